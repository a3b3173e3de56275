"""Storing in the background: one writer thread per process, with a bound on the bytes waiting for it."""

from __future__ import annotations

import collections
import multiprocessing.util
import os
import threading
from typing import TYPE_CHECKING

from azstoragetorch._cache._failures import _warn_once
from azstoragetorch._client import pause

if TYPE_CHECKING:
    from azstoragetorch._cache._blob_cache import BlobCache

# The most bytes of fetched blobs that wait, in one process, for the background writer to store them.
_PENDING_LIMIT = 64 * 1024 * 1024


class _Writer:
    """The thread that stores fetched blobs, one per process for all of its caches (see the package's
    "Storing in the background")."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._condition = threading.Condition()
        # In the order handed over; an item stays (and is counted) until it is stored.
        self._queue: collections.deque[tuple[BlobCache, str, str, bytes]] = collections.deque()
        self._pending_bytes = 0
        # The latest blob handed over for each path, served to reads until it is stored.
        self._latest: dict[str, tuple[str, bytes]] = {}
        self._thread: threading.Thread | None = None

    def pending(self, path: str) -> tuple[str, bytes] | None:
        """The ETag and content handed over for ``path`` and not yet stored, if any."""
        with self._condition:
            return self._latest.get(path)

    def put(self, cache: BlobCache, path: str, etag: str, data: bytes) -> None:
        pause("cache.handoff")  # the writer may be storing an older copy of the same blob now
        with self._condition:
            while self._pending_bytes and self._pending_bytes + len(data) > _PENDING_LIMIT:
                self._condition.wait()
            self._queue.append((cache, path, etag, data))
            self._pending_bytes += len(data)
            self._latest[path] = (etag, data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="azstoragetorch-cache-writer", daemon=True)
                self._thread.start()
                # Run at a normal exit, a DataLoader worker's included (atexit is not, in a worker).
                multiprocessing.util.Finalize(None, self.flush, exitpriority=100)
            self._condition.notify_all()

    def flush(self) -> None:
        """Wait until no blob waits to be stored (each is stored, or dropped after a failure)."""
        if self._pid != os.getpid():
            return  # a copy inherited by a forked process, without its thread
        with self._condition:
            while self._queue:
                self._condition.wait()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue:
                    self._condition.wait()
                cache, path, etag, data = self._queue[0]
            try:
                cache._store(path, etag, data)
            except Exception as error:  # a defect: keep the samples coming, without a cache
                cache._process_state().storing = False
                what = f"storing in {cache.directory} failed ({type(error).__name__}: {error})"
                _warn_once(cache.directory, "store", what)
            finally:
                with self._condition:
                    self._queue.popleft()
                    self._pending_bytes -= len(data)
                    if self._latest.get(path, (None, None))[1] is data:
                        del self._latest[path]  # after the rename: a read finds it on disk now
                    self._condition.notify_all()


_the_writer: _Writer | None = None
_the_writer_lock = threading.Lock()


def _writer() -> _Writer:
    global _the_writer
    writer = _the_writer
    if writer is None or writer._pid != os.getpid():
        with _the_writer_lock:
            if _the_writer is None or _the_writer._pid != os.getpid():
                _the_writer = _Writer()
            writer = _the_writer
    return writer


def _forget_writer() -> None:
    global _the_writer, _the_writer_lock
    _the_writer = None  # the parent's thread is not in the child; its queue belongs to the parent
    _the_writer_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer)


def flush() -> None:
    """Wait until this process has stored every blob it has read (tests, and callers that copy a cache)."""
    _writer().flush()
