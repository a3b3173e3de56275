"""WholeBlobRead: a whole blob sized by its first answer, the rest fetched in parallel, pinned."""

from __future__ import annotations

import os

import pytest

from azstoragetorch._client import Recorder
from azstoragetorch._reads import WholeBlobRead
from tests.unit.fakes import InMemoryBlobClient

BLOCK = 1000


def test_a_blob_within_block_size_costs_one_request() -> None:
    client = InMemoryBlobClient(b"sample")
    properties, data = WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read()
    assert data == b"sample" and isinstance(data, bytes)
    assert properties.size == 6 and properties.etag == client.properties.etag
    assert client.reads == [(0, 6)]


def test_a_larger_blob_arrives_as_the_first_block_then_parallel_parts() -> None:
    data = os.urandom(3 * BLOCK + 5)
    client = InMemoryBlobClient(data)
    assert WholeBlobRead(client, block_size=BLOCK, max_concurrency=2).read()[1] == data
    assert client.reads[0] == (0, BLOCK)
    assert sorted(client.reads[1:]) == [(BLOCK, BLOCK), (2 * BLOCK, BLOCK), (3 * BLOCK, 5)]


def test_read_into_allocates_once_with_the_blob_size() -> None:
    data = os.urandom(2 * BLOCK + 1)
    client = InMemoryBlobClient(data)
    sizes: list[int] = []
    target = bytearray(len(data))

    def allocate(size: int) -> memoryview:
        sizes.append(size)
        return memoryview(target)

    properties = WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read_into(allocate)
    assert sizes == [len(data)] and properties.size == len(data)
    assert bytes(target) == data


def test_read_into_refuses_memory_of_the_wrong_size() -> None:
    client = InMemoryBlobClient(b"0123456789")
    with pytest.raises(ValueError, match="allocate returned 4 bytes for a blob of 10"):
        WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read_into(lambda size: memoryview(bytearray(4)))


def test_read_if_changed_returns_nothing_for_the_current_etag() -> None:
    client = InMemoryBlobClient(b"cached")
    whole = WholeBlobRead(client, block_size=BLOCK, max_concurrency=4)
    assert whole.read_if_changed(client.properties.etag) is None
    assert whole.read_if_changed('"0"') == (client.properties, b"cached")


def test_the_first_answer_gives_a_progress_hook_its_total() -> None:
    client = InMemoryBlobClient(os.urandom(2 * BLOCK)).with_recorder(Recorder())
    WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read()
    assert client.recorder.total == 2 * BLOCK


def test_an_empty_blob() -> None:
    client = InMemoryBlobClient(b"")
    assert WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read()[1] == b""
