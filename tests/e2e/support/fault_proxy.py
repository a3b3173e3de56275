"""A fault-injecting HTTP/1.1 reverse proxy that sits between azstoragetorch and Azurite.

Azurite never drops a connection half-way through a body, fails one Put Block out of ten or echoes
the wrong client request ID, yet those are the failures the transport has to survive. The proxy
forwards every request to the real emulator, so blobs behave exactly as they would without it, and
lets a test damage chosen responses with a small rule API::

    proxy.add_fault(lambda req: req.operation == "PutBlock", Respond(500), times=None)

Blob URLs stay path-style (``http://127.0.0.1:<proxy port>/devstoreaccount1/<container>/<blob>``).
Shared Key signatures cover the method, headers, path and query but not the host or port, so a
request signed for the proxy's URL is valid at Azurite. Standard library only.

In front of an HTTPS emulator (``Azurite(oauth=True)``), pass ``tls=(certificate, key)``: the proxy
then speaks TLS on both sides with that certificate, so faults hit a TLS stream as they would on
Azure (and :class:`Garble` can break the TLS layer itself).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import http.client
import http.server
import io
import os
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import traceback
import urllib.parse
from collections.abc import Callable
from typing import Any

# Headers that describe one connection rather than the message: never copied across the proxy.
_HOP_BY_HOP = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding", "upgrade", "expect", "host"}
)
_CHUNK = 64 * 1024


@dataclasses.dataclass(frozen=True)
class SeenRequest:
    """One request as it reached the proxy. ``headers`` has lower-cased names."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]

    @property
    def operation(self) -> str:
        """The Blob REST operation (``GetBlob``, ``PutBlock``, ...), so tests can count requests by kind."""
        comp = self.query.get("comp")
        names = {
            ("GET", None): "GetBlob",
            ("HEAD", None): "GetBlobProperties",
            ("PUT", None): "PutBlob",
            ("PUT", "block"): "PutBlock",
            ("PUT", "blocklist"): "PutBlockList",
        }
        return names.get((self.method, comp), f"{self.method} comp={comp}")

    @property
    def byte_range(self) -> tuple[int, int] | None:
        """The inclusive ``(first, last)`` byte range a ranged GET asked for, if any."""
        value = self.headers.get("x-ms-range") or self.headers.get("range")
        if not value or not value.startswith("bytes="):
            return None
        first, _, last = value[len("bytes=") :].partition("-")
        return int(first), int(last)


# -- actions: what to do with a request that matches a fault ------------------------------------


@dataclasses.dataclass(frozen=True)
class Reset:
    """Forward the request, then drop the connection after ``after_body_bytes`` of the response body.

    ``None`` drops it before the status line (the request was processed; its answer is lost).
    ``hard`` sends a TCP RST, which the client sees as ``ECONNRESET``; otherwise a FIN, which it sees
    as a body shorter than its Content-Length.
    """

    after_body_bytes: int | None = 0
    hard: bool = True


@dataclasses.dataclass(frozen=True)
class Garble:
    """Forward, then after ``after_body_bytes`` of the response body write bytes that are no TLS record
    straight onto the connection, beneath TLS, and drop it: the client's TLS layer fails with
    ``ssl.SSLError`` (a damaged record, as a middlebox or a broken NIC can cause). Needs ``tls``."""

    after_body_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Respond:
    """Answer with ``status`` and a Blob Storage style XML error, without forwarding the request."""

    status: int
    error_code: str = "InternalError"
    headers: dict[str, str] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class RewriteHeader:
    """Forward, then replace response header ``name`` with ``value`` (``None`` removes it)."""

    name: str
    value: str | None


@dataclasses.dataclass(frozen=True)
class Delay:
    """Forward, then hold the response for ``seconds`` before sending its first byte.

    With ``hold_request``, hold the request for ``seconds`` before forwarding it instead: a slow
    upload, which the service has not yet seen. ``holding`` is set when the hold begins: the request
    has been read whole and (without ``hold_request``) answered by the service. Held requests and
    responses are dropped when the proxy stops.
    """

    seconds: float
    hold_request: bool = False
    holding: threading.Event | None = None


@dataclasses.dataclass(frozen=True)
class ResetRequest:
    """Read ``after_body_bytes`` of the request's body, then drop the connection (TCP RST): an upload
    cut off part way. The request never reaches the emulator."""

    after_body_bytes: int = 0


