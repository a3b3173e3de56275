"""Read a dataset with a cache through a DataLoader of two workers, and show which process warned.

Run as ``python -m tests.e2e.support.cache_workers_run <cache dir> <start method> <epochs> <blob URL>...``
from the repository root, with the emulator's account key in ``AZSTORAGETORCH_TEST_ACCOUNT_KEY``.
Every warning, in the main process or a worker (forked or spawned), is written to stderr as
``warning in <pid>: <message>``; stdout gets the SHA-256 of each epoch's samples, then ``main <pid>``.
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from typing import Any

import torch.utils.data
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.datasets import BlobDataset
from azstoragetorch.testing import ACCOUNT_NAME


def _show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    sys.stderr.write(f"warning in {os.getpid()}: {message}\n")


# At import, not in main(): a spawned worker imports this module but does not run main().
warnings.showwarning = _show
warnings.simplefilter("always")


def main() -> None:
    directory, method, epochs, urls = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, os.environ["AZSTORAGETORCH_TEST_ACCOUNT_KEY"])
    dataset = BlobDataset.from_blob_urls(urls, credential=credential, cache_dir=directory)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=2, multiprocessing_context=method, collate_fn=list
    )
    for _epoch in range(epochs):
        digest = hashlib.sha256()
        for batch in loader:
            for sample in batch:
                digest.update(sample["data"])
        print(digest.hexdigest(), flush=True)
    print(f"main {os.getpid()}", flush=True)


if __name__ == "__main__":
    main()
