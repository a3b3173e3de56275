"""Fill a dataset cache in a process that a test kills (SIGKILL) in the middle of a background store.

Run as ``python -m tests.e2e.support.cache_filler_run <cache dir> <stores to finish> <blob URL>...`` from the
repository root, with the emulator's account key in ``AZSTORAGETORCH_TEST_ACCOUNT_KEY``. Reads every
blob once through ``BlobDataset(cache_dir=...)``. The cache's writer finishes the first ``<stores to
finish>`` stores, writes half of the next one's file, prints ``torn`` and waits to be killed; with
every store to finish, it slows each one down, prints ``read`` and exits.
"""

from __future__ import annotations

import itertools
import os
import sys
import threading

from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._cache import _blob_cache
from azstoragetorch.datasets import BlobDataset
from azstoragetorch.testing import ACCOUNT_NAME


def main() -> None:
    directory, finished, urls = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, os.environ["AZSTORAGETORCH_TEST_ACCOUNT_KEY"])
    writes = itertools.count()  # a store writes twice: the header, then the content
    write_all = _blob_cache._write_all

    def write_then_stall(fd: int, data: bytes) -> None:
        if finished >= len(urls):
            # Slow stores: the reads end well before them, so that exiting has stores to finish.
            threading.Event().wait(0.05)
        if next(writes) < 2 * finished + 1:
            write_all(fd, data)
            return
        os.write(fd, memoryview(data)[: len(data) // 2])
        print("torn", flush=True)
        threading.Event().wait()  # until killed

    _blob_cache._write_all = write_then_stall
    dataset = BlobDataset.from_blob_urls(urls, credential=credential, cache_dir=directory)
    for index in range(len(dataset)):
        dataset[index]
    print("read", flush=True)
    if finished < len(urls):
        threading.Event().wait()  # the writer is stalled: the test kills this process
    # Otherwise exit at once: the stores still pending are finished on the way out.


if __name__ == "__main__":
    main()
