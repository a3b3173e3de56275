"""Transfer statistics and the progress hook of BlobIO, against Azurite (and the fault proxy)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential

import azstoragetorch
from azstoragetorch._client import _stats
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset, _blob
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.io import BlobIO
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy, Reset, Respond, SeenRequest

KiB = 1024
BLOCK = 16 * KiB


@pytest.fixture
def no_waits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


def operation(name: str) -> Callable[[SeenRequest], bool]:
    return lambda seen: seen.operation == name


class Calls:
    """Progress hook calls, with the thread each came from."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, int | None]] = []
        self.threads: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            self.calls.append((done, total))
            self.threads.add(threading.current_thread().name)


def test_a_write_counts_bytes_requests_and_reports_progress_of_unknown_total(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)  # every piece of progress is reported
    data = os.urandom(5 * BLOCK + 100)
    calls = Calls()
    before = azstoragetorch.stats()
    with BlobIO(
        container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK, progress_hook=calls
    ) as f:
        f.write(data)
    stats = f.stats
    assert container.download("blob") == data
    assert stats.bytes == len(data)
    assert stats.requests == 7  # 6 blocks and the commit
    assert stats.retries == 0
    assert stats.first_byte_seconds is not None and 0 < stats.first_byte_seconds <= stats.seconds
    assert 0 < stats.blocked_seconds <= stats.seconds
    # Unknown total while writing; the last call, at close, gives the size as both numbers.
    assert calls.calls[-1] == (len(data), len(data))
    assert all(total is None for _, total in calls.calls[:-1])
    assert [done for done, _ in calls.calls] == sorted(done for done, _ in calls.calls)
    assert any(name.startswith("azstoragetorch") for name in calls.threads)  # from the transfer threads
    process = azstoragetorch.stats().minus(before)
    assert process.bytes >= len(data) and process.requests >= 7


def test_a_read_reports_the_blob_size_as_total(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)
    data = os.urandom(6 * BLOCK)
    url = container.upload("blob", data)
    calls = Calls()
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, progress_hook=calls) as f:
        assert f.read() == data
    assert f.stats.bytes == len(data)
    assert f.stats.requests >= 2
    assert calls.calls[-1] == (len(data), len(data))
    assert all(total == len(data) for _, total in calls.calls)


def test_the_hook_is_called_once_at_the_end_when_the_transfer_is_quicker_than_the_interval(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 3600.0)
    calls = Calls()
    data = os.urandom(4 * BLOCK)
    with BlobIO(
        container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK, progress_hook=calls
    ) as f:
        f.write(data)
    assert calls.calls == [(len(data), len(data))]


def test_retries_are_counted_by_reason(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_waits: None
) -> None:
    proxy.add_fault(operation("PutBlock"), Respond(503, "ServerBusy"), times=3)
    proxy.add_fault(operation("PutBlock"), Respond(500, "OperationTimedOut"), times=2)
    proxy.add_fault(operation("PutBlockList"), Reset(None), times=1)
    data = os.urandom(3 * BLOCK)
    with BlobIO(
        proxy.url(container.blob_url("blob")), "wb", credential=account_credential, block_size=BLOCK, max_concurrency=1
    ) as f:
        f.write(data)
    assert container.download("blob") == data
    stats = f.stats
    assert (stats.throttled_retries, stats.timeout_retries, stats.reset_retries) == (3, 2, 1)
    assert stats.retries == 6
    assert stats.requests == 4 + 6


def test_a_body_that_breaks_off_counts_as_a_reset_retry_and_its_bytes_once(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, no_waits: None
) -> None:
    data = os.urandom(4 * BLOCK)
    url = proxy.url(container.upload("blob", data))
    proxy.add_fault(operation("GetBlob"), Reset(after_body_bytes=5000), times=1)
    with BlobIO(url, "rb", credential=account_credential, block_size=4 * BLOCK) as f:
        assert f.read() == data
    assert f.stats.bytes == len(data)
    assert f.stats.reset_retries == 1 and f.stats.retries == 1


def test_a_failing_hook_fails_the_write_and_nothing_is_committed(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)

    def hook(done: int, total: int | None) -> None:
        raise RuntimeError("the progress bar broke")

    with (
        pytest.raises(FatalBlobIOWriteError),
        BlobIO(
            container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK, progress_hook=hook
        ) as f,
    ):
        f.write(os.urandom(4 * BLOCK))
    assert not container.exists("blob")


def test_a_progress_hook_that_is_not_callable_is_refused(container: Container) -> None:
    with pytest.raises(TypeError, match="progress_hook must be a callable"):
        BlobIO(container.blob_url("blob"), "wb", credential=False, progress_hook=5)  # type: ignore[arg-type]


# -- datasets and DCP pass a progress hook through; DCP saves and loads gather statistics ------------


def assert_each_read_counts_up_to_its_size(calls: list[tuple[int, int | None]], sizes: list[int]) -> None:
    """Calls of reads of blobs of distinct ``sizes``: grouped by total, each read's bytes rise to its size."""
    by_total: dict[int | None, list[int]] = {}
    for done, total in calls:
        by_total.setdefault(total, []).append(done)
    assert sorted(by_total, key=lambda total: -1 if total is None else total) == sorted(sizes)
    for size in sizes:
        dones = by_total[size]
        assert dones == sorted(dones) and dones[-1] == size, (size, dones)


