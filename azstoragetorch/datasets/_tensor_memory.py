"""Tensor memory that samples are received into: new byte tensors (shared memory in DataLoader
workers, reused once the main process has let go of it, faulted in with one ``madvise``) and
writable byte views of tensors and buffers."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os
import sys
import threading
from collections.abc import Callable
from typing import cast

import torch
import torch.multiprocessing
import torch.utils.data

_PAGE_SIZE = mmap.PAGESIZE


def _new_byte_tensor(size: int) -> torch.Tensor:
    """A new uint8 tensor of ``size`` elements; in a DataLoader worker, in shared memory, its pages already in.

    A tensor that a worker returns is moved into shared memory when it is sent to the main process,
    which copies it. Received there in the first place, it is sent as it is: one copy of every
    sample and the page faults of a private buffer fewer, in the workers. ``_new_shared`` is how
    torch's own collate allocates a batch in workers; it is private, so without it (or if it fails)
    the tensor is an ordinary one, and torch moves it when sending it.

    Shared memory that the main process has let go of is received into again (see
    :class:`_SegmentPool`): new memory costs the kernel a page fault and a zeroed page for every
    4 KiB, in this process and again when it is freed, which for large samples is more than the
    socket reads that fill it. Pages, new or reused, are faulted in here in one system call (see
    ``_populate``), rather than one page at a time by the socket reads.
    """
    if size and torch.utils.data.get_worker_info() is not None:
        storage = _segments.storage(size)
        if storage is None:
            new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
            try:
                storage = new_shared(size) if new_shared is not None else None
            except Exception:
                storage = None
        if storage is not None and storage.nbytes() == size:
            shared: torch.Tensor = torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[call-overload]
            # EFAULT: the shared-memory file system (/dev/shm) has no room for it, and the first write
            # would kill the worker with SIGBUS. Ordinary memory serves a transform that decodes the
            # tensor rather than returning it.
            if _populate(shared) != errno.EFAULT:
                return shared
    # Ordinary memory is often heap memory used before, already mapped: nothing to fault in ahead.
    return torch.empty(size, dtype=torch.uint8)


class _SegmentPool:
    """Shared-memory files (Linux ``memfd``) that a DataLoader worker's tensors are made in, each reused
    once no process holds a tensor made in it.

    Torch sends a tensor in shared memory to the main process as a file descriptor, and the tensor
    keeps its descriptor open for as long as it lives, there as here. Each tensor is made through a
    descriptor of its own, opened anew on the segment's file and holding a shared ``flock``; the
    descriptors torch duplicates from it, in this process, in the one that sends it and in the one
    that receives it, share that lock, which is released when the last of them is closed: when the
    last tensor over that memory, in any process, is freed. A segment that takes an exclusive lock
    at once is therefore held by nobody, and is reused. A process forked from one that uses the pool
    inherits the descriptors of its live tensors, so their segments stay locked until it has
    exited or freed them: reuse only ever waits longer, never comes early.

    Used only where torch shares tensors by file descriptor (its default on Linux); elsewhere, or if
    a segment cannot be made, :meth:`storage` returns ``None`` and torch allocates as usual.
    """

    # A segment serves a sample at most this many times smaller (or of one page at most): samples of
    # about the same size share segments; a small sample does not pin a large segment.
    _MAX_SLACK = 2
    # What one process keeps for reuse: in-flight samples beyond it are made in new segments, closed
    # when freed. A worker has at most prefetch_factor batches in flight, plus the batch in use.
    _MAX_SEGMENTS = 128
    _MAX_BYTES = 1024 * 1024 * 1024

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._next = 0  # where the next search for a free segment starts, so all of them take turns
        self._available = hasattr(os, "memfd_create") and sys.platform.startswith("linux")

    def storage(self, size: int) -> torch.UntypedStorage | None:
        """A shared storage of ``size`` bytes over a free segment, or ``None`` where there can be none."""
        strategy = torch.multiprocessing.get_sharing_strategy()  # type: ignore[no-untyped-call]
        if not self._available or strategy != "file_descriptor":
            return None
        new_shared_fd = getattr(torch.UntypedStorage, "_new_shared_fd_cpu", None)
        if new_shared_fd is None:
            return None
        try:
            descriptor = self._locked_descriptor(size)
        except OSError:
            return None
        try:
            storage = new_shared_fd(descriptor, size)  # maps the segment, and keeps a duplicate of descriptor
        except Exception:
            return None
        finally:
            os.close(descriptor)
        return storage if storage.nbytes() == size else None

    def _locked_descriptor(self, size: int) -> int:
        """A new descriptor of a free segment of at least ``size`` bytes, holding the segment's shared lock."""
        with self._lock:
            segment = self._free_segment(size)
            if segment is None:
                # A power of two: samples of sizes up to half as large again reuse it. Only the pages a
                # tensor maps are ever touched, so room beyond the size asked for costs no memory
                # until a larger sample uses it.
                segment = _Segment(max(_PAGE_SIZE, 1 << (size - 1).bit_length()))
                if not self._make_room(segment.capacity):
                    try:
                        return segment.locked_descriptor()
                    finally:
                        segment.close()  # not kept: freed with the last tensor made in it
                self._segments.append(segment)
            return segment.locked_descriptor()

    def _free_segment(self, size: int) -> _Segment | None:
        count = len(self._segments)
        largest = max(size * self._MAX_SLACK, _PAGE_SIZE)
        for step in range(count):
            index = (self._next + step) % count
            segment = self._segments[index]
            if size <= segment.capacity <= largest and segment.is_free():
                self._next = index + 1
                return segment
        return None

    def _make_room(self, capacity: int) -> bool:
        """Whether a new segment of ``capacity`` bytes may be kept, after closing free ones if need be."""

        def fits() -> bool:
            held = sum(segment.capacity for segment in self._segments)
            return len(self._segments) < self._MAX_SEGMENTS and held + capacity <= self._MAX_BYTES

        if fits():
            return True
        for segment in [segment for segment in self._segments if segment.is_free()]:
            self._segments.remove(segment)
            segment.close()
            if fits():
                return True
        return False

    def forget(self) -> None:
        """In a forked child: its parent's segments are its parent's to reuse, never the child's."""
        self._lock = threading.Lock()
        for segment in self._segments:
            segment.close()
        self._segments = []
        self._next = 0


