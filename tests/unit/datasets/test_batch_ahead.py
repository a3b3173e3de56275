"""BlobDataset reading its next batch while the caller uses this one (``datasets/_batch_ahead.py``).

Blobs are served by the in-memory fake client, through the default sample's real read path; every
blob's content names it, so a sample handed out for the wrong index shows.
"""

from __future__ import annotations

import pickle
import threading
from concurrent.futures import Future
from typing import Any

import pytest
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st

from azstoragetorch._client import BlobProperties, BlobUrl, _schedule
from azstoragetorch.datasets import Blob, BlobDataset
from azstoragetorch.datasets._batch_ahead import _following, _NextBatch
from tests.unit.fakes import InMemoryBlobClient

ACCOUNT = "https://acct.blob.core.windows.net"


class NamedBlobClient(InMemoryBlobClient):
    """A blob whose content is its name; it can be made to fail, or to wait, before answering."""

    def __init__(self, name: str) -> None:
        super().__init__(name.encode())
        self.blob_url = BlobUrl.parse(f"{ACCOUNT}/data/{name}")  # type: ignore[misc]
        self.fail = False
        self.gate: threading.Event | None = None
        self.attempts = 0
        self.attempted = threading.Event()

    def fetch_range_into(self, offset: int, into: Any, **kwargs: Any) -> tuple[BlobProperties, int]:
        self.attempts += 1
        self.attempted.set()
        if self.gate is not None:
            assert self.gate.wait(30), "the gate was never opened"
        if self.fail:
            raise ConnectionError(f"injected failure reading {self.blob_url.blob_name}")
        return super().fetch_range_into(offset, into, **kwargs)


def name(index: int) -> str:
    return f"b{index:04d}"


def make_dataset(count: int, *, sizes_known: bool = True) -> tuple[BlobDataset[Any], list[NamedBlobClient]]:
    """Blobs whose sizes are known ahead, as a listing gives them (or, with ``sizes_known=False``,
    as a list of URLs does before the first read)."""
    clients = [NamedBlobClient(name(index)) for index in range(count)]
    blobs = [Blob(client, client.properties if sizes_known else None) for client in clients]  # type: ignore[arg-type]
    return BlobDataset(blobs), clients


def contents(batch: list[dict[str, Any]]) -> list[str]:
    for sample in batch:
        assert sample["url"].endswith("/" + sample["data"].decode())  # a sample's URL and bytes match
    return [sample["data"].decode() for sample in batch]


def read_counts(clients: list[NamedBlobClient]) -> list[int]:
    return [len(client.reads) for client in clients]


def batch(start: int, stop: int, step: int = 1) -> list[int]:
    return list(range(start, stop, step))


# -- which batch comes next -----------------------------------------------------------------------


def test_a_sequential_run_is_predicted_once_two_batches_confirm_it() -> None:
    upcoming, tail = _following(None, batch(0, 4), 100)
    assert upcoming == []  # one batch says nothing about the next
    upcoming, tail = _following(tail, batch(4, 8), 100)
    assert upcoming == batch(8, 12)
    assert _following(tail, batch(8, 12), 100)[0] == batch(12, 16)


def test_an_unshuffled_distributed_sampler_stride_is_followed() -> None:
    _, tail = _following(None, batch(1, 13, 3), 100)  # rank 1 of 3
    assert _following(tail, batch(13, 25, 3), 100)[0] == batch(25, 37, 3)


def test_the_prediction_stops_at_the_end_of_the_dataset() -> None:
    _, tail = _following(None, batch(0, 4), 10)
    upcoming, tail = _following(tail, batch(4, 8), 10)
    assert upcoming == [8, 9]
    assert _following(tail, [8, 9], 10)[0] == []


def test_batches_of_one_are_followed() -> None:
    _, tail = _following(None, [0], 10)
    upcoming, tail = _following(tail, [1], 10)
    assert upcoming == [2]


@pytest.mark.parametrize(
    "first, second",
    [
        (batch(0, 4), batch(8, 12)),  # a DataLoader worker's share: every other batch
        (batch(0, 4), [4, 5, 7, 6]),  # not a progression
        ([3, 1, 2, 0], batch(4, 8)),  # a shuffled batch before
        (batch(96, 100), batch(0, 4)),  # a new epoch
        (batch(0, 8, 2), batch(9, 17, 2)),  # the step between batches is not the step within them
        (batch(-8, -4), batch(-4, 0)),  # negative indexes
        (batch(4, 8), batch(4, 8)),  # the same batch again
    ],
)
def test_anything_but_one_stride_throughout_predicts_nothing(first: list[int], second: list[int]) -> None:
    _, tail = _following(None, first, 100)
    assert _following(tail, second, 100)[0] == []


