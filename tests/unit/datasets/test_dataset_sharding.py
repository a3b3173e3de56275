"""The datasets' pure logic, without a network: sharding, shuffling, resuming, prefetch and input checks.

Blobs here are real :class:`Blob` objects for made-up URLs; the transforms only look at names, so
no request is ever sent. Ranks and DataLoader workers are simulated by patching
``azstoragetorch.datasets._iterable._live_rank_and_world_size`` and ``torch.utils.data.get_worker_info``.
"""

from __future__ import annotations

import contextlib
import pickle
import threading
import time
import traceback
import types
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch.multiprocessing
import torch.utils.data
from hypothesis import given, settings
from hypothesis import strategies as st
from torchdata.stateful_dataloader import StatefulDataLoader

from azstoragetorch import datasets
from azstoragetorch._client import AzStorageTorchBlobClient, BlobUrl
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset, _dealing, _iterable

ACCOUNT = "https://acct.blob.core.windows.net"
SAS = "sv=2021-08-06&sr=c&sp=rl&se=2030-01-01T00%3A00%3A00Z&sig=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"


def fake_blobs(count: int, *, query: str = "") -> list[Blob]:
    """``count`` blobs named ``b0000``, ``b0001``, ... that no transform here ever reads."""
    suffix = f"?{query}" if query else ""
    return [
        Blob(AzStorageTorchBlobClient(BlobUrl.parse(f"{ACCOUNT}/data/b{index:04d}{suffix}"), False))
        for index in range(count)
    ]


def names(count: int) -> list[str]:
    return [f"b{index:04d}" for index in range(count)]


def blob_name(blob: Blob) -> str:
    return blob.blob_name


@contextlib.contextmanager
def as_shard(rank: int, world_size: int | None, worker_id: int, num_workers: int) -> Iterator[None]:
    """Pretend to run on ``rank`` of ``world_size`` (``None``: no process group), in worker ``worker_id``
    of ``num_workers`` (0: the main process, no worker info)."""
    live = None if world_size is None else (rank, world_size)
    worker = types.SimpleNamespace(id=worker_id, num_workers=num_workers, seed=0, dataset=None)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_iterable, "_live_rank_and_world_size", lambda: live)
        patch.setattr(torch.utils.data, "get_worker_info", lambda: worker if num_workers else None)
        yield


def shards_of(dataset: IterableBlobDataset[Any], world_size: int, num_workers: int) -> dict[tuple[int, int], list[Any]]:
    """What every (rank, worker) yields, each from its own copy of ``dataset`` as a DataLoader would make."""
    shards = {}
    for rank in range(world_size):
        for worker_id in range(max(num_workers, 1)):
            with as_shard(rank, world_size, worker_id, num_workers):
                shards[(rank, worker_id)] = list(pickle.loads(pickle.dumps(dataset)))
    return shards


def shard_layouts(
    *, max_world_size: int = 4, max_workers: int = 4, max_count: int = 40
) -> st.SearchStrategy[tuple[int, int, int]]:
    """``(world_size, num_workers, count)``: ranks, DataLoader workers per rank (0: none) and blobs."""
    return st.tuples(st.integers(1, max_world_size), st.integers(0, max_workers), st.integers(0, max_count))


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    remaining = iter(whole)
    return all(any(item == candidate for candidate in remaining) for item in part)


# -- sharding -------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(layout=shard_layouts(), shuffle=st.booleans(), seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 20))
def test_every_blob_exactly_once_over_all_ranks_and_workers(
    layout: tuple[int, int, int], shuffle: bool, seed: int, epoch: int
) -> None:
    world_size, num_workers, count = layout
    dataset = IterableBlobDataset(fake_blobs(count), transform=blob_name, shuffle=shuffle, seed=seed)
    dataset.set_epoch(epoch)
    shards = shards_of(dataset, world_size, num_workers)

    assert len(shards) == world_size * max(num_workers, 1)
    seen = [name for shard in shards.values() for name in shard]
    assert Counter(seen) == Counter(names(count))  # exactly once: nothing missing, nothing twice
    sizes = [len(shard) for shard in shards.values()]
    assert max(sizes) - min(sizes) <= 1
    # Every shard follows the one order of the epoch, which a single process sees whole.
    with as_shard(0, None, 0, 0):
        whole = list(dataset)
    assert sorted(whole) == names(count)
    if not shuffle:
        assert whole == names(count)
    for shard in shards.values():
        assert is_subsequence(shard, whole), (shard, whole)