@dataclasses.dataclass(frozen=True)
class Corrupt:
    """Forward, but flip every bit of one byte on the way: byte ``offset`` of the response body, or
    of the request body with ``request=True`` (corruption in flight that TCP did not catch)."""

    offset: int = 0
    request: bool = False


class Gather:
    """Hold matching requests until ``parties`` of them wait at the same time, then forward them all.

    Shows that requests really are in flight together, without timing anything: if fewer than
    ``parties`` ever arrive together, each is forwarded after ``timeout`` seconds and
    :attr:`opened` stays unset. Use it with ``times=parties``. The timeout is only a guard against
    a hang, long enough for a starved machine to get every party there.
    """

    def __init__(self, parties: int, timeout: float = 300.0) -> None:
        self.parties = parties
        self.opened = threading.Event()
        self._barrier = threading.Barrier(parties, timeout=timeout)

    def wait(self) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError:
            return
        self.opened.set()

    def release(self) -> None:
        """Let every waiting request go at once (the proxy is stopping)."""
        self._barrier.abort()


Action = Reset | Respond | RewriteHeader | Delay | Gather | ResetRequest | Corrupt | Garble


@dataclasses.dataclass
class Fault:
    """A rule: ``action`` applies to the next ``times`` requests that ``match`` (all of them if ``None``)."""

    match: Callable[[SeenRequest], bool]
    action: Action
    times: int | None = 1
    hits: int = 0


