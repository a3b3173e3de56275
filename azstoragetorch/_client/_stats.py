"""Transfer statistics: what a transfer (one BlobIO) and the whole process cost in bytes, requests,
retries and time, and the progress hook that reports bytes as they move.

Counting happens on every request, so it has to cost next to nothing: each thread adds to counters of
its own (a :class:`_Counts` per thread and :class:`Recorder`), with no lock, and a snapshot sums them.
Requests and retries are counted by :class:`StatsPolicy`, which sits inside the pipeline's retry
loop and so sees every attempt; bytes are counted where bodies are sent or read (the blob client);
the time the caller was blocked is counted by BlobIO around its methods.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from typing import Any

from azure.core.exceptions import ServiceRequestTimeoutError, ServiceResponseTimeoutError
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import HTTPPolicy

from azstoragetorch._options import ProgressHook

# The progress hook is called at most this often (seconds) while bytes move, plus once at the end.
PROGRESS_INTERVAL_SECONDS = 0.1

# The pipeline option that carries a request's Recorder to StatsPolicy (which removes it again).
OPTION = "azstoragetorch_recorder"
_RECORDER = "azstoragetorch.recorder"
_LAST_OUTCOME = "azstoragetorch.last_outcome"

# Why a request was sent again.
THROTTLED, TIMEOUT, RESET, OTHER = "throttled", "timeout", "reset", "other"


@dataclasses.dataclass(frozen=True)
class TransferStats:
    """What a transfer cost: :attr:`azstoragetorch.io.BlobIO.stats`, or the whole process's
    :func:`azstoragetorch.stats`.

    Attributes:
        bytes: Payload bytes moved: blob content uploaded (counted once a request succeeded) or
            downloaded (as received). A body that is retried counts once.
        seconds: Wall-clock seconds, from opening the ``BlobIO`` to the end of its ``close()`` (or to
            now while it is open); for the process, since azstoragetorch was imported (in a forked
            child, since the fork).
        requests: HTTP requests sent, retries included.
        retries: Requests sent again, and ranges of a download resumed after their body broke off.
        throttled_retries: Retries after the service said it was busy (HTTP 503 or 429).
        timeout_retries: Retries after a request or a response timed out (or HTTP 408, 504, or 500
            ``OperationTimedOut``).
        reset_retries: Retries after a connection failed or was reset.
        first_byte_seconds: Seconds from opening the ``BlobIO`` to the first response; ``None``
            before there was one, and for the process.
        blocked_seconds: Seconds the caller spent inside ``BlobIO`` calls (opening, reading,
            writing, flushing and closing): how long the transfer held up the caller's thread.
        verified_blobs: Blobs (and DCP shard files) read whole whose CRC-32 was checked against
            the one recorded when they were written, and matched.
        unverified_blobs: Blobs (and DCP shard files) read with no recorded CRC-32 to check them
            against (written by another tool), so read unverified. Reads with
            ``verify_checksum=False`` and blobs read only in part are counted in neither.
    """

    bytes: int = 0
    seconds: float = 0.0
    requests: int = 0
    retries: int = 0
    throttled_retries: int = 0
    timeout_retries: int = 0
    reset_retries: int = 0
    first_byte_seconds: float | None = None
    blocked_seconds: float = 0.0
    verified_blobs: int = 0
    unverified_blobs: int = 0

    @property
    def mib_per_s(self) -> float:
        """Throughput: :attr:`bytes` in MiB over :attr:`seconds` (0 for a zero duration)."""
        return self.bytes / (1024 * 1024) / self.seconds if self.seconds > 0 else 0.0

    def minus(self, earlier: TransferStats) -> TransferStats:
        """The counts since ``earlier``, a snapshot of the same counters (for example per epoch)."""
        return TransferStats(
            bytes=self.bytes - earlier.bytes,
            seconds=self.seconds - earlier.seconds,
            requests=self.requests - earlier.requests,
            retries=self.retries - earlier.retries,
            throttled_retries=self.throttled_retries - earlier.throttled_retries,
            timeout_retries=self.timeout_retries - earlier.timeout_retries,
            reset_retries=self.reset_retries - earlier.reset_retries,
            first_byte_seconds=None,
            blocked_seconds=self.blocked_seconds - earlier.blocked_seconds,
            verified_blobs=self.verified_blobs - earlier.verified_blobs,
            unverified_blobs=self.unverified_blobs - earlier.unverified_blobs,
        )


def sum_stats(parts: list[TransferStats], *, seconds: float) -> TransferStats:
    """The counts of several transfers (the shard files of one checkpoint save) as one, over
    ``seconds`` of wall time. Their first bytes are relative to their own starts, so none is given."""
    return TransferStats(
        bytes=sum(part.bytes for part in parts),
        seconds=seconds,
        requests=sum(part.requests for part in parts),
        retries=sum(part.retries for part in parts),
        throttled_retries=sum(part.throttled_retries for part in parts),
        timeout_retries=sum(part.timeout_retries for part in parts),
        reset_retries=sum(part.reset_retries for part in parts),
        blocked_seconds=sum((part.blocked_seconds for part in parts), 0.0),
        verified_blobs=sum(part.verified_blobs for part in parts),
        unverified_blobs=sum(part.unverified_blobs for part in parts),
    )


class _Counts:
    """One thread's counters: only that thread writes them, so plain adds suffice."""

    __slots__ = ("blocked", "bytes", "requests", "reset", "retries", "throttled", "timeout", "unverified", "verified")

    def __init__(self) -> None:
        self.bytes = 0
        self.requests = 0
        self.retries = 0
        self.throttled = 0
        self.timeout = 0
        self.reset = 0
        self.blocked = 0.0
        self.verified = 0
        self.unverified = 0