@settings(max_examples=80, deadline=None)
@given(layout=shard_layouts(), balance_ranks=st.booleans())
def test_ranks_get_shares_that_differ_by_at_most_one_or_none_when_balanced(
    layout: tuple[int, int, int], balance_ranks: bool
) -> None:
    world_size, num_workers, count = layout
    dataset = IterableBlobDataset(fake_blobs(count), transform=blob_name, shuffle=True, balance_ranks=balance_ranks)
    shards = shards_of(dataset, world_size, num_workers)

    per_rank = [sum(len(shard) for (rank, _), shard in shards.items() if rank == r) for r in range(world_size)]
    seen = Counter(name for shard in shards.values() for name in shard)
    if balance_ranks:
        # Every rank runs the same number of steps (what DDP needs); nothing is missing, and the padding
        # (world_size - 1 samples at most) repeats blobs evenly, as DistributedSampler does; with fewer
        # blobs than ranks, every rank gets them all over again.
        assert len(set(per_rank)) == 1
        assert set(seen) == set(names(count))
        assert sum(seen.values()) == count + (-count) % world_size
        assert not seen or max(seen.values()) - min(seen.values()) <= 1
    else:
        assert max(per_rank) - min(per_rank) <= 1
        assert seen == Counter(names(count))
    if count % world_size == 0:
        assert len(set(per_rank)) == 1 and seen == Counter(names(count))  # both ways: exact and even


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 1000), count=st.integers(20, 60))
def test_shuffle_is_deterministic_per_seed_and_epoch_and_changes_with_the_epoch(
    seed: int, epoch: int, count: int
) -> None:
    def order_for(seed: int, epoch: int) -> list[str]:
        dataset = IterableBlobDataset(fake_blobs(count), transform=blob_name, shuffle=True, seed=seed)
        dataset.set_epoch(epoch)
        with as_shard(0, None, 0, 0):
            return list(dataset)

    first = order_for(seed, epoch)
    assert sorted(first) == names(count)
    assert order_for(seed, epoch) == first  # another instance (another rank) draws the same order
    assert order_for(seed, epoch + 1) != first
    assert order_for(seed + 1, epoch) != first
    # Seeds and epochs are not simply added: the next seed's epoch is not the next epoch's order.
    assert order_for(seed + 1, epoch) != order_for(seed, epoch + 1)


def test_shuffle_is_off_by_default_and_set_epoch_then_changes_nothing() -> None:
    dataset = IterableBlobDataset(fake_blobs(30), transform=blob_name)
    dataset.set_epoch(7)
    with as_shard(0, None, 0, 0):
        assert list(dataset) == names(30)


def test_without_a_process_group_or_workers_one_process_sees_everything() -> None:
    assert _dealing._live_rank_and_world_size() is None  # no process group in this test process
    dataset = IterableBlobDataset(fake_blobs(9), transform=blob_name)
    assert list(dataset) == names(9)


def test_a_worker_started_by_spawn_learns_its_rank_from_the_process_that_pickled_the_dataset() -> None:
    dataset = IterableBlobDataset(fake_blobs(23), transform=blob_name, shuffle=True, seed=11)
    expected = shards_of(dataset, world_size=2, num_workers=2)
    for rank in range(2):
        with as_shard(rank, 2, 0, 0):
            payload = pickle.dumps(dataset)  # the rank's main process starting its workers
        for worker_id in range(2):
            with as_shard(0, None, worker_id, 2):  # a spawned worker: no process group of its own
                assert list(pickle.loads(payload)) == expected[(rank, worker_id)]
    # A copy that reaches a process with a live process group follows that group.
    with as_shard(1, 2, 0, 0):
        payload = pickle.dumps(dataset)
    with as_shard(0, 2, 1, 2):
        assert list(pickle.loads(payload)) == expected[(0, 1)]


