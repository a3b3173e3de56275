import datetime
import gc
import os
import threading
import urllib.parse
import weakref

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline.transport import HttpRequest, RequestsTransport

from azstoragetorch import datasets
from azstoragetorch._client import AzStorageTorchBlobClient, _pipeline
from azstoragetorch._client._transport import WireTransport


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.delenv(name)


def test_without_proxies_requests_go_straight_to_the_socket(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/custom-ca.pem")
    transport = _pipeline.transport_for("https://a.blob.core.windows.net")
    assert isinstance(transport, WireTransport)
    assert transport.ca_bundle == "/etc/custom-ca.pem"


def test_with_a_proxy_requests_handles_the_environment(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    transport = _pipeline.transport_for("https://a.blob.core.windows.net")
    assert isinstance(transport, RequestsTransport)
    assert transport.session.trust_env is True


def test_one_transport_per_origin_and_a_shared_pipeline_per_credential(fresh_state: None) -> None:
    first = _pipeline.transport_for("https://a.blob.core.windows.net")
    assert _pipeline.transport_for("https://a.blob.core.windows.net") is first
    assert _pipeline.transport_for("https://b.blob.core.windows.net") is not first
    anonymous = _pipeline.pipeline_for("https://a.blob.core.windows.net", False, url_has_sas=False)
    assert _pipeline.pipeline_for("https://a.blob.core.windows.net", False, url_has_sas=False) is anonymous
    assert _pipeline.pipeline_for("https://a.blob.core.windows.net", False, url_has_sas=True) is not anonymous


class FakeErrorResponse:
    """Just enough of an azure-core response for raise_for_status."""

    def __init__(self, status: int, error_code: str | None, body: bytes = b"", url: str | None = None) -> None:
        self.status_code = status
        self.reason = "Reason"
        self.headers = {"x-ms-error-code": error_code} if error_code else {}
        self.request = HttpRequest("GET", url) if url else None
        self._body = body

    def body(self) -> bytes:
        return self._body


@pytest.mark.parametrize(
    ("status", "error_code", "expected"),
    [
        (409, "BlobAlreadyExists", ResourceExistsError),
        (409, "ContainerAlreadyExists", ResourceExistsError),
        (409, "SnapshotsPresent", ResourceExistsError),  # the blob's snapshots exist
        (409, None, ResourceExistsError),  # no code to go by: the status decides
        (409, "BlobArchived", HttpResponseError),
        (409, "LeaseIdMissing", HttpResponseError),
        (409, "LeaseAlreadyPresent", HttpResponseError),
        (409, "PendingCopyOperation", HttpResponseError),
        (412, "ConditionNotMet", ResourceModifiedError),
        (412, None, ResourceModifiedError),
        (412, "LeaseIdMissing", HttpResponseError),
        (412, "LeaseIdMismatchWithBlobOperation", HttpResponseError),
        (404, "BlobNotFound", ResourceNotFoundError),
        (404, "ContainerNotFound", ResourceNotFoundError),
        (403, "AuthorizationPermissionMismatch", ClientAuthenticationError),
        (403, "AuthenticationFailed", ClientAuthenticationError),
        (400, "InvalidBlockList", HttpResponseError),
        (503, "ServerBusy", HttpResponseError),
    ],
)
def test_the_error_class_follows_the_service_error_code(
    status: int, error_code: str | None, expected: type[HttpResponseError]
) -> None:
    response = FakeErrorResponse(status, error_code)
    with pytest.raises(HttpResponseError) as caught:
        _pipeline.raise_for_status(response, action="write", display_url="https://a.blob.core.windows.net/c/b")  # type: ignore[arg-type]
    assert type(caught.value) is expected
    assert caught.value.status_code == status and caught.value.error_code == error_code  # type: ignore[attr-defined]


def test_the_error_code_is_read_from_the_body_when_the_header_is_missing() -> None:
    body = b'<?xml version="1.0"?><Error><Code>BlobArchived</Code><Message>m</Message></Error>'
    with pytest.raises(HttpResponseError) as caught:
        _pipeline.raise_for_status(FakeErrorResponse(409, None, body), action="read", display_url="u")  # type: ignore[arg-type]
    assert type(caught.value) is HttpResponseError and caught.value.error_code == "BlobArchived"  # type: ignore[attr-defined]


def test_the_pipeline_cache_does_not_keep_every_credential_alive(fresh_state: None) -> None:
    # A credential made per sample or per save (an anti-pattern, but a common one) must not pin
    # memory for the life of the process: 3,000 of them once added 55 MB.
    first = AzureNamedKeyCredential("acct", "a2V5")
    first_alive = weakref.ref(first)
    client = AzStorageTorchBlobClient.from_url("https://acct.blob.core.windows.net/c/b", first)
    client._get_pipeline()
    del client, first
    for _ in range(3 * _pipeline.MAX_PIPELINES):
        credential = AzureNamedKeyCredential("acct", "a2V5")
        AzStorageTorchBlobClient.from_url("https://acct.blob.core.windows.net/c/b", credential)._get_pipeline()
    gc.collect()
    assert first_alive() is None
    assert len(_pipeline._state.pipelines) <= _pipeline.MAX_PIPELINES


def test_a_credential_in_use_keeps_its_pipeline(fresh_state: None) -> None:
    credential = AzureNamedKeyCredential("acct", "a2V5")
    pipeline = _pipeline.pipeline_for("https://acct.blob.core.windows.net", credential, url_has_sas=False)
    for _ in range(_pipeline.MAX_PIPELINES - 1):
        _pipeline.pipeline_for(
            "https://acct.blob.core.windows.net", AzureNamedKeyCredential("a", "a2V5"), url_has_sas=False
        )
        # Used again in between: the least recently used entries are dropped first.
        assert _pipeline.pipeline_for("https://acct.blob.core.windows.net", credential, url_has_sas=False) is pipeline


def test_the_connection_pool_holds_a_connection_for_every_thread_that_may_use_one(fresh_state: None) -> None:
    transport = _pipeline.transport_for("https://a.blob.core.windows.net")
    assert isinstance(transport, WireTransport)
    assert transport._maxsize >= _pipeline.MAX_THREADS + datasets.MAX_SAMPLE_THREADS


def sas_url(**times: datetime.datetime) -> str:
    fields = "&".join(
        f"{name}={urllib.parse.quote(value.strftime('%Y-%m-%dT%H:%M:%SZ'))}" for name, value in times.items()
    )
    return f"https://a.blob.core.windows.net/c/b?sv=2021-08-06&sr=b&sp=r&{fields}&sig=c2VjcmV0"


NOW = datetime.datetime.now(datetime.timezone.utc)
HOUR = datetime.timedelta(hours=1)


@pytest.mark.parametrize("code", ["AuthenticationFailed", "AuthorizationFailure"])
def test_an_expired_sas_gets_a_hint_that_says_so(code: str) -> None:
    expired = FakeErrorResponse(403, code, url=sas_url(st=NOW - 2 * HOUR, se=NOW - HOUR))
    with pytest.raises(ClientAuthenticationError, match=r"SAS token expired at \d{4}-\d\d-\d\dT") as caught:
        _pipeline.raise_for_status(expired, action="read", display_url="u")  # type: ignore[arg-type]
    assert "c2VjcmV0" not in str(caught.value)
    not_yet = FakeErrorResponse(403, code, url=sas_url(st=NOW + HOUR, se=NOW + 2 * HOUR))
    with pytest.raises(ClientAuthenticationError, match=r"SAS token is not valid before .*clock"):
        _pipeline.raise_for_status(not_yet, action="read", display_url="u")  # type: ignore[arg-type]


def test_the_services_detail_about_the_sas_time_frame_is_passed_on() -> None:
    # Azure says why, even when the local clock disagrees with the service's.
    detail = "Signature not valid in the specified time frame: Start [Mon, 01 Jan 2024 00:00:00 GMT] - Expiry [Mon, 01 Jan 2024 01:00:00 GMT] - Current [Mon, 01 Jan 2024 02:00:00 GMT]"
    body = f"<Error><Code>AuthenticationFailed</Code><AuthenticationErrorDetail>{detail}</AuthenticationErrorDetail></Error>"
    response = FakeErrorResponse(403, "AuthenticationFailed", body.encode(), url=sas_url(se=NOW + HOUR))
    with pytest.raises(
        ClientAuthenticationError, match=r"expired or is not yet valid.*Signature not valid in the specified time frame"
    ):
        _pipeline.raise_for_status(response, action="read", display_url="u")  # type: ignore[arg-type]


def test_other_authentication_details_are_not_passed_on() -> None:
    # Other details can quote the signature that was sent; only the time frame is shown.
    body = b"<Error><Code>AuthenticationFailed</Code><AuthenticationErrorDetail>The MAC signature found in the HTTP request 'c2VjcmV0' is not the same</AuthenticationErrorDetail></Error>"
    response = FakeErrorResponse(403, "AuthenticationFailed", body, url=sas_url(se=NOW + HOUR))
    with pytest.raises(ClientAuthenticationError) as caught:
        _pipeline.raise_for_status(response, action="read", display_url="u")  # type: ignore[arg-type]
    assert "c2VjcmV0" not in str(caught.value) and "MAC signature" not in str(caught.value)


def test_once_the_transfer_threads_refuse_work_a_transfer_runs_on_a_thread_of_its_own(fresh_state: None) -> None:
    # concurrent.futures refuses new work in every pool once the main thread has ended; a save
    # still under way then (dcp.async_save's) must go on, not fail half done.
    assert not _pipeline.interpreter_exiting()
    _pipeline.executor().shutdown()  # refuses work as every pool does at exit
    assert _pipeline.interpreter_exiting()
    ran_on = _pipeline.submit(lambda: threading.current_thread().name).result(timeout=10)
    assert ran_on == "azstoragetorch-exiting"
    failed = _pipeline.submit(lambda: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        failed.result(timeout=10)
