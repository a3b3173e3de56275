"""A lean azure-core transport: HTTP/1.1 on pooled keep-alive sockets, and nothing else.

Every layer between azure-core and the socket costs CPU on every request: requests prepares,
merges settings, handles cookies and hooks; urllib3 under it parses URLs, builds pool keys, header
dictionaries and checks; and http.client parses response headers with the ``email`` package. For a
checkpoint that is noise; for a dataset of small blobs it would be most of the client's work, more
than Shared Key signing. This transport writes the request head in one string, reads the status
line and headers with ``readline`` into a plain dictionary, and reads bodies with ``readinto``
straight into the caller's memory (through the socket file's buffer only for what arrived with the
headers).

It does what Blob Storage needs and no more: no redirects, cookies, proxies (with proxy settings in
the environment, the pipeline uses requests instead), content decoding or ``Expect: 100-continue``.
Bodies are framed by ``Content-Length``, chunked encoding, or the end of the connection. Idle
connections are checked before reuse (a peer that closed one makes it readable) and dropped if so.

A pool belongs to the process that made it, and closes its idle connections when the interpreter
exits or the pool is collected. A process forked from the owner finds every pool empty: it closes
its copies of the parent's descriptors, which leaves the parent's connections open, and never reads
a response meant for its parent.
"""

from __future__ import annotations

import atexit
import http.client
import io
import logging
import os
import re
import select
import socket
import ssl
import threading
import weakref
from typing import Any

