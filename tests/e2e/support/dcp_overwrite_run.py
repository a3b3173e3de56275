"""Overwrite a DCP checkpoint in processes that a test kills (SIGKILL) part way.

Run as ``python -m tests.e2e.support.dcp_overwrite_run <url>`` from the repository root. This process
imports torch once and then, for each line ``<version>`` on its standard input, forks a saver: a
child that saves ``versioned_state(version)`` at ``url`` with ``overwrite=True``. A line ``kill``
while the saver runs sends it SIGKILL. Each save is answered with one line: ``finished <seconds
the save took>`` or ``killed``. Forking spares each saver the seconds of importing torch. This
process only imports (as a DataLoader does before it forks its workers) and makes no requests, so
a saver inherits no connection and no thread of ours.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time
import traceback
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.integrations.dcp import BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

# Small blocks, so that every shard file is several blocks and a commit is a Put Block List.
BLOCK_SIZE = 256 * 1024


def versioned_state(version: int) -> dict[str, Any]:
    """A state dict whose every value depends on ``version``: two versions share no tensor."""
    generator = torch.Generator().manual_seed(version)
    state: dict[str, Any] = {f"layer{i}.weight": torch.randn(256 * 1024, generator=generator) for i in range(6)}
    state |= {f"bias{i}": torch.randn(64, generator=generator) for i in range(20)}
    state["step"] = version
    return state


def writer(url: str) -> BlobStorageWriter:
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    return BlobStorageWriter(url, credential=credential, thread_count=2, overwrite=True, block_size=BLOCK_SIZE)


def read_line(fd: int) -> str:
    """One line from ``fd``, read unbuffered (``select`` must see whatever is not read yet); ``""`` at EOF."""
    line = bytearray()
    while not line.endswith(b"\n"):
        byte = os.read(fd, 1)
        if not byte:
            return ""
        line += byte
    return line.decode().strip()


def save(url: str, version: int) -> str:
    """Save ``version`` in a forked child, killed if a line arrives on standard input while it runs."""
    saving_read, saving_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the saver
        os.close(saving_read)
        code = 1
        try:
            state = versioned_state(version)
            storage_writer = writer(url)
            os.write(saving_write, b"s")
            dcp.save(state, storage_writer=storage_writer)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(saving_write)
    with os.fdopen(saving_read, "rb") as saving:
        saving.read(1)  # the saver is about to call dcp.save (or died before it)
    began = time.monotonic()
    exited = os.pidfd_open(pid)  # readable once the saver has exited; its pid stays ours until waitpid
    try:
        ready = select.select([exited, sys.stdin.fileno()], [], [])[0]
        if exited not in ready and read_line(sys.stdin.fileno()) == "kill":
            os.kill(pid, signal.SIGKILL)
    finally:
        os.close(exited)
    _, status = os.waitpid(pid, 0)
    took = time.monotonic() - began
    if os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
        return "killed"
    if os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
        return f"finished {took:.3f}"
    return f"failed {status}"


def main() -> None:
    url = sys.argv[1]
    warnings.filterwarnings("ignore", category=UserWarning)  # torch: saving without a process group
    while line := read_line(sys.stdin.fileno()):
        print(save(url, int(line)), flush=True)


if __name__ == "__main__":
    main()