# -- resuming -------------------------------------------------------------------------------------


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    world_size=st.integers(1, 3),
    num_workers=st.integers(0, 3),
    count=st.integers(0, 30),
    shuffle=st.booleans(),
    seed=st.integers(0, 1000),
    epoch=st.integers(0, 5),
)
def test_state_dict_resumes_a_shard_where_it_stopped(
    data: st.DataObject, world_size: int, num_workers: int, count: int, shuffle: bool, seed: int, epoch: int
) -> None:
    rank = data.draw(st.integers(0, world_size - 1))
    worker_id = data.draw(st.integers(0, max(num_workers, 1) - 1))

    def fresh() -> IterableBlobDataset[str]:
        return IterableBlobDataset(fake_blobs(count), transform=blob_name, shuffle=shuffle, seed=seed)

    with as_shard(rank, world_size, worker_id, num_workers):
        reference = fresh()
        reference.set_epoch(epoch)
        full = list(reference)
        stop = data.draw(st.integers(0, len(full)))

        interrupted = fresh()
        interrupted.set_epoch(epoch)
        iterator = iter(interrupted)
        first = [next(iterator) for _ in range(stop)]
        state = pickle.loads(pickle.dumps(interrupted.state_dict()))
        iterator.close()

        resumed = fresh()  # epoch 0: the state must bring the epoch back
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert first + rest == full
        assert list(resumed) == full  # the iteration after the resumed one is whole again


def test_load_state_dict_refuses_foreign_or_mismatched_states() -> None:
    dataset = IterableBlobDataset(fake_blobs(5), transform=blob_name, shuffle=True, seed=3)
    good = dataset.state_dict()
    assert set(good) >= {"epoch", "seed", "shuffle", "samples_yielded"}
    for bad in ({}, {"epoch": 0}, [1, 2], {**good, "seed": 4}, {**good, "shuffle": False}):
        with pytest.raises(ValueError):
            dataset.load_state_dict(bad)  # type: ignore[arg-type]
    dataset.load_state_dict(good)


def test_state_dict_counts_what_was_yielded_and_records_the_epoch() -> None:
    dataset = IterableBlobDataset(fake_blobs(6), transform=blob_name, prefetch=2)
    dataset.set_epoch(4)
    iterator = iter(dataset)
    assert [next(iterator), next(iterator)] == ["b0000", "b0001"]
    state = dataset.state_dict()
    assert (state["epoch"], state["samples_yielded"]) == (4, 2)  # prefetched samples do not count
    iterator.close()


# StatefulDataLoader creates a dataset iterator (and may take a state_dict, or discard the iterator)
# before asking it for a sample, so the position must be reset or restored when the iterator is
# created, not at its first sample. (Regression tests: all three once lost samples or epochs.)


@pytest.mark.parametrize("history", ["iterated-in-main-process", "persistent-workers-second-epoch"])
def test_resume_right_after_the_first_batch_when_the_dataset_was_iterated_before(
    history: str, stop_workers: list[Any]
) -> None:
    dataset = IterableBlobDataset(fake_blobs(20), transform=blob_name)
    persistent = history == "persistent-workers-second-epoch"
    if not persistent:
        assert list(dataset) == names(20)  # e.g. a look at the data before training
    loader = StatefulDataLoader(dataset, batch_size=2, num_workers=2, persistent_workers=persistent)
    stop_workers.append(loader)
    if persistent:
        assert sorted(name for batch in loader for name in batch) == names(20)  # epoch 0
    iterator = iter(loader)
    first = [next(iterator)]  # worker 1 has not yielded yet in this epoch
    state = pickle.loads(pickle.dumps(loader.state_dict()))

    resumed = StatefulDataLoader(IterableBlobDataset(fake_blobs(20), transform=blob_name), batch_size=2, num_workers=2)
    stop_workers.append(resumed)
    resumed.load_state_dict(state)
    seen = [name for batch in first + list(resumed) for name in batch]
    assert sorted(seen) == names(20)


def test_resume_from_a_state_taken_before_the_first_batch_of_a_later_epoch() -> None:
    dataset = IterableBlobDataset(fake_blobs(10), transform=blob_name)
    loader = StatefulDataLoader(dataset, batch_size=3)
    assert sorted(name for batch in loader for name in batch) == names(10)
    iterator = iter(loader)  # the second epoch starts ...
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # ... and is checkpointed right away
    del iterator

    resumed = StatefulDataLoader(IterableBlobDataset(fake_blobs(10), transform=blob_name), batch_size=3)
    resumed.load_state_dict(state)
    assert sorted(name for batch in resumed for name in batch) == names(10)


