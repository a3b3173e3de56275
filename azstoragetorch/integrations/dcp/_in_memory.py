"""Loading one item from fetched bytes in memory: a file over them, the part of the stored tensor
the load asked for, and the copy into the state dict's tensor."""

from __future__ import annotations

import ctypes
import io
import os
from collections.abc import Sequence
from typing import Any

import torch
from typing_extensions import override


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview, without copying it (``io.BytesIO`` would)."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._position = 0

    @override
    def readable(self) -> bool:
        return True

    @override
    def seekable(self) -> bool:
        return True

    @override
    def tell(self) -> int:
        return self._position

    @override
    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}[whence]
        self._position = max(0, base + offset)
        return self._position

    @override
    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._position : self._position + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The part of a stored tensor that a load asked for: ``lengths`` elements from ``offsets``, per dimension.

    What torch's ``FileSystemReader`` does with its private ``narrow_tensor_by_index``, with the public
    ``Tensor.narrow``: a view, no copy; a dimension read whole is left alone.
    """
    for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        if length < tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor


def _copy_on_this_thread(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` as one memory copy on the calling thread, where the layouts allow it.

    ``copy_`` splits a large copy across torch's OpenMP threads, which then spin for a while waiting
    for the next parallel region. A load makes one such copy per item, between fetches that need the
    cores, so that spinning would take the CPU time the transfers (and, on the same machine, the
    service) need. ``ctypes.memmove`` also lets go of the GIL.
    """
    plain = all(
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and not tensor.is_quantized
        for tensor in (target, source)
    )
    if plain and target.dtype == source.dtype and target.size() == source.size():
        ctypes.memmove(target.data_ptr(), source.data_ptr(), source.nbytes)
    else:
        target.copy_(source)