def test_a_blob_dataset_passes_its_hook_to_every_sample_read(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)
    monkeypatch.setitem(_blob._READ_ALL, "block_size", BLOCK)  # several parts per blob
    sizes = [3 * BLOCK + 5, 5 * BLOCK + 7, 100]
    urls = [container.upload(f"s/{size}", os.urandom(size)) for size in sizes]
    calls = Calls()
    dataset = BlobDataset.from_blob_urls(urls, credential=account_credential, progress_hook=calls)
    samples = dataset.__getitems__([0, 1, 2])  # the samples of a batch, read at once
    assert [len(sample["data"]) for sample in samples] == sizes
    assert len(calls.calls) > len(sizes) + 1  # part by part, not only at the ends
    assert_each_read_counts_up_to_its_size(calls.calls, sizes)


def read_with_a_reader_and_as_a_tensor(blob: Blob) -> int:
    with blob.reader() as f:
        size = len(f.read())
    return size + blob.read_tensor().numel()


def test_an_iterable_dataset_passes_its_hook_to_a_transforms_reads(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)
    monkeypatch.setitem(_blob._READ_ALL, "block_size", BLOCK)
    sizes = [2 * BLOCK + 1, 3 * BLOCK + 2]
    for size in sizes:
        container.upload(f"s/{size}", os.urandom(size))
    calls = Calls()
    dataset = IterableBlobDataset.from_container_url(
        container.blob_url("").rstrip("/"),
        prefix="s/",
        credential=account_credential,
        transform=read_with_a_reader_and_as_a_tensor,
        progress_hook=calls,
        prefetch=1,
    )
    assert sorted(dataset) == sorted(2 * size for size in sizes)
    # Each blob was read twice (by a reader, then as a tensor), each read counted on its own.
    for size in sizes:
        reads = [done for done, total in calls.calls if total == size]
        assert reads.count(size) >= 2


def test_a_dataset_without_a_hook_counts_nothing_for_one(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_recorder(*args: object, **kwargs: object) -> None:
        raise AssertionError("a Recorder was made for a read without a progress hook")

    monkeypatch.setattr(_blob, "Recorder", no_recorder)
    url = container.upload("s/one", b"one sample")
    (sample,) = BlobDataset.from_blob_urls([url], credential=account_credential)
    assert sample["data"] == b"one sample"
    with pytest.raises(TypeError, match="progress_hook must be a callable"):
        BlobDataset.from_blob_urls([url], credential=account_credential, progress_hook=3)  # type: ignore[arg-type]


def dcp_state() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}": torch.randn(40_000, generator=generator) for i in range(6)}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("thread_count", [1, 3])
def test_a_dcp_save_reports_its_bytes_and_its_stats_are_the_shard_files(
    container: Container,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    thread_count: int,
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)
    calls = Calls()
    writer = BlobStorageWriter(
        container.blob_url("ckpt"),
        credential=account_credential,
        thread_count=thread_count,
        block_size=64 * KiB,
        progress_hook=calls,
    )
    assert writer.stats is None
    dcp.save(dcp_state(), storage_writer=writer)
    shards = [blob for blob in container.client.list_blobs(name_starts_with="ckpt/") if blob.name.endswith(".distcp")]
    assert len(shards) == thread_count
    shard_bytes = sum(int(blob.size) for blob in shards)
    stats = writer.stats
    assert stats is not None
    assert stats.bytes == shard_bytes
    # A Put Block per 64 KiB block (or less) and a Put Block List per shard file, no retries.
    assert stats.requests >= shard_bytes // (64 * KiB) + thread_count and stats.retries == 0
    assert stats.blocked_seconds > 0 and stats.seconds > 0 and stats.first_byte_seconds is None
    dones = [done for done, _ in calls.calls]
    assert dones == sorted(dones) and len(dones) > thread_count + 1
    assert all(total is None for _, total in calls.calls[:-1])
    assert calls.calls[-1] == (shard_bytes, shard_bytes)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_dcp_load_reports_its_planned_bytes_and_gathers_stats(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)
    expected = dcp_state()
    url = container.blob_url("ckpt")
    dcp.save(expected, storage_writer=BlobStorageWriter(url, credential=account_credential, thread_count=2))
    shards = [blob for blob in container.client.list_blobs(name_starts_with="ckpt/") if blob.name.endswith(".distcp")]
    shard_bytes = sum(int(blob.size) for blob in shards)
    calls = Calls()
    reader = BlobStorageReader(url, credential=account_credential, block_size=64 * KiB, progress_hook=calls)
    assert reader.stats is None
    loaded = {key: torch.zeros_like(value) for key, value in expected.items()}
    dcp.load(loaded, storage_reader=reader)
    assert all(torch.equal(loaded[key], value) for key, value in expected.items())
    stats = reader.stats
    assert stats is not None
    # Every item is wanted, so the coalesced ranges cover the shard files but for their trailers.
    assert 0.9 * shard_bytes < stats.bytes <= shard_bytes
    assert stats.requests >= stats.bytes // (64 * KiB) + len(shards) and stats.retries == 0
    assert stats.first_byte_seconds is not None and 0 < stats.first_byte_seconds <= stats.seconds
    assert len(calls.calls) > 2
    assert all(total == stats.bytes for _, total in calls.calls)  # the plan's bytes, known from the start
    dones = [done for done, _ in calls.calls]
    assert dones == sorted(dones) and dones[-1] == stats.bytes
