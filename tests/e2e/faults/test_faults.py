"""Faults injected by :class:`FaultProxy` between the package and a real Azurite, and what the user sees.

The first half checks the transport's own faults, one failure at a time, through ``BlobIO``: dropped
connections, failed uploads, bad echoes, stalls. The user must see correct bytes or a clear error,
never a hang, wrong data or a half-committed blob.

The second half is every fault on every path: BlobIO read and write, both datasets with DataLoader
workers, the Lightning plugin, and the DCP writer and reader. A transient fault (the first matching
request, or the N-th) must be survived: reads return exactly the right bytes, writes commit exactly
the right content, datasets yield every sample once. A persistent fault must end in a clear error
after bounded attempts: nothing committed, the previous content intact, no loadable partial
checkpoint. Every case also checks that its fault really hit a request, so that none can pass
without being tested. pytest-timeout turns a hang into a failure.
"""

from __future__ import annotations

import dataclasses
import http.client
import os
import socket
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils.data import DataLoader

from azstoragetorch._client import _blob_client, _pipeline
from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.exceptions import BlobModifiedDuringReadError, ClientRequestIdMismatchError, FatalBlobIOWriteError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import (
    Action,
    Corrupt,
    Delay,
    Fault,
    FaultProxy,
    Reset,
    ResetRequest,
    Respond,
    RewriteHeader,
    SeenRequest,
)

KiB = 1024
BLOCK = 16 * KiB


def gets(proxy: FaultProxy) -> list[SeenRequest]:
    return [seen for seen in proxy.requests if seen.operation == "GetBlob"]


def nth_block(n: int) -> Callable[[SeenRequest], bool]:
    """Matches the Put Blocks (retries included) of the ``n``-th distinct block ID to arrive, 0-based."""
    block_ids: list[str] = []

    def match(seen: SeenRequest) -> bool:
        if seen.operation != "PutBlock":
            return False
        if seen.query["blockid"] not in block_ids:
            block_ids.append(seen.query["blockid"])
        return block_ids.index(seen.query["blockid"]) == n

    return match


def exception_chain(error: BaseException) -> list[BaseException]:
    """``error`` and everything reachable through ``__cause__`` and ``__context__``."""
    found: list[BaseException] = []
    pending: list[BaseException | None] = [error]
    while pending:
        current = pending.pop()
        if current is not None and all(current is not seen for seen in found):
            found.append(current)
            pending += [current.__cause__, current.__context__]
    return found


# -- the proxy itself -------------------------------------------------------------------------


def test_proxy_forwards_shared_key_requests_and_keeps_connections_alive(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # Shared Key signs the path, not the host or port: a request signed for the proxy is valid at Azurite.
    data = os.urandom(5 * BLOCK + 7)
    url = proxy.url(container.blob_url("through-proxy"))
    with BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
        f.write(data)
    assert container.download("through-proxy") == data
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
        assert f.read() == data
    assert proxy.count("PutBlock") == 6 and proxy.count("PutBlockList") == 1 and len(gets(proxy)) == 6
    assert proxy.connections_accepted < len(proxy.requests)


def test_proxy_stop_interrupts_a_stalled_response_and_joins_its_threads(azurite: Azurite, container: Container) -> None:
    container.upload("blob", b"content")
    proxy = FaultProxy(azurite.port).start()
    proxy.add_fault(lambda seen: True, Delay(60))
    client = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    client.request("GET", urllib.parse.urlsplit(container.blob_url("blob")).path)
    while not proxy.requests:
        time.sleep(0.01)
    started = time.monotonic()
    proxy.stop()
    assert time.monotonic() - started < 15  # far below the 60 s stall: interrupted, not waited out
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("fault-proxy")]
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        client.getresponse()  # the stalled response was cut, not left hanging
    client.close()


