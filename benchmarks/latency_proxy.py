#!/usr/bin/env python
"""A TCP proxy that gives a loopback emulator a network's latency: a fixed delay before the first byte
of every response, and optionally a bandwidth cap per connection.

It does not parse HTTP. On a keep-alive HTTP/1.1 connection (no pipelining) a response is what the
server sends after the client has sent something, so the proxy holds the first bytes the server
sends after each client turn for ``--delay-ms`` before passing them on; every later byte of that
response flows at once. With ``--mbps`` each connection's server-to-client bytes are paced to that
rate. Both directions are otherwise copied as they come.

    .venv/bin/python benchmarks/latency_proxy.py --upstream 127.0.0.1:10000 --delay-ms 20 [--mbps 100]

It prints ``listening <port>`` once it accepts connections, and runs until killed (or until
``--seconds``). It runs in its own process, so its CPU is not counted as the client's. Shared Key
signatures do not cover the host or port, so a request signed for the proxy's URL is valid
upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from collections.abc import Sequence

_CHUNK = 256 * 1024


class _Turn:
    """Whether the client has sent bytes since the server last did: the next server bytes then start a
    response, and are held for the delay."""

    def __init__(self) -> None:
        self.client_spoke = False


async def _client_to_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: _Turn) -> None:
    try:
        while data := await reader.read(_CHUNK):
            turn.client_spoke = True
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        if writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                writer.write_eof()


async def _server_to_client(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: _Turn, delay: float, rate: float | None
) -> None:
    sent = 0
    started = time.monotonic()
    try:
        while data := await reader.read(_CHUNK):
            if turn.client_spoke:
                turn.client_spoke = False
                await asyncio.sleep(delay)
            if rate is not None:
                sent += len(data)
                ahead = sent / rate - (time.monotonic() - started)
                if ahead > 0:
                    await asyncio.sleep(ahead)
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def serve(
    upstream_host: str, upstream_port: int, delay: float, rate: float | None, port: int, seconds: float | None
) -> None:
    async def handle(client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        try:
            server_reader, server_writer = await asyncio.open_connection(upstream_host, upstream_port)
        except OSError:
            client_writer.close()
            return
        turn = _Turn()
        await asyncio.gather(
            _client_to_server(client_reader, server_writer, turn),
            _server_to_client(server_reader, client_writer, turn, delay, rate),
            return_exceptions=True,
        )
        server_writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=512)
    print(f"listening {server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        if seconds is None:
            await server.serve_forever()
        else:
            await asyncio.sleep(seconds)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--upstream", required=True, help="host:port of the emulator (loopback)")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="held before each response's first byte")
    parser.add_argument("--mbps", type=float, help="cap per connection, server to client, in 10^6 bytes/s")
    parser.add_argument("--port", type=int, default=0, help="port to listen on (0: a free one)")
    parser.add_argument("--seconds", type=float, help="stop after this long (default: run until killed)")
    args = parser.parse_args(argv)
    host, _, port = args.upstream.rpartition(":")
    if host not in ("127.0.0.1", "localhost", "::1"):
        parser.error("--upstream must be a loopback address")
    rate = args.mbps * 1e6 if args.mbps else None
    asyncio.run(serve(host, int(port), args.delay_ms / 1000, rate, args.port, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
