"""The threads that fetch samples ahead of the consumer, one pool per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from azstoragetorch import _client

# Threads per process that fetch samples (created as needed): the ceiling for prefetch and for the
# blobs of one batch fetched together by BlobDataset.__getitems__. Set in _client, which sizes the
# connection pool that these threads share with the transfer threads.
MAX_SAMPLE_THREADS = _client.MAX_SAMPLE_THREADS


class _SampleThreads:
    """Threads that fetch samples, one pool per process (a forked DataLoader worker makes its own).

    Separate from the transfer threads on purpose: a sample's transform may itself wait for
    transfers, and waiting on work queued in the same pool could deadlock it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(
                    max_workers=MAX_SAMPLE_THREADS, thread_name_prefix="azstoragetorch-samples"
                )
                self._pid = os.getpid()
            return self._pool.submit(fn, *args)

    def forget(self) -> None:
        self._lock = threading.Lock()
        self._pool = None


_sample_threads = _SampleThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_sample_threads.forget)
