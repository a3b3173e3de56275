import os
import random
import zlib

import pytest

from azstoragetorch._client import BlockUploader
from tests.unit.fakes import InMemoryBlobClient


def make_uploader(client: InMemoryBlobClient, *, block_size: int = 100, max_concurrency: int = 2) -> BlockUploader:
    return BlockUploader(client, block_size=block_size, max_concurrency=max_concurrency, validate_content=False)  # type: ignore[arg-type]


def test_small_blob_is_one_put_blob_even_after_flush() -> None:
    client = InMemoryBlobClient()
    uploader = make_uploader(client)
    uploader.write(memoryview(b"x" * 99))
    uploader.flush()
    uploader.commit()
    assert client.committed == b"x" * 99
    assert (client.put_blob_calls, client.commit_calls, len(client.staged)) == (1, 0, 0)


def test_zero_bytes_makes_an_empty_blob() -> None:
    client = InMemoryBlobClient()
    make_uploader(client).commit()
    assert client.committed == b""


@pytest.mark.parametrize("chunk", [1, 7, 99, 100, 101, 250, 1000])
def test_blocks_reassemble_exactly_in_order(chunk: int) -> None:
    data = os.urandom(1234)
    client = InMemoryBlobClient()
    uploader = make_uploader(client)
    for start in range(0, len(data), chunk):
        uploader.write(memoryview(data)[start : start + chunk])
    uploader.commit()
    assert client.committed == data
    assert client.put_blob_calls == 0 and client.commit_calls == 1
    assert len(client.staged) == 13  # 12 full blocks of 100 and a tail of 34


def test_exactly_one_block_is_staged_not_put() -> None:
    client = InMemoryBlobClient()
    uploader = make_uploader(client)
    uploader.write(memoryview(b"y" * 100))
    uploader.commit()
    assert client.committed == b"y" * 100 and client.commit_calls == 1


def test_blocks_in_flight_are_bounded() -> None:
    client = InMemoryBlobClient()
    uploader = make_uploader(client, max_concurrency=3)
    uploader.write(memoryview(os.urandom(100 * 20)))
    uploader.commit()
    assert 1 <= client.max_in_flight <= 3


def test_stage_failure_surfaces_and_nothing_is_committed() -> None:
    client = InMemoryBlobClient(fail_stage_at=2)
    uploader = make_uploader(client)
    with pytest.raises(ConnectionError):
        uploader.write(memoryview(os.urandom(100 * 10)))
        uploader.flush()
    assert uploader.error is not None
    with pytest.raises(ConnectionError):
        uploader.commit()
    assert client.committed is None and client.commit_calls == 0


def test_block_ids_are_unique_per_writer_and_equal_length() -> None:
    client = InMemoryBlobClient()
    first, second = make_uploader(client), make_uploader(client)
    for uploader in (first, second):
        uploader.write(memoryview(os.urandom(350)))
        uploader.flush()
    ids = list(client.staged)
    assert len(ids) == len(set(ids)) == 8
    assert len({len(block_id) for block_id in ids}) == 1


@pytest.mark.parametrize("size", [0, 5, 100, 101, 503])
def test_the_commit_records_the_crc32_of_the_whole_blob(size: int) -> None:
    client = InMemoryBlobClient()
    uploader = make_uploader(client, max_concurrency=3)
    data = bytes(random.Random(size).getrandbits(8) for _ in range(size))
    for start in range(0, size, 7):
        uploader.write(memoryview(data[start : start + 7]))

    uploader.commit()

    assert client.committed == data
    assert client.recorded_crc32 == zlib.crc32(data)
