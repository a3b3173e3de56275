"""The client's ranged fetch into ``bytes`` (IntoBytes), against a loopback server that plays canned answers."""

from __future__ import annotations

import base64
import hashlib
import threading
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    BlobNotModified,
    IntoBytes,
    PieceChecksums,
    Recorder,
    _pipeline,
)
from azstoragetorch._client._blob_client import DownloadStopped
from azstoragetorch._client._transport import WireResponse
from azstoragetorch.exceptions import BlobModifiedDuringReadError, ChecksumMismatchError
from azstoragetorch.retry import RetryOptions
from tests.stub_server import StubServer, canned, close_pooled_connections

CONTENT = b"hello world"
ETAG = '"0x1"'


def partial(start: int, body: bytes, *, total: int = len(CONTENT), declared: int | None = None, md5: str = "") -> bytes:
    """A 206 answer for ``body`` at ``start``; ``declared`` is a longer Content-Length, for a body that breaks off."""
    length = len(body) if declared is None else declared
    head = (
        f"HTTP/1.1 206 Partial Content\r\nContent-Length: {length}\r\n"
        f"Content-Range: bytes {start}-{start + length - 1}/{total}\r\nETag: {ETAG}\r\n"
    )
    if md5:
        head += f"Content-MD5: {md5}\r\n"
    return head.encode() + b"\r\n" + body


