"""``dcp.async_save`` through ``BlobStorageWriter`` with one checkpointer type and every stager, in a
process of its own (the process checkpointer needs a process group, which the test process must not
keep). Run as ``python -m tests.e2e.support.dcp_async_run <thread|process> <url>`` from the repository root.

For each stager it saves twice with the same writer and stager (the second save with other values,
so a stager that reused stale staged tensors would show), loads each checkpoint back and prints one
line ``<stager> ok`` or ``<stager> wrong: <what>``.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.staging import AsyncStager, DefaultStager, StagingOptions
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

CREDENTIAL = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
# Without CUDA, pinned memory, asynchronous staging and non-blocking copies are unavailable.
_CPU_ONLY = {"use_pinned_memory": False, "use_async_staging": False, "use_non_blocking_copy": False}


def state(step: int) -> dict[str, Any]:
    return {"weight": torch.full((1024,), float(step)), "bias": torch.arange(8) + step, "step": step}


def stagers(writer: BlobStorageWriter) -> dict[str, Callable[[], AsyncStager | None]]:
    """Each stager variant by name; ``None`` means the writer stages (it is a ``BlockingAsyncStager``)."""
    return {
        # (cache_staged_state_dict=True, the writer's other staging option, pins memory: CUDA only.)
        "writer": lambda: None,
        "default-shared-memory": lambda: DefaultStager(StagingOptions(use_shared_memory=True, **_CPU_ONLY)),
        "default-private-memory": lambda: DefaultStager(StagingOptions(use_shared_memory=False, **_CPU_ONLY)),
    }


def wait(response: Any) -> None:
    """async_save returns a future, or with some stagers a response holding two."""
    staging = getattr(response, "staging_completion", None)
    if staging is not None:
        staging.result(timeout=300)
    getattr(response, "upload_completion", response).result(timeout=300)


def check(url: str, step: int) -> str | None:
    loaded = {"weight": torch.zeros(1024), "bias": torch.zeros(8, dtype=torch.int64), "step": None}
    dcp.load(loaded, storage_reader=BlobStorageReader(url, credential=CREDENTIAL))
    expected = state(step)
    for key in ("weight", "bias"):
        if not torch.equal(loaded[key], expected[key]):
            return f"{url} {key} is {loaded[key][:3].tolist()}..., saved {expected[key][:3].tolist()}..."
    return None if loaded["step"] == step else f"{url} step is {loaded['step']}, saved {step}"


def main(kind: str, base_url: str) -> None:
    checkpointer = AsyncCheckpointerType(kind)
    for name in stagers(BlobStorageWriter(credential=CREDENTIAL)):
        writer = BlobStorageWriter(credential=CREDENTIAL, thread_count=2)
        stager = stagers(writer)[name]()
        problems = []
        try:
            for step in (1, 2):
                url = f"{base_url}/{name}/step-{step}"
                wait(
                    dcp.async_save(
                        state(step),
                        checkpoint_id=url,
                        storage_writer=writer,
                        async_checkpointer_type=checkpointer,
                        async_stager=stager,
                    )
                )
                problem = check(url, step)
                if problem:
                    problems.append(problem)
        finally:
            if stager is not None:
                stager.close()
        print(f"{name} ok" if not problems else f"{name} wrong: {'; '.join(problems)}", flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    with socket.socket() as probe:  # a free port for the group's store
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    try:
        main(sys.argv[1], sys.argv[2])
    finally:
        torch.distributed.destroy_process_group()