# -- reading ahead --------------------------------------------------------------------------------


def test_blobs_of_unknown_size_are_not_read_ahead() -> None:
    # A list of URLs says nothing of sizes before the first read: a blob of many GB may come next.
    dataset, clients = make_dataset(12, sizes_known=False)
    for start in (0, 4, 8):
        assert contents(dataset.__getitems__(batch(start, start + 4))) == [name(i) for i in range(start, start + 4)]
        assert dataset._batch_read_ahead()._ahead is None  # nothing held for the next batch
    assert read_counts(clients) == [1] * 12


def test_a_read_ahead_holds_no_more_than_its_byte_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    from azstoragetorch.datasets import _batch_ahead

    size = len(name(0))  # every blob's content is its five-character name
    monkeypatch.setattr(_batch_ahead, "READ_AHEAD_MAX_BYTES", 2 * size + 1)
    dataset, _ = make_dataset(12)
    dataset.__getitems__(batch(0, 4))
    dataset.__getitems__(batch(4, 8))
    ahead = dataset._batch_read_ahead()._ahead
    assert ahead is not None
    with ahead._lock:  # started or still waiting to start: what the read-ahead took on
        taken = sorted([index for index, _ in ahead._waiting] + list(ahead._started))
    assert taken == [8, 9]  # the first two fit the budget; the third would not, nor the rest
    assert contents(dataset.__getitems__(batch(8, 12))) == [name(i) for i in range(8, 12)]


def test_the_next_batch_is_read_while_this_one_is_used_and_each_blob_once() -> None:
    dataset, clients = make_dataset(12)
    for client in clients[8:]:
        client.gate = threading.Event()  # answers held, so that the reads ahead are seen in flight
    assert contents(dataset.__getitems__(batch(0, 4))) == [name(i) for i in range(4)]
    assert contents(dataset.__getitems__(batch(4, 8))) == [name(i) for i in range(4, 8)]
    for client in clients[8:]:
        assert client.attempted.wait(30)  # requested before anyone asked for the batch
        assert client.gate is not None
        client.gate.set()
    assert contents(dataset.__getitems__(batch(8, 12))) == [name(i) for i in range(8, 12)]
    assert read_counts(clients) == [1] * 12  # and not read again when asked for


def test_a_plain_dataloader_reads_ahead_and_gives_every_sample_once_in_order() -> None:
    dataset, clients = make_dataset(70)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, collate_fn=contents)
    assert [sample for one in loader for sample in one] == [name(i) for i in range(70)]
    assert read_counts(clients) == [1] * 70
    ahead = dataset.__dict__["_read_ahead"]
    assert ahead._tail == (69, 1)  # the dataset did follow the run (and predicted nothing past the end)


def test_a_shuffled_dataloader_reads_nothing_ahead() -> None:
    dataset, clients = make_dataset(64)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=8, shuffle=True, collate_fn=contents, generator=torch.Generator().manual_seed(5)
    )
    assert sorted(sample for one in loader for sample in one) == [name(i) for i in range(64)]
    assert read_counts(clients) == [1] * 64  # not one request more than the samples


def test_a_wrong_prediction_hands_out_the_asked_samples_and_drops_the_rest() -> None:
    dataset, clients = make_dataset(20)
    dataset.__getitems__(batch(0, 4))
    dataset.__getitems__(batch(4, 8))  # predicts 8..11
    assert contents(dataset.__getitems__([10, 2, 9, 15])) == [name(10), name(2), name(9), name(15)]
    # 10 and 9 may come from the read ahead; asked again, they are read again, never handed out twice.
    before = read_counts(clients)
    assert contents(dataset.__getitems__([9, 10])) == [name(9), name(10)]
    assert read_counts(clients)[9] == before[9] + 1 and read_counts(clients)[10] == before[10] + 1


def test_a_read_ahead_error_is_raised_for_its_own_index_only() -> None:
    dataset, clients = make_dataset(16)
    clients[9].fail = True
    dataset.__getitems__(batch(0, 4))
    dataset.__getitems__(batch(4, 8))  # reads 8..11 ahead: 9 fails there
    assert clients[9].attempted.wait(30)
    # Another batch is asked for: the failure is dropped with the rest of what was read ahead.
    assert contents(dataset.__getitems__(batch(12, 16))) == [name(i) for i in range(12, 16)]
    clients[9].attempted.clear()
    dataset.__getitems__(batch(0, 4))
    dataset.__getitems__(batch(4, 8))
    assert clients[9].attempted.wait(30)
    attempts = clients[9].attempts
    with pytest.raises(ConnectionError, match="b0009") as raised:
        dataset.__getitems__(batch(8, 12))
    assert clients[9].attempts == attempts  # the error of the read ahead, not of a second read
    assert any("b0009" in note for note in raised.value.__notes__)  # named as any sample's error is
    clients[9].fail = False
    assert contents(dataset.__getitems__(batch(8, 12))) == [name(i) for i in range(8, 12)]  # nothing kept from it


