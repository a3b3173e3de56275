import os

import pytest
from azure.core.pipeline.transport import RequestsTransport

from azstoragetorch._client import _pipeline
from azstoragetorch._client._transport import Urllib3Transport


@pytest.fixture
def fresh_state(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
            monkeypatch.delenv(name)


def test_without_proxies_requests_go_straight_to_urllib3(fresh_state: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/custom-ca.pem")
    transport = _pipeline.transport_for("https://a.blob.core.windows.net")
    assert isinstance(transport, Urllib3Transport)
    assert transport._pool.connection_pool_kw["ca_certs"] == "/etc/custom-ca.pem"


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
