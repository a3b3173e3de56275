"""One job of the concurrent-saves test: it saves to a checkpoint URL that another job saves to as well.

Run as ``python -m tests.e2e.support.dcp_concurrent_run <url> <job> <world_size> <rounds> <dir>`` from the
repository root. With ``world_size`` 1 the job is this process (no process group); otherwise it
spawns that many ranks (gloo, a FileStore in ``dir``). In each round ``r`` every rank writes
``<dir>/job<job>-rank<rank>-ready-<r>``, waits for ``<dir>/go-<r>`` (the test creates it once every
rank of both jobs is ready, so that the two jobs' saves start together), saves
:func:`state` ``(job, r)`` and writes ``<dir>/job<job>-rank<rank>-done-<r>``: ``saved``,
``conflict <message>`` (the save raised :class:`~azstoragetorch.exceptions.CheckpointConflictError`)
or ``error <traceback>``.
"""

from __future__ import annotations

import os
import pathlib
import sys
import time
import traceback
import warnings

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
import torch.multiprocessing
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.api import CheckpointException

from azstoragetorch.exceptions import CheckpointConflictError
from azstoragetorch.integrations.dcp import BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

# Small blocks, so that every shard file is several block uploads and the saves overlap for longer.
BLOCK_SIZE = 128 * 1024


def state(job: int, round_: int) -> dict[str, torch.Tensor]:
    """What job ``job`` saves in round ``round_``: no two (job, round) pairs share a tensor."""
    generator = torch.Generator().manual_seed(1000 * job + round_)
    return {f"layer{i}.weight": torch.randn(64 * 1024, generator=generator) for i in range(8)}


def conflict_in(error: BaseException) -> CheckpointConflictError | None:
    """The CheckpointConflictError that a CheckpointException (on any rank) carries, if any."""
    if isinstance(error, CheckpointConflictError):
        return error
    if isinstance(error, CheckpointException):
        for failure, _traceback in error.failures.values():
            found = conflict_in(failure)
            if found is not None:
                return found
    return None


def rank_main(rank: int, url: str, job: int, world_size: int, rounds: int, directory: str) -> None:
    folder = pathlib.Path(directory)
    if world_size > 1:
        torch.distributed.init_process_group(
            "gloo", init_method=f"file://{folder}/store-{job}", rank=rank, world_size=world_size
        )
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    try:
        for round_ in range(rounds):
            (folder / f"job{job}-rank{rank}-ready-{round_}").write_text("")
            while not (folder / f"go-{round_}").exists():
                time.sleep(0.005)
            try:
                writer = BlobStorageWriter(url, credential=credential, thread_count=2, block_size=BLOCK_SIZE)
                dcp.save(state(job, round_), storage_writer=writer, no_dist=world_size == 1)
                outcome = "saved"
            except (Exception, CheckpointException) as error:  # (torch's is a BaseException)
                conflict = conflict_in(error)
                outcome = f"conflict {conflict}" if conflict is not None else f"error {traceback.format_exc()}"
            done = folder / f"job{job}-rank{rank}-done-{round_}"
            done.with_suffix(".tmp").write_text(outcome)
            done.with_suffix(".tmp").replace(done)  # whole when it appears
    finally:
        if world_size > 1:
            torch.distributed.destroy_process_group()


def main() -> None:
    url, directory = sys.argv[1], sys.argv[5]
    job, world_size, rounds = (int(argument) for argument in sys.argv[2:5])
    warnings.filterwarnings("ignore", category=UserWarning)  # torch: saving without a process group
    if world_size == 1:
        rank_main(0, url, job, world_size, rounds, directory)
    else:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.multiprocessing.spawn(rank_main, args=(url, job, world_size, rounds, directory), nprocs=world_size)


if __name__ == "__main__":
    main()