def test_resume_from_a_state_taken_at_the_end_of_an_epoch_gives_a_whole_next_epoch() -> None:
    loader = StatefulDataLoader(IterableBlobDataset(fake_blobs(10), transform=blob_name), batch_size=3)
    assert sorted(name for batch in loader for name in batch) == names(10)
    state = pickle.loads(pickle.dumps(loader.state_dict()))  # end-of-epoch checkpoint

    resumed = StatefulDataLoader(IterableBlobDataset(fake_blobs(10), transform=blob_name), batch_size=3)
    resumed.load_state_dict(state)
    assert sorted(name for batch in resumed for name in batch) == names(10)


def test_set_epoch_reaches_persistent_workers(stop_workers: list[Any]) -> None:
    dataset = IterableBlobDataset(fake_blobs(24), transform=blob_name, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2, persistent_workers=True)
    stop_workers.append(loader)
    orders = []
    for epoch in (0, 1, 0):
        dataset.set_epoch(epoch)
        orders.append(list(loader))
    assert sorted(orders[0]) == sorted(orders[1]) == names(24)
    assert orders[0] != orders[1]
    assert orders[2] == orders[0]  # back to epoch 0: its order again


def set_epoch_and_report(dataset: IterableBlobDataset[str], epoch: int, results: Any) -> None:
    dataset.set_epoch(epoch)
    results.put(dataset.state_dict()["epoch"])


def test_set_epoch_in_a_spawned_rank_leaves_the_other_copies_alone() -> None:
    dataset = IterableBlobDataset(fake_blobs(5), transform=blob_name, shuffle=True, seed=3)
    context = torch.multiprocessing.get_context("spawn")
    results = context.SimpleQueue()
    rank = context.Process(target=set_epoch_and_report, args=(dataset, 7, results))  # as mp.spawn(args=...) does
    rank.start()
    rank.join(60)
    assert rank.exitcode == 0
    assert results.get() == 7
    assert dataset.state_dict()["epoch"] == 0  # this process never called set_epoch


def test_set_epoch_reaches_workers_that_are_started_per_epoch() -> None:
    dataset = IterableBlobDataset(fake_blobs(24), transform=blob_name, shuffle=True, seed=3)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    orders = []
    for epoch in range(2):
        dataset.set_epoch(epoch)
        orders.append(list(loader))
    assert sorted(orders[0]) == sorted(orders[1]) == names(24)
    assert orders[0] != orders[1]


# -- prefetch and concurrency ---------------------------------------------------------------------


class InFlight:
    """A transform that records how many calls run at once; the first ``together`` must overlap."""

    def __init__(self, together: int, delays: dict[str, float] | None = None, timeout: float = 10) -> None:
        self.lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.calls = 0
        self.barrier = threading.Barrier(together)
        self.together = together
        self.delays = delays or {}
        self.timeout = timeout

    def __call__(self, blob: Blob) -> str:
        with self.lock:
            self.now += 1
            self.most = max(self.most, self.now)
            call = self.calls
            self.calls += 1
        try:
            if call < self.together:
                self.barrier.wait(timeout=self.timeout)  # BrokenBarrierError unless `together` calls overlap
            time.sleep(self.delays.get(blob.blob_name, 0.002))
            return blob.blob_name
        finally:
            with self.lock:
                self.now -= 1


@pytest.mark.parametrize("prefetch", [1, 3, 8])
def test_iterable_prefetch_is_concurrent_bounded_and_in_order(prefetch: int) -> None:
    # Earlier blobs take longest, so samples finish out of order; they must still come out in order.
    delays = {name: 0.03 * (index % 4 == 0) for index, name in enumerate(names(24))}
    transform = InFlight(together=prefetch, delays=delays)
    dataset = IterableBlobDataset(fake_blobs(24), transform=transform, prefetch=prefetch)
    assert list(dataset) == names(24)
    assert transform.most == prefetch


def test_iterable_prefetch_stops_at_the_consumer() -> None:
    transform = InFlight(together=1)
    dataset = IterableBlobDataset(fake_blobs(50), transform=transform, prefetch=4)
    iterator = iter(dataset)
    assert next(iterator) == "b0000"
    time.sleep(0.1)
    assert transform.calls <= 5  # the sample handed out plus at most `prefetch` ahead of it
    iterator.close()


def test_prefetch_above_32_is_honoured() -> None:
    transform = InFlight(together=48, timeout=2)
    dataset = IterableBlobDataset(fake_blobs(60), transform=transform, prefetch=48)
    assert list(dataset) == names(60)
    assert transform.most == 48


