"""The process-wide pool of transfer buffers."""

from __future__ import annotations

import os

import pytest

from azstoragetorch._client import _buffers
from azstoragetorch._client._buffers import BufferPool

MiB = 1024 * 1024


def test_a_returned_buffer_is_reused_for_the_same_size() -> None:
    pool = BufferPool(max_idle_bytes=4 * MiB)
    first = pool.take(2 * MiB)
    pool.give_back(first)

    assert pool.take(3 * MiB) is not first  # sizes must match exactly
    assert pool.take(2 * MiB) is first
    assert pool.idle_bytes == 0


def test_idle_buffers_are_capped_and_the_longest_idle_go_first() -> None:
    pool = BufferPool(max_idle_bytes=3 * MiB)
    small = [pool.take(MiB) for _ in range(3)]
    for buffer in small:
        pool.give_back(buffer)
    large = pool.take(2 * MiB)
    pool.give_back(large)  # needs room: the two small buffers returned first are freed

    assert pool.idle_bytes == 3 * MiB
    assert pool.take(2 * MiB) is large
    assert pool.take(MiB) is small[2]
    assert not any(pool.take(MiB) is buffer for buffer in small)


def test_buffers_larger_than_the_cap_or_small_are_not_kept() -> None:
    pool = BufferPool(max_idle_bytes=2 * MiB)
    pool.give_back(bytearray(2 * MiB + 1))
    pool.give_back(bytearray(MiB - 1))
    assert pool.idle_bytes == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_pool() -> None:
    _buffers.give_back(_buffers.take(MiB))
    assert _buffers.pool.idle_bytes >= MiB
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, str(_buffers.pool.idle_bytes).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 64) == b"0"


def test_a_lease_returns_its_buffer_once_its_last_holder_releases_it(monkeypatch: pytest.MonkeyPatch) -> None:
    returned: list[bytearray] = []
    monkeypatch.setattr(_buffers, "give_back", returned.append)
    lease = _buffers.lease(2 * MiB)
    buffer = lease.buffer
    reader = lease.retain()
    lease.release()
    assert returned == []  # the reader still holds it
    assert reader.view(3).obj is buffer
    reader.release()
    assert len(returned) == 1 and returned[0] is buffer


def test_a_lease_cannot_be_used_or_released_after_its_last_release() -> None:
    lease = _buffers.lease(16)
    lease.release()
    with pytest.raises(RuntimeError, match="released more often"):
        lease.release()
    with pytest.raises(RuntimeError, match="after its last holder"):
        lease.retain()
    with pytest.raises(RuntimeError, match="after its last holder"):
        lease.view(1)