class Recorder:
    """The counters of one transfer (or of the process), kept per thread; with an optional progress hook.

    ``total`` is the transfer's size for the progress hook (``None`` while a write's length is unknown).
    """

    __slots__ = ("_by_thread", "_hook", "_last_report", "_reporting", "ended", "first_response", "started", "total")

    def __init__(
        self, progress_hook: ProgressHook | None = None, total: int | None = None, *, started: float | None = None
    ) -> None:
        # A thread's id may be reused once the thread has ended; sharing a dead thread's counters is harmless.
        self._by_thread: dict[int, _Counts] = {}
        self.started = time.perf_counter() if started is None else started  # a time.perf_counter()
        self.ended: float | None = None
        self.first_response: float | None = None
        self.total = total
        self._hook: ProgressHook | None = None
        self._reporting: threading.Lock | None = None
        self._last_report = 0.0
        if progress_hook is not None:
            self.attach_hook(progress_hook, total)

    def attach_hook(self, progress_hook: ProgressHook, total: int | None) -> None:
        """Report progress to ``progress_hook`` from now on (a reader attaches it once it knows the size)."""
        self.total = total
        self._reporting = threading.Lock()
        self._last_report = time.monotonic()  # the first call comes an interval in
        self._hook = progress_hook

    def counts(self) -> _Counts:
        """The calling thread's counters."""
        ident = threading.get_ident()
        counts = self._by_thread.get(ident)
        if counts is None:
            counts = self._by_thread.setdefault(ident, _Counts())
        return counts

    def add_blocked(self, seconds: float) -> None:
        """The caller's thread spent ``seconds`` waiting on this transfer."""
        _process.counts().blocked += seconds
        self.counts().blocked += seconds

    def bytes_done(self) -> int:
        return sum(counts.bytes for counts in list(self._by_thread.values()))

    def snapshot(self, *, first_byte: bool = True) -> TransferStats:
        every = list(self._by_thread.values())  # a copy: threads may add entries meanwhile
        end = self.ended if self.ended is not None else time.perf_counter()
        first = self.first_response
        return TransferStats(
            bytes=sum(c.bytes for c in every),
            seconds=end - self.started,
            requests=sum(c.requests for c in every),
            retries=sum(c.retries for c in every),
            throttled_retries=sum(c.throttled for c in every),
            timeout_retries=sum(c.timeout for c in every),
            reset_retries=sum(c.reset for c in every),
            first_byte_seconds=first - self.started if first is not None and first_byte else None,
            blocked_seconds=sum((c.blocked for c in every), 0.0),
            verified_blobs=sum(c.verified for c in every),
            unverified_blobs=sum(c.unverified for c in every),
        )

    def maybe_report(self) -> None:
        """Call the progress hook if the last call was at least PROGRESS_INTERVAL_SECONDS ago."""
        now = time.monotonic()
        if now - self._last_report < PROGRESS_INTERVAL_SECONDS:
            return
        reporting = self._reporting
        if reporting is None or not reporting.acquire(blocking=False):
            return  # another thread is reporting right now
        try:
            hook = self._hook
            if hook is not None and now - self._last_report >= PROGRESS_INTERVAL_SECONDS:
                self._last_report = now
                hook(self.bytes_done(), self.total)
        finally:
            reporting.release()

    def report_last(self, *, done: int | None = None, total: int | None = None, report: bool = True) -> None:
        """Detach the hook and, with ``report``, give it its last call: ``(done, total)``, by default
        the bytes moved so far. No call comes after this one, nor while it runs: a call under way in a
        transfer thread is waited for first. An exception from the hook propagates to the caller, who
        decides what it means (a writer calls this before its commit, so that it means nothing was
        committed)."""
        if total is not None:
            self.total = total
        reporting, hook = self._reporting, self._hook
        if reporting is None or hook is None:
            return
        with reporting:
            self._hook = None  # transfer threads still finishing (read-ahead) report no more
            if report:
                hook(self.bytes_done() if done is None else done, self.total)

    def end(self, *, total: int | None = None, report: bool = True) -> None:
        """The transfer is over: stop the clock and, with ``report``, give the hook its last call
        (see :meth:`report_last`; the clock is stopped even if the hook raises)."""
        if self.ended is None:
            self.ended = time.perf_counter()
        self.report_last(total=total, report=report)


