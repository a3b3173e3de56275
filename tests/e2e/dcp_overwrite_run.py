"""Overwrite a DCP checkpoint in processes that a test ``kill -9``\\ s part way.

Run as ``python -m tests.e2e.dcp_overwrite_run <url>`` from the repository root. This process
imports torch once and then, for each line ``<version> <kill_after>`` on its standard input,
forks a saver: a child that saves ``versioned_state(version)`` at ``url`` with ``overwrite=True``.
``kill_after`` seconds after the saver entered ``dcp.save`` (never, for ``-``), this process sends
it SIGKILL, and then answers with one line: ``finished <seconds the save took>`` or ``killed``.
Forking spares each saver the seconds of importing torch; this process starts no threads and makes
no requests, so what a saver inherits is safe to fork.
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


def save(url: str, version: int, kill_after: float | None) -> str:
    """Save ``version`` in a forked child, killed ``kill_after`` seconds into ``dcp.save``."""
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
        started = saving.read(1) == b"s"  # b"" if the saver died before dcp.save
    began = time.monotonic()
    exited = os.pidfd_open(pid)  # readable once the saver has exited; its pid stays ours until waitpid
    try:
        if started and not select.select([exited], [], [], kill_after)[0]:
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
    for line in sys.stdin:
        version, kill_after = line.split()
        print(save(url, int(version), None if kill_after == "-" else float(kill_after)), flush=True)


if __name__ == "__main__":
    main()
