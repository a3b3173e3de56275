"""ReadAheadWindow: its opening read, and which reads go straight into the destination (more of the
window's behaviour is in tests/unit/reads/test_read_ahead.py)."""

from __future__ import annotations

import os
import random
import threading
import time
from typing import Any

import pytest

from azstoragetorch._client import PieceChecksums, _buffers, _schedule, crc32
from azstoragetorch._reads import DirectReads, ReadAheadWindow, _window, read_first
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


BLOCK = 4096


def _seeds(default: list[int]) -> list[int]:
    chosen = os.environ.get("AZSTORAGETORCH_FUZZ_SEEDS")
    return [int(seed) for seed in chosen.split(",")] if chosen else default


def watched_window(
    monkeypatch: pytest.MonkeyPatch, data: bytes, *, max_chunks: int = 4
) -> tuple[ReadAheadWindow, InMemoryBlobClient]:
    """A window of BLOCK-sized chunks whose direct reads are recorded in ``client.parallel_reads``."""
    monkeypatch.setattr(_window, "AFTER_DIRECT_BYTES", 64)
    read_into = DirectReads.read_into

    def watched(self: DirectReads, offset: int, buffer: memoryview, **kwargs: Any) -> None:
        self._source.parallel_reads.append((offset, len(buffer), self._block_size))  # type: ignore[attr-defined]
        read_into(self, offset, buffer, **kwargs)

    monkeypatch.setattr(DirectReads, "read_into", watched)
    client = InMemoryBlobClient(data)
    window = ReadAheadWindow(
        client, client.properties, block_size=BLOCK, max_chunks=max_chunks, first_chunk=bytearray(data[:BLOCK])
    )
    return window, client


def read_at(window: ReadAheadWindow, position: int, size: int) -> bytes:
    target = bytearray(size)
    return bytes(target[: window.readinto(position, memoryview(target))])


def test_records_of_a_block_behind_small_headers_go_straight_to_their_destination(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """torch.load's pattern: a header-sized read, then the tensor's storage in one readinto."""
    record = 2 * BLOCK + 100  # at least a block, less than max_chunks * DIRECT_PART_BYTES
    data = os.urandom(40 * BLOCK)
    window, client = watched_window(monkeypatch, data)
    position = BLOCK // 2
    for number in range(8):
        assert read_at(window, position, 30) == data[position : position + 30]
        position += 60
        assert read_at(window, position, record) == data[position : position + record], f"record {number}"
        position += record
    window.close()
    client._pool.shutdown(wait=True)
    direct_bytes = sum(length for _, length, _ in client.parallel_reads)
    assert direct_bytes >= 8 * record - 3 * BLOCK  # at most what the window held before the first record
    assert {part for _, _, part in client.parallel_reads} == {BLOCK}  # whole blocks: fewest requests
    direct = [(offset, offset + length) for offset, length, _ in client.parallel_reads]
    chunked = sum(length for start, length in client.reads if not any(low <= start < high for low, high in direct))
    assert chunked <= 3 * BLOCK + 8 * 64  # the first chunks, then only the small chunk after each record


def test_block_sized_reads_one_after_another_stay_with_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """A reader streaming in block-sized reads keeps the read-ahead that runs across its reads."""
    data = os.urandom(30 * BLOCK)
    window, client = watched_window(monkeypatch, data)
    position = 0
    while position < len(data):
        got = read_at(window, position, BLOCK)
        assert got == data[position : position + BLOCK]
        position += len(got)
    window.close()
    assert len(client.parallel_reads) <= 1  # at most the first of them


def test_reads_below_a_block_stay_with_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(30 * BLOCK)
    window, client = watched_window(monkeypatch, data)
    position = 10
    for _ in range(10):
        assert read_at(window, position, 30) == data[position : position + 30]
        assert read_at(window, position + 30, BLOCK - 1) == data[position + 30 : position + 29 + BLOCK]
        position += 29 + BLOCK
    window.close()
    assert client.parallel_reads == []


def test_a_direct_read_that_fails_part_way_leaves_the_buffer_alone_once_it_raises(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failing part raises while others may still be running: all of them have ended by then."""
    data = os.urandom(40 * BLOCK)
    window, client = watched_window(monkeypatch, data)
    fail_at = 10 * BLOCK
    fetch = client.fetch_range_into
    writes_after_return: list[int] = []
    returned = threading.Event()

    def failing_fetch(offset: int, into: Any, **kwargs: Any) -> Any:
        if offset == fail_at:
            raise ConnectionResetError("injected failure of one part")
        if offset > fail_at:
            time.sleep(0.01)  # the parts after it are still running when it fails
        result = fetch(offset, into, **kwargs)
        if returned.is_set():
            writes_after_return.append(offset)
        return result

    client.fetch_range_into = failing_fetch  # type: ignore[method-assign]
    read_at(window, BLOCK + 10, 30)
    target = bytearray(6 * BLOCK)
    with pytest.raises(ConnectionResetError):
        window.readinto(7 * BLOCK, memoryview(target))
    returned.set()
    snapshot = bytes(target)
    client._pool.shutdown(wait=True)  # whatever was still queued has run (or was cancelled) by now
    assert bytes(target) == snapshot
    assert not any(7 * BLOCK <= offset < 13 * BLOCK for offset in writes_after_return)
    assert client.parallel_reads  # the read did go direct
    window.close()


@pytest.mark.parametrize("seed", _seeds([random.randrange(1 << 30) for _ in range(3)]))
def test_torch_load_pattern_with_failures_under_a_perturbed_schedule(seed: int) -> None:
    """Headers, small records and block-sized records, with jumps, every hand-off point perturbed."""
    print(f"perturbation seed {seed} (AZSTORAGETORCH_FUZZ_SEEDS={seed} replays it)")
    mib = 1024 * 1024
    chooser = random.Random(seed)
    data = chooser.randbytes(24 * mib + 7)
    client = InMemoryBlobClient(data)
    checksums = PieceChecksums(len(data))
    properties, first = read_first(client, mib, validate_content=False)
    window = ReadAheadWindow(client, properties, block_size=mib, max_chunks=3, first_chunk=first, checksums=checksums)
    position = 0
    with _schedule.perturbed(seed, max_delay=0.002, probability=0.5):
        for step in range(100):
            if chooser.random() < 0.1:
                position = chooser.randrange(0, len(data))
            for length in (30, chooser.choice([4096, mib // 2, mib, mib + 3, 2 * mib + 1])):
                got = read_at(window, position, length)
                assert got == data[position : position + length], f"step {step} at {position}"
                position += len(got)
        assert window.whole_crc32(download_rest=True) == crc32(data)
    window.close()
