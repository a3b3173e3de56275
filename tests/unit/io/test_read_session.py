"""open_window and verify_whole_blob: what ``verify_checksum`` means for a BlobIO reader."""

from __future__ import annotations

import pytest

from azstoragetorch._client import Recorder, crc32
from azstoragetorch._options import TransferOptions
from azstoragetorch._read_session import open_window, verify_whole_blob
from azstoragetorch.exceptions import ChecksumMismatchError
from tests.unit.fakes import InMemoryBlobClient

DATA = bytes(range(256)) * 4


def options(verify_checksum: bool | None) -> TransferOptions:
    return TransferOptions(block_size=256, max_concurrency=2, verify_checksum=verify_checksum)


def read_all(client: InMemoryBlobClient, verify_checksum: bool | None, recorder: Recorder) -> None:
    window = open_window(client, options(verify_checksum), recorder)  # type: ignore[arg-type]
    try:
        assert window.readinto(0, memoryview(bytearray(len(DATA)))) == len(DATA)
        if window.verifies_checksum:
            verify_whole_blob(window, recorder, client.display_url, download_rest=False)
    finally:
        window.close()


def test_a_blob_read_whole_is_checked_against_its_recorded_crc32() -> None:
    recorder = Recorder()
    read_all(InMemoryBlobClient(DATA, recorded_crc32=crc32(DATA)), None, recorder)
    assert recorder.snapshot().verified_blobs == 1


def test_a_blob_whose_bytes_differ_from_its_recorded_crc32_raises_naming_it() -> None:
    with pytest.raises(ChecksumMismatchError, match="memory://blob"):
        read_all(InMemoryBlobClient(DATA, recorded_crc32=crc32(DATA) ^ 1), None, Recorder())


def test_without_a_recorded_crc32_the_blob_is_read_unverified_unless_insisted_on() -> None:
    recorder = Recorder()
    read_all(InMemoryBlobClient(DATA, recorded_crc32=None), None, recorder)
    assert (recorder.snapshot().verified_blobs, recorder.snapshot().unverified_blobs) == (0, 1)
    with pytest.raises(ValueError, match=r"memory://blob has no recorded CRC-32 to verify"):
        open_window(InMemoryBlobClient(DATA, recorded_crc32=None), options(True), Recorder())  # type: ignore[arg-type]


def test_verify_checksum_false_gathers_nothing() -> None:
    window = open_window(InMemoryBlobClient(DATA, recorded_crc32=crc32(DATA) ^ 1), options(False), Recorder())  # type: ignore[arg-type]
    assert not window.verifies_checksum
    window.close()


def test_a_blob_read_in_part_is_checked_only_when_the_rest_is_downloaded() -> None:
    client = InMemoryBlobClient(DATA, recorded_crc32=crc32(DATA) ^ 1)
    recorder = Recorder()
    window = open_window(client, options(None), recorder)  # type: ignore[arg-type]
    try:
        window.readinto(0, memoryview(bytearray(10)))
        verify_whole_blob(window, recorder, client.display_url, download_rest=False)  # read in part: unchecked
        with pytest.raises(ChecksumMismatchError):
            verify_whole_blob(window, recorder, client.display_url, download_rest=True)
    finally:
        window.close()
