"""Transfer statistics: retry reasons, per-thread counters, snapshots."""

from __future__ import annotations

import threading

import urllib3.exceptions
from azure.core.exceptions import ServiceRequestError, ServiceResponseError, ServiceResponseTimeoutError

from azstoragetorch._client import _stats
from azstoragetorch._client._stats import Recorder, TransferStats


def test_retry_reasons_of_failures() -> None:
    assert _stats.reason_for_error(ServiceResponseTimeoutError("slow")) == _stats.TIMEOUT
    assert _stats.reason_for_error(TimeoutError("slow")) == _stats.TIMEOUT
    assert _stats.reason_for_error(urllib3.exceptions.ReadTimeoutError(None, "/", "slow")) == _stats.TIMEOUT  # type: ignore[arg-type]
    assert _stats.reason_for_error(ServiceRequestError("refused")) == _stats.RESET
    assert _stats.reason_for_error(ServiceResponseError("reset")) == _stats.RESET
    assert _stats.reason_for_error(ConnectionResetError()) == _stats.RESET
    assert _stats.reason_for_error(ValueError("checksum")) == _stats.OTHER


def test_counts_from_many_threads_add_up() -> None:
    recorder = Recorder()
    start = threading.Barrier(8)

    def work() -> None:
        start.wait()
        for _ in range(10_000):
            _stats.add_bytes(recorder, 3)
            _stats.add_retry(recorder, _stats.THROTTLED)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = recorder.snapshot()
    assert snapshot.bytes == 8 * 10_000 * 3
    assert snapshot.retries == snapshot.throttled_retries == 8 * 10_000


def test_minus_and_throughput() -> None:
    later = TransferStats(bytes=3 * 1024 * 1024, seconds=4.0, requests=5, retries=2, throttled_retries=1)
    earlier = TransferStats(bytes=1024 * 1024, seconds=2.0, requests=1, retries=1, throttled_retries=1)
    delta = later.minus(earlier)
    assert (delta.bytes, delta.seconds, delta.requests, delta.retries, delta.throttled_retries) == (
        2 * 1024 * 1024,
        2.0,
        4,
        1,
        0,
    )
    assert delta.mib_per_s == 1.0
    assert TransferStats().mib_per_s == 0.0


def test_the_hook_gets_no_call_after_the_end() -> None:
    calls: list[tuple[int, int | None]] = []
    recorder = Recorder(lambda done, total: calls.append((done, total)))
    _stats.add_bytes(recorder, 10)
    recorder.end(total=10)
    _stats.add_bytes(recorder, 5)  # a read-ahead finishing after close
    recorder.end(total=15)
    assert calls == [(10, 10)]
