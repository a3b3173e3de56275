"""Reads over TLS that break off mid-body, through :class:`FaultProxy` speaking TLS to an HTTPS Azurite.

Azure is always HTTPS, and a TLS stream fails in ways plain HTTP cannot: a damaged record raises
``ssl.SSLError`` from the middle of a body. The body is read straight from the http.client response
under urllib3's (its private ``_fp``) so that it lands in the caller's memory without a copy; these
tests also guard that this fast path is still taken over TLS and keeps resuming broken bodies.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.storage.blob import BlobServiceClient, ContainerClient

from azstoragetorch._client import AzStorageTorchBlobClient, _blob_client
from azstoragetorch.datasets import BlobDataset
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite
from tests.e2e.support.fault_proxy import Action, FaultProxy, Garble, Reset, SeenRequest

KiB = 1024
BLOCK = 64 * KiB


@pytest.fixture
def tls_container(https_azurite: Azurite) -> Iterator[ContainerClient]:
    service = BlobServiceClient(
        https_azurite.account_url, credential=https_azurite.credential, connection_verify=https_azurite.ca_bundle
    )
    container = service.create_container(f"tls-{uuid.uuid4().hex[:16]}")
    yield container
    container.delete_container()


@pytest.fixture
def tls_proxy(https_azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", https_azurite.ca_bundle)  # read when a connection pool is made
    key = os.path.join(os.path.dirname(https_azurite.ca_bundle), "key.pem")  # written next to the certificate
    with FaultProxy(https_azurite.port, tls=(https_azurite.ca_bundle, key)) as proxy:
        yield proxy


def gets(proxy: FaultProxy) -> list[SeenRequest]:
    return [seen for seen in proxy.requests if seen.operation == "GetBlob"]


def upload(container: ContainerClient, azurite: Azurite, proxy: FaultProxy, data: bytes) -> str:
    container.upload_blob("blob", data)
    return proxy.url(azurite.blob_url(container.container_name, "blob"))


FAULTS = [
    pytest.param(Garble(after_body_bytes=5000), id="damaged-record"),
    pytest.param(Reset(after_body_bytes=5000, hard=True), id="rst"),
    pytest.param(Reset(after_body_bytes=5000, hard=False), id="eof-without-close-notify"),
]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_tls_body_that_breaks_off_is_resumed(
    https_azurite: Azurite, tls_container: ContainerClient, tls_proxy: FaultProxy, fault: Action
) -> None:
    data = os.urandom(2 * BLOCK)
    url = upload(tls_container, https_azurite, tls_proxy, data)
    injected = tls_proxy.add_fault(lambda seen: seen.operation == "GetBlob", fault)
    with BlobIO(url, "rb", credential=https_azurite.credential, block_size=BLOCK, max_concurrency=1) as f:
        assert f.read() == data
    first, retry = gets(tls_proxy)[:2]
    assert injected.hits == 1 and first.byte_range == (0, BLOCK - 1)
    # The rest of the same range, from at most the bytes that arrived (a piece being read is lost).
    assert retry.byte_range is not None and retry.byte_range[0] <= 5000 and retry.byte_range[1] == BLOCK - 1


@pytest.mark.parametrize("fault", FAULTS)
def test_a_dataset_sample_whose_tls_body_breaks_off_is_fetched_again(
    https_azurite: Azurite, tls_container: ContainerClient, tls_proxy: FaultProxy, fault: Action
) -> None:
    data = os.urandom(BLOCK)
    url = upload(tls_container, https_azurite, tls_proxy, data)
    injected = tls_proxy.add_fault(lambda seen: seen.operation == "GetBlob", fault)
    dataset = BlobDataset.from_blob_urls(url, credential=https_azurite.credential)
    assert dataset[0]["data"] == data
    assert injected.hits == 1 and len(gets(tls_proxy)) == 2


def test_a_tls_body_that_keeps_breaking_off_fails_as_a_response_error(
    https_azurite: Azurite, tls_container: ContainerClient, tls_proxy: FaultProxy, no_backoff: None
) -> None:
    url = upload(tls_container, https_azurite, tls_proxy, os.urandom(2 * BLOCK))
    tls_proxy.add_fault(lambda seen: seen.operation == "GetBlob", Garble(after_body_bytes=100), times=None)
    with pytest.raises(ServiceResponseError, match="failed after"):
        BlobIO(url, "rb", credential=https_azurite.credential, block_size=BLOCK)
    # The open's read is one ranged read like any other: its first request and its retries together
    # make BODY_READ_ATTEMPTS attempts.
    assert len(gets(tls_proxy)) == _blob_client.BODY_READ_ATTEMPTS


def test_tls_bodies_are_read_without_a_copy(
    https_azurite: Azurite, tls_container: ContainerClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The fast path reads from the http.client response under urllib3's; if urllib3 ever hides it,
    # reads would still work through the copying fallback, only slower: this test says so instead.
    url = https_azurite.blob_url(tls_container.container_name, "blob")
    tls_container.upload_blob("blob", b"x" * 1000)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", https_azurite.ca_bundle)
    client = AzStorageTorchBlobClient.from_url(url, https_azurite.credential)
    response = client._send_range_get(0, 1000, None)
    assert response is not None
    _raw, body = _blob_client._raw_and_body(response)
    assert body is not None and callable(body.readinto)
    assert _blob_client._read_body_into(response, memoryview(bytearray(1000))) == (1000, None)