class FaultProxy:
    """Forwards ``127.0.0.1:<port>`` to ``upstream_port``, applying the first fault that matches each request.

    Every client connection gets its own thread and is kept alive between requests, as HTTP
    clients expect; each forwarded request uses a fresh upstream connection, so Azurite closing an
    idle connection can never be confused with an injected fault.

    :meth:`stop` must be able to end every thread, whatever it waits for: a client (its socket is
    shut down), the emulator (the upstream sockets in use are tracked and shut down), a stalled
    response (it waits on the stopping event) or a :class:`Gather` (released). A request whose
    body breaks off is never forwarded, since the emulator would wait for the rest of it.
    """

    def __init__(
        self, upstream_port: int, upstream_host: str = "127.0.0.1", *, tls: tuple[str, str] | None = None
    ) -> None:
        self.upstream = (upstream_host, upstream_port)
        # With tls=(certificate, key): serve TLS with them, and trust the certificate upstream.
        self.server_context: ssl.SSLContext | None = None
        self.upstream_context: ssl.SSLContext | None = None
        if tls is not None:
            self.server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.server_context.load_cert_chain(*tls)
            self.upstream_context = ssl.create_default_context(cafile=tls[0])
        self.connections_accepted = 0
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._seen: list[SeenRequest] = []
        self._stopping = threading.Event()
        self._upstreams: set[socket.socket] = set()  # connections to the emulator in use
        self._server = _Server(self)
        self.port: int = self._server.server_address[1]
        serve = functools.partial(self._server.serve_forever, poll_interval=0.05)  # stop() waits one interval
        self._thread = threading.Thread(target=serve, name="fault-proxy", daemon=True)

    def start(self) -> FaultProxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting, wake stalled responses, cut every connection and wait for every thread."""
        with self._lock:
            self._stopping.set()  # from now on no handler opens a connection to the emulator
        if self._thread.is_alive():
            self._server.shutdown()  # waits for serve_forever to return: never call it if that never ran
        self._server.server_close()
        with self._lock:
            connections = dict(self._server.connections)
            upstreams = list(self._upstreams)
            gathers = [fault.action for fault in self._faults if isinstance(fault.action, Gather)]
        for gather in gathers:
            gather.release()
        # Shutting a socket down wakes a thread blocked on it: a handler waiting for a client's
        # next request or the rest of its body, and one waiting for (or relaying) the emulator's
        # answer, which no client is left to read.
        for connection in [*connections, *upstreams]:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + 30  # a woken thread may wait long for a core on a loaded machine
        for thread in [self._thread, *connections.values()]:
            thread.join(timeout=max(0.0, deadline - time.monotonic()))
            if thread.is_alive():
                frame = sys._current_frames().get(thread.ident or 0)
                where = "".join(traceback.format_stack(frame)) if frame is not None else "(no frame)\n"
                raise RuntimeError(f"FaultProxy thread {thread.name} did not stop; it is here:\n{where}")

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, azurite_url: str) -> str:
        """``azurite_url`` (any URL on the emulator) rewritten to go through the proxy."""
        parts = urllib.parse.urlsplit(azurite_url)
        return urllib.parse.urlunsplit(parts._replace(netloc=f"127.0.0.1:{self.port}"))

    def add_fault(self, match: Callable[[SeenRequest], bool], action: Action, times: int | None = 1) -> Fault:
        """Apply ``action`` to the next ``times`` requests for which ``match`` is true (all if ``None``).

        ``match`` runs while the proxy holds its lock: it must not call back into the proxy.
        """
        fault = Fault(match, action, times)
        with self._lock:
            self._faults.append(fault)
        return fault

    @property
    def requests(self) -> list[SeenRequest]:
        """Every request received so far, in arrival order."""
        with self._lock:
            return list(self._seen)

    def count(self, operation: str) -> int:
        """How many requests of one :attr:`SeenRequest.operation` were received."""
        return sum(1 for seen in self.requests if seen.operation == operation)

    def _open_upstream(self) -> http.client.HTTPConnection | None:
        """A connection to the emulator that :meth:`stop` can cut, or ``None`` once stopping."""
        upstream: http.client.HTTPConnection
        # Connecting is the one wait that stop() cannot cut (the socket is not ours to shut down
        # yet): it is tried in short attempts that look at the stopping flag in between.
        for _ in range(30):
            if self._stopping.is_set():
                return None
            if self.upstream_context is not None:
                upstream = http.client.HTTPSConnection(*self.upstream, timeout=1, context=self.upstream_context)
            else:
                upstream = http.client.HTTPConnection(*self.upstream, timeout=1)
            try:
                upstream.connect()
                break
            except TimeoutError:
                upstream.close()
        else:
            raise TimeoutError(f"the emulator on port {self.upstream[1]} did not accept a connection in 30 s")
        upstream.sock.settimeout(30)
        with self._lock:
            if not self._stopping.is_set():
                self._upstreams.add(upstream.sock)
                return upstream
        upstream.close()
        return None

    def _close_upstream(self, upstream: http.client.HTTPConnection) -> None:
        with self._lock:
            self._upstreams.discard(upstream.sock)
        upstream.close()

    def _record(self, seen: SeenRequest) -> Action | None:
        with self._lock:
            self._seen.append(seen)
            for fault in self._faults:
                if (fault.times is None or fault.hits < fault.times) and fault.match(seen):
                    fault.hits += 1
                    return fault.action
        return None


class _Server(socketserver.TCPServer):
    """A TCP server with one daemon thread per connection, tracked so that :meth:`FaultProxy.stop` can join them."""

    allow_reuse_address = True

    def __init__(self, proxy: FaultProxy) -> None:
        self.proxy = proxy
        self.connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(("127.0.0.1", 0), _Handler)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        if self.proxy.server_context is not None:
            # The handshake happens on first use, in the connection's own thread, so that a client
            # stuck in it cannot stall the accept loop.
            connection = self.proxy.server_context.wrap_socket(
                connection, server_side=True, do_handshake_on_connect=False
            )
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(target=self._serve, args=(request, client_address), name="fault-proxy-conn")
        thread.daemon = True
        with self.proxy._lock:
            self.connections[request] = thread
            self.proxy.connections_accepted += 1
        thread.start()

    def _serve(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
        finally:
            self.shutdown_request(request)
            with self.proxy._lock:
                self.connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client hanging up mid-response is routine here, not worth a traceback


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _proxy(self) -> None:
        proxy = self.server.proxy
        split = urllib.parse.urlsplit(self.path)
        headers = {name.lower(): value for name, value in self.headers.items()}
        query = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
        action = proxy._record(SeenRequest(self.command, split.path, query, headers))
        length = int(self.headers["Content-Length"]) if "Content-Length" in self.headers else None
        if isinstance(action, ResetRequest):
            self.rfile.read(min(action.after_body_bytes, length or 0))
            self._drop(hard=True)
            return
        body = self.rfile.read(length) if length is not None else None
        if length is not None and body is not None and len(body) < length:
            # The client went away part-way (or stop() cut it off). Forwarding the part received
            # under the full Content-Length would leave the emulator, and this thread, waiting.
            self._drop(hard=True)
            return
        if isinstance(action, Corrupt) and action.request and body and action.offset < len(body):
            body = body[: action.offset] + bytes([body[action.offset] ^ 0xFF]) + body[action.offset + 1 :]
            action = None
        if isinstance(action, Respond):
            self._send_error(action, headers.get("x-ms-client-request-id"))
            return
        if isinstance(action, Gather):
            action.wait()
            action = None
        if isinstance(action, Delay) and action.hold_request:
            if action.holding is not None:
                action.holding.set()
            if proxy._stopping.wait(action.seconds):
                self._drop(hard=True)
                return
            action = None
        upstream = proxy._open_upstream()
        if upstream is None:
            self._drop(hard=True)
            return
        try:
            forwarded = [(name, value) for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP]
            upstream.putrequest(self.command, self.path, skip_accept_encoding=True)
            for name, value in forwarded:
                upstream.putheader(name, value)
            upstream.endheaders(body)
            response = upstream.getresponse()
            self._relay(response, action)
        finally:
            proxy._close_upstream(upstream)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = _proxy

    def _relay(self, response: http.client.HTTPResponse, action: Action | None) -> None:
        headers = [(name, value) for name, value in response.getheaders() if name.lower() not in _HOP_BY_HOP]
        source: Any = response
        chunked = response.getheader("Content-Length") is None and response.status not in (204, 304)
        if chunked and self.command != "HEAD":
            source = io.BytesIO(response.read())  # re-sent with a length, which keeps this class simple
            headers.append(("Content-Length", str(len(source.getvalue()))))
        if isinstance(action, RewriteHeader):
            headers = [(name, value) for name, value in headers if name.lower() != action.name.lower()]
            if action.value is not None:
                headers.append((action.name, action.value))
        if isinstance(action, Delay):
            if action.holding is not None:
                action.holding.set()
            if self.server.proxy._stopping.wait(action.seconds):
                self._drop(hard=True)
                return
        if isinstance(action, Reset) and action.after_body_bytes is None:
            self._drop(action.hard)
            return
        self.send_response_only(response.status, response.reason)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        reset = action if isinstance(action, Reset) else None
        budget = reset.after_body_bytes if reset is not None else None
        if isinstance(action, Garble):
            budget = action.after_body_bytes
        corrupt_at = action.offset if isinstance(action, Corrupt) and not action.request else None
        sent = 0
        while budget is None or sent < budget:
            chunk = source.read(_CHUNK if budget is None else min(_CHUNK, budget - sent))
            if not chunk:
                break
            if corrupt_at is not None and sent <= corrupt_at < sent + len(chunk):
                index = corrupt_at - sent
                chunk = chunk[:index] + bytes([chunk[index] ^ 0xFF]) + chunk[index + 1 :]
            self.wfile.write(chunk)
            sent += len(chunk)
        if reset is not None:
            self._drop(reset.hard)
        if isinstance(action, Garble):
            os.write(
                self.connection.fileno(), b"\x17\x03\x03\x00\x20" + b"\x00" * 32
            )  # an application-data record that does not decrypt
            self._drop(hard=False)

    def _send_error(self, action: Respond, client_request_id: str | None) -> None:
        body = (
            f'<?xml version="1.0" encoding="utf-8"?><Error><Code>{action.error_code}</Code>'
            "<Message>Injected by FaultProxy.</Message></Error>"
        ).encode()
        self.send_response_only(action.status)
        headers = {"Content-Type": "application/xml", "Content-Length": str(len(body))}
        headers |= {"x-ms-error-code": action.error_code, "x-ms-request-id": "fault-proxy"}
        if client_request_id is not None:
            headers["x-ms-client-request-id"] = client_request_id  # echo it, as the service does
        for name, value in (headers | action.headers).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _drop(self, hard: bool) -> None:
        """Cut the client connection: RST (``hard``) or FIN, after giving sent bytes time to arrive."""
        self.close_connection = True
        if not hard:
            self.connection.shutdown(socket.SHUT_WR)
            return
        self.server.proxy._stopping.wait(0.05)  # an RST discards data still in the send buffer
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the socket only really closes (and resets) once its file objects are gone
        self.connection.close()
