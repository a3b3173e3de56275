"""Large transfer buffers, reused across transfers within a process.

The first write to freshly allocated memory costs a page fault per 4 KiB page, and the kernel zeroes
each page as it hands it out. For the multi-MiB buffers that uploads fill and downloads land in, that
costs more CPU than the copy of the data itself. Transfers take their buffers from here and give them
back when done, so the next transfer, or the next shard file of the same checkpoint, writes into
memory that is already mapped. Up to :data:`MAX_IDLE_BYTES` of idle buffers are kept; beyond that,
returned buffers are simply freed.
"""

from __future__ import annotations

import os
import threading

MAX_IDLE_BYTES = 128 * 1024 * 1024


class BufferPool:
    """Buffers by exact size: transfers ask for block-sized (or block-multiple) buffers, so sizes repeat."""

    def __init__(self, max_idle_bytes: int = MAX_IDLE_BYTES) -> None:
        self._lock = threading.Lock()
        self._idle: dict[int, list[bytearray]] = {}
        self._idle_bytes = 0
        self._max_idle_bytes = max_idle_bytes

    def take(self, size: int) -> bytearray:
        """A buffer of exactly ``size`` bytes with unspecified contents."""
        with self._lock:
            free = self._idle.get(size)
            if free:
                self._idle_bytes -= size
                return free.pop()
        return bytearray(size)

    def give_back(self, buffer: bytearray) -> None:
        """Return a buffer that nothing reads or writes any more."""
        with self._lock:
            if self._idle_bytes + len(buffer) <= self._max_idle_bytes:
                self._idle.setdefault(len(buffer), []).append(buffer)
                self._idle_bytes += len(buffer)

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
