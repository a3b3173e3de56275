"""Both transports against Azurite: our lean one on sockets, and requests when proxies are configured."""

import os

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.pipeline.transport import RequestsTransport

from azstoragetorch._client import _pipeline
from azstoragetorch._client._transport import WireTransport
from azstoragetorch.io import BlobIO
from tests.conftest import Container


@pytest.mark.parametrize("proxy_settings", [False, True], ids=["wire", "requests-with-proxy-settings"])
def test_round_trip_on_each_transport(
    container: Container,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    proxy_settings: bool,
) -> None:
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())  # new pools under this environment
    for name in list(os.environ):
        if name.lower().endswith("_proxy"):
            monkeypatch.delenv(name)
    if proxy_settings:
        # A proxy that does not exist, bypassed for loopback: requests must honour NO_PROXY.
        monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
        monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    url = container.blob_url("transport.pt")
    tensors = {"weight": torch.randn(300, 300)}
    with BlobIO(url, "wb", credential=account_credential, block_size=64 * 1024) as f:
        torch.save(tensors, f)
    with BlobIO(url, "rb", credential=account_credential, block_size=64 * 1024) as f:
        assert torch.equal(torch.load(f)["weight"], tensors["weight"])
    transport = _pipeline.transport_for(url.split("/devstoreaccount1")[0])
    assert isinstance(transport, RequestsTransport if proxy_settings else WireTransport)
