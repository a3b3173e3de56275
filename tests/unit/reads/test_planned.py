"""PlannedSpans over a plain fetch callable: order, the memory budget, and leases released once."""

from __future__ import annotations

import dataclasses
import random
import threading

import pytest

from azstoragetorch._client import Lease
from azstoragetorch._reads import PinnedBlob, PlannedSpans
from tests.unit.fakes import InMemoryBlobClient


@dataclasses.dataclass(frozen=True)
class Range:
    """A span of the plan: a byte range of one of the test's in-memory files."""

    relative_path: str
    start: int
    end: int


class CountedLease(Lease):
    """A lease that tells its source when it is released, so the test can count the bytes alive."""

    __slots__ = ("_size", "_source")

    def __init__(self, buffer: bytearray, source: Source) -> None:
        super().__init__(buffer)
        self._size = len(buffer)
        self._source = source

    def release(self) -> None:
        super().release()  # raises if released twice
        self._source.released(self._size)


class Source:
    """A plain ``fetch(span)`` callable over in-memory files that records what it hands out."""

    def __init__(self, files: dict[str, bytes], *, fail: str | None = None) -> None:
        self.files = files
        self.fail = fail
        self.leases: list[CountedLease] = []
        self.alive = 0  # bytes of leases handed out and not yet released
        self.max_alive = 0
        self.alive_before: dict[tuple[str, int], int] = {}
        self.gates: dict[tuple[str, int], threading.Event] = {}
        self.on_fetch: dict[tuple[str, int], threading.Event] = {}
        self._lock = threading.Lock()

    def __call__(self, span: Range) -> Lease:
        key = (span.relative_path, span.start)
        if key in self.gates:
            assert self.gates[key].wait(30), f"{key} was never let go"
        if key in self.on_fetch:
            self.on_fetch[key].set()
        if span.relative_path == self.fail:
            raise ConnectionError(f"injected failure of {key}")
        data = self.files[span.relative_path][span.start : span.end]
        with self._lock:
            self.alive_before[key] = self.alive
            self.alive += len(data)
            self.max_alive = max(self.max_alive, self.alive)
            lease = CountedLease(bytearray(data), self)
            self.leases.append(lease)
        return lease

    def released(self, size: int) -> None:
        with self._lock:
            self.alive -= size

    def all_released(self) -> bool:
        return self.alive == 0 and all(_is_released(lease) for lease in self.leases)


def _is_released(lease: Lease) -> bool:
    try:
        lease.buffer  # noqa: B018  (raises once the last holder let go)
    except RuntimeError:
        return True
    return False


def spans_over(files: dict[str, bytes], size: int) -> list[Range]:
    return [
        Range(path, start, min(start + size, len(data)))
        for path, data in sorted(files.items())
        for start in range(0, len(data), size)
    ]


@pytest.mark.parametrize("seed", range(5))
def test_spans_come_back_in_order_with_their_bytes_within_the_budget(seed: int) -> None:
    chance = random.Random(seed)
    files = {f"f{n}": chance.randbytes(chance.randrange(1, 400)) for n in range(4)}
    spans = spans_over(files, chance.randrange(1, 40))
    chance.shuffle(spans)
    source = Source(files)
    fetcher = PlannedSpans(source, max_concurrency=3, block_size=16)

    handed = [(span, bytes(data)) for span, data in fetcher.fetch_in_order(spans)]

    assert [span for span, _ in handed] == spans
    assert all(data == files[span.relative_path][span.start : span.end] for span, data in handed)
    assert source.max_alive <= 3 * 16
    assert len(source.leases) == len(spans)
    assert source.all_released()


def test_a_span_fetched_first_still_waits_for_the_spans_before_it() -> None:
    files = {"f": bytes(range(20))}
    first, second = Range("f", 0, 10), Range("f", 10, 20)
    source = Source(files)
    source.on_fetch[("f", 10)] = threading.Event()
    source.gates[("f", 0)] = source.on_fetch[("f", 10)]  # the first span is fetched only after the second
    fetcher = PlannedSpans(source, max_concurrency=2, block_size=10)

    assert [span for span, _ in fetcher.fetch_in_order([first, second])] == [first, second]
    assert source.all_released()


def test_a_span_larger_than_the_budget_is_fetched_alone() -> None:
    files = {"f": bytes(100)}
    spans = [Range("f", 0, 3), Range("f", 3, 63), Range("f", 63, 66)]
    source = Source(files)
    fetcher = PlannedSpans(source, max_concurrency=2, block_size=4)  # a budget of 8 bytes

    assert [span for span, _ in fetcher.fetch_in_order(spans)] == spans
    assert source.alive_before[("f", 3)] == 0  # the span before it was handed over and released first
    assert source.all_released()


def test_a_failed_fetch_raises_after_the_spans_before_it_and_no_lease_is_left_held() -> None:
    files = {"a": bytes(40), "b": bytes(40)}
    spans = spans_over(files, 10)  # a's four spans, then b's
    source = Source(files, fail="b")
    fetcher = PlannedSpans(source, max_concurrency=4, block_size=10)
    handed = []

    with pytest.raises(ConnectionError, match="injected failure"):
        for span, _ in fetcher.fetch_in_order(spans):
            handed.append(span)

    assert handed == spans[:4]
    assert source.all_released()


def test_a_consumer_that_stops_early_leaves_no_lease_held() -> None:
    files = {"f": bytes(range(200))}
    source = Source(files)
    fetcher = PlannedSpans(source, max_concurrency=4, block_size=20)
    handing = fetcher.fetch_in_order(spans_over(files, 10))

    _, data = next(handing)
    assert bytes(data) == files["f"][:10]
    handing.close()

    assert len(source.leases) > 1  # spans after the first had been started
    assert source.all_released()


def test_an_empty_plan_fetches_nothing() -> None:
    source = Source({})

    assert list(PlannedSpans(source, max_concurrency=2, block_size=8).fetch_in_order([])) == []
    assert source.leases == []


def test_spans_fetched_from_the_in_memory_client_arrive_whole() -> None:
    chance = random.Random(7)
    clients = {name: InMemoryBlobClient(chance.randbytes(1000)) for name in ("a", "b")}
    blobs = {name: PinnedBlob(client, block_size=64, max_concurrency=2) for name, client in clients.items()}

    def fetch(span: Range) -> Lease:
        return blobs[span.relative_path].read_leased(span.start, span.end - span.start)

    spans = [Range("a", 0, 300), Range("b", 100, 900), Range("a", 500, 1000)]
    fetcher = PlannedSpans(fetch, max_concurrency=2, block_size=64)

    for span, data in fetcher.fetch_in_order(spans):
        assert bytes(data) == clients[span.relative_path].data[span.start : span.end]

    def parts(start: int, end: int) -> list[tuple[int, int]]:
        return [(offset, min(64, end - offset)) for offset in range(start, end, 64)]

    assert sorted(clients["a"].reads) == parts(0, 300) + parts(500, 1000)  # parts of block_size, no more
    assert sorted(clients["b"].reads) == parts(100, 900)
