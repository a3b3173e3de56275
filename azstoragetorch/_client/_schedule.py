"""Test-only schedule perturbation at the points where threads hand work or memory to each other.

A green test run says little about threaded code: the thread that would overtake another only does
so on a loaded machine. The transfer code calls :func:`pause` at its hand-off points (picking a
chunk, copying out of it, releasing a buffer, finishing a part, committing). In production
:func:`pause` finds no perturbation installed and returns at once. Tests install one, seeded, and
every hand-off point then sleeps a random short time, which shakes the interleavings that a quiet
machine never produces.

Tests use :func:`perturbed` in-process. Child processes (DataLoader workers, spawned ranks, killed
savers) inherit the setting through the ``AZSTORAGETORCH_PERTURB`` environment variable, read
once at import: ``"<seed>"`` or ``"<seed>:<max_delay_seconds>"``.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
from collections.abc import Iterator

ENVIRONMENT_VARIABLE = "AZSTORAGETORCH_PERTURB"
# The hand-off points, by name (tests may restrict a perturbation to some of them):
#   "chunk.pick"     a reader has chosen the chunk it will copy from
#   "chunk.copy"     just before bytes are copied out of a downloaded chunk
#   "buffer.release" just before a lease on a pooled buffer is released
#   "part.finish"    a transfer thread has finished one part (a range or a block)
#   "commit"         just before a blob, or a checkpoint's metadata, is committed
#   "connection.release"  a response was read to its end and its connection goes back to the pool
#   "cache.read"     a dataset cache file is open, not yet read (azstoragetorch._cache)
#   "cache.store"    a dataset cache file is written under its temporary name, not yet renamed
#   "cache.handoff"  a fetched blob is about to be handed to the cache's background writer
#   "batch.ahead"    a dataset's next-batch read-ahead starts one of its blobs (azstoragetorch.datasets)
#   "dcp.start"      a DCP save has seen the checkpoint's .metadata it may replace (integrations.dcp)
#   "dcp.commit"     a DCP save is about to commit its .metadata, if no other save did meanwhile
#   "dcp.cleanup"    a DCP save is about to delete one shard file (replaced, or its own after losing)
DEFAULT_MAX_DELAY_SECONDS = 0.005


class Perturbation:
    """Random sleeps of up to ``max_delay`` seconds at hand-off points, drawn from one seeded stream.

    The thread interleaving itself is never reproducible, but the same seed replays the same
    sequence of delays, which in practice brings back the same kind of race. ``only`` restricts
    the sleeps to the named points; ``probability`` is the chance that a point sleeps at all.
    """

    def __init__(
        self,
        seed: int,
        *,
        max_delay: float = DEFAULT_MAX_DELAY_SECONDS,
        probability: float = 0.5,
        only: frozenset[str] | None = None,
    ) -> None:
        self.seed = seed
        self.max_delay = max_delay
        self.probability = probability
        self.only = only
        self.counts: dict[str, int] = {}
        self._random = random.Random(seed)
        self._lock = threading.Lock()

    def pause(self, point: str) -> None:
        if self.only is not None and point not in self.only:
            return
        with self._lock:
            self.counts[point] = self.counts.get(point, 0) + 1
            sleeps = self._random.random() < self.probability
            delay = self._random.uniform(0, self.max_delay)
        if sleeps:
            threading.Event().wait(delay)  # not time.sleep: tests patch that to skip retry back-off


_active: Perturbation | None = None


def pause(point: str) -> None:
    """A hand-off point named ``point``; sleeps a little when a test perturbs the schedule."""
    if _active is not None:
        _active.pause(point)


@contextlib.contextmanager
def perturbed(
    seed: int,
    *,
    max_delay: float = DEFAULT_MAX_DELAY_SECONDS,
    probability: float = 0.5,
    only: frozenset[str] | None = None,
) -> Iterator[Perturbation]:
    """Perturb every hand-off point of this process while the ``with`` block runs."""
    global _active
    previous = _active
    _active = Perturbation(seed, max_delay=max_delay, probability=probability, only=only)
    try:
        yield _active
    finally:
        _active = previous


def _from_environment() -> Perturbation | None:
    setting = os.environ.get(ENVIRONMENT_VARIABLE)
    if not setting:
        return None
    seed, _, delay = setting.partition(":")
    return Perturbation(int(seed), max_delay=float(delay) if delay else DEFAULT_MAX_DELAY_SECONDS)


_active = _from_environment()
