"""``dcp.async_save`` and then a normal exit, without waiting for the save: what a training script
does when its last checkpoint is saved asynchronously. Run as ``python -m tests.e2e.support.dcp_async_exit_run
<thread|process> <url> <version>`` from the repository root; it prints ``returned`` once
``async_save`` has returned, and exits.
"""

from __future__ import annotations

import os
import socket
import sys
import warnings

import torch.distributed
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

from azstoragetorch.integrations.dcp import BlobStorageWriter
from tests.e2e.support import dcp_concurrent_run
from tests.e2e.support.dcp_async_run import CREDENTIAL


def main(kind: str, url: str, version: int) -> None:
    writer = BlobStorageWriter(url, credential=CREDENTIAL, thread_count=2, block_size=dcp_concurrent_run.BLOCK_SIZE)
    state = dcp_concurrent_run.state(version, 0)
    dcp.async_save(state, storage_writer=writer, async_checkpointer_type=AsyncCheckpointerType(kind))
    print("returned", flush=True)


if __name__ == "__main__":
    warnings.filterwarnings("ignore", category=UserWarning)
    kind = sys.argv[1]
    if kind == "process":  # torch's process checkpointer needs a process group
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    main(kind, sys.argv[2], int(sys.argv[3]))