def test_a_batch_of_64_is_fetched_at_once() -> None:
    transform = InFlight(together=64, timeout=2)
    dataset = BlobDataset(fake_blobs(64), transform=transform)
    assert dataset.__getitems__(list(range(64))) == names(64)
    assert transform.most == 64


def test_prefetch_may_be_as_large_as_the_thread_ceiling() -> None:
    dataset = IterableBlobDataset(fake_blobs(3), transform=blob_name, prefetch=datasets.MAX_SAMPLE_THREADS)
    assert list(dataset) == names(3)


@pytest.mark.parametrize("prefetch", [0, -1, True, 2.5, "4", None, 129, 10**6])
def test_prefetch_must_be_a_positive_int_within_the_thread_ceiling(prefetch: Any) -> None:
    with pytest.raises(ValueError, match="prefetch"):
        IterableBlobDataset(fake_blobs(1), transform=blob_name, prefetch=prefetch)
    with pytest.raises(ValueError, match="prefetch"):
        IterableBlobDataset.from_blob_urls(f"{ACCOUNT}/data/x", credential=False, prefetch=prefetch)


def test_getitems_fetches_a_batch_concurrently_and_keeps_its_order() -> None:
    delays = {"b0007": 0.05, "b0002": 0.03}
    transform = InFlight(together=6, delays=delays)
    dataset = BlobDataset(fake_blobs(10), transform=transform)
    assert dataset.__getitems__([7, 2, 9, 0, 5, 2]) == ["b0007", "b0002", "b0009", "b0000", "b0005", "b0002"]
    assert transform.most == 6


def test_dataloader_batches_go_through_getitems() -> None:
    transform = InFlight(together=4)
    dataset = BlobDataset(fake_blobs(12), transform=transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=list)
    assert list(loader) == [names(12)[0:4], names(12)[4:8], names(12)[8:12]]
    assert transform.most == 4


def test_map_dataset_length_and_indexing() -> None:
    calls: list[str] = []

    def record(blob: Blob) -> str:
        calls.append(blob.blob_name)
        return blob.blob_name

    dataset = BlobDataset(fake_blobs(3), transform=record)
    assert len(dataset) == 3
    assert [dataset[0], dataset[2]] == ["b0000", "b0002"]
    for index in (3, 4, 10**9):
        with pytest.raises(IndexError):
            dataset[index]
    calls.clear()
    with pytest.raises(IndexError):
        dataset.__getitems__([0, 1, 3])
    assert calls == []  # nothing fetched for a batch with a bad index
    assert len(BlobDataset([], transform=record)) == 0


# -- input checks ---------------------------------------------------------------------------------

BAD_BLOB_URLS = [
    "not a url",
    "ftp://acct.blob.core.windows.net/data/blob",
    "https:///data/blob",
    "https://acct.blob.core.windows.net",
    "https://acct.blob.core.windows.net/data",
    "https://acct.blob.core.windows.net/data/",
    "https://acct.blob.core.windows.net/data/blob#fragment",
    "http://127.0.0.1:10000/",
    "http://127.0.0.1:10000/devstoreaccount1",
]
BAD_CONTAINER_URLS = [
    "not a url",
    "ftp://acct.blob.core.windows.net/data",
    "https://acct.blob.core.windows.net",
    "https://acct.blob.core.windows.net/",
    "https://acct.blob.core.windows.net/data/blob",
    "https://acct.blob.core.windows.net/data?snapshot=2024-01-01T00:00:00.0000000Z",
    "http://127.0.0.1:10000/devstoreaccount1",
]


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
@pytest.mark.parametrize("url", BAD_BLOB_URLS)
def test_malformed_blob_urls_raise_value_error(kind: type[BlobDataset[Any]], url: str) -> None:
    with pytest.raises(ValueError):
        kind.from_blob_urls(url, credential=False)
    with pytest.raises(ValueError):  # also when it hides among good ones
        kind.from_blob_urls([f"{ACCOUNT}/data/a", url, f"{ACCOUNT}/data/b"], credential=False)


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
@pytest.mark.parametrize("url", BAD_CONTAINER_URLS)
def test_malformed_container_urls_raise_value_error_at_construction(kind: type[BlobDataset[Any]], url: str) -> None:
    with pytest.raises(ValueError):
        kind.from_container_url(url, credential=False)


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_a_malformed_url_error_does_not_show_its_sas(kind: type[BlobDataset[Any]]) -> None:
    with pytest.raises(ValueError) as blob_error:
        kind.from_blob_urls(f"ftp://acct.blob.core.windows.net/data/blob?{SAS}", credential=False)
    with pytest.raises(ValueError) as container_error:
        kind.from_container_url(f"https://acct.blob.core.windows.net/data/extra?{SAS}", credential=False)
    for error in (blob_error.value, container_error.value):
        text = "".join(traceback.format_exception(error))
        assert "sig=" not in text and "c2VjcmV0" not in text, text


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_prefix_must_be_a_string(kind: type[BlobDataset[Any]]) -> None:
    with pytest.raises(TypeError, match="prefix"):
        kind.from_container_url(f"{ACCOUNT}/data", prefix=b"train/", credential=False)  # type: ignore[arg-type]


