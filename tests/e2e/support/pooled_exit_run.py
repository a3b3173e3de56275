"""Exits with keep-alive connections still pooled, in this process and in a child it forks.

``python -m tests.e2e.support.pooled_exit_run BLOB_URL ACCOUNT_NAME ACCOUNT_KEY``: writes and reads
the blob (so the pools hold idle connections), forks a child that reads it over connections of its
own and exits as a normal program does (atexit hooks and finalizers run), checks that the child left
the parent's connections open, reads again over them, and exits. Run with ResourceWarnings shown,
its stderr names any socket the interpreter had to close for us.
"""

from __future__ import annotations

import os
import sys

from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._client import _pipeline
from azstoragetorch._client._transport import WireTransport
from azstoragetorch.io import BlobIO

# Enough blocks written in parallel that the pool keeps several connections.
_DATA = bytes(range(256)) * 4096 * 6
_BLOCK_BYTES = 256 * 1024


def _read(url: str, credential: AzureNamedKeyCredential) -> None:
    with BlobIO(url, "rb", credential=credential) as blob:
        if blob.read() != _DATA:
            raise SystemExit("the blob read back differs from what was written")


def main(url: str, account_name: str, account_key: str) -> None:
    credential = AzureNamedKeyCredential(account_name, account_key)
    with BlobIO(url, "wb", credential=credential, block_size=_BLOCK_BYTES, max_concurrency=4) as blob:
        blob.write(_DATA)
    _read(url, credential)
    pools = list(_pipeline._state.transports.values())
    idle = [connection for pool in pools if isinstance(pool, WireTransport) for connection in pool._idle]
    if not idle:
        raise SystemExit("no connection was pooled, so the exit checks nothing")
    child = os.fork()
    if child == 0:
        _read(url, credential)
        sys.exit(0)
    _, status = os.waitpid(child, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the forked child failed with status {status}")
    # A connection the child had shut down (rather than dropped its descriptor of) would now be
    # readable: at its end, with nothing to read.
    dropped = [connection for connection in idle if connection.is_dropped()]
    if dropped:
        raise SystemExit(f"{len(dropped)} of the parent's {len(idle)} idle connections ended when the child exited")
    _read(url, credential)
    print(f"pooled {len(idle)}")


if __name__ == "__main__":
    main(*sys.argv[1:4])
