import io
import os
import random
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azstoragetorch._client import _buffers, _schedule
from azstoragetorch._reads import DirectReads, ReadAheadWindow
from azstoragetorch._reads import _window as _read_ahead
from azstoragetorch._reads._window import JUMP_FETCH_BYTES
from tests.unit.fakes import InMemoryBlobClient

CHUNK = 1024


@pytest.fixture(autouse=True)
def _watch_direct_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Record every direct read in the fake's ``parallel_reads``: (offset, length, part size)."""
    read_into = DirectReads.read_into

    def watched(self: DirectReads, offset: int, buffer: memoryview, **kwargs: object) -> None:
        self._source.parallel_reads.append((offset, len(buffer), self._block_size))  # type: ignore[attr-defined]
        read_into(self, offset, buffer, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(DirectReads, "read_into", watched)


def make_buffer(
    data: bytes, *, max_chunks: int = 4, first: int = CHUNK, block_size: int = CHUNK
) -> tuple[ReadAheadWindow, InMemoryBlobClient]:
    client = InMemoryBlobClient(data)
    buffer = ReadAheadWindow(
        client,  # type: ignore[arg-type]
        client.properties,
        block_size=block_size,
        max_chunks=max_chunks,
        first_chunk=bytearray(data[:first]),
    )
    return buffer, client


def read(buffer: ReadAheadWindow, position: int, size: int) -> bytes:
    target = bytearray(size)
    count = buffer.readinto(position, memoryview(target))
    return bytes(target[:count])


def test_small_sequential_reads_cost_one_request_per_chunk() -> None:
    data = os.urandom(CHUNK * 20)
    buffer, client = make_buffer(data)
    out = b"".join(read(buffer, position, 10) for position in range(0, len(data), 10))
    assert out == data
    # Every chunk after the first is fetched exactly once, however many reads it serves.
    assert len(client.reads) == 19
    assert len({offset for offset, _ in client.reads}) == 19


def test_read_ahead_keeps_several_chunks_in_flight_but_bounded() -> None:
    data = os.urandom(CHUNK * 40)
    buffer, client = make_buffer(data, max_chunks=4)
    for position in range(0, len(data), 100):
        read(buffer, position, 100)
        assert len(buffer._store) <= 5  # max_chunks + 1: the memory bound
    requested = sorted(offset for offset, _ in client.reads)
    assert requested == list(range(CHUNK, CHUNK * 40, CHUNK))


def test_a_jump_fetches_a_small_chunk_and_resets_the_window() -> None:
    data = os.urandom(CHUNK * 50)
    buffer, client = make_buffer(data, max_chunks=8)
    for position in range(0, CHUNK * 10, 512):
        read(buffer, position, 512)
    assert read(buffer, CHUNK * 40 + 3, 5) == data[CHUNK * 40 + 3 : CHUNK * 40 + 8]
    near_the_jump = [request for request in client.reads if request[0] >= CHUNK * 30]
    assert near_the_jump == [(CHUNK * 40 + 3, min(CHUNK, JUMP_FETCH_BYTES))]  # nothing read ahead of it


def test_reads_past_the_end_return_nothing() -> None:
    buffer, _ = make_buffer(b"abc")
    assert read(buffer, 3, 10) == b""
    assert read(buffer, 100, 10) == b""
    assert read(buffer, 1, 10) == b"bc"


def test_empty_blob() -> None:
    buffer, client = make_buffer(b"")
    assert read(buffer, 0, 10) == b""
    assert client.reads == []


def test_large_read_spanning_many_chunks() -> None:
    data = os.urandom(CHUNK * 30 + 17)
    buffer, _ = make_buffer(data)
    assert read(buffer, 5, len(data)) == data[5:]


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, CHUNK * 12),
    operations=st.lists(st.tuples(st.integers(0, CHUNK * 13), st.integers(0, CHUNK * 3)), max_size=25),
    max_chunks=st.integers(1, 5),
)
def test_random_reads_match_bytesio(size: int, operations: list[tuple[int, int]], max_chunks: int) -> None:
    data = os.urandom(size)
    buffer, _ = make_buffer(data, max_chunks=max_chunks, first=min(size, CHUNK))
    reference = io.BytesIO(data)
    for position, length in operations:
        reference.seek(position)
        assert read(buffer, position, length) == reference.read(length)
        assert len(buffer._store) <= max_chunks + 1


def test_large_uncovered_reads_go_straight_to_the_destination(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_read_ahead, "AFTER_DIRECT_BYTES", 64)
    data = os.urandom(CHUNK * 40)
    buffer, client = make_buffer(data, max_chunks=4)
    # A header-sized read, then a tensor-sized read, as torch.load does for each record.
    assert read(buffer, CHUNK * 10, 30) == data[CHUNK * 10 : CHUNK * 10 + 30]
    assert read(buffer, CHUNK * 10 + 64, CHUNK * 12) == data[CHUNK * 10 + 64 : CHUNK * 22 + 64]
    assert read(buffer, CHUNK * 22 + 64, 30) == data[CHUNK * 22 + 64 : CHUNK * 22 + 94]
    [(offset, length, block_size)] = client.parallel_reads
    assert offset > CHUNK * 10 + 64 and offset + length == CHUNK * 22 + 64  # what the chunk did not cover
    assert block_size == CHUNK  # parts of block_size; 12 chunks >= max_chunks * block_size
    # The small read after it was served by the small chunk fetched alongside, not a new request.
    assert (CHUNK * 22 + 64, 64) in client.reads
    assert not any(start == CHUNK * 22 + 64 and length != 64 for start, length in client.reads)