_process = Recorder()


def _reset_after_fork() -> None:
    global _process
    # A forked child (a DataLoader worker) counts its own transfers, from zero.
    _process = Recorder()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_after_fork)


def stats() -> TransferStats:
    """Counters of every transfer this process made since azstoragetorch was imported.

    In a forked child (such as a DataLoader worker) the counters start from zero at the fork. Take
    two snapshots and :meth:`TransferStats.minus` them for what happened in between.
    """
    return _process.snapshot(first_byte=False)


def add_bytes(recorder: Recorder | None, count: int) -> None:
    _process.counts().bytes += count
    if recorder is not None:
        recorder.counts().bytes += count
        if recorder._hook is not None:
            recorder.maybe_report()


def add_retry(recorder: Recorder | None, reason: str) -> None:
    for target in (_process, recorder):
        if target is None:
            continue
        counts = target.counts()
        counts.retries += 1
        if reason == THROTTLED:
            counts.throttled += 1
        elif reason == TIMEOUT:
            counts.timeout += 1
        elif reason == RESET:
            counts.reset += 1


def add_checksum_outcome(recorder: Recorder | None, *, verified: bool) -> None:
    """A blob was read whole and its CRC-32 matched (``verified``), or it had none to check."""
    for target in (_process, recorder):
        if target is None:
            continue
        counts = target.counts()
        if verified:
            counts.verified += 1
        else:
            counts.unverified += 1


def reason_for_error(error: BaseException) -> str:
    """Why a request or a body read that raised ``error`` is tried again."""
    if isinstance(error, (ServiceRequestTimeoutError, ServiceResponseTimeoutError, TimeoutError)):
        return TIMEOUT
    if "timeout" in type(error).__name__.lower():  # urllib3's ReadTimeoutError and the like
        return TIMEOUT
    if isinstance(error, (OSError, ConnectionError)) or type(error).__module__.startswith(("azure", "urllib3", "http")):
        return RESET
    return OTHER


def _reason_for_status(response: Any) -> str:
    status = response.status_code
    if status in (429, 503):
        return THROTTLED
    if status in (408, 504) or (status == 500 and response.headers.get("x-ms-error-code") == "OperationTimedOut"):
        return TIMEOUT
    return OTHER


class StatsPolicy(HTTPPolicy[Any, Any]):
    """Counts every attempt of a request, and why an attempt after the first was needed.

    It sits after the retry policy, so it runs once per attempt. The reason for a retry is the
    outcome of the attempt before it, which this policy noted in the request's context.
    """

    def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
        context = request.context
        if _LAST_OUTCOME in context:
            recorder = context[_RECORDER]
            add_retry(recorder, context[_LAST_OUTCOME])
        else:
            recorder = context.options.pop(OPTION, None)
            context[_RECORDER] = recorder
        _process.counts().requests += 1
        if recorder is not None:
            recorder.counts().requests += 1
        try:
            response = self.next.send(request)
        except Exception as error:
            context[_LAST_OUTCOME] = reason_for_error(error)
            raise
        if recorder is not None and recorder.first_response is None:
            recorder.first_response = time.perf_counter()
        context[_LAST_OUTCOME] = _reason_for_status(response.http_response)
        return response
