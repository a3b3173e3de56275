"""The socket transport's HTTP/1.1 framing, against a canned server on loopback."""

from __future__ import annotations

import gc
import http.client
import os
import random
import threading
import warnings
from collections.abc import Iterator

import pytest
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import HttpRequest

from azstoragetorch._client import _schedule
from azstoragetorch._client._transport import WireTransport
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions
from tests.stub_server import StubServer, canned, close_pooled_connections


@pytest.fixture
def serve() -> Iterator[object]:
    servers: list[StubServer] = []

    def start(responses: list[bytes], *, close_after: int | None = None) -> tuple[WireTransport, StubServer]:
        server = StubServer(canned(responses), close_after=close_after)
        servers.append(server)
        origin = f"http://127.0.0.1:{server.port}"
        return WireTransport(origin, connection_timeout=5, read_timeout=5, maxsize=4), server

    yield start
    for server in servers:
        close_pooled_connections(server.port)
        server.close()


def _get(transport: WireTransport, *, stream: bool = False, method: str = "GET", body: bytes | None = None) -> object:
    request = HttpRequest(method, f"{transport._origin}/account/container/blob?comp=x")
    if body is not None:
        request.set_bytes_body(body)
    return transport.send(request, stream=stream)


def test_content_length_bodies_and_connection_reuse(serve) -> None:  # type: ignore[no-untyped-def]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-Ms-Thing: a\r\nx-ms-thing: b\r\n\r\nhello"
    transport, server = serve([ok, ok])
    first = _get(transport)
    assert first.body() == b"hello"  # type: ignore[attr-defined]
    assert first.headers["X-MS-THING"] == "a, b"  # type: ignore[attr-defined]
    second = _get(transport, stream=True)
    buffer = bytearray(10)
    assert second.internal_response.readinto(memoryview(buffer)) == 5  # type: ignore[attr-defined]
    assert second.internal_response.isclosed()  # type: ignore[attr-defined]
    assert bytes(buffer[:5]) == b"hello"
    assert server.connections == 1
    assert server.received[0].startswith(b"GET /account/container/blob?comp=x HTTP/1.1\r\nHost: 127.0.0.1:")


@pytest.mark.parametrize(
    ("status_line", "reason"),
    [
        (b"HTTP/1.1 200\r\n", ""),  # no reason phrase, as http.client accepts
        (b"HTTP/1.1 200 \r\n", ""),  # an empty one
        (b"HTTP/1.1 200\n", ""),  # a bare line feed
        (b"HTTP/1.1 206 Partial  Content\r\n", "Partial  Content"),
    ],
)
def test_a_status_line_without_a_reason_phrase_is_accepted(serve, status_line: bytes, reason: str) -> None:  # type: ignore[no-untyped-def]
    transport, server = serve([status_line + b"Content-Length: 2\r\n\r\nok", b"HTTP/1.1 204\r\n\r\n"])
    response = _get(transport)
    assert (response.status_code, response.reason, response.body()) == (int(status_line[9:12]), reason, b"ok")  # type: ignore[attr-defined]
    assert _get(transport).status_code == 204  # the connection stayed usable
    assert server.connections == 1


@pytest.mark.parametrize(
    "status_line",
    [b"HTTP/1.1 20\r\n", b"HTTP/1.1 2000 OK\r\n", b"HTTP/1.1\r\n", b"ICY 200 OK\r\n", b"HTTP/1.1 2x0\r\n"],
)
def test_a_status_line_without_a_status_is_still_refused(serve, status_line: bytes) -> None:  # type: ignore[no-untyped-def]
    transport, _ = serve([status_line + b"Content-Length: 0\r\n\r\n"], close_after=1)
    with pytest.raises(ServiceResponseError) as caught:
        _get(transport)
    assert isinstance(caught.value.inner_exception, http.client.BadStatusLine)


def test_a_blob_read_from_a_stub_without_reason_phrases_needs_no_retry(serve) -> None:  # type: ignore[no-untyped-def]
    answer = b'HTTP/1.1 206\r\nContent-Length: 5\r\nContent-Range: bytes 0-4/5\r\nETag: "0x1"\r\n\r\nhello'
    _, server = serve([answer])
    url = f"http://127.0.0.1:{server.port}/devstoreaccount1/container/blob"
    with BlobIO(url, "rb", credential=False, retry=RetryOptions(retry_total=0)) as f:
        assert f.read() == b"hello"
    assert f.stats.retries == 0 and server.requests == 1


def test_chunked_bodies_are_decoded(serve) -> None:  # type: ignore[no-untyped-def]
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nTrailer: x\r\n\r\n"
    )
    transport, _ = serve([chunked])
    assert _get(transport).body() == b"abcde"  # type: ignore[attr-defined]


def test_a_body_cut_short_raises_incomplete_read(serve) -> None:  # type: ignore[no-untyped-def]
    transport, _ = serve([b"HTTP/1.1 206 Partial Content\r\nContent-Length: 10\r\n\r\nabc"], close_after=1)
    response = _get(transport, stream=True).internal_response  # type: ignore[attr-defined]
    buffer = bytearray(10)
    assert response.readinto(memoryview(buffer)) == 3
    with pytest.raises(http.client.IncompleteRead):
        response.readinto(memoryview(buffer)[3:])
    assert response.isclosed()
    assert transport._idle == []  # a broken connection is never pooled


