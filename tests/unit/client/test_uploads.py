import os
import random
import zlib

import pytest

from azstoragetorch._client import BlockUploader, _uploads
from azstoragetorch._options import TransferOptions
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.io import BlobIO
from tests.unit.fakes import InMemoryBlobClient


def make_uploader(client: InMemoryBlobClient, *, block_size: int = 100, max_concurrency: int = 2) -> BlockUploader:
    options = TransferOptions(block_size=block_size, max_concurrency=max_concurrency)
    return BlockUploader(client, options)  # type: ignore[arg-type]


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
    # The failure stays: every later call raises it again, and nothing is committed.
    with pytest.raises(ConnectionError):
        uploader.write(memoryview(b"more"))
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


# -- more than 50,000 blocks of block_size ----------------------------------------------------


@pytest.fixture
def growth_ratio_500(monkeypatch: pytest.MonkeyPatch) -> None:
    """The figures below were worked out for a growth ratio of 500 (the shipped one is larger)."""
    monkeypatch.setattr(_uploads, "GROWTH_RATIO", 500)


def test_a_blob_past_50000_blocks_of_block_size_grows_its_blocks(growth_ratio_500: None) -> None:
    # With block_size=1, 60,000 bytes would be 60,000 blocks, more than Put Block List accepts.
    # Found out at the commit, that would waste the whole upload; later blocks must grow instead.
    data = os.urandom(60_000)
    client = InMemoryBlobClient()
    uploader = make_uploader(client, block_size=1, max_concurrency=4)
    uploader.write(memoryview(data)[:12_345])
    uploader.write(memoryview(data)[12_345:])
    uploader.commit()
    assert client.committed == data
    assert client.recorded_crc32 == zlib.crc32(data)
    sizes = client.committed_block_sizes
    assert len(sizes) < 50_000
    assert sizes[:1000] == [1] * 1000  # the first 1,000 blocks keep block_size
    written = 0
    for size in sizes:
        assert size <= max(1, written // 500)  # a block never exceeds 1/500 of what came before it
        written += size


def test_block_size_doubles_with_what_was_written_up_to_4000_mib(growth_ratio_500: None) -> None:
    size_after = _uploads.block_size_after
    written = (0, 9_999, 10_000, 19_999, 20_000, 40_000)
    assert [size_after(before, 10) for before in written] == [10, 10, 20, 20, 40, 80]
    assert size_after(10**18, 10) == _uploads.MAX_BLOCK_SIZE == 4000 * 1024 * 1024
    assert size_after(10**18, 3000 * 1024 * 1024) == 4000 * 1024 * 1024
    assert size_after(10**18, _uploads.MAX_BLOCK_SIZE) == _uploads.MAX_BLOCK_SIZE


def test_what_50000_blocks_hold_with_the_default_block_size() -> None:
    most = _uploads.most_bytes(8 * 1024 * 1024)
    assert 100 * 1024**4 < most < 50_000 * 4000 * 1024 * 1024  # 105.1 TiB of the 190.7 TiB Azure allows
    assert _uploads.most_bytes(_uploads.MAX_BLOCK_SIZE) == 50_000 * _uploads.MAX_BLOCK_SIZE


@pytest.fixture
def few_blocks(monkeypatch: pytest.MonkeyPatch, growth_ratio_500: None) -> int:
    """Service limits shrunk so that a blob can outgrow them in a unit test: 1,600 blocks of at most 4
    bytes. With block_size=1 that is 1,000 blocks of 1 byte, 500 of 2 and 100 of 4: 2,400 bytes."""
    monkeypatch.setattr(_uploads, "MAX_BLOCKS", 1600)
    monkeypatch.setattr(_uploads, "MAX_BLOCK_SIZE", 4)
    return 2400


def test_a_blob_that_fills_every_block_commits(few_blocks: int) -> None:
    data = os.urandom(few_blocks)
    client = InMemoryBlobClient(max_blocks=1600)
    uploader = make_uploader(client, block_size=1)
    for start in range(0, len(data), 7):
        uploader.write(memoryview(data)[start : start + 7])
    uploader.commit()
    assert client.committed == data and len(client.committed_block_sizes) == 1600


@pytest.mark.parametrize("split", [0, 1, 1000, 2399])
def test_the_write_that_would_not_fit_fails_before_anything_of_it_is_taken(few_blocks: int, split: int) -> None:
    client = InMemoryBlobClient(max_blocks=1600)
    uploader = make_uploader(client, block_size=1)
    uploader.write(memoryview(os.urandom(split)))
    with pytest.raises(
        ValueError, match=r"memory://blob 2,401 bytes, more than the 2,400 bytes .* 1,600 blocks"
    ) as caught:
        uploader.write(memoryview(os.urandom(few_blocks - split + 1)))
    assert "block_size" in str(caught.value)
    assert client.commit_calls == 0 and client.put_blob_calls == 0


def test_partial_blocks_staged_by_flush_count_against_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_uploads, "MAX_BLOCKS", 30)
    client = InMemoryBlobClient(max_blocks=30)
    uploader = make_uploader(client, block_size=10)
    uploader.write(memoryview(b"a" * 10))
    for _ in range(29):  # every flush stages the partial block: 30 blocks in all
        uploader.write(memoryview(b"b"))
        uploader.flush()
    with pytest.raises(ValueError, match="flush"):
        uploader.write(memoryview(b"c"))
    uploader.commit()
    assert client.committed == b"a" * 10 + b"b" * 29


