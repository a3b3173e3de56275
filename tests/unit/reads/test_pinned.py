"""PinnedBlob: ranges of one blob in any order, all of the version of the first answer."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from azstoragetorch._client import BlobProperties, crc32
from azstoragetorch._reads import PinnedBlob
from azstoragetorch.exceptions import BlobModifiedDuringReadError
from tests.unit.fakes import InMemoryBlobClient


class VersionedClient(InMemoryBlobClient):
    """The in-memory client with a replaceable version and a recorded CRC-32, whose first ranged
    request may fail before any answer."""

    def __init__(self, data: bytes, *, recorded: bool = True, fail_first: bool = False) -> None:
        super().__init__(data)
        self.etag = '"1"'
        self.recorded = recorded
        self.fail_first = fail_first

    @property
    def properties(self) -> BlobProperties:
        return BlobProperties(size=len(self.data), etag=self.etag, crc32=crc32(self.data) if self.recorded else None)

    def fetch_range_into(self, offset: int, into: Any, **request: Any) -> Any:
        with self._lock:
            failing, self.fail_first = self.fail_first, False
            if failing:
                self.etags.append(request["etag"])  # the request went out; its answer never came
        if failing:
            raise ConnectionError("injected failure before any answer")
        return super().fetch_range_into(offset, into, **request)


def read(blob: PinnedBlob, offset: int, length: int) -> bytes:
    lease = blob.read_leased(offset, length)
    try:
        return bytes(lease.view(length))
    finally:
        lease.release()


def test_the_first_range_pins_the_version_and_the_later_ones_are_read_on_its_etag() -> None:
    data = bytes(range(200))
    client = VersionedClient(data)
    blob = PinnedBlob(client, block_size=16, max_concurrency=2)

    assert read(blob, 10, 40) == data[10:50]
    assert read(blob, 100, 100) == data[100:]

    assert client.etags[0] is None  # the first request finds the version
    assert client.etags[1:] == ['"1"'] * (len(client.etags) - 1)
    assert blob.version.etag == '"1"' and client.properties_requests == 0


def test_a_blob_replaced_after_the_first_answer_fails_the_later_ranges() -> None:
    client = VersionedClient(b"a" * 64)
    blob = PinnedBlob(client, block_size=64, max_concurrency=1)
    read(blob, 0, 32)

    client.data, client.etag = b"b" * 64, '"2"'

    with pytest.raises(BlobModifiedDuringReadError):
        read(blob, 32, 32)


def test_ranges_waiting_for_a_first_answer_that_never_came_fail_with_its_error() -> None:
    client = VersionedClient(b"x" * 64, fail_first=True)
    blob = PinnedBlob(client, block_size=64, max_concurrency=1)

    with pytest.raises(ConnectionError, match="injected"):
        read(blob, 0, 32)
    with pytest.raises(ConnectionError, match="injected"):
        read(blob, 32, 32)
    assert client.etags == [None]  # the second range sent no request of its own


def test_ranges_started_together_all_wait_for_one_first_answer() -> None:
    data = bytes(range(256)) * 4
    client = VersionedClient(data)
    blob = PinnedBlob(client, block_size=32, max_concurrency=2)
    results: dict[int, bytes] = {}

    def worker(offset: int) -> None:
        results[offset] = read(blob, offset, 128)

    threads = [threading.Thread(target=worker, args=(offset,)) for offset in range(0, len(data), 128)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert all(results[offset] == data[offset : offset + 128] for offset in range(0, len(data), 128))
    assert client.etags.count(None) == 1  # one request found the version; every other was pinned to it


def test_pin_asks_for_the_properties_once_and_the_ranges_after_are_pinned() -> None:
    client = VersionedClient(b"p" * 40)
    blob = PinnedBlob(client, block_size=16, max_concurrency=2)

    assert blob.pin(client.get_properties).size == 40
    assert blob.pin(client.get_properties).size == 40
    read(blob, 0, 40)

    assert client.properties_requests == 1
    assert client.etags == ['"1"'] * len(client.etags)


def test_with_verify_checksum_ranges_that_tile_the_blob_give_its_crc32() -> None:
    data = bytes(range(100))
    blob = PinnedBlob(VersionedClient(data), block_size=16, max_concurrency=2, verify_checksum=True)

    read(blob, 60, 40)  # any order
    read(blob, 0, 60)

    assert blob.checksums is not None and blob.checksums.whole() == crc32(data)


def test_without_a_recorded_crc32_only_the_first_range_is_checksummed() -> None:
    data = bytes(range(100))
    blob = PinnedBlob(VersionedClient(data, recorded=False), block_size=16, max_concurrency=2, verify_checksum=True)

    read(blob, 0, 60)  # its CRC-32 is computed before the answer says there is nothing to compare with
    read(blob, 60, 40)

    assert blob.checksums is not None and blob.checksums.whole() is None


def test_without_verify_checksum_nothing_is_gathered() -> None:
    blob = PinnedBlob(VersionedClient(b"n" * 10), block_size=16, max_concurrency=1)

    assert read(blob, 0, 10) == b"n" * 10
    assert blob.checksums is None
