"""How Blob.read_tensor allocates and Blob.readinto accepts memory, without a service."""

from __future__ import annotations

import ctypes
import errno
import mmap
import sys
import types

import pytest
import torch
import torch.utils.data

from azstoragetorch.datasets import _tensor_memory


@pytest.fixture
def in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = types.SimpleNamespace(id=0, num_workers=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)


def test_outside_workers_a_tensor_is_ordinary_memory() -> None:
    tensor = _tensor_memory._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and tensor.dtype == torch.uint8 and not tensor.is_shared()


def test_in_a_worker_a_tensor_is_allocated_in_shared_memory(in_a_worker: None) -> None:
    tensor = _tensor_memory._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and tensor.dtype == torch.uint8 and tensor.is_shared()
    view = _tensor_memory._tensor_bytes(tensor)
    view[:] = bytes(range(256)) * 3 + bytes(232)
    assert tensor[:256].tolist() == list(range(256))
    assert not _tensor_memory._new_byte_tensor(0).is_shared()  # nothing to share


def test_without_torchs_private_allocator_a_worker_falls_back_to_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = next(cls for cls in torch.UntypedStorage.__mro__ if "_new_shared" in vars(cls))
    monkeypatch.delattr(owner, "_new_shared")
    assert not hasattr(torch.UntypedStorage, "_new_shared")
    tensor = _tensor_memory._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and not tensor.is_shared()


def test_a_failing_shared_allocation_falls_back_to_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(size: int) -> torch.UntypedStorage:
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    tensor = _tensor_memory._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and not tensor.is_shared()


def _resident_pages(tensor: torch.Tensor) -> tuple[int, int]:
    """(pages in memory, pages) of a page-aligned tensor's memory, by mincore(2)."""
    pages = -(-tensor.nbytes // mmap.PAGESIZE)
    vector = (ctypes.c_ubyte * pages)()
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    assert libc.mincore(tensor.data_ptr(), tensor.nbytes, vector) == 0, ctypes.get_errno()
    return sum(byte & 1 for byte in vector), pages


def _populate_write_supported() -> bool:
    if _tensor_memory._madvise is None:
        return False
    with mmap.mmap(-1, mmap.PAGESIZE) as probe:
        address = ctypes.addressof(ctypes.c_char.from_buffer(probe))
        supported = _tensor_memory._madvise(address, mmap.PAGESIZE, _tensor_memory._MADV_POPULATE_WRITE) == 0
    return supported


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="MADV_POPULATE_WRITE and mincore are Linux's")
def test_in_a_worker_a_new_tensors_pages_are_in_memory_before_it_is_filled(in_a_worker: None) -> None:
    # Each shared tensor is fresh memory: mapped in one madvise rather than one fault per page inside the
    # socket reads of the worker's sample threads (#14, large samples through workers).
    if not _populate_write_supported():
        pytest.skip("this kernel has no MADV_POPULATE_WRITE (Linux < 5.14)")
    tensor = _tensor_memory._new_byte_tensor(64 * mmap.PAGESIZE)
    assert tensor.is_shared()
    resident, pages = _resident_pages(tensor)
    assert resident == pages
    assert tensor.sum() == 0  # populated, not written: new shared memory reads as zeros


def test_without_madvise_a_new_tensor_is_still_made(in_a_worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tensor_memory, "_madvise", None)
    tensor = _tensor_memory._new_byte_tensor(64 * mmap.PAGESIZE)
    assert tensor.shape == (64 * mmap.PAGESIZE,) and tensor.is_shared()


def test_a_failing_madvise_leaves_the_tensor_as_it_was(in_a_worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[int, int, int]] = []

    def refused(address: int, length: int, advice: int) -> int:
        calls.append((address, length, advice))
        ctypes.set_errno(errno.EINVAL)  # a kernel before 5.14
        return -1

    monkeypatch.setattr(_tensor_memory, "_madvise", refused)
    tensor = _tensor_memory._new_byte_tensor(64 * mmap.PAGESIZE + 10)
    assert tensor.shape == (64 * mmap.PAGESIZE + 10,) and tensor.is_shared()
    ((address, length, advice),) = calls
    # Whole pages of the tensor's own memory only: never past its end.
    assert address % mmap.PAGESIZE == 0 and address >= tensor.data_ptr()
    assert address + length <= tensor.data_ptr() + tensor.nbytes and advice == _tensor_memory._MADV_POPULATE_WRITE
    _tensor_memory._tensor_bytes(tensor)[:] = b"\x01" * tensor.nbytes
    assert tensor.sum() == tensor.nbytes


def test_a_worker_whose_shared_memory_is_full_reads_into_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MADV_POPULATE_WRITE fails with EFAULT where the first write would raise SIGBUS: /dev/shm is full
    # (a container's default 64 MB). Writing into that tensor would kill the worker.
    refused: list[int] = []

    def madvise(address: int, length: int, advice: int) -> int:
        if not refused:
            refused.append(address)
            ctypes.set_errno(errno.EFAULT)
            return -1
        return 0

    monkeypatch.setattr(_tensor_memory, "_madvise", madvise)
    tensor = _tensor_memory._new_byte_tensor(64 * mmap.PAGESIZE)
    assert refused and tensor.shape == (64 * mmap.PAGESIZE,) and not tensor.is_shared()
    _tensor_memory._tensor_bytes(tensor)[:] = b"\x02" * tensor.nbytes
    assert tensor.sum() == 2 * tensor.nbytes


def test_a_tensor_view_writes_through_to_the_tensor_at_its_offset() -> None:
    base = torch.zeros(100, dtype=torch.uint8)
    window = base[10:20]
    view = _tensor_memory._writable_bytes(window)
    view[:] = bytes(range(1, 11))
    assert base[10:20].tolist() == list(range(1, 11)) and base[:10].sum() == 0 and base[20:].sum() == 0