def test_proxy_stop_does_not_forward_a_request_whose_body_is_still_arriving(
    azurite: Azurite, container: Container
) -> None:
    # What made teardown fail under load ("thread fault-proxy-conn did not stop"): a client still
    # sending an upload when the test ends. stop() shuts the client socket, the handler's body read
    # returns short, and forwarding that short body under the full Content-Length left the handler
    # waiting for the emulator, which waited for the rest of the body.
    proxy = FaultProxy(azurite.port).start()
    path = urllib.parse.urlsplit(container.blob_url("upload")).path
    sas = container.container_sas(write=True, create=True)
    client = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    head = f"PUT {path}?{sas} HTTP/1.1\r\nHost: x\r\nx-ms-blob-type: BlockBlob\r\nContent-Length: 1000000\r\n\r\n"
    client.sendall(head.encode() + b"x" * 1000)
    while not proxy.requests:
        time.sleep(0.01)
    proxy.stop()  # raised "did not stop": the handler waited up to 30 s for the emulator
    assert not [thread for thread in threading.enumerate() if thread.name.startswith("fault-proxy")]
    client.close()
    assert not container.exists("upload")


# -- reads --------------------------------------------------------------------------------------


@pytest.mark.parametrize("hard", [True, False], ids=["rst", "fin"])
def test_reset_mid_body_is_retried_transparently(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, hard: bool
) -> None:
    data = os.urandom(4 * BLOCK)
    url = proxy.url(container.upload("blob", data))
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", Reset(after_body_bytes=5000, hard=hard))
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
        assert f.read() == data
    first, retry = gets(proxy)[:2]
    assert first.byte_range == (0, BLOCK - 1)
    assert retry.byte_range is not None and retry.byte_range[1] == BLOCK - 1  # the rest of the same range


@pytest.mark.parametrize("hard", [True, False], ids=["rst", "fin"])
def test_reset_mid_body_resumes_after_the_bytes_received(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, hard: bool
) -> None:
    # The body is read in pieces of _BODY_PIECE_BYTES: a clean close (FIN) keeps every byte that
    # arrived, a reset (RST) loses at most the piece being read when it hit.
    piece = _blob_client._BODY_PIECE_BYTES
    block = 4 * piece
    data = os.urandom(2 * block)
    url = proxy.url(container.upload("blob", data))
    received = 2 * piece + 5000
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", Reset(after_body_bytes=received, hard=hard))
    with BlobIO(url, "rb", credential=account_credential, block_size=block, max_concurrency=2) as f:
        assert f.read() == data
    resumed_at = received if not hard else 2 * piece
    assert gets(proxy)[1].byte_range == (resumed_at, block - 1)