def test_a_whole_body_cut_short_fails_as_a_response_error(serve) -> None:  # type: ignore[no-untyped-def]
    transport, _ = serve([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc"], close_after=1)
    with pytest.raises(ServiceResponseError):
        _get(transport)


def test_a_body_without_length_ends_with_the_connection_which_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    transport, _ = serve([b"HTTP/1.1 200 OK\r\n\r\nuntil close"], close_after=1)
    assert _get(transport).body() == b"until close"  # type: ignore[attr-defined]
    assert transport._idle == []


def test_connection_close_and_informational_answers(serve) -> None:  # type: ignore[no-untyped-def]
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    transport, _ = serve([answer], close_after=1)
    response = _get(transport, method="PUT", body=b"data")
    assert response.status_code == 201  # type: ignore[attr-defined]
    assert transport._idle == []


def test_head_answers_have_no_body_whatever_their_length(serve) -> None:  # type: ignore[no-untyped-def]
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
    transport, server = serve([head, b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"])
    assert _get(transport, method="HEAD").headers["content-length"] == "1234"  # type: ignore[attr-defined]
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    assert server.connections == 1


def test_an_idle_connection_the_peer_closed_is_not_reused(serve) -> None:  # type: ignore[no-untyped-def]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    transport, server = serve([ok, ok], close_after=1)  # the server closes after each answer
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    for _ in range(200):  # wait until the close has arrived (bounded; the server closes at once)
        if transport._idle and transport._idle[0].is_dropped():
            break
        threading.Event().wait(0.01)
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    assert server.connections == 2


def test_put_bodies_are_sent_with_their_length(serve) -> None:  # type: ignore[no-untyped-def]
    created = b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    transport, server = serve([created, created, created])
    big = random.Random(1).randbytes(200_000)  # sent after the head rather than joined to it
    _get(transport, method="PUT", body=b"small")
    _get(transport, method="PUT", body=big)
    _get(transport, method="PUT")
    heads = [request.partition(b"\r\n\r\n")[0].lower() for request in server.received]  # names in any case
    assert server.received[0].endswith(b"\r\n\r\nsmall") and b"\r\ncontent-length: 5" in heads[0]
    assert server.received[1].endswith(big) and b"\r\ncontent-length: 200000" in heads[1]
    assert b"\r\ncontent-length: 0" in heads[2]
    assert [head.count(b"content-length") for head in heads] == [1, 1, 1]


def test_line_breaks_in_headers_or_url_are_refused(serve) -> None:  # type: ignore[no-untyped-def]
    transport, _ = serve([])
    with pytest.raises(ValueError, match="line break"):
        transport.send(HttpRequest("GET", f"{transport._origin}/a", headers={"x-ms-meta-a": "1\r\nInjected: 1"}))
    with pytest.raises(ValueError, match="spaces or control characters"):
        transport.send(HttpRequest("GET", f"{transport._origin}/a b"))


def serving_bodies(bodies: list[bytes]) -> StubServer:
    """Serves ``bodies[i]`` at ``/i``."""

    def answer(head: bytes) -> bytes:
        body = bodies[int(head.split()[1].strip(b"/"))]
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body

    return StubServer(answer)


def test_pooled_connections_under_a_perturbed_schedule_deliver_every_body_intact() -> None:
    # Threads share one pool of keep-alive connections; giving a connection back is perturbed, so
    # one given back while its body is still being read would hand another thread the wrong bytes.
    seed = random.randrange(2**32)
    print(f"perturbation seed {seed}")
    rng = random.Random(seed)
    bodies = [rng.randbytes(rng.randrange(1, 200_000)) for _ in range(64)]
    server = serving_bodies(bodies)
    transport = WireTransport(f"http://127.0.0.1:{server.port}", connection_timeout=5, read_timeout=30, maxsize=3)
    got: dict[int, list[bytes]] = {index: [] for index in range(len(bodies))}

    def fetch(indices: list[int], piece: int) -> None:
        for index in indices:
            response = transport.send(HttpRequest("GET", f"http://127.0.0.1:{server.port}/{index}"), stream=True)
            if index % 3 == 0:  # some whole, some in pieces
                got[index].append(response.body())
                continue
            buffer = bytearray(len(bodies[index]))
            view, filled = memoryview(buffer), 0
            while filled < len(buffer):
                filled += response.internal_response.readinto(view[filled : filled + piece])
            got[index].append(bytes(buffer))

    try:
        with _schedule.perturbed(seed, only=frozenset({"connection.release"})) as perturbation:
            orders = [rng.sample(range(len(bodies)), len(bodies)) for _ in range(4)]
            threads = [threading.Thread(target=fetch, args=(order, 7_777 * (n + 1))) for n, order in enumerate(orders)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
    finally:
        transport.close()
        server.close()
    assert perturbation.counts.get("connection.release", 0) >= 4 * len(bodies)
    assert [all(copy == body for copy in got[index]) and len(got[index]) == 4 for index, body in enumerate(bodies)] == [
        True
    ] * len(bodies)


def test_a_collected_pool_closes_its_idle_connections(serve) -> None:  # type: ignore[no-untyped-def]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    transport, _ = serve([ok])
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    assert transport._idle
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        del transport
        gc.collect()
    assert [str(warning.message) for warning in caught if issubclass(warning.category, ResourceWarning)] == []


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_inherits_the_pool_empty_and_leaves_the_parents_connections_open(serve) -> None:  # type: ignore[no-untyped-def]
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    transport, server = serve([ok, ok])
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    [connection] = transport._idle
    child = os.fork()
    if child == 0:  # never returns: the child must not go on running the test session
        code = 1
        try:
            if transport._idle == [] and transport._pid == os.getpid():
                transport.close()
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the forked child's copy of the pool was not empty"
    assert not connection.is_dropped()  # a shutdown in the child would have ended it here too
    assert _get(transport).body() == b"ok"  # type: ignore[attr-defined]
    assert server.connections == 1
