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

from azstoragetorch._client import _schedule

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


class Lease:
    """A buffer handed out to one or more holders; it goes back to the pool when the last one lets go.

    Memory that was handed out must never be recycled while anyone may still read or write it: a
    reader copying out of a chunk, a download thread writing into it, a consumer of a fetched span.
    Each of them holds the lease (the first holder gets it from :func:`lease`, others call
    :meth:`retain`) and calls :meth:`release` exactly once when done; the buffer returns to the pool
    only after the last release. Releasing more often than holding is a bug and raises at once.
    """

    __slots__ = ("_buffer", "_holders", "_lock")

    def __init__(self, buffer: bytearray) -> None:
        self._buffer: bytearray | None = buffer
        self._holders = 1
        self._lock = threading.Lock()

    @property
    def buffer(self) -> bytearray:
        """The leased memory; only for holders, between taking the lease and releasing it."""
        if self._buffer is None:
            raise RuntimeError("A buffer lease was used after its last holder released it.")
        return self._buffer

    def view(self, length: int) -> memoryview:
        """The first ``length`` bytes of the buffer, without a copy."""
        return memoryview(self.buffer)[:length]

    def retain(self) -> Lease:
        """Become one more holder; returns the lease, for ``hold = lease.retain()``."""
        with self._lock:
            if self._buffer is None:
                raise RuntimeError("A buffer lease was retained after its last holder released it.")
            self._holders += 1
        return self

    def release(self) -> None:
        """Let go; the last holder to do so returns the buffer to the pool."""
        with self._lock:
            if self._buffer is None:
                raise RuntimeError("A buffer lease was released more often than it was held.")
            self._holders -= 1
            if self._holders:
                return
            buffer, self._buffer = self._buffer, None
        _schedule.pause("buffer.release")
        give_back(buffer)


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


def lease(size: int) -> Lease:
    """A lease on a buffer of exactly ``size`` bytes (pooled when large), held once by the caller."""
    return Lease(take(size))