def test_permanent_reset_mid_body_raises_within_bounded_time(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = os.urandom(4 * BLOCK)
    url = proxy.url(container.upload("blob", data))
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
        assert f.read(100) == data[:100]
        proxy.add_fault(lambda seen: seen.operation == "GetBlob", Reset(after_body_bytes=1000), times=None)
        started = time.monotonic()
        with pytest.raises(ServiceResponseError, match="failed after") as caught:
            f.read()  # the first chunk is cached; the next ones cannot be fetched
        assert time.monotonic() - started < 30  # bounded (real back-off is ~4 s), never a hang
        assert "/blob" in str(caught.value)
        monkeypatch.setattr(time, "sleep", lambda seconds: None)
        with pytest.raises(ServiceResponseError):
            f.read()  # still failing: an error again, never bytes from a broken download
    assert proxy.requests[-1].operation == "GetBlob"
    assert sum(1 for seen in gets(proxy) if seen.byte_range and seen.byte_range[0] == BLOCK) >= 2


def test_permanent_drop_before_response_is_not_retried_by_two_layers(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_backoff: None
) -> None:
    url = proxy.url(container.upload("blob", os.urandom(BLOCK)))
    # Only the pipeline's retry policy retries a request that got no response; the body-read retries
    # must not multiply it (they once did: 4 x 5 = 20 requests and ~15-25 s of back-off).
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", Reset(after_body_bytes=None), times=None)
    with pytest.raises(ServiceResponseError):
        BlobIO(url, "rb", credential=account_credential, block_size=BLOCK)
    assert 2 <= len(gets(proxy)) <= 6


def test_stall_shorter_than_the_read_timeout_succeeds(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # BlobIO exposes no timeout (the transport's read timeout is a fixed 60 s), so only a stall
    # below it can be tested quickly: it must be waited out, not treated as a failure.
    data = os.urandom(2 * BLOCK)
    url = proxy.url(container.upload("blob", data))
    stall = proxy.add_fault(lambda seen: seen.operation == "GetBlob", Delay(1.0))
    started = time.monotonic()
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK) as f:
        assert f.read() == data
    assert time.monotonic() - started >= 1.0 and stall.hits == 1
    assert [seen.byte_range for seen in gets(proxy)] == [(0, BLOCK - 1), (BLOCK, 2 * BLOCK - 1)]


def test_rewritten_client_request_id_raises_mismatch(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = proxy.url(container.upload("blob", b"content"))
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", RewriteHeader("x-ms-client-request-id", "someone-else"))
    with pytest.raises(ClientRequestIdMismatchError) as caught:
        BlobIO(url, "rb", credential=account_credential)
    assert caught.value.response_client_id == "someone-else"
    assert caught.value.request_client_id == gets(proxy)[0].headers["x-ms-client-request-id"]


def test_error_without_client_request_id_echo_is_the_normal_error(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    strip = proxy.add_fault(lambda seen: seen.operation == "GetBlob", RewriteHeader("x-ms-client-request-id", None))
    with pytest.raises(ResourceNotFoundError) as caught:
        BlobIO(proxy.url(container.blob_url("missing")), "rb", credential=account_credential)
    assert strip.hits == 1 and caught.value.error_code == "BlobNotFound"


def test_blob_overwritten_mid_read_raises_and_never_mixes(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    old, new = os.urandom(64 * BLOCK), os.urandom(64 * BLOCK)
    url = container.upload("blob", old)
    received = bytearray()
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
        received += f.read(1000)
        container.upload("blob", new)
        with pytest.raises(BlobModifiedDuringReadError):
            while piece := f.read(10 * KiB):
                received += piece
    assert len(received) < len(old) and received == old[: len(received)]


# -- writes -------------------------------------------------------------------------------------


def test_one_failed_put_block_is_retried(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    data = os.urandom(6 * BLOCK + 3)
    failure = proxy.add_fault(nth_block(2), Respond(500))
    with BlobIO(proxy.url(container.blob_url("out")), "wb", credential=account_credential, block_size=BLOCK) as f:
        f.write(data)
    assert failure.hits == 1 and proxy.count("PutBlock") == 8 and proxy.count("PutBlockList") == 1
    assert container.download("out") == data


@pytest.mark.parametrize("existed", [True, False], ids=["overwrite", "new-blob"])
def test_permanent_put_block_failure_commits_nothing(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    no_backoff: None,
    existed: bool,
) -> None:
    old = os.urandom(3 * BLOCK)
    if existed:
        container.upload("out", old)
    proxy.add_fault(nth_block(2), Respond(500), times=None)
    url = proxy.url(container.blob_url("out"))
    f = BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=2)
    with pytest.raises(FatalBlobIOWriteError) as caught, f:  # from write, flush or close: whichever notices first
        for _ in range(10):
            f.write(os.urandom(BLOCK))
        f.flush()
    assert isinstance(caught.value.underlying_exception, HttpResponseError)
    assert caught.value.underlying_exception.status_code == 500
    assert proxy.count("PutBlockList") == 0 and proxy.count("PutBlob") == 0
    if existed:
        assert container.download("out") == old
    else:
        assert not container.exists("out")


def test_a_failure_noticed_inside_torch_save_is_reported_as_the_upload_failure(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_backoff: None
) -> None:
    # With one block in flight, the third block's write waits for the first and finds it failed,
    # in the middle of torch.save writing the tensor. torch then fails its own clean-up of the
    # half-written archive with a RuntimeError; the user must see the upload failure instead.
    container.upload("checkpoint.pt", b"previous checkpoint")
    proxy.add_fault(lambda seen: seen.operation == "PutBlock", Respond(503, "ServerBusy"), times=None)
    url = proxy.url(container.blob_url("checkpoint.pt"))
    with (
        pytest.raises(FatalBlobIOWriteError, match="ServerBusy") as caught,
        BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=1) as f,
    ):
        torch.save({"weights": torch.randn(20 * BLOCK // 4)}, f)
    assert isinstance(caught.value.__cause__, HttpResponseError) and caught.value.__cause__.status_code == 503
    assert isinstance(caught.value.__context__, RuntimeError)  # torch's clean-up error, kept but not shown first
    assert proxy.count("PutBlockList") == 0 and proxy.count("PutBlob") == 0
    assert container.download("checkpoint.pt") == b"previous checkpoint"


def test_an_error_of_the_callers_own_after_an_upload_failure_is_not_replaced(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_backoff: None
) -> None:
    proxy.add_fault(lambda seen: seen.operation == "PutBlock", Respond(503, "ServerBusy"), times=None)
    url = proxy.url(container.blob_url("checkpoint.pt"))
    with (
        pytest.raises(KeyError),
        BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=1) as f,
    ):
        with pytest.raises(FatalBlobIOWriteError):
            f.write(os.urandom(4 * BLOCK))
        raise KeyError("unrelated")  # not raised while handling the upload failure
    assert not container.exists("checkpoint.pt")


@pytest.mark.parametrize(("operation", "size"), [("PutBlockList", 3 * BLOCK + 1), ("PutBlob", BLOCK - 1)])
def test_permanent_commit_failure_keeps_the_old_content(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    no_backoff: None,
    operation: str,
    size: int,
) -> None:
    old = os.urandom(2 * BLOCK)
    container.upload("out", old)
    proxy.add_fault(lambda seen: seen.operation == operation, Respond(503, "ServerBusy"), times=None)
    f = BlobIO(proxy.url(container.blob_url("out")), "wb", credential=account_credential, block_size=BLOCK)
    f.write(os.urandom(size))
    with pytest.raises(FatalBlobIOWriteError, match="503"):
        f.close()
    assert f.closed and proxy.count(operation) > 1  # retried by the SDK policy first
    assert container.download("out") == old


@pytest.mark.parametrize("writer", ["flush", "torch.save"])
def test_small_blob_is_a_single_put_blob(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, writer: str
) -> None:
    url = proxy.url(container.blob_url("small"))
    with BlobIO(url, "wb", credential=account_credential, block_size=64 * KiB) as f:
        if writer == "flush":
            f.write(b"a" * 1000)
            f.flush()
            f.write(b"b" * 1000)
            f.flush()
        else:
            torch.save({"weights": torch.arange(100)}, f)
    assert [seen.operation for seen in proxy.requests] == ["PutBlob"]
    written = container.download("small")
    if writer == "flush":
        assert written == b"a" * 1000 + b"b" * 1000
    else:
        with BlobIO(url, "rb", credential=account_credential) as reader:
            assert torch.equal(torch.load(reader)["weights"], torch.arange(100))
        assert len(written) < 64 * KiB


def test_large_blob_is_put_blocks_and_one_put_block_list(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    data = os.urandom(5 * BLOCK + 1)
    with BlobIO(proxy.url(container.blob_url("large")), "wb", credential=account_credential, block_size=BLOCK) as f:
        f.write(data)
    assert proxy.count("PutBlock") == 6 and proxy.count("PutBlockList") == 1 and proxy.count("PutBlob") == 0
    assert proxy.requests[-1].operation == "PutBlockList"
    assert container.download("large") == data


# -- SAS secrecy --------------------------------------------------------------------------------


def assert_sas_not_in(error: BaseException, sas: str) -> None:
    signature = urllib.parse.parse_qs(sas)["sig"][0]
    forms = {signature, urllib.parse.quote(signature, safe=""), urllib.parse.quote(signature)}
    for link in exception_chain(error):
        for text in (str(link), repr(link)):
            assert not any(form in text for form in forms), f"SAS signature in {type(link).__name__}: {text}"


@pytest.mark.parametrize(
    "action",
    [Reset(after_body_bytes=100), Reset(after_body_bytes=None), Respond(500)],
    ids=["mid-body", "no-response", "500"],
)
def test_sas_stays_out_of_errors_when_gets_fail(
    proxy: FaultProxy, container: Container, no_backoff: None, action: Reset | Respond
) -> None:
    container.upload("blob", os.urandom(2 * BLOCK))
    sas = container.blob_sas("blob", read=True)
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", action, times=None)
    with pytest.raises((ServiceResponseError, HttpResponseError)) as caught:
        BlobIO(f"{proxy.url(container.blob_url('blob'))}?{sas}", "rb", block_size=BLOCK)
    assert "sig" in gets(proxy)[0].query  # the request really carried the SAS
    assert_sas_not_in(caught.value, sas)


@pytest.mark.parametrize("mode", ["rb", "wb"])
def test_sas_stays_out_of_errors_when_the_connection_is_refused(
    container: Container, no_backoff: None, mode: str
) -> None:
    with socket.socket() as closed_port:  # bound, never listening: connections are refused
        closed_port.bind(("127.0.0.1", 0))
        sas = container.blob_sas("blob", read=True, write=True, create=True)
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}/devstoreaccount1/{container.name}/blob?{sas}"
        with pytest.raises(Exception) as caught, BlobIO(url, mode) as f:  # the type is not the point here
            f.write(b"data")
    assert_sas_not_in(caught.value, sas)


# -- error classes ------------------------------------------------------------------------------


def test_a_leased_blob_is_a_lease_error_not_a_modified_blob(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # Azurite answers 412 LeaseIdMissing, Azure 409 or 412 depending on the operation: neither means
    # that the blob changed (ResourceModifiedError) or already exists (ResourceExistsError).
    container.upload("leased", b"old")
    container.client.get_blob_client("leased").acquire_lease()
    with (
        pytest.raises(FatalBlobIOWriteError) as caught,
        BlobIO(container.blob_url("leased"), "wb", credential=account_credential) as f,
    ):
        f.write(b"new")
    underlying = caught.value.underlying_exception
    assert type(underlying) is HttpResponseError and underlying.error_code == "LeaseIdMissing"
    assert "lease" in str(underlying)
    assert container.download("leased") == b"old"


def test_an_archived_blob_is_not_a_conflict_about_existence(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = proxy.url(container.upload("archived", b"content"))
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", Respond(409, "BlobArchived"))
    with pytest.raises(HttpResponseError) as caught:
        BlobIO(url, "rb", credential=account_credential)
    assert type(caught.value) is HttpResponseError and caught.value.error_code == "BlobArchived"
    assert "rehydrate" in str(caught.value)


def test_a_refused_connection_is_a_request_error_not_a_timeout(container: Container, no_backoff: None) -> None:
    with socket.socket() as closed_port:  # bound, never listening: connections are refused
        closed_port.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed_port.getsockname()[1]}/devstoreaccount1/{container.name}/blob"
        with pytest.raises(ServiceRequestError) as caught:
            BlobIO(url, "rb", credential=False)
    assert not isinstance(caught.value, ServiceRequestTimeoutError)


def test_a_host_name_that_does_not_resolve_is_a_request_error_not_a_timeout(
    monkeypatch: pytest.MonkeyPatch, no_backoff: None
) -> None:
    def no_such_host(host: str, *args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(socket, "getaddrinfo", no_such_host)
    account = AzureNamedKeyCredential("nosuchaccount", "a2V5")
    with pytest.raises(ServiceRequestError) as caught:
        BlobIO("https://nosuchaccount.blob.core.windows.net/c/blob", "rb", credential=account)
    assert not isinstance(caught.value, ServiceRequestTimeoutError)
    assert "nosuchaccount" in str(caught.value)


def test_a_block_damaged_on_the_way_is_sent_again(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_backoff: None
) -> None:
    # 400 is not retried, but the code Md5Mismatch says the bytes were damaged in flight: a retry
    # sends them intact.
    data = os.urandom(3 * BLOCK)
    damage = proxy.add_fault(nth_block(1), Corrupt(offset=10, request=True))
    url = proxy.url(container.blob_url("out"))
    with BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, validate_content=True) as f:
        f.write(data)
    assert damage.hits == 1 and proxy.count("PutBlock") == 4
    assert container.download("out") == data


# -- every fault on every path (the matrix) ---------------------------------------------------


MATRIX_BLOCK = 64 * KiB
READ_TIMEOUT = 1.0  # seconds, for the stall faults; stalls last longer


@pytest.fixture
def short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 1-second read timeout, on connections made from now on (forked workers inherit it)."""
    monkeypatch.setattr(_pipeline, "READ_TIMEOUT_SECONDS", READ_TIMEOUT)
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())
    yield


# -- the matrix: faults -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaultKind:
    name: str
    action: Action
    reads: bool = True
    writes: bool = True
    nth: bool = False  # hit the second request of the kind (the first when there is only one)


FAULTS = [
    FaultKind("reset-before-response", Reset(after_body_bytes=None)),
    FaultKind("reset-mid-response", Reset(after_body_bytes=500, hard=True), writes=False),
    FaultKind("truncated-body", Reset(after_body_bytes=500, hard=False), writes=False),
    FaultKind("reset-mid-request", ResetRequest(after_body_bytes=1000), reads=False),
    FaultKind("500", Respond(500, "InternalError")),
    FaultKind("503-retry-after", Respond(503, "ServerBusy", headers={"Retry-After": "1"})),
    FaultKind("503", Respond(503, "ServerBusy")),
    FaultKind("stall-past-timeout", Delay(READ_TIMEOUT * 3)),
    FaultKind("fail-nth", Respond(500, "InternalError"), nth=True),
]


def matching(operation: str, *, nth: bool, path_suffix: str = "") -> Callable[[SeenRequest], bool]:
    """Matches requests of ``operation`` (with ``nth``, only from the second one on)."""
    seen = 0

    def match(request: SeenRequest) -> bool:
        nonlocal seen
        if request.operation != operation or not request.path.endswith(path_suffix):
            return False
        seen += 1
        return not nth or seen >= 2

    return match


# -- the matrix: paths ------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    azurite: Azurite
    proxy: FaultProxy
    container: Container
    credential: AzureNamedKeyCredential

    def url(self, name: str) -> str:
        return self.proxy.url(self.container.blob_url(name))


class Path:
    """One way of using the package; ``operation`` is the request kind the faults hit."""

    name = ""
    operation = ""
    reads = True
    nth_always_one = False  # only one request of the kind: "the N-th" is the first

    def prepare(self, env: Env) -> None:
        """Set up what the path needs, without faults."""

    def run(self, env: Env) -> None:
        """Do it through the proxy and check the result is exactly right."""
        raise NotImplementedError

    def expect_failure(self, env: Env) -> None:
        """Do it under a persistent fault and check how it fails."""
        raise NotImplementedError


class BlobIORead(Path):
    name, operation = "blobio-read", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.data = os.urandom(8 * MATRIX_BLOCK + 99)
        env.container.upload("blob", self.data)

    def run(self, env: Env) -> None:
        with BlobIO(env.url("blob"), "rb", credential=env.credential, block_size=MATRIX_BLOCK, max_concurrency=3) as f:
            assert f.read() == self.data

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError) as error:
            BlobIO(env.url("blob"), "rb", credential=env.credential, block_size=MATRIX_BLOCK).read()
        assert "blob" in str(error.value)


class BlobIOWrite(Path):
    name, operation, reads = "blobio-write-blocks", "PutBlock", False

    def prepare(self, env: Env) -> None:
        self.data = os.urandom(6 * MATRIX_BLOCK + 5)
        env.container.upload("blob", b"previous content")

    def run(self, env: Env) -> None:
        with BlobIO(env.url("blob"), "wb", credential=env.credential, block_size=MATRIX_BLOCK, max_concurrency=2) as f:
            f.write(self.data)
        assert env.container.download("blob") == self.data

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(FatalBlobIOWriteError):  # noqa: SIM117 (the BlobIO must be created inside)
            with BlobIO(env.url("blob"), "wb", credential=env.credential, block_size=MATRIX_BLOCK) as f:
                f.write(self.data)
        assert env.container.download("blob") == b"previous content"


class BlobIOCommit(BlobIOWrite):
    name, operation, nth_always_one = "blobio-write-commit", "PutBlockList", True


class DatasetWithWorkers(Path):
    operation = "GetBlob"
    iterable = False

    def prepare(self, env: Env) -> None:
        self.samples = {f"s/{index}": os.urandom(3000 + index) for index in range(8)}
        for name, data in self.samples.items():
            env.container.upload(name, data)

    def loader(self, env: Env) -> DataLoader[Any]:
        urls = [env.url(name) for name in self.samples]
        kind = IterableBlobDataset if self.iterable else BlobDataset
        dataset = kind.from_blob_urls(urls, credential=env.credential)
        return DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")

    def run(self, env: Env) -> None:
        seen = Counter()
        for sample in self.loader(env):
            name = sample["url"].split("/", 5)[-1]
            assert sample["data"] == self.samples[name]
            seen[name] += 1
        assert seen == Counter(list(self.samples))  # every sample exactly once

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError, match=r"s/\d"):
            list(self.loader(env))


class MapDataset(DatasetWithWorkers):
    name = "map-dataset-2-workers"


class IterableDataset(DatasetWithWorkers):
    name, iterable = "iterable-dataset-2-workers", True


class LightningSave(Path):
    name, operation, reads = "lightning-save", "PutBlock", False

    def prepare(self, env: Env) -> None:
        self.plugin = AzureBlobCheckpointIO(
            credential=env.credential, account_url=env.proxy.url(env.azurite.account_url), block_size=MATRIX_BLOCK
        )
        self.previous = {"step": 1, "w": torch.zeros(10)}
        self.checkpoint = {"step": 2, "w": torch.randn(100_000)}
        with BlobIO(env.container.blob_url("last.ckpt"), "wb", credential=env.credential) as f:
            torch.save(self.previous, f)

    def run(self, env: Env) -> None:
        self.plugin.save_checkpoint(self.checkpoint, env.url("last.ckpt"))
        loaded = AzureBlobCheckpointIO(credential=env.credential, account_url=env.azurite.account_url).load_checkpoint(
            env.container.blob_url("last.ckpt")
        )
        assert loaded["step"] == 2 and torch.equal(loaded["w"], self.checkpoint["w"])

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(FatalBlobIOWriteError):
            self.plugin.save_checkpoint(self.checkpoint, env.url("last.ckpt"))
        plugin = AzureBlobCheckpointIO(credential=env.credential, account_url=env.azurite.account_url)
        assert plugin.load_checkpoint(env.container.blob_url("last.ckpt"))["step"] == 1  # the previous one


class LightningLoad(Path):
    name, operation = "lightning-load", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.checkpoint = {"step": 3, "w": torch.randn(100_000)}
        with BlobIO(env.container.blob_url("last.ckpt"), "wb", credential=env.credential) as f:
            torch.save(self.checkpoint, f)
        self.plugin = AzureBlobCheckpointIO(
            credential=env.credential, account_url=env.proxy.url(env.azurite.account_url), block_size=MATRIX_BLOCK
        )

    def run(self, env: Env) -> None:
        loaded = self.plugin.load_checkpoint(env.url("last.ckpt"))
        assert torch.equal(loaded["w"], self.checkpoint["w"])

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError):
            self.plugin.load_checkpoint(env.url("last.ckpt"))


class DcpSave(Path):
    name, operation, reads = "dcp-save", "PutBlob", False

    def prepare(self, env: Env) -> None:
        self.state = {f"w{index}": torch.randn(2000) for index in range(6)}

    def run(self, env: Env) -> None:
        dcp.save(
            self.state, storage_writer=BlobStorageWriter(env.url("ckpt"), credential=env.credential, thread_count=2)
        )
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        dcp.load(target, storage_reader=BlobStorageReader(env.container.blob_url("ckpt"), credential=env.credential))
        assert all(torch.equal(target[name], tensor) for name, tensor in self.state.items())

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(CheckpointException):
            dcp.save(
                self.state, storage_writer=BlobStorageWriter(env.url("ckpt"), credential=env.credential, thread_count=2)
            )
        assert not env.container.exists("ckpt/.metadata")  # no loadable partial checkpoint


class DcpLoad(Path):
    name, operation = "dcp-load", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.state = {f"w{index}": torch.randn(20_000) for index in range(6)}
        dcp.save(
            self.state,
            storage_writer=BlobStorageWriter(env.container.blob_url("ckpt"), credential=env.credential, thread_count=2),
        )

    def run(self, env: Env) -> None:
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        reader = BlobStorageReader(env.url("ckpt"), credential=env.credential, block_size=MATRIX_BLOCK)
        dcp.load(target, storage_reader=reader)
        assert all(torch.equal(target[name], tensor) for name, tensor in self.state.items())

    def expect_failure(self, env: Env) -> None:
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        with pytest.raises(CheckpointException):
            dcp.load(target, storage_reader=BlobStorageReader(env.url("ckpt"), credential=env.credential))


PATHS = [
    BlobIORead(),
    BlobIOWrite(),
    BlobIOCommit(),
    MapDataset(),
    IterableDataset(),
    LightningSave(),
    LightningLoad(),
    DcpSave(),
    DcpLoad(),
]
CASES = [
    pytest.param(path, fault, id=f"{path.name}-{fault.name}")
    for path in PATHS
    for fault in FAULTS
    if (fault.reads if path.reads else fault.writes)
]


@pytest.fixture
def env(azurite: Azurite, proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential) -> Env:
    return Env(azurite, proxy, container, account_credential)


PERSISTENT = [
    pytest.param(path, fault, id=f"{path.name}-{fault.name}")
    for path in PATHS
    for fault in FAULTS
    if fault.name in (("503", "reset-mid-response") if path.reads else ("503", "reset-mid-request"))
]


class TestEveryFaultOnEveryPath:
    """The matrix: each fault of ``FAULTS`` on each path of ``PATHS``, with a 1-second read timeout."""

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = [
        pytest.mark.usefixtures("no_backoff", "short_read_timeout"),
        pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
        pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
        pytest.mark.timeout(120),
    ]

    @pytest.mark.parametrize(("path", "fault"), CASES)
    def test_a_transient_fault_is_survived_exactly(self, env: Env, path: Path, fault: FaultKind) -> None:
        path.prepare(env)
        nth = fault.nth and not path.nth_always_one
        injected: Fault = env.proxy.add_fault(matching(path.operation, nth=nth), fault.action, times=1)

        path.run(env)

        assert injected.hits == 1, f"the fault never hit a {path.operation} request"

    @pytest.mark.parametrize(("path", "fault"), PERSISTENT)
    def test_a_persistent_fault_fails_clearly_and_loses_nothing(self, env: Env, path: Path, fault: FaultKind) -> None:
        path.prepare(env)
        injected = env.proxy.add_fault(matching(path.operation, nth=False), fault.action, times=None)

        path.expect_failure(env)

        assert injected.hits >= 2  # retried, then gave up

    def test_a_read_that_stalls_every_time_gives_up_after_its_attempts(self, env: Env) -> None:
        path = BlobIORead()
        path.prepare(env)
        injected = env.proxy.add_fault(matching("GetBlob", nth=False), Delay(READ_TIMEOUT * 3), times=None)

        path.expect_failure(env)

        assert 2 <= injected.hits <= 1 + _pipeline.TRANSPORT_RETRIES
