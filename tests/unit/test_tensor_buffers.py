"""How Blob.read_tensor allocates and Blob.readinto accepts memory, without a service."""

from __future__ import annotations

import types

import pytest
import torch
import torch.utils.data

from azstoragetorch import datasets


@pytest.fixture
def in_a_worker(monkeypatch: pytest.MonkeyPatch) -> None:
    worker = types.SimpleNamespace(id=0, num_workers=2)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: worker)


def test_outside_workers_a_tensor_is_ordinary_memory() -> None:
    tensor = datasets._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and tensor.dtype == torch.uint8 and not tensor.is_shared()


def test_in_a_worker_a_tensor_is_allocated_in_shared_memory(in_a_worker: None) -> None:
    tensor = datasets._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and tensor.dtype == torch.uint8 and tensor.is_shared()
    view = datasets._tensor_bytes(tensor)
    view[:] = bytes(range(256)) * 3 + bytes(232)
    assert tensor[:256].tolist() == list(range(256))
    assert not datasets._new_byte_tensor(0).is_shared()  # nothing to share


def test_without_torchs_private_allocator_a_worker_falls_back_to_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner = next(cls for cls in torch.UntypedStorage.__mro__ if "_new_shared" in vars(cls))
    monkeypatch.delattr(owner, "_new_shared")
    assert not hasattr(torch.UntypedStorage, "_new_shared")
    tensor = datasets._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and not tensor.is_shared()


def test_a_failing_shared_allocation_falls_back_to_ordinary_memory(
    in_a_worker: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(size: int) -> torch.UntypedStorage:
        raise RuntimeError("unable to write to file </torch_1_2>: No space left on device")

    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", full)
    tensor = datasets._new_byte_tensor(1000)
    assert tensor.shape == (1000,) and not tensor.is_shared()


def test_a_tensor_view_writes_through_to_the_tensor_at_its_offset() -> None:
    base = torch.zeros(100, dtype=torch.uint8)
    window = base[10:20]
    view = datasets._writable_bytes(window)
    view[:] = bytes(range(1, 11))
    assert base[10:20].tolist() == list(range(1, 11)) and base[:10].sum() == 0 and base[20:].sum() == 0
