"""Save checkpoints with ``torch.save`` into ``BlobIO`` (as the Lightning plugin does), version after
version, to one blob, until killed.

Run as ``python -m tests.e2e.support.checkpoint_saver_run <url> <first version>`` from the repository root,
with the emulator's account key in ``AZSTORAGETORCH_TEST_ACCOUNT_KEY``. Prints ``ready`` once torch is
imported, then ``saved <version>`` after each save returns. A test kills it (SIGKILL) at a random moment
and checks that the blob holds one complete version.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_NAME

# Small blocks, so that a checkpoint is many blocks and a commit is a Put Block List.
BLOCK_SIZE = 256 * 1024


def versioned_checkpoint(version: int) -> dict[str, Any]:
    """A checkpoint whose every tensor depends on ``version`` (about 3 MiB)."""
    generator = torch.Generator().manual_seed(version)
    weights = {f"layer{i}.weight": torch.randn(128 * 1024, generator=generator) for i in range(6)}
    return {"version": version, "state_dict": weights}


def main() -> None:
    url, first = sys.argv[1], int(sys.argv[2])
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, os.environ["AZSTORAGETORCH_TEST_ACCOUNT_KEY"])
    print("ready", flush=True)
    version = first
    while True:
        with BlobIO(url, "wb", credential=credential, block_size=BLOCK_SIZE) as f:
            torch.save(versioned_checkpoint(version), f)
        print(f"saved {version}", flush=True)
        version += 1


if __name__ == "__main__":
    main()
