"""Transfer statistics and the progress hook of BlobIO, against Azurite (and the fault proxy)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

import pytest
from azure.core.credentials import AzureNamedKeyCredential

import azstoragetorch
from azstoragetorch._client import _stats
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.io import BlobIO
from tests.conftest import Container
from tests.e2e.fault_proxy import FaultProxy, Reset, Respond, SeenRequest

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
