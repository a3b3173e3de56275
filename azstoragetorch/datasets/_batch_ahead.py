"""Reading a map-style dataset's next batch while the caller uses this one: :class:`_BatchReadAhead`."""

from __future__ import annotations

import collections
import itertools
import operator
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from azstoragetorch._client import pause
from azstoragetorch.datasets._blob import Blob

# Starts the fetch of one sample: a pending future from the sample threads, or a done one.
_Start = Callable[[Blob], "Future[Any]"]

# The most a read-ahead holds. A DataLoader without workers is not expected to hold more than the
# batch it hands out; a few samples' worth is what hides a round trip, and blobs of many MB are
# bound by bandwidth, not latency, while a second batch of them could double the memory used.
READ_AHEAD_MAX_BYTES = 64 * 1024 * 1024


class _BatchReadAhead:
    """Fetches the batch a map-style dataset will be asked for next, as the blobs of this one arrive.

    A DataLoader without workers asks for one batch at a time and uses it before asking for the
    next. Fetched only when asked for, every batch waits for a full round trip plus its slowest blob,
    and no request is in flight while the caller uses it. When the batches step through the dataset
    by one stride (the last two batches and every index within them one stride apart: a sequential
    sampler, or an unshuffled ``DistributedSampler``), the next batch is known; each blob of this
    batch that arrives starts one of the next, so the requests in flight stay at one batch, and the
    window slides over the batch boundaries instead of draining at each of them.

    Shuffled orders never step by one stride, and neither does the share of one DataLoader worker
    among several (every ``num_workers``-th batch), so nothing is read ahead for them: a DataLoader
    already hands its workers their next batch early.

    It is safe to be wrong. At most one batch is held ahead, and of it no more than
    :data:`READ_AHEAD_MAX_BYTES` of blobs whose sizes are known before any request. A sample read
    ahead is handed out once, for its own index; its error is raised only if that index is asked
    for, naming its blob as any sample's error does. Whatever the next request does not ask for is
    cancelled if not yet running, else dropped when it finishes. The work runs on the process's
    sample threads, so nothing is left running that a later request would not have run. The state
    belongs to one process: the dataset does not pickle it, and a forked DataLoader worker starts
    its own.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._tail: tuple[int, int | None] | None = None  # the last batch's last index and stride
        self._ahead: _NextBatch | None = None

    def fetch(self, indexes: Sequence[Any], source: Sequence[Blob], start: _Start) -> list[Future[Any]]:
        """The samples at ``indexes`` of ``source``, taken from what was read ahead where they can be.

        Behind them the batch that should come next starts, a blob of it each time one of these is
        done. A bad index raises before anything starts. Waiting on the futures is the caller's, and
        so is :meth:`discard` if one of them fails.
        """
        blobs = [source[index] for index in indexes]
        try:
            keys: list[int] | None = [operator.index(index) for index in indexes]
        except TypeError:
            keys = None  # indexes that cannot be told apart by value (tensors, say): fetched as asked
        with self._lock:
            previous = self._ahead
            upcoming, self._tail = _following(self._tail, keys or [], len(source))
            held = _within_budget(((i, source[i]) for i in upcoming), READ_AHEAD_MAX_BYTES)
            following = self._ahead = _NextBatch(held, start) if held else None
        ahead = previous.close() if previous is not None else {}
        futures = []
        for position, blob in enumerate(blobs):
            read = ahead.pop(keys[position], None) if keys is not None else None
            futures.append(read if read is not None else _started(start, blob))
        for future in ahead.values():  # read ahead for a batch that did not come
            future.cancel()
        if following is not None:
            for future in futures:
                future.add_done_callback(following.start_one)
        return futures

    def discard(self) -> None:
        """Drop what is read ahead (a batch failed: its caller may stop there)."""
        with self._lock:
            previous, self._ahead, self._tail = self._ahead, None, None
        if previous is not None:
            for future in previous.close().values():
                future.cancel()


class _NextBatch:
    """The predicted batch: its blobs not yet started, and the futures of those that were."""

    def __init__(self, upcoming: list[tuple[int, Blob]], start: _Start) -> None:
        self._lock = threading.Lock()
        self._waiting = collections.deque(upcoming)
        self._started: dict[int, Future[Any]] = {}
        self._start = start
        self._open = True

    def start_one(self, _done: Future[Any] | None = None) -> None:
        """Start the next blob, if any is left and the batch is still expected (a done-callback)."""
        pause("batch.ahead")  # the next request may take this batch while one of its blobs starts
        with self._lock:
            if not self._open or not self._waiting:
                return
            index, blob = self._waiting.popleft()
            self._started[index] = _started(self._start, blob)

    def close(self) -> dict[int, Future[Any]]:
        """Stop starting blobs; the futures of those started, by index, now the caller's."""
        with self._lock:
            self._open = False
            self._waiting.clear()
            started, self._started = self._started, {}
        return started


def _within_budget(upcoming: Iterable[tuple[int, Blob]], budget: int) -> list[tuple[int, Blob]]:
    """The leading blobs of ``upcoming`` whose sizes are known without a request (listed, or read
    before) and together fit in ``budget`` bytes: those are the ones worth reading ahead. Taken one
    at a time, so that no blob past the budget is made."""
    kept: list[tuple[int, Blob]] = []
    total = 0
    for index, blob in upcoming:
        size = blob._known_size()
        if size is None or total + size > budget:
            break
        total += size
        kept.append((index, blob))
    return kept


def _started(start: _Start, blob: Blob) -> Future[Any]:
    """``start(blob)``, with an error in starting it kept in the future (raised when it is asked for)."""
    try:
        return start(blob)
    except Exception as error:  # the sample threads refuse work once the interpreter exits, say
        failed: Future[Any] = Future()
        failed.set_exception(error)
        return failed


def _following(
    tail: tuple[int, int | None] | None, indexes: list[int], length: int
) -> tuple[list[int], tuple[int, int | None] | None]:
    """The indexes of the batch after ``indexes`` if the batches step through the dataset by one stride
    (else none), and the tail to remember for the next call: the batch's last index and inner stride."""
    if not indexes:
        return [], None
    inner = indexes[1] - indexes[0] if len(indexes) > 1 else None
    if any(after - before != inner for before, after in itertools.pairwise(indexes)):
        return [], None  # not a progression: a shuffled batch
    new_tail = (indexes[-1], inner)
    if tail is None or indexes[0] < 0:
        return [], new_tail
    last, previous_inner = tail
    stride = indexes[0] - last
    if stride <= 0 or inner not in (None, stride) or previous_inner not in (None, stride):
        return [], new_tail
    stop = min(length, indexes[-1] + stride * len(indexes) + 1)
    return list(range(indexes[-1] + stride, stop, stride)), new_tail
