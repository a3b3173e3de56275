"""Large transfer buffers, reused across transfers within a process.

The first write to freshly allocated memory costs a page fault per 4 KiB page, and the kernel zeroes
each page as it hands it out. For the multi-MiB buffers that uploads fill and downloads land in, that
costs more CPU than the copy of the data itself. Transfers take their buffers from here and give them
back when done, so the next transfer, or the next shard file of the same checkpoint, writes into
memory that is already mapped. Up to :data:`MAX_IDLE_BYTES` of idle buffers are kept; beyond that,
the longest idle ones are freed.
"""

from __future__ import annotations

import collections
import os
import threading

MAX_IDLE_BYTES = 128 * 1024 * 1024
# Smaller buffers come from the allocator's heap, which reuses freed memory by itself.
MIN_POOLED_BYTES = 1024 * 1024


class BufferPool:
    """Idle buffers by exact size (transfers ask for block-sized or whole-block buffers, so sizes repeat).

    When returning a buffer would exceed the cap, the buffers returned longest ago are freed first:
    what the current workload uses stays, what an earlier one left behind goes.
    """

    def __init__(self, max_idle_bytes: int = MAX_IDLE_BYTES) -> None:
        self._lock = threading.Lock()
        self._idle: collections.OrderedDict[int, bytearray] = collections.OrderedDict()  # by id, oldest first
        self._idle_bytes = 0
        self._max_idle_bytes = max_idle_bytes

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes with unspecified contents."""
        if size < MIN_POOLED_BYTES:
            return bytearray(size)
        with self._lock:
            for key, buffer in reversed(self._idle.items()):  # the most recently returned fits best in cache
                if len(buffer) == size:
                    del self._idle[key]
                    self._idle_bytes -= size
                    return buffer
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer that nothing reads or writes any more."""
        if not MIN_POOLED_BYTES <= len(buffer) <= self._max_idle_bytes:
            return
        with self._lock:
            self._idle[id(buffer)] = buffer
            self._idle_bytes += len(buffer)
            while self._idle_bytes > self._max_idle_bytes:
                _, oldest = self._idle.popitem(last=False)
                self._idle_bytes -= len(oldest)

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes


pool = BufferPool()


def _forget_in_child() -> None:
    global pool
    pool = BufferPool()  # a fresh lock; the parent's idle buffers are not worth the copy-on-write pages


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


def take(size: int) -> bytearray:
    return pool.take(size)


def give_back(buffer: bytearray) -> None:
    pool.give_back(buffer)
