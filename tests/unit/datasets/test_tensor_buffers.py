"""How Blob.read_tensor allocates and Blob.readinto accepts memory, without a service."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.utils.data

from azstoragetorch.datasets import _tensor_memory


@pytest.fixture
def in_a_worker(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """As in a DataLoader worker, with a segment pool of its own (closed afterwards)."""
    worker = types.SimpleNamespace(id=0, num_workers=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)
    pool = _tensor_memory._SegmentPool()
    monkeypatch.setattr(_tensor_memory, "_segments", pool)
    yield
    pool.forget()


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
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_fd_cpu", None)  # defined in C, seen as absent
    tensor = _tensor_memory._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and not tensor.is_shared()


def test_a_failing_shared_allocation_falls_back_to_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(size: int) -> torch.UntypedStorage:
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared_fd_cpu", lambda fd, size: full(size))
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


# -- shared memory reused once no process holds it ------------------------------------------------------

linux_only = pytest.mark.skipif(
    not hasattr(os, "memfd_create") or not sys.platform.startswith("linux"), reason="the segment pool is Linux's"
)


def _segment_of(tensor: torch.Tensor) -> tuple[int, int]:
    """(device, inode) of the shared-memory file a shared tensor lives in."""
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _filled(size: int, value: int) -> torch.Tensor:
    tensor = _tensor_memory._new_byte_tensor(size)
    assert tensor.is_shared()
    _tensor_memory._tensor_bytes(tensor)[:] = bytes([value]) * size
    return tensor


@linux_only
def test_a_segment_is_reused_once_its_tensor_is_freed_and_never_before(in_a_worker: None) -> None:
    first = _filled(10_000, 1)
    second = _filled(10_000, 2)
    assert _segment_of(first) != _segment_of(second)  # first is alive: its memory is not handed out again
    first_segment = _segment_of(first)
    del first
    third = _filled(9_000, 3)  # smaller, within the slack: the freed segment serves it
    assert _segment_of(third) == first_segment and third.shape == (9_000,)
    assert torch.all(second == 2)  # untouched by the reuse
    view = third[100:200]  # a view keeps the storage, so the segment, alive
    del third
    fourth = _filled(9_000, 4)
    assert _segment_of(fourth) != first_segment
    assert torch.all(view == 3)


@linux_only
def test_a_small_sample_does_not_take_a_much_larger_segment(in_a_worker: None) -> None:
    large = _filled(64 * mmap.PAGESIZE, 1)
    large_segment = _segment_of(large)
    del large
    small = _filled(100, 2)
    assert _segment_of(small) != large_segment
    again = _filled(40 * mmap.PAGESIZE, 3)
    assert _segment_of(again) == large_segment


@linux_only
def test_segments_kept_are_bounded_and_the_rest_close_when_freed(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_tensor_memory._SegmentPool, "_MAX_SEGMENTS", 3)
    before = _open_fds()
    alive = [_filled(5_000, index) for index in range(10)]
    assert len(_tensor_memory._segments._segments) == 3
    # Each live tensor holds one descriptor (torch's); the pool one per kept segment.
    assert _open_fds() == before + 10 + 3
    del alive
    assert _open_fds() == before + 3
    for round_index in range(50):  # many samples, one at a time: the kept segments serve them all
        sample = _filled(5_000, round_index)
        del sample
    assert _open_fds() == before + 3
    _tensor_memory._segments.forget()
    assert _open_fds() == before


@linux_only
def test_free_segments_make_room_for_a_new_size(in_a_worker: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tensor_memory._SegmentPool, "_MAX_BYTES", 4 * mmap.PAGESIZE)
    small = [_filled(mmap.PAGESIZE, 1) for _ in range(4)]
    del small
    # A size none of the free segments fits: they are closed to make room for it.
    large = _filled(3 * mmap.PAGESIZE, 2)
    capacities = [segment.capacity for segment in _tensor_memory._segments._segments]
    assert capacities == [4 * mmap.PAGESIZE]
    assert torch.all(large == 2)


@linux_only
def test_under_the_file_system_sharing_strategy_torch_allocates(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torch.multiprocessing, "get_sharing_strategy", lambda: "file_system")
    tensor = _tensor_memory._new_byte_tensor(10_000)
    assert tensor.is_shared() and not _tensor_memory._segments._segments


@linux_only
def test_a_pool_that_cannot_make_a_segment_leaves_it_to_torch(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memfd(name: str, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "memfd_create", no_memfd)
    tensor = _tensor_memory._new_byte_tensor(10_000)
    assert tensor.is_shared() and not _tensor_memory._segments._segments


@linux_only
def test_a_forked_child_forgets_its_parents_segments(in_a_worker: None) -> None:
    kept = _filled(10_000, 1)
    del kept
    assert _tensor_memory._segments._segments
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports by its exit status
        os._exit(0 if not _tensor_memory._segments._segments else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _tensor_memory._segments._segments  # the parent's are its own still


def _hold_then_report(queue: Any, held: Any, release: Any, results: Any) -> None:
    tensor = queue.get()
    held.set()
    release.wait(60)
    results.put((tensor.numel(), bytes(tensor[:8].tolist()), bool(torch.all(tensor == tensor[0]))))
    del tensor


@linux_only
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_a_segment_held_by_another_process_is_not_reused_until_it_lets_go(in_a_worker: None, start_method: str) -> None:
    context = torch.multiprocessing.get_context(start_method)
    queue, results = context.Queue(), context.Queue()
    held, release = context.Event(), context.Event()
    child = context.Process(target=_hold_then_report, args=(queue, held, release, results))
    child.start()
    try:
        sent = _filled(3 * mmap.PAGESIZE + 5, 7)
        segment = _segment_of(sent)
        queue.put(sent)
        assert held.wait(60)
        del sent
        # The child holds the tensor: new samples, even of the same size, get other memory.
        others = [_filled(3 * mmap.PAGESIZE + 5, 8 + index) for index in range(5)]
        assert segment not in {_segment_of(other) for other in others}
        del others
        release.set()
        assert results.get(timeout=60) == (3 * mmap.PAGESIZE + 5, bytes([7] * 8), True)
        child.join(60)
        assert child.exitcode == 0
        reused = _filled(3 * mmap.PAGESIZE + 5, 9)  # let go of everywhere: the segment serves again
        assert segment in {_segment_of(reused)} | {
            (os.fstat(s._fd).st_dev, os.fstat(s._fd).st_ino) for s in _tensor_memory._segments._segments
        }
    finally:
        release.set()
        child.join(60)
        if child.is_alive():
            child.kill()
