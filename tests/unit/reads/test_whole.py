"""WholeBlobRead: a whole blob sized by its first answer, the rest fetched in parallel, pinned."""

from __future__ import annotations

import os
from typing import Any

import pytest

from azstoragetorch._client import BlobProperties, IntoBytes, Recorder
from azstoragetorch._reads import WholeBlobRead
from azstoragetorch.exceptions import BlobModifiedDuringReadError
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


class WatchedClient(InMemoryBlobClient):
    """The in-memory client that notes what each first answer was received into, and whose blob can
    be replaced once its first answer is in."""

    def __init__(self, data: bytes, *, replaced_by: bytes | None = None) -> None:
        super().__init__(data)
        self.targets: list[type] = []
        self.etag = '"1"'
        self._replaced_by = replaced_by

    @property
    def properties(self) -> BlobProperties:
        return BlobProperties(size=len(self.data), etag=self.etag)

    def fetch_range_into(self, offset: int, into: Any, *, etag: str | None, **options: Any) -> Any:
        if not callable(into):
            return super().fetch_range_into(offset, into, etag=etag, **options)

        def noted(properties: BlobProperties) -> Any:
            target = into(properties)
            self.targets.append(type(target))
            return target

        answer = super().fetch_range_into(offset, noted, etag=etag, **options)
        if self._replaced_by is not None:
            self.data, self.etag, self._replaced_by = self._replaced_by, '"2"', None
        return answer


@pytest.mark.parametrize("size", [0, 1, BLOCK])
def test_a_blob_its_first_answer_holds_is_received_as_bytes_with_no_buffer(size: int) -> None:
    data = os.urandom(size)
    client = WatchedClient(data)
    properties, received = WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read()
    assert received == data and type(received) is bytes and properties.size == size
    assert client.targets == [IntoBytes]


def test_a_larger_blob_is_received_into_one_buffer() -> None:
    data = os.urandom(BLOCK + 1)
    client = WatchedClient(data)
    assert WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read()[1] == data
    assert client.targets == [memoryview]


def test_read_into_never_receives_bytes() -> None:
    data = os.urandom(10)
    client = WatchedClient(data)
    target = bytearray(10)
    WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read_into(lambda size: memoryview(target))
    assert bytes(target) == data and client.targets == [memoryview]


def test_a_blob_replaced_after_its_first_answer_raises_rather_than_mixing_versions() -> None:
    client = WatchedClient(os.urandom(3 * BLOCK), replaced_by=os.urandom(3 * BLOCK))
    with pytest.raises(BlobModifiedDuringReadError):
        WholeBlobRead(client, block_size=BLOCK, max_concurrency=2).read()


def test_a_conditional_read_of_a_changed_blob_is_received_as_bytes() -> None:
    client = WatchedClient(b"fresh")
    assert WholeBlobRead(client, block_size=BLOCK, max_concurrency=4).read_if_changed('"0"') == (
        client.properties,
        b"fresh",
    )
    assert client.targets == [IntoBytes]