@pytest.mark.parametrize("max_chunks", [2, 3, 4])
def test_random_reads_with_pooled_chunks_under_a_perturbed_schedule(max_chunks: int) -> None:
    """Chunks of 1 MiB come from the process's buffer pool: an evicted chunk's buffer must not be
    downloaded into again while a read still copies out of it (it was, and reads returned other bytes)."""
    mib = 1024 * 1024
    data = random.Random(max_chunks).randbytes(14 * mib + 5)
    for seed in (1, 2, 3):
        print(f"perturbation seed {seed}, max_chunks {max_chunks}")
        buffer, _ = make_buffer(data, max_chunks=max_chunks, first=mib, block_size=mib)
        chooser = random.Random(seed)
        position = 0
        with _schedule.perturbed(seed, max_delay=0.002, probability=1.0, only=frozenset({"chunk.copy"})):
            for step in range(300):
                if chooser.random() < 0.35:
                    position = chooser.randrange(0, len(data))
                elif chooser.random() < 0.2:
                    position = max(0, position - chooser.randrange(0, 2 * mib))
                length = chooser.choice([1, 100, 4096, mib // 2, mib - 1, mib, mib + 1, 3 * mib])
                got = read(buffer, position, length)
                assert got == data[position : position + length], f"step {step} at {position}"
                position += len(got)
        buffer.close()


def test_closing_while_chunks_download_recycles_no_buffer_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    """A buffer goes back to the pool only when its download is done, even if the reader closed first."""
    mib = 1024 * 1024
    data = os.urandom(8 * mib)
    buffer, client = make_buffer(data, first=mib, block_size=mib)
    client.release.clear()  # downloads wait for this
    returned: list[bytearray] = []
    monkeypatch.setattr(_buffers, "give_back", returned.append)
    slow_download_into = client.fetch_range_into
    downloading_into: list[object] = []
    started = threading.Event()

    def download_into(offset: int, target: memoryview, **kwargs: object) -> object:
        downloading_into.append(target.obj)
        started.set()
        client.release.wait(10)
        return slow_download_into(offset, target, **kwargs)  # type: ignore[arg-type]

    client.fetch_range_into = download_into  # type: ignore[method-assign]
    assert read(buffer, 0, 10) == data[:10]  # served by the first chunk; the next one is requested
    buffer.close()
    assert started.wait(10)
    [in_flight] = downloading_into
    assert not any(recycled is in_flight for recycled in returned)  # its download still holds it
    client.release.set()
    client._pool.shutdown(wait=True)
    assert sum(recycled is in_flight for recycled in returned) == 1  # returned once, when done


def test_large_reads_after_the_window_has_widened_still_go_to_the_destination(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A large read whose start the read-ahead already holds copies only that part; the rest goes
    straight into the destination. (It used to widen the window at every chunk it entered and copy
    all of itself, so a checkpoint of large tensors was received into chunks and copied.)"""
    monkeypatch.setattr(_read_ahead, "AFTER_DIRECT_BYTES", 64)
    data = os.urandom(CHUNK * 80)
    buffer, client = make_buffer(data, max_chunks=4)
    position = 0
    for _ in range(20):  # small forward reads: the window widens to max_chunks - 1 chunks ahead
        assert read(buffer, position, 100) == data[position : position + 100]
        position += 100
    for record in range(3):  # then large records, each behind a header-sized read, as torch.load reads them
        for chunk in list(buffer._store._chunks.values()):
            chunk.future.result()  # the fake records a request when it runs
        requested_before = list(client.reads)
        assert read(buffer, position, CHUNK * 15) == data[position : position + CHUNK * 15], f"record {record}"
        position += CHUNK * 15
        direct = [(offset, offset + length) for offset, length, _ in client.parallel_reads]
        new_chunks = [
            (start, length)
            for start, length in client.reads[len(requested_before) :]
            if not any(low <= start < high for low, high in direct)  # the parts of direct reads
        ]
        # No chunk is fetched for the record itself; only the small one after its end.
        assert all(start >= position for start, _ in new_chunks), new_chunks
        assert read(buffer, position, 30) == data[position : position + 30]
        position += 30
    copied_into_records = sum(length for _, length, _ in client.parallel_reads)
    assert copied_into_records >= CHUNK * 15 * 3 - CHUNK * 4  # at most the window held before the first


@pytest.mark.parametrize("seed", [11, 12, 13])
def test_mixed_small_and_direct_reads_under_a_perturbed_schedule(seed: int) -> None:
    """Large reads that are partly held by chunks and partly read directly, between small ones, with
    every hand-off point (chunk pick and copy, part finish, buffer release) perturbed."""
    mib = 1024 * 1024
    data = random.Random(seed).randbytes(20 * mib + 7)
    print(f"perturbation seed {seed}")
    buffer, client = make_buffer(data, max_chunks=3, first=mib, block_size=mib)
    chooser = random.Random(seed)
    position = 0
    with _schedule.perturbed(seed, max_delay=0.002, probability=0.5):
        for step in range(120):
            if chooser.random() < 0.15:
                position = chooser.randrange(0, len(data))
            length = chooser.choice([30, 4096, mib // 3, 3 * mib, 3 * mib + 5, 5 * mib])
            got = read(buffer, position, length)
            assert got == data[position : position + length], f"step {step} at {position}"
            position += len(got)
    buffer.close()
    assert client.parallel_reads  # the direct path ran
