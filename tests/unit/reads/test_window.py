"""ReadAheadWindow and its opening read (the window's own behaviour is in tests/unit/reads/test_read_ahead.py)."""

from __future__ import annotations

import os

import pytest

from azstoragetorch._client import PieceChecksums, _buffers, crc32
from azstoragetorch._reads import ReadAheadWindow, read_first
from tests.unit.fakes import InMemoryBlobClient

CHUNK = 1024


def open_window(client: InMemoryBlobClient, *, checksums: PieceChecksums | None = None) -> ReadAheadWindow:
    properties, first = read_first(client, CHUNK, validate_content=False)
    return ReadAheadWindow(client, properties, block_size=CHUNK, max_chunks=3, first_chunk=first, checksums=checksums)


def test_read_first_sizes_its_buffer_by_the_blob() -> None:
    client = InMemoryBlobClient(b"small")
    properties, first = read_first(client, CHUNK, validate_content=False)
    assert (properties.size, bytes(first)) == (5, b"small")
    assert client.reads == [(0, 5)]


def test_reads_across_the_first_chunk_and_beyond() -> None:
    data = os.urandom(10 * CHUNK + 3)
    client = InMemoryBlobClient(data)
    window = open_window(client)
    target = bytearray(3 * CHUNK)
    assert window.readinto(CHUNK - 10, memoryview(target)) == 3 * CHUNK
    assert bytes(target) == data[CHUNK - 10 : 4 * CHUNK - 10]
    window.close()


def test_whole_crc32_downloads_what_was_never_read_when_asked() -> None:
    data = os.urandom(10 * CHUNK)
    client = InMemoryBlobClient(data)
    window = open_window(client, checksums=PieceChecksums(len(data)))
    window.readinto(0, memoryview(bytearray(10)))
    assert window.whole_crc32(download_rest=False) is None  # read in part
    assert window.whole_crc32(download_rest=True) == crc32(data)
    window.close()


def test_close_gives_every_chunk_back_once(monkeypatch: pytest.MonkeyPatch) -> None:
    returned: list[bytearray] = []
    monkeypatch.setattr(_buffers, "give_back", returned.append)
    mib = 1024 * 1024
    data = os.urandom(6 * mib)
    client = InMemoryBlobClient(data)
    properties, first = read_first(client, mib, validate_content=False)
    window = ReadAheadWindow(client, properties, block_size=mib, max_chunks=3, first_chunk=first)
    for position in range(0, 3 * mib, 4096):
        window.readinto(position, memoryview(bytearray(100)))
    pooled = len(window._store)
    window.close()
    client._pool.shutdown(wait=True)
    assert len(window._store) == 0
    assert len({id(buffer) for buffer in returned}) == len(returned)  # none given back twice
    assert len(returned) >= pooled - 1  # every pooled chunk (the first one is the caller's bytearray)