def test_a_failed_batch_stops_reading_ahead() -> None:
    dataset, clients = make_dataset(16)
    for client in clients[8:12]:
        client.gate = threading.Event()
    clients[5].fail = True
    dataset.__getitems__(batch(0, 4))
    with pytest.raises(ConnectionError, match="b0005"):
        dataset.__getitems__(batch(4, 8))
    assert dataset.__dict__["_read_ahead"]._ahead is None  # the caller may stop at the failure
    for client in clients[8:12]:
        assert client.gate is not None
        client.gate.set()
    # What had started goes on to its end and is dropped; the run is followed afresh (two batches)
    # before anything is read ahead again.
    assert contents(dataset.__getitems__(batch(12, 16))) == [name(i) for i in range(12, 16)]
    assert all(client.attempts <= 1 for client in clients)


def test_a_closed_prediction_starts_nothing() -> None:
    started: list[Blob] = []

    def start(blob: Blob) -> Future[Any]:
        started.append(blob)
        done: Future[Any] = Future()
        done.set_result(blob)
        return done

    blobs = make_dataset(3)[0]._blobs
    following = _NextBatch([(index, blobs[index]) for index in range(3)], start)
    following.start_one()
    assert following.close().keys() == {0}
    following.start_one()
    assert started == [blobs[0]]


def test_reads_ahead_stay_within_one_batch_in_flight() -> None:
    in_flight = 0
    most = 0
    lock = threading.Lock()

    def counted(blob: Blob) -> str:
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        try:
            threading.Event().wait(0.002)
            return blob.blob_name
        finally:
            with lock:
                in_flight -= 1

    dataset = BlobDataset(make_dataset(60)[0]._blobs, transform=counted)
    loader = torch.utils.data.DataLoader(dataset, batch_size=6, collate_fn=list)
    assert [sample for one in loader for sample in one] == [name(i) for i in range(60)]
    assert most <= 6


def test_a_dataset_that_read_ahead_pickles_without_it_and_reads_ahead_again() -> None:
    dataset, _ = make_dataset(0)
    named = BlobDataset.from_blob_urls([f"{ACCOUNT}/data/{name(i)}" for i in range(8)], credential=False)
    named.__dict__["_read_ahead"] = dataset._batch_read_ahead()
    copy = pickle.loads(pickle.dumps(named))
    assert "_read_ahead" not in copy.__dict__
    assert len(copy) == 8


@settings(max_examples=30, deadline=None)
@given(
    requests=st.lists(
        st.one_of(
            st.tuples(st.integers(0, 39), st.integers(1, 6)).map(lambda r: batch(r[0], min(40, r[0] + r[1]))),
            st.lists(st.integers(0, 39), min_size=1, max_size=6),
        ),
        min_size=1,
        max_size=12,
    ),
    seed=st.integers(0, 2**16),
)
def test_any_sequence_of_batches_gets_its_own_samples_under_a_perturbed_schedule(
    requests: list[list[int]], seed: int
) -> None:
    dataset, clients = make_dataset(40)
    clients[17].fail = True
    with _schedule.perturbed(seed, max_delay=0.002, probability=1.0, only=frozenset({"batch.ahead"})):
        for request in requests:
            # Each batch followed by the one that continues it, so that runs are read ahead between
            # arbitrary batches.
            following = [index + len(request) for index in request if index + len(request) < 40]
            for indexes in filter(None, (request, following)):
                if 17 in indexes:
                    with pytest.raises(ConnectionError, match="b0017"):
                        dataset.__getitems__(indexes)
                else:
                    assert contents(dataset.__getitems__(indexes)) == [name(i) for i in indexes]


def test_a_sequential_run_under_a_perturbed_schedule_passes_the_hand_off_point() -> None:
    dataset, clients = make_dataset(50)
    loader = torch.utils.data.DataLoader(dataset, batch_size=7, collate_fn=contents)
    with _schedule.perturbed(5, max_delay=0.003, probability=1.0, only=frozenset({"batch.ahead"})) as perturbation:
        assert [sample for one in loader for sample in one] == [name(i) for i in range(50)]
    assert perturbation.counts.get("batch.ahead", 0) >= 7 * 5  # each blob of batches 2 to 7 passes it
    assert read_counts(clients) == [1] * 50