def md5_of(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


CONDITION_NOT_MET = b"HTTP/1.1 412 Precondition Failed\r\nx-ms-error-code: ConditionNotMet\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def serve() -> Iterator[Callable[..., tuple[AzStorageTorchBlobClient, StubServer]]]:
    """A client of a blob on a server that gives the canned answers in order; a server made with
    ``close_after=1`` closes each connection after its answer, so a body shorter than its
    Content-Length ends with the connection."""
    servers: list[StubServer] = []

    def start(answers: list[bytes], **kwargs: Any) -> tuple[AzStorageTorchBlobClient, StubServer]:
        server = StubServer(canned(answers), **kwargs)
        servers.append(server)
        url = f"http://127.0.0.1:{server.port}/devstoreaccount1/container/blob"
        client = AzStorageTorchBlobClient.from_url(url, credential=False, retry=RetryOptions(retry_total=0))
        return client.with_recorder(Recorder()), server

    yield start
    for server in servers:
        close_pooled_connections(server.port)
        server.close()


def header(request: bytes, name: str) -> str | None:
    for line in request.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    return None


def test_a_range_one_answer_holds_is_that_answers_own_bytes(serve, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([partial(0, CONTENT)])
    bodies: list[bytes] = []
    read = WireResponse.read

    def watched_read(self: WireResponse, amount: int | None = None) -> bytes:
        bodies.append(read(self, amount))
        return bodies[-1]

    monkeypatch.setattr(WireResponse, "read", watched_read)
    target = IntoBytes()
    properties, count = client.fetch_range_into(0, target, etag=None, length=1000)
    assert (count, properties.size, properties.etag) == (len(CONTENT), len(CONTENT), ETAG)
    assert target.data == CONTENT and type(target.data) is bytes
    assert len(bodies) == 1 and target.data is bodies[0]  # handed on, not copied
    assert [header(request, "x-ms-range") for request in server.received] == ["bytes=0-999"]
    transport = _pipeline._current_state().transports[f"http://127.0.0.1:{server.port}"]
    assert len(transport._idle) == 1  # the whole body was read: the connection is kept for the next request
    stats = client.recorder.snapshot()
    assert (stats.requests, stats.retries, stats.bytes) == (1, 0, len(CONTENT))


def test_a_function_may_choose_bytes_once_it_knows_the_size(serve) -> None:  # type: ignore[no-untyped-def]
    client, _ = serve([partial(0, CONTENT)])
    sizes: list[int] = []
    target = IntoBytes()

    def choose(properties: Any) -> memoryview | IntoBytes:
        sizes.append(properties.size)
        return target

    assert client.fetch_range_into(0, choose, etag=None, length=64)[1] == len(CONTENT)
    assert sizes == [len(CONTENT)] and target.data == CONTENT


def test_a_body_that_ends_early_is_resumed_where_it_stopped_pinned_to_its_version(serve) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([partial(0, CONTENT[:4], declared=len(CONTENT)), partial(4, CONTENT[4:])], close_after=1)
    target = IntoBytes()
    assert client.fetch_range_into(0, target, etag=None, length=1000)[1] == len(CONTENT)
    assert target.data == CONTENT
    first, second = server.received
    assert header(first, "If-Match") is None
    assert (header(second, "x-ms-range"), header(second, "If-Match")) == ("bytes=4-999", ETAG)
    stats = client.recorder.snapshot()
    assert (stats.retries, stats.reset_retries, stats.bytes) == (1, 1, len(CONTENT))


def test_a_reset_mid_body_loses_that_answer_which_is_fetched_again(serve, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([partial(0, CONTENT), partial(0, CONTENT)], close_after=1)
    read = WireResponse.read
    resets = [ConnectionResetError("reset by peer")]

    def read_then_reset(self: WireResponse, amount: int | None = None) -> bytes:
        if resets:
            read(self, 3)
            self.close()
            raise resets.pop()
        return read(self, amount)

    monkeypatch.setattr(WireResponse, "read", read_then_reset)
    target = IntoBytes()
    assert client.fetch_range_into(0, target, etag=None, length=1000)[1] == len(CONTENT)
    assert target.data == CONTENT
    assert (header(server.received[1], "x-ms-range"), header(server.received[1], "If-Match")) == ("bytes=0-999", ETAG)
    assert client.recorder.snapshot().reset_retries == 1


def test_a_blob_changed_before_the_rest_of_a_broken_body_raises(serve) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([partial(0, CONTENT[:4], declared=len(CONTENT)), CONDITION_NOT_MET], close_after=1)
    with pytest.raises(BlobModifiedDuringReadError):
        client.fetch_range_into(0, IntoBytes(), etag=None, length=1000)
    assert header(server.received[1], "If-Match") == ETAG


def test_a_read_pinned_to_another_version_raises(serve) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([CONDITION_NOT_MET])
    with pytest.raises(BlobModifiedDuringReadError):
        client.fetch_range_into(0, IntoBytes(), etag='"0x0"', length=1000)
    assert header(server.received[0], "If-Match") == '"0x0"'


def test_an_unchanged_blob_answers_not_modified(serve) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([f"HTTP/1.1 304 Not Modified\r\nETag: {ETAG}\r\nContent-Length: 0\r\n\r\n".encode()])
    with pytest.raises(BlobNotModified):
        client.fetch_range_into(0, IntoBytes(), etag=None, length=1000, if_none_match=ETAG)
    assert header(server.received[0], "If-None-Match") == ETAG


def test_validated_bytes_that_do_not_match_their_md5_are_fetched_again_whole(serve) -> None:  # type: ignore[no-untyped-def]
    damaged = b"hello wXrld"
    client, server = serve([partial(0, damaged, md5=md5_of(CONTENT)), partial(0, CONTENT, md5=md5_of(CONTENT))])
    target = IntoBytes()
    assert client.fetch_range_into(0, target, etag=None, length=1000, validate_content=True)[1] == len(CONTENT)
    assert target.data == CONTENT
    assert [header(request, "x-ms-range-get-content-md5") for request in server.received] == ["true", "true"]
    assert header(server.received[1], "x-ms-range") == "bytes=0-999"
    assert client.recorder.snapshot().bytes == len(CONTENT)  # the damaged answer does not count


def test_validated_bytes_that_never_match_raise(serve) -> None:  # type: ignore[no-untyped-def]
    client, _ = serve([partial(0, b"hello wXrld", md5=md5_of(CONTENT))] * 5)
    with pytest.raises(ChecksumMismatchError):
        client.fetch_range_into(0, IntoBytes(), etag=None, length=1000, validate_content=True)


def test_the_crc32_of_resumed_bytes_is_of_the_whole_range(serve) -> None:  # type: ignore[no-untyped-def]
    client, _ = serve([partial(0, CONTENT[:5], declared=len(CONTENT)), partial(5, CONTENT[5:])], close_after=1)
    checksums = PieceChecksums(size=len(CONTENT))
    client.fetch_range_into(0, IntoBytes(), etag=None, length=1000, checksums=checksums)
    assert checksums.whole() == zlib.crc32(CONTENT)


def test_an_empty_blob_gives_empty_bytes(serve) -> None:  # type: ignore[no-untyped-def]
    not_satisfiable = b"HTTP/1.1 416 Range Not Satisfiable\r\nContent-Length: 0\r\n\r\n"
    properties_answer = f"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nETag: {ETAG}\r\n\r\n".encode()
    client, _ = serve([not_satisfiable, properties_answer])
    target = IntoBytes()
    properties, count = client.fetch_range_into(0, target, etag=None, length=1000)
    assert (properties.size, count, target.data) == (0, 0, b"")


def test_a_stopped_read_sends_nothing(serve) -> None:  # type: ignore[no-untyped-def]
    client, server = serve([partial(0, CONTENT)])
    stop = threading.Event()
    stop.set()
    with pytest.raises(DownloadStopped):
        client.fetch_range_into(0, IntoBytes(), etag=None, length=1000, stop=stop)
    assert server.received == []


def test_bytes_need_a_length(serve) -> None:  # type: ignore[no-untyped-def]
    client, _ = serve([])
    with pytest.raises(TypeError, match="needs a length"):
        client.fetch_range_into(0, IntoBytes(), etag=None)
