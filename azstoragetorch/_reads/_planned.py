"""Spans planned ahead, fetched in parallel and handed over in the planned order: :class:`PlannedSpans`."""

from __future__ import annotations

import collections
import concurrent.futures
from collections.abc import Callable, Generator, Iterator
from typing import Generic, Protocol, TypeVar

from azstoragetorch._client import Lease


class Span(Protocol):
    """What :class:`PlannedSpans` needs of a span: its byte range (of whichever blob it names)."""

    @property
    def start(self) -> int: ...

    @property
    def end(self) -> int: ...


_S = TypeVar("_S", bound=Span)


class _ByteBudget:
    """The bytes of spans a load holds at once: being fetched, fetched and waiting, or being consumed.

    It only answers whether one more span fits; which span frees room, and when, is the order of
    hand-over, decided by :meth:`PlannedSpans.fetch_in_order`. Only the consuming thread uses it
    (the fetching threads never touch it), so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0

    def admits(self, size: int) -> bool:
        """Whether a span of ``size`` bytes fits beside those held. (A span larger than the limit
        never fits: the caller starts it once every span before it has been handed over.)"""
        return self._held + size <= self._limit

    def take(self, size: int) -> None:
        self._held += size

    def give_back(self, size: int) -> None:
        self._held -= size


class PlannedSpans(Generic[_S]):
    """A plan of spans (byte ranges, of one blob or many) fetched in parallel and handed over in order.

    A DCP load knows every range it needs before it reads any: this strategy fetches them ahead,
    several at once, while the consumer works through them in the planned order, and holds a bounded
    amount of memory however long the plan is. Unlike :class:`~azstoragetorch._reads.ReadAheadWindow`
    it guesses nothing: every byte fetched lies in a span of the plan.

    Where a span's bytes come from is the ``fetch`` callable's business: given a span, it returns a
    lease on a buffer whose first ``span.end - span.start`` bytes are the span's (typically
    :meth:`PinnedBlob.read_leased <azstoragetorch._reads.PinnedBlob.read_leased>` of the span's
    blob), and this releases that lease once the consumer is done with it. This decides only when
    each span starts and in which order the spans are handed over: it holds at most
    ``max_concurrency * block_size`` bytes of spans fetched or being fetched, besides the one in use
    (a span larger than that alone), on up to ``2 * max_concurrency`` threads.

    Spans run on threads of their own: a span waits for its ranged requests, which run on the shared
    transfer threads, and waiting for work queued behind oneself in one pool could deadlock it.
    """

    def __init__(self, fetch: Callable[[_S], Lease], *, max_concurrency: int, block_size: int) -> None:
        self._fetch = fetch
        self._budget = max_concurrency * block_size  # bytes being fetched, beside the span in use
        self._max_workers = 2 * max_concurrency

    def fetch_in_order(self, spans: list[_S]) -> Iterator[tuple[_S, memoryview]]:
        """Each span with its bytes, in the order given; the bytes are valid until the next span is asked for.

        Two jobs, kept apart: the :class:`_ByteBudget` says whether the next span may start (memory),
        and this keeps the started spans in a queue and hands them over oldest first (order). Handing
        over is the only way bytes go back to the budget, so a span waits only for spans before it.
        """
        budget = _ByteBudget(self._budget)
        started: collections.deque[tuple[_S, concurrent.futures.Future[Lease]]] = collections.deque()
        workers = max(1, min(len(spans), self._max_workers))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="azstoragetorch-spans") as pool:
            try:
                for span in spans:
                    while started and not budget.admits(span.end - span.start):
                        yield from self._hand_over(started.popleft(), budget)
                    budget.take(span.end - span.start)
                    started.append((span, pool.submit(self._fetch, span)))
                while started:
                    yield from self._hand_over(started.popleft(), budget)
            finally:
                # Spans fetched but never handed over: their leases are ours to release, once fetched.
                for _, future in started:
                    future.cancel()
                    future.add_done_callback(_release_fetched)

    @staticmethod
    def _hand_over(
        entry: tuple[_S, concurrent.futures.Future[Lease]], budget: _ByteBudget
    ) -> Generator[tuple[_S, memoryview], None, None]:
        """Give the consumer one span's bytes, then its buffer back to the pool and its bytes to ``budget``."""
        span, future = entry
        lease = future.result()
        try:
            yield span, lease.view(span.end - span.start)
        finally:
            lease.release()  # the consumer is done with it (it asked for the next span, or stopped)
        budget.give_back(span.end - span.start)


def _release_fetched(future: concurrent.futures.Future[Lease]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()
