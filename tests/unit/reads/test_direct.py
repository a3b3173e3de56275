"""DirectReads: a known range split into parallel parts that land straight in the caller's buffer."""

from __future__ import annotations

import os

import pytest

from azstoragetorch._client import PieceChecksums, crc32
from azstoragetorch._reads import DirectReads
from azstoragetorch.exceptions import BlobModifiedDuringReadError
from tests.unit.fakes import InMemoryBlobClient

PART = 1000


def test_parts_of_block_size_fill_the_callers_buffer_in_place() -> None:
    data = os.urandom(5 * PART + 7)
    client = InMemoryBlobClient(data)
    target = bytearray(len(data) - 3)
    DirectReads(client, block_size=PART, max_concurrency=3).read_into(3, memoryview(target), etag='"1"')
    assert bytes(target) == data[3:]
    assert sorted(client.reads) == [
        (3 + start, min(PART, len(target) - start)) for start in range(0, len(target), PART)
    ]


def test_a_read_within_one_part_is_one_request_on_the_callers_thread() -> None:
    client = InMemoryBlobClient(b"abcdef")
    target = bytearray(4)
    DirectReads(client, block_size=PART, max_concurrency=4).read_into(1, memoryview(target), etag=None)
    assert bytes(target) == b"bcde"
    assert client.reads == [(1, 4)]


def test_a_changed_blob_raises_and_every_part_has_ended() -> None:
    client = InMemoryBlobClient(os.urandom(6 * PART))
    with pytest.raises(BlobModifiedDuringReadError):
        DirectReads(client, block_size=PART, max_concurrency=2).read_into(
            0, memoryview(bytearray(6 * PART)), etag='"0"'
        )
    client._pool.shutdown(wait=True)
    assert len(client.reads) <= 2  # the parts after the first window were never sent


def test_checksums_of_all_parts_combine_into_the_ranges_crc() -> None:
    data = os.urandom(4 * PART + 1)
    client = InMemoryBlobClient(data)
    checksums = PieceChecksums(len(data))
    DirectReads(client, block_size=PART, max_concurrency=4).read_into(
        0, memoryview(bytearray(len(data))), etag='"1"', checksums=checksums
    )
    assert checksums.whole() == crc32(data)


def test_read_leased_rounds_the_buffer_to_whole_parts_and_holds_the_bytes() -> None:
    data = os.urandom(3 * PART)
    client = InMemoryBlobClient(data)
    lease = DirectReads(client, block_size=PART, max_concurrency=2).read_leased(10, 2 * PART, etag='"1"')
    try:
        assert bytes(lease.view(2 * PART)) == data[10 : 10 + 2 * PART]
        assert len(lease.buffer) == 2 * PART
    finally:
        lease.release()
