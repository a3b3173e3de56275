"""Small HTTP servers on loopback, for tests that need a service's behaviour the emulator cannot produce,
or no service at all: one that gives every request the same answer, and one that plays a script."""

from __future__ import annotations

import socket
import threading

from azstoragetorch._client import _pipeline


class StubServer:
    """Answers every request, on any number of keep-alive connections, with ``answer`` (raw bytes).

    Counts the connections accepted and the requests read; a request's body is read and dropped.
    """

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.connections = 0
        self.requests = 0
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
        with connection, connection.makefile("rb") as reader:
            while True:
                head = b""
                while not head.endswith(b"\r\n\r\n"):
                    line = reader.readline()
                    if not line:
                        return
                    head += line
                lengths = [
                    line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")
                ]
                reader.read(int(lengths[0]) if lengths else 0)
                self.requests += 1
                connection.sendall(self.answer)

    def close(self) -> None:
        self._listener.close()


class CannedServer:
    """Answers each request on a connection with the next canned response (raw bytes), then maybe closes."""

    def __init__(self, responses: list[bytes], *, close_after: int | None = None) -> None:
        self._responses = list(responses)
        self._close_after = close_after
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._responses:
            try:
                connection, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            with connection, connection.makefile("rb") as reader:  # both closed: the peer then sees the close
                served = 0
                while self._responses:
                    head = b""
                    while not head.endswith(b"\r\n\r\n"):
                        line = reader.readline()
                        if not line:
                            break
                        head += line
                    if not head:
                        break
                    length = next(
                        (
                            int(line.split(b":")[1])
                            for line in head.split(b"\r\n")
                            if line.lower().startswith(b"content-length")
                        ),
                        0,
                    )
                    self.requests.append(head + reader.read(length))
                    connection.sendall(self._responses.pop(0))
                    served += 1
                    if self._close_after is not None and served >= self._close_after:
                        break

    def close(self) -> None:
        self._listener.close()


def close_pooled_connections(port: int) -> None:
    """Close the idle connections that the process-wide pool keeps to ``127.0.0.1:port``.

    A ``BlobIO`` against a loopback server leaves its keep-alive connection in that pool, where it
    would outlive the server and the test until the interpreter exits.
    """
    pooled = _pipeline._current_state().transports.get(f"http://127.0.0.1:{port}")
    if pooled is not None:
        pooled.close()