def test_blobio_reports_a_blob_too_large_as_a_fatal_write_error(few_blocks: int) -> None:
    client = InMemoryBlobClient(max_blocks=1600)
    url = "https://account.blob.core.windows.net/container/blob"
    f = BlobIO._open(url, "wb", options=TransferOptions(block_size=1), client=client)  # type: ignore[arg-type]
    f.write(os.urandom(few_blocks - 1))
    with pytest.raises(FatalBlobIOWriteError) as caught:
        f.write(b"xy")
    assert isinstance(caught.value.underlying_exception, ValueError)
    with pytest.raises(FatalBlobIOWriteError):
        f.close()
    assert client.commit_calls == 0 and client.put_blob_calls == 0


# -- an uploader commits at most once --------------------------------------------------------------------


@pytest.mark.parametrize("size", [99, 350], ids=["one-block", "many-blocks"])
def test_a_second_commit_raises_and_sends_nothing(size: int) -> None:
    data = os.urandom(size)
    client = InMemoryBlobClient()
    uploader = make_uploader(client)
    uploader.write(memoryview(data))
    uploader.commit()
    calls = (client.put_blob_calls, client.commit_calls)
    with pytest.raises(RuntimeError, match="was committed already; nothing was sent"):
        uploader.commit()
    with pytest.raises(RuntimeError, match="was committed already"):
        uploader.write(memoryview(b"more"))
    assert (client.put_blob_calls, client.commit_calls) == calls
    assert client.committed == data


def test_a_commit_after_abort_raises_and_sends_nothing() -> None:
    client = InMemoryBlobClient(b"old")
    uploader = make_uploader(client)
    uploader.write(memoryview(b"new"))
    uploader.abort()
    with pytest.raises(RuntimeError, match="was aborted already"):
        uploader.commit()
    assert (client.put_blob_calls, client.commit_calls) == (0, 0)


def test_a_commit_that_failed_is_not_tried_again() -> None:
    client = InMemoryBlobClient()
    uploader = make_uploader(client)
    uploader.write(memoryview(b"x" * 99))

    def refuse(data: object, **options: object) -> None:
        raise ConnectionError("the commit failed")

    client.put_blob = refuse  # type: ignore[method-assign]
    with pytest.raises(ConnectionError):
        uploader.commit()
    del client.put_blob
    with pytest.raises(RuntimeError, match="failed to commit already"):
        uploader.commit()
    assert client.committed is None