from azure.core.exceptions import (
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpRequest, HttpResponse, HttpTransport

from azstoragetorch._client import _schedule
from azstoragetorch._client._redaction import redact_url

# Each request at DEBUG, as HTTP stacks log them, but with no query string: a SAS never reaches a log.
_LOGGER = logging.getLogger("azstoragetorch.transport")

_MAX_LINE = 65536
_MAX_HEADERS = 200
# Big enough for a small blob's whole response in one receive; larger reads bypass it.
_READ_BUFFER_BYTES = 64 * 1024
# Bodies up to this size go out in one send with the head (fewer system calls, one TCP segment).
_JOIN_BODY_BYTES = 64 * 1024
_FORBIDDEN_IN_TARGET = re.compile(r"[\x00-\x20\x7f]")
_FORBIDDEN_IN_HEADER = re.compile(r"[\r\n\x00]")


class ResponseHeaders(dict[str, str]):
    """Response headers by lower-case name; lookups ignore case, as HTTP's header names do."""

    def __getitem__(self, name: str) -> str:
        return super().__getitem__(name.lower())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and super().__contains__(name.lower())

    def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
        return super().get(name.lower(), default)


class _Connection:
    __slots__ = ("reader", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: io.BufferedReader = sock.makefile("rb", buffering=_READ_BUFFER_BYTES)  # type: ignore[assignment]

    def close(self) -> None:
        self.reader.close()
        self.sock.close()

    def is_dropped(self) -> bool:
        """Whether an idle connection was closed by the peer (or has stray bytes): either makes it readable."""
        poller = select.poll()
        poller.register(self.sock, select.POLLIN)
        return bool(poller.poll(0))


class WireResponse:
    """A response whose body has not been read yet (or only partly); its connection goes back to the
    pool as soon as the whole body has been read.

    ``readinto`` and ``read`` raise ``http.client.IncompleteRead`` when the connection ends before
    the body does, and the socket's own ``OSError`` (reset, timeout, a damaged TLS record) when it
    breaks.
    """

    def __init__(
        self,
        transport: WireTransport,
        connection: _Connection,
        status: int,
        reason: str,
        headers: ResponseHeaders,
        *,
        length: int | None,
        chunked: bool,
        reusable: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self._transport = transport
        self._connection: _Connection | None = connection
        self._remaining = length  # bytes of the body not read yet; None: until the connection ends
        self._chunked = chunked
        self._chunk_left = 0
        self._reusable = reusable
        if length == 0 and not chunked:
            self._finish()

    def isclosed(self) -> bool:
        """Whether the body has been read entirely, or the connection was closed."""
        return self._connection is None

    def readinto(self, buffer: memoryview | bytearray) -> int:
        """Read up to ``len(buffer)`` bytes of the body into ``buffer``; 0 at its end."""
        connection = self._connection
        if connection is None or not len(buffer):
            return 0
        if self._chunked:
            data = self._read_chunked(len(buffer))
            buffer[: len(data)] = data
            return len(data)
        remaining = self._remaining
        view = buffer if remaining is None or remaining >= len(buffer) else memoryview(buffer)[:remaining]
        try:
            count = connection.reader.readinto(view)
        except BaseException:
            self.close()
            raise
        if remaining is None:
            if not count:
                self._reusable = False
                self._finish()
            return count
        if not count:
            self.close()
            raise http.client.IncompleteRead(b"", remaining)
        self._remaining = remaining - count
        if not self._remaining:
            self._finish()
        return count

    def read(self, amount: int | None = None) -> bytes:
        """Up to ``amount`` bytes of the body (all that is left with ``None``), in one ``bytes``."""
        connection = self._connection
        if connection is None:
            return b""
        if self._chunked:
            return self._read_chunked(amount)
        remaining = self._remaining
        want = remaining if amount is None or (remaining is not None and amount > remaining) else amount
        try:
            data = connection.reader.read(-1 if want is None else want)
        except BaseException:
            self.close()
            raise
        if remaining is None:
            if want is None or not data:
                self._reusable = False
                self._finish()
            return data
        if len(data) < want:  # type: ignore[operator]
            self.close()
            raise http.client.IncompleteRead(data, remaining - len(data))
        self._remaining = remaining - len(data)
        if not self._remaining:
            self._finish()
        return data

    @property
    def data(self) -> bytes:
        return self.read()

    def release_conn(self) -> None:
        """Done with the response: a fully read one has already given its connection back; anything
        else is closed (the rest of its body would have to be read first)."""
        self.close()

    def close(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.close()

    def _finish(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            self._transport._give_back(connection, reusable=self._reusable)

    def _read_chunked(self, amount: int | None) -> bytes:
        connection = self._connection
        assert connection is not None
        reader = connection.reader
        pieces: list[bytes] = []
        wanted = amount
        try:
            while wanted is None or wanted > 0:
                if not self._chunk_left:
                    size_line = reader.readline(_MAX_LINE)
                    if not size_line:
                        raise http.client.IncompleteRead(b"".join(pieces))
                    try:
                        size = int(size_line.split(b";", 1)[0], 16)
                    except ValueError:
                        raise http.client.IncompleteRead(b"".join(pieces)) from None
                    if size == 0:
                        while reader.readline(_MAX_LINE) not in (b"\r\n", b"\n", b""):
                            pass  # trailers
                        self._finish()
                        break
                    self._chunk_left = size
                take = self._chunk_left if wanted is None else min(wanted, self._chunk_left)
                piece = reader.read(take)
                if len(piece) < take:
                    raise http.client.IncompleteRead(b"".join(pieces) + piece)
                pieces.append(piece)
                self._chunk_left -= take
                if wanted is not None:
                    wanted -= take
                if not self._chunk_left:
                    reader.readline(_MAX_LINE)  # the CRLF after the chunk's data
        except BaseException:
            self.close()
            raise
        return b"".join(pieces)


class WireTransportResponse(HttpResponse):
    """An azure-core response around a :class:`WireResponse` (``internal_response``)."""

    def __init__(self, request: HttpRequest, internal_response: WireResponse, body: bytes | None = None) -> None:
        super().__init__(request, internal_response)
        self.status_code = internal_response.status
        self.headers = internal_response.headers
        self.reason = internal_response.reason
        self.content_type = internal_response.headers.get("content-type")
        self._body = body

    def body(self) -> bytes:
        """The whole body; reads what is left of a streamed one (which frees the connection)."""
        if self._body is None:
            self._body = self.internal_response.read()
        return self._body


class WireTransport(HttpTransport):  # type: ignore[type-arg]
    """Sends azure-core requests to one origin (``scheme://host:port``) over pooled connections.

    Args:
        origin: The scheme, host and port that every request goes to.
        connection_timeout: Seconds allowed to open a connection (and finish the TLS handshake).
        read_timeout: Seconds a response may stay silent before it counts as failed.
        maxsize: Idle connections kept, which should match the threads that use them.
    """

    def __init__(self, origin: str, *, connection_timeout: float, read_timeout: float, maxsize: int) -> None:
        scheme, _, netloc = origin.partition("://")
        if scheme not in ("http", "https"):
            raise ValueError(f"Unsupported URL scheme {scheme!r} in {origin!r}; expected http or https.")
        host, port = _host_and_port(netloc, 443 if scheme == "https" else 80)
        self._origin = origin
        self._host = host
        self._port = port
        self._host_header = netloc
        self._connection_timeout = connection_timeout
        self._read_timeout = read_timeout
        self._maxsize = maxsize
        self._lock = threading.Lock()
        self._idle: list[_Connection] = []
        self._pid = os.getpid()  # the process whose connections the pool holds
        _pools.add(self)
        self._tls = scheme == "https"
        self._ssl_context: ssl.SSLContext | None = None  # made at the first connection
        # Certificates to trust: the variables requests and curl read, else the system's.
        self.ca_bundle = (
            os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or os.environ.get("SSL_CERT_FILE")
        )

    def open(self) -> None:
        pass

    def __enter__(self) -> WireTransport:
        return self

    def __exit__(self, *exc_details: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the idle connections; the pool stays usable and opens new ones as needed."""
        if self._pid != os.getpid():
            self._forget_inherited()
            return
        with self._lock:
            idle, self._idle = self._idle, []
        for connection in idle:
            connection.close()

    def __del__(self) -> None:
        # Nobody can be using the pool any more, so its lock is free: close what it holds rather
        # than leave each socket to its own finalizer (which warns that it was never closed).
        if getattr(self, "_idle", None):  # (None when __init__ failed)
            self.close()

    def _forget_inherited(self) -> None:
        """Empty a pool copied by ``fork`` and make it this process's own.

        The lock is replaced, not taken: a thread of the parent may have held it when the process
        was forked, and that thread does not exist here to release it.
        """
        self._lock = threading.Lock()
        inherited, self._idle = self._idle, []
        self._pid = os.getpid()
        # Closing a socket releases this process's descriptor and nothing more (no shutdown, no TLS
        # close_notify): the connection stays open on the parent's descriptor, in the parent's pool.
        for connection in inherited:
            connection.close()

    def send(self, request: HttpRequest, **kwargs: Any) -> WireTransportResponse:
        stream = bool(kwargs.get("stream", False))
        head, body = self._request_bytes(request)
        connection = self._take()
        try:
            if connection is None:
                connection = self._connect()
            response = self._exchange(connection, request.method, head, body)
            if _LOGGER.isEnabledFor(logging.DEBUG):
                _LOGGER.debug("%s %s -> %d", request.method, redact_url(request.url), response.status)
            # Unless streamed, the whole body now: the connection goes back to the pool.
            content = None if stream else response.read()
        except TimeoutError as error:
            _close(connection)
            raise ServiceResponseTimeoutError(error, error=error) from None
        except (OSError, http.client.HTTPException) as error:
            _close(connection)
            raise ServiceResponseError(error, error=error) from None
        return WireTransportResponse(request, response, content)

    # -- connections ---------------------------------------------------------------------------

    def _take(self) -> _Connection | None:
        while True:
            with self._lock:
                if not self._idle:
                    return None
                connection = self._idle.pop()  # the most recently used: the least likely closed by the peer
            if not connection.is_dropped():
                return connection
            connection.close()

    def _give_back(self, connection: _Connection, *, reusable: bool) -> None:
        _schedule.pause("connection.release")
        if reusable:
            with self._lock:
                if len(self._idle) < self._maxsize:
                    self._idle.append(connection)
                    return
        connection.close()

    def _connect(self) -> _Connection:
        try:
            sock = socket.create_connection((self._host, self._port), timeout=self._connection_timeout)
        except TimeoutError as error:
            raise ServiceRequestTimeoutError(error, error=error) from None
        except OSError as error:  # refused, unreachable, a name that does not resolve
            raise ServiceRequestError(error, error=error) from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._tls:
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context(cafile=self.ca_bundle)
                sock = self._ssl_context.wrap_socket(sock, server_hostname=self._host)
            sock.settimeout(self._read_timeout)
        except TimeoutError as error:
            sock.close()
            raise ServiceRequestTimeoutError(error, error=error) from None
        except OSError as error:  # the TLS handshake failed (an untrusted certificate, ...)
            sock.close()
            raise ServiceRequestError(error, error=error) from None
        return _Connection(sock)

    # -- one exchange --------------------------------------------------------------------------

    def _request_bytes(self, request: HttpRequest) -> tuple[bytes, Any]:
        url = request.url
        start = url.find("/", url.find("//") + 2)
        target = url[start:] if start != -1 else "/"
        if _FORBIDDEN_IN_TARGET.search(target):
            raise ValueError("The request URL contains spaces or control characters.")
        data = request.data
        headers = request.headers
        # azure-core's headers hand out lower-cased names without a lookup per name; HTTP's names
        # are case-insensitive, so they go on the wire as they are.
        pairs = list(headers.lowerkey_items() if hasattr(headers, "lowerkey_items") else headers.items())
        fields = "".join([f"{name}: {value}\r\n" for name, value in pairs])
        # Each field adds one CR and one LF of its own: any other is a line break smuggled into a
        # name or value, which would start a header (or a request) of its own.
        if fields.count("\n") != len(pairs) or fields.count("\r") != len(pairs) or "\x00" in fields:
            name = next(name for name, value in pairs if _FORBIDDEN_IN_HEADER.search(f"{name}{value}"))
            raise ValueError(f"The request header {name!r} contains a line break.")
        if data is not None and not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"Unsupported request body type {type(data).__name__}; expected bytes.")
        body = memoryview(data).cast("B") if data is not None and len(data) else None
        needs_length = body is not None or request.method in ("PUT", "POST", "PATCH")
        if needs_length and not any(name.lower() == "content-length" for name, _ in pairs):
            fields += f"Content-Length: {0 if body is None else len(body)}\r\n"
        head = f"{request.method} {target} HTTP/1.1\r\nHost: {self._host_header}\r\n{fields}\r\n".encode("latin-1")
        if body is not None and len(body) <= _JOIN_BODY_BYTES:
            return head + body, None
        return head, body

    def _exchange(self, connection: _Connection, method: str, head: bytes, body: Any) -> WireResponse:
        connection.sock.sendall(head)
        if body is not None:
            connection.sock.sendall(body)
        while True:
            response = self._read_response(connection, method)
            if response is not None:
                return response

    def _read_response(self, connection: _Connection, method: str) -> WireResponse | None:
        """The response whose head comes next, or ``None`` for an informational one (1xx) that another follows."""
        reader = connection.reader
        status_line = reader.readline(_MAX_LINE + 1)
        if not status_line:
            raise http.client.RemoteDisconnected("Remote end closed connection without response")
        # "HTTP/1.1 200 OK\r\n"; the reason phrase may be empty or left out ("HTTP/1.1 200\r\n"), as
        # http.client accepts and RFC 9112 allows.
        version, _, rest = status_line.rstrip(b"\r\n").partition(b" ")
        code, _, reason = rest.partition(b" ")
        if not version.startswith(b"HTTP/") or len(code) != 3 or not code.isdigit():
            raise http.client.BadStatusLine(repr(status_line[:100]))
        status = int(code)
        headers = _read_headers(reader)
        if status < 200:  # an informational answer (we never ask for one): the real one follows
            return None
        reusable = version == b"HTTP/1.1" and "close" not in dict.get(headers, "connection", "").lower()
        chunked = "chunked" in dict.get(headers, "transfer-encoding", "").lower()
        length: int | None
        if method == "HEAD" or status in (204, 304):
            length, chunked = 0, False
        elif chunked:
            length = None
        elif (declared := dict.get(headers, "content-length")) is not None:
            try:
                length = int(declared)
            except ValueError:
                raise http.client.HTTPException(f"Invalid Content-Length {declared!r}.") from None
            if length < 0:
                raise http.client.HTTPException(f"Invalid Content-Length {declared!r}.")
        else:
            length, reusable = None, False  # the body ends when the connection does
        return WireResponse(
            self,
            connection,
            status,
            reason.decode("latin-1").strip(),
            headers,
            length=length,
            chunked=chunked,
            reusable=reusable,
        )


def _read_headers(reader: io.BufferedReader) -> ResponseHeaders:
    """The header lines after a status line, up to the empty line that ends them."""
    # Usually the whole head is in the read buffer already: split it in one go rather than line by line.
    buffered = reader.peek(1)
    end = buffered.find(b"\r\n\r\n")
    if buffered.startswith(b"\r\n"):
        reader.read(2)
        return ResponseHeaders()
    if end != -1 and buffered.count(b"\n", 0, end) < _MAX_HEADERS:
        lines = reader.read(end + 4).decode("latin-1").split("\r\n")[:-2]
    else:
        lines = []
        for _ in range(_MAX_HEADERS):
            raw = reader.readline(_MAX_LINE + 1)
            if raw in (b"\r\n", b"\n"):
                break
            if not raw:
                raise http.client.RemoteDisconnected("Remote end closed connection in the middle of the headers")
            if len(raw) > _MAX_LINE:
                raise http.client.LineTooLong("header line")
            lines.append(raw.decode("latin-1").rstrip("\r\n"))
        else:
            raise http.client.HTTPException(f"More than {_MAX_HEADERS} response headers.")
    fields: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        value = value.strip()
        if name in fields:
            value = f"{fields[name]}, {value}"
        fields[name] = value
    return ResponseHeaders(fields)


# Every pool in the process, so that their idle connections are closed at exit: a socket left to
# the interpreter's teardown is closed without order, and warns that it was never closed.
_pools: weakref.WeakSet[WireTransport] = weakref.WeakSet()


def _close_pools() -> None:
    for pool in list(_pools):
        pool.close()


def _forget_inherited_pools() -> None:
    for pool in list(_pools):
        pool._forget_inherited()


atexit.register(_close_pools)
if hasattr(os, "register_at_fork"):
    # The pid check in ``close`` covers forks that bypass this, at the pool's next close.
    os.register_at_fork(after_in_child=_forget_inherited_pools)


def _close(connection: _Connection | None) -> None:
    if connection is not None:
        connection.close()


def _host_and_port(netloc: str, default_port: int) -> tuple[str, int]:
    host = netloc.rsplit("@", 1)[-1]
    port = default_port
    if host.startswith("["):  # an IPv6 literal
        end = host.index("]")
        if host[end + 1 : end + 2] == ":":
            port = int(host[end + 2 :])
        return host[1:end], port
    if ":" in host:
        host, _, port_text = host.partition(":")
        port = int(port_text)
    return host, port
