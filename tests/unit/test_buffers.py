"""The process-wide pool of transfer buffers."""

from __future__ import annotations

import os

import pytest

from azstoragetorch._client import _buffers
from azstoragetorch._client._buffers import BufferPool


def test_a_returned_buffer_is_reused_for_the_same_size() -> None:
    pool = BufferPool(max_idle_bytes=1024)
    first = pool.take(256)
    pool.give_back(first)

    assert pool.take(128) is not first  # sizes must match exactly
    assert pool.take(256) is first
    assert pool.idle_bytes == 0


def test_idle_buffers_are_capped() -> None:
    pool = BufferPool(max_idle_bytes=300)
    buffers = [pool.take(100) for _ in range(5)]
    for buffer in buffers:
        pool.give_back(buffer)

    assert pool.idle_bytes == 300
    kept = [pool.take(100) for _ in range(3)]
    assert all(any(buffer is original for original in buffers) for buffer in kept)
    fourth = pool.take(100)
    assert not any(fourth is original for original in buffers)  # the two beyond the cap were freed


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_starts_with_an_empty_pool() -> None:
    _buffers.give_back(_buffers.take(4096))
    assert _buffers.pool.idle_bytes >= 4096
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the child
        os.write(write, str(_buffers.pool.idle_bytes).encode())
        os._exit(0)
    os.waitpid(child, 0)
    assert os.read(read, 64) == b"0"
