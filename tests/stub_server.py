"""A small HTTP server on loopback that answers every request from a fixed rule, for tests that need a
service's behaviour the emulator cannot produce, or no service at all."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import BinaryIO

from azstoragetorch._client import _pipeline


class StubServer:
    """Answers every request, on any number of keep-alive connections, each in a thread of its own,
    with ``answer``: raw bytes, or a function from the request (its head and body, as received) to
    raw bytes. With ``close_after``, closes each connection once it has answered that many requests.

    Counts the connections accepted and the requests read, and keeps each request in ``received``.
    """

    def __init__(self, answer: bytes | Callable[[bytes], bytes], *, close_after: int | None = None) -> None:
        self.answer = answer
        self.close_after = close_after
        self.connections = 0
        self.requests = 0
        self.received: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        # Closing both the connection and its reader lets the peer see the close at once.
        with connection, connection.makefile("rb") as reader:
            answered = 0
            while self.close_after is None or answered < self.close_after:
                request = _read_request(reader)
                if request is None:
                    return
                self.requests += 1
                self.received.append(request)
                connection.sendall(self.answer if isinstance(self.answer, bytes) else self.answer(request))
                answered += 1

    def close(self) -> None:
        self._listener.close()


def canned(answers: list[bytes]) -> Callable[[bytes], bytes]:
    """An answer for :class:`StubServer` that plays a script: each request gets the next of ``answers``
    (raw bytes), in the order the requests arrive."""
    left = list(answers)
    lock = threading.Lock()

    def answer(request: bytes) -> bytes:
        with lock:
            return left.pop(0)

    return answer


def _read_request(reader: BinaryIO) -> bytes | None:
    """The next request's head and body, or ``None`` once the peer has closed the connection."""
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        line = reader.readline()
        if not line:
            return None
        head += line
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    return head + reader.read(int(lengths[0]) if lengths else 0)


def close_pooled_connections(port: int) -> None:
    """Close the idle connections that the process-wide pool keeps to ``127.0.0.1:port``.

    A ``BlobIO`` against a loopback server leaves its keep-alive connection in that pool, where it
    would outlive the server and the test until the interpreter exits.
    """
    pooled = _pipeline._current_state().transports.get(f"http://127.0.0.1:{port}")
    if pooled is not None:
        pooled.close()