def test_blob_urls_may_be_one_string_or_any_iterable() -> None:
    describe = IterableBlobDataset.from_blob_urls(f"{ACCOUNT}/data/one", credential=False, transform=blob_name)
    assert list(describe) == ["one"]
    generated = (f"{ACCOUNT}/data/{name}" for name in ["z", "a", "m"])
    assert list(IterableBlobDataset.from_blob_urls(generated, credential=False, transform=blob_name)) == ["z", "a", "m"]
    assert len(BlobDataset.from_blob_urls([], credential=False)) == 0
    assert list(IterableBlobDataset.from_blob_urls([], credential=False)) == []


def test_blob_identity_never_carries_the_query_string() -> None:
    def describe(blob: Blob) -> tuple[str, str, str, str]:
        return blob.url, blob.blob_name, blob.container_name, repr(blob)

    urls = [
        f"{ACCOUNT}/data/dir/a%20b.pt?{SAS}",
        f"{ACCOUNT}/data/snap.pt?snapshot=2024-01-01T00%3A00%3A00.0000000Z&{SAS}",
        f"{ACCOUNT}/data/ver.pt?versionid=2024-01-01T00%3A00%3A00.0000000Z",
    ]
    for kind in (BlobDataset, IterableBlobDataset):
        dataset = kind.from_blob_urls(urls, transform=describe)
        described = [dataset[index] for index in range(3)] if kind is BlobDataset else list(dataset)
        assert [(url, name, container) for url, name, container, _ in described] == [
            (f"{ACCOUNT}/data/dir/a%20b.pt", "dir/a b.pt", "data"),
            (f"{ACCOUNT}/data/snap.pt", "snap.pt", "data"),
            (f"{ACCOUNT}/data/ver.pt", "ver.pt", "data"),
        ]
        for _, _, _, shown in described:
            assert "sig=" not in shown and "c2VjcmV0" not in shown


# -- errors from transforms -----------------------------------------------------------------------


class DecodeError(Exception):
    pass


def fail_on_b0003(blob: Blob) -> str:
    if blob.blob_name == "b0003":
        raise DecodeError("cannot decode this sample")
    return blob.blob_name


def assert_names_the_blob(error: BaseException) -> None:
    assert type(error) is DecodeError
    text = "".join(traceback.format_exception(error))
    assert "cannot decode this sample" in text
    assert f"{ACCOUNT}/data/b0003" in text, text
    assert f"{ACCOUNT}/data/b0002" not in text
    assert "sig=" not in text and "c2VjcmV0" not in text, text


def test_a_transform_error_keeps_its_type_and_names_the_blob_without_its_sas() -> None:
    blobs = fake_blobs(6, query=SAS)
    map_dataset = BlobDataset(blobs, transform=fail_on_b0003)
    assert map_dataset[2] == "b0002"
    with pytest.raises(DecodeError) as single:
        map_dataset[3]
    assert_names_the_blob(single.value)
    with pytest.raises(DecodeError) as batch:
        map_dataset.__getitems__([1, 2, 3, 4])
    assert_names_the_blob(batch.value)
    iterable = IterableBlobDataset(blobs, transform=fail_on_b0003, prefetch=4)
    iterator = iter(iterable)
    assert [next(iterator) for _ in range(3)] == ["b0000", "b0001", "b0002"]
    with pytest.raises(DecodeError) as iterated:
        next(iterator)
    assert_names_the_blob(iterated.value)
