"""Tensor memory that samples are received into: new byte tensors (shared memory in DataLoader
workers, faulted in with one ``madvise``) and writable byte views of tensors and buffers."""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
from collections.abc import Callable
from typing import cast

import torch
import torch.utils.data

_PAGE_SIZE = mmap.PAGESIZE


def _new_byte_tensor(size: int) -> torch.Tensor:
    """A new uint8 tensor of ``size`` elements; in a DataLoader worker, in shared memory, its pages already in.

    A tensor that a worker returns is moved into shared memory when it is sent to the main process,
    which copies it. Received there in the first place, it is sent as it is: one copy of every
    sample and the page faults of a private buffer fewer, in the workers. ``_new_shared`` is how
    torch's own collate allocates a batch in workers; it is private, so without it (or if it fails)
    the tensor is an ordinary one, and torch moves it when sending it.

    Every shared tensor is new memory (the main process may still be reading the ones sent before),
    so its pages are faulted in here, in one system call (see ``_populate``), rather than one page at
    a time by the socket reads that fill it.
    """
    if size and torch.utils.data.get_worker_info() is not None:
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
