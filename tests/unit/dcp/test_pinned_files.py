"""The shard files of one load against the in-memory client: one version per file, and recorded CRC-32s checked."""

from __future__ import annotations

import pytest

from azstoragetorch._client import crc32
from azstoragetorch._options import TransferOptions
from azstoragetorch._reads import PlannedSpans
from azstoragetorch.exceptions import ChecksumMismatchError
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._pinned_files import _PinnedShardFiles
from azstoragetorch.integrations.dcp._spans import _Span
from tests.unit.fakes import InMemoryBlobClient

CHECKPOINT = "https://account.blob.core.windows.net/container/checkpoint"


def shard_files(clients: dict[str, InMemoryBlobClient], *, verify_checksum: bool = True) -> _PinnedShardFiles:
    options = TransferOptions(max_concurrency=2, block_size=16, verify_checksum=None if verify_checksum else False)
    files = _BlobFiles(None, options)
    files.blob_client = lambda path: clients[str(path).rsplit("/", 1)[1]]  # type: ignore[method-assign]
    return _PinnedShardFiles(files, CHECKPOINT)


def read(shards: _PinnedShardFiles, spans: list[_Span]) -> list[bytes]:
    return [
        bytes(data) for _, data in PlannedSpans(shards.fetch, max_concurrency=2, block_size=16).fetch_in_order(spans)
    ]


def test_the_first_range_of_a_file_pins_its_version_for_every_later_range() -> None:
    data = bytes(range(100))
    client = InMemoryBlobClient(data, recorded_crc32=crc32(data))
    shards = shard_files({"__0_0.distcp": client})

    assert read(shards, [_Span("__0_0.distcp", 0, 10, []), _Span("__0_0.distcp", 50, 100, [])]) == [
        data[:10],
        data[50:],
    ]
    assert client.etags[0] is None  # the first request finds the version
    assert client.etags[1:] == ['"1"'] * (len(client.etags) - 1)
    assert client.properties_requests == 0  # the first answer's headers were enough


def test_pinned_version_asks_for_the_properties_of_a_file_not_read_yet_and_only_once() -> None:
    data = b"x" * 40
    client = InMemoryBlobClient(data, recorded_crc32=crc32(data))
    shards = shard_files({"__0_0.distcp": client})

    assert shards.pinned_version("__0_0.distcp").size == 40
    read(shards, [_Span("__0_0.distcp", 0, 40, [])])

    assert client.properties_requests == 1
    assert client.etags == ['"1"'] * len(client.etags)  # every range read on the condition


def test_a_file_read_whole_is_checked_against_its_recorded_crc32() -> None:
    good, bad = b"g" * 64, b"b" * 64
    clients = {
        "good": InMemoryBlobClient(good, recorded_crc32=crc32(good)),
        "bad": InMemoryBlobClient(bad, recorded_crc32=crc32(b"other")),
    }
    shards = shard_files(clients)
    read(shards, [_Span("good", 0, 64, []), _Span("bad", 0, 32, []), _Span("bad", 32, 64, [])])

    assert shards.mismatch("good") is None
    found = shards.mismatch("bad")
    assert found is not None and found[1:] == (f"{crc32(b'other'):08x}", f"{crc32(bad):08x}")
    with pytest.raises(ChecksumMismatchError):
        shards.verify_whole_files()


def test_a_file_read_in_part_or_without_a_recorded_crc32_is_not_held_against_the_load() -> None:
    data = b"d" * 64
    clients = {
        "part": InMemoryBlobClient(data, recorded_crc32=crc32(b"other")),
        "unrecorded": InMemoryBlobClient(data, recorded_crc32=None),
    }
    shards = shard_files(clients)
    read(shards, [_Span("part", 0, 32, []), _Span("unrecorded", 0, 64, [])])

    shards.verify_whole_files()  # raises nothing: neither file can be checked

    assert shards.mismatch("part") is None


def test_without_verify_checksum_a_changed_file_loads_unchecked() -> None:
    data = b"c" * 64
    shards = shard_files({"f": InMemoryBlobClient(data, recorded_crc32=crc32(b"other"))}, verify_checksum=False)

    assert read(shards, [_Span("f", 0, 64, [])]) == [data]
    shards.verify_whole_files()
    assert shards.mismatch("f") is None
