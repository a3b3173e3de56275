import base64
import time
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AzureNamedKeyCredential, AzureSasCredential
from azure.core.pipeline.policies import AzureSasCredentialPolicy, BearerTokenCredentialPolicy

from azstoragetorch._client import AzStorageTorchBlobClient, _credentials
from azstoragetorch._client._credentials import SharedKeyPolicy, _string_to_sign, auth_policy_for, validate_credential
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

KEY = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class FakeTokenCredential:
    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        return AccessToken("token", int(time.time()) + 3600)


@pytest.mark.parametrize("credential", [True, "account-key", 42, object(), {"account_name": "a"}])
def test_unsupported_credentials_raise_type_error_listing_accepted_types(credential: object) -> None:
    with pytest.raises(TypeError) as info:
        validate_credential(credential)
    message = str(info.value)
    for accepted in ("AzureSasCredential", "AzureNamedKeyCredential", "DefaultAzureCredential", "False"):
        assert accepted in message
    assert KEY not in message


def test_string_credential_gets_a_hint() -> None:
    with pytest.raises(TypeError, match="AzureNamedKeyCredential\\(account_name, key\\)"):
        validate_credential("some-key")


def test_policy_for_each_credential() -> None:
    azure = "myaccount.blob.core.windows.net"
    assert auth_policy_for(False, url_has_sas=False, host=azure) is None
    assert isinstance(
        auth_policy_for(AzureSasCredential("sv=1&sig=x"), url_has_sas=False, host=azure), AzureSasCredentialPolicy
    )
    assert isinstance(
        auth_policy_for(AzureNamedKeyCredential("a", KEY), url_has_sas=False, host=azure), SharedKeyPolicy
    )
    assert isinstance(
        auth_policy_for(FakeTokenCredential(), url_has_sas=False, host=azure), BearerTokenCredentialPolicy
    )


@pytest.mark.parametrize(
    "credential", [None, AzureNamedKeyCredential("a", KEY), FakeTokenCredential(), AzureSasCredential("sig=x")]
)
def test_sas_in_url_wins_over_any_credential(credential: object) -> None:
    assert auth_policy_for(credential, url_has_sas=True, host="a.blob.core.windows.net") is None  # type: ignore[arg-type]


def test_sas_in_url_still_rejects_a_bad_credential_type() -> None:
    with pytest.raises(TypeError):
        auth_policy_for("key", url_has_sas=True, host="h")  # type: ignore[arg-type]


def test_default_credential_is_created_lazily_once_per_process(monkeypatch: pytest.MonkeyPatch) -> None:
    created: list[object] = []

    class CountingCredential(FakeTokenCredential):
        def __init__(self) -> None:
            created.append(self)

    import azure.identity

    monkeypatch.setattr(azure.identity, "DefaultAzureCredential", CountingCredential)
    monkeypatch.setattr(_credentials, "shared_default_credential", _credentials._SharedDefaultCredential())
    assert created == []
    first = auth_policy_for(None, url_has_sas=False, host="a.blob.core.windows.net")
    second = auth_policy_for(None, url_has_sas=False, host="b.blob.core.windows.net")
    assert isinstance(first, BearerTokenCredentialPolicy) and isinstance(second, BearerTokenCredentialPolicy)
    assert len(created) == 1
    _credentials.shared_default_credential.forget()
    auth_policy_for(None, url_has_sas=False, host="a.blob.core.windows.net")
    assert len(created) == 2


def test_shared_key_policy_repr_hides_the_key() -> None:
    policy = SharedKeyPolicy(AzureNamedKeyCredential("myaccount", KEY))
    assert KEY not in repr(policy) and "myaccount" in repr(policy)


def test_string_to_sign_follows_the_shared_key_layout() -> None:
    headers = {
        "x-ms-version": "2021-08-06",
        "x-ms-date": "Mon, 01 Jan 2024 00:00:00 GMT",
        "x-ms-range": "bytes=0-99",
        "If-Match": '"0x1"',
        "Content-Length": "0",
    }
    url = "http://127.0.0.1:10000/devstoreaccount1/ckpt/a%20b.pt?comp=block&blockid=QUJD"
    expected = "\n".join(
        [
            "GET",
            "",  # Content-Encoding
            "",  # Content-Language
            "",  # Content-Length (empty for 0)
            "",  # Content-MD5
            "",  # Content-Type
            "",  # Date
            "",  # If-Modified-Since
            '"0x1"',  # If-Match
            "",  # If-None-Match
            "",  # If-Unmodified-Since
            "",  # Range
            "x-ms-date:Mon, 01 Jan 2024 00:00:00 GMT",
            "x-ms-range:bytes=0-99",
            "x-ms-version:2021-08-06",
            "/devstoreaccount1/devstoreaccount1/ckpt/a%20b.pt\nblockid:QUJD\ncomp:block",
        ]
    )
    assert _string_to_sign("GET", url, headers, "devstoreaccount1") == expected


# -- no secret over plain http, except to this machine ------------------------------------------------

URL_SAS = "sv=2021-08-06&sr=b&sp=rw&se=2030-01-01T00%3A00%3A00Z&sig=c2VjcmV0"


@pytest.mark.parametrize(
    ("url", "credential", "secret"),
    [
        (f"http://acct.blob.core.windows.net/c/b?{URL_SAS}", None, "SAS"),
        ("http://acct.blob.core.windows.net/c/b", AzureSasCredential(URL_SAS), "SAS"),
        ("http://acct.blob.core.windows.net/c/b", AzureNamedKeyCredential("acct", KEY), "account key"),
        ("http://10.0.0.5:10000/devstoreaccount1/c/b", AzureNamedKeyCredential("devstoreaccount1", KEY), "account key"),
        ("http://acct.blob.core.windows.net/c/b", FakeTokenCredential(), "token"),
        ("http://acct.blob.core.windows.net/c/b", None, "token"),
    ],
)
def test_secrets_are_never_sent_over_plain_http(url: str, credential: Any, secret: str) -> None:
    # Refused when the client is made, before any request (a writer sends none until it uploads).
    with pytest.raises(ValueError, match=rf"{secret}.*plain http://") as caught:
        BlobIO(url, "wb", credential=credential)
    assert "c2VjcmV0" not in str(caught.value) and KEY not in str(caught.value)
    assert "https://" in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://acct.blob.core.windows.net/c/b",
        "http://127.0.0.1:10000/devstoreaccount1/c/b",
        "http://localhost:10000/devstoreaccount1/c/b",
        "http://[::1]:10000/devstoreaccount1/c/b",
    ],
)
@pytest.mark.parametrize(
    "credential", [AzureSasCredential(URL_SAS), AzureNamedKeyCredential("acct", KEY), FakeTokenCredential()]
)
def test_secrets_may_go_over_https_or_to_this_machine(url: str, credential: Any) -> None:
    AzStorageTorchBlobClient.from_url(url, credential)
    AzStorageTorchBlobClient.from_url(f"{url}?{URL_SAS}", None)


def test_anonymous_requests_and_the_published_development_key_may_go_over_plain_http() -> None:
    AzStorageTorchBlobClient.from_url("http://acct.blob.core.windows.net/c/b", False)
    # Azurite's account key is published; a Docker service called "azurite" is not on loopback.
    AzStorageTorchBlobClient.from_url(
        "http://azurite:10000/devstoreaccount1/c/b", AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    )