class _Segment:
    """One shared-memory file of the pool, through the descriptor that tests whether it is free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._fd = os.memfd_create("azstoragetorch-sample", os.MFD_CLOEXEC)
        try:
            os.ftruncate(self._fd, capacity)
        except OSError:
            os.close(self._fd)
            raise

    def is_free(self) -> bool:
        """No tensor made in this segment is alive in any process (none holds a shared lock)."""
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        return True

    def locked_descriptor(self) -> int:
        """A new open file description of the segment, holding a shared lock for its lifetime.

        Its own description, not a duplicate of ours: a lock belongs to the description, and ours
        must stay free to test the others with.
        """
        descriptor = os.open(f"/proc/self/fd/{self._fd}", os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH)
        except OSError:
            os.close(descriptor)
            raise
        return descriptor

    def close(self) -> None:
        os.close(self._fd)


_segments = _SegmentPool()


def _forget_segments() -> None:
    _segments.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_segments)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in, writable, without writing to it


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], madvise)


_madvise = _libc_madvise()


def _populate(tensor: torch.Tensor) -> int:
    """Fault in the whole pages of a new tensor's memory at once, before anything is written into it.

    Fresh memory faults once per page when it is first written. Taken inside the socket reads of a
    worker's many sample threads, those faults contend for the process's memory map; one
    ``madvise`` maps all the pages in a single call instead (the kernel still allocates and zeroes
    each of them, which no call can avoid). It also tells, before anything is written, whether a
    write would raise SIGBUS (a full ``/dev/shm``). Where this is not available (not Linux, a
    kernel before 5.14) or fails, the first writes fault the pages in, one at a time. Returns the
    ``errno`` of a failure (``EFAULT``: a write would raise SIGBUS), else 0.
    """
    if _madvise is None or tensor.nbytes < _PAGE_SIZE:
        return 0
    start = -(-tensor.data_ptr() // _PAGE_SIZE) * _PAGE_SIZE  # whole pages of the tensor's own memory only
    end = (tensor.data_ptr() + tensor.nbytes) // _PAGE_SIZE * _PAGE_SIZE
    if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        return ctypes.get_errno() or -1
    return 0


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (which must outlive the view)."""
    if tensor.nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def _writable_bytes(buffer: object) -> memoryview:
    """``buffer`` (a tensor or a buffer) as a flat writable byte view; a clear error for what cannot be one."""
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8:
            raise TypeError(
                f"buffer is a tensor of {buffer.dtype}; readinto fills torch.uint8 tensors "
                "(for another dtype, pass tensor.view(torch.uint8) of a contiguous tensor)."
            )
        if buffer.device.type != "cpu" or buffer.layout != torch.strided:
            raise ValueError(
                f"buffer is a {buffer.layout} tensor on {buffer.device}; readinto fills dense CPU tensors "
                "(read into one, pinned for speed, then move it with .to(device, non_blocking=True))."
            )
        if not buffer.is_contiguous():
            raise ValueError("buffer is a non-contiguous tensor; pass a contiguous one (tensor.contiguous() copies).")
        return _tensor_bytes(buffer)
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"buffer must be a torch.Tensor or a writable bytes-like object, not {type(buffer).__name__}."
        ) from None
    if view.readonly:
        raise TypeError(
            f"buffer is read-only ({type(buffer).__name__}); pass a bytearray, a tensor or another writable buffer."
        )
    if not view.c_contiguous:
        raise ValueError(f"buffer is a non-contiguous {type(buffer).__name__}; pass a contiguous one.")
    return view.cast("B")
