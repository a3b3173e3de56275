"""The datasets' local cache (``cache_dir=``) against Azurite: hits, freshness, processes, failures, eviction.

Every test compares every byte it reads with what was uploaded. Blobs are a few KiB to a few hundred
KiB, of varied sizes (and one empty), with content that differs from blob to blob.
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import pickletools
import random
import subprocess
import sys
import threading
import urllib.parse
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch.utils.data
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch import _cache
from azstoragetorch._cache import _blob_cache, _failures, _files, _lock
from azstoragetorch._client import AzStorageTorchBlobClient, _schedule, crc32
from azstoragetorch._reads import WholeBlobRead
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset
from azstoragetorch.testing import ACCOUNT_KEY, Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy

COUNT = 24
REPOSITORY = Path(__file__).resolve().parents[3]


def content(index: int, generation: int = 0) -> bytes:
    if index == 0:
        return b""
    size = random.Random(index).randrange(1, 300 * 1024)
    return random.Random(f"{index}:{generation}").randbytes(size)


def name(index: int) -> str:
    return f"cache/{index:03d}.bin"


NAMES = [name(index) for index in range(COUNT)]


@pytest.fixture(autouse=True)
def stores_end_with_their_test() -> Iterator[None]:
    """The cache stores in a background thread: none of a test's may land (or warn) in the next one."""
    yield
    _cache.flush()


@pytest.fixture
def blobs(container: Container) -> Container:
    for index in range(COUNT):
        container.upload(name(index), content(index))
    return container


@pytest.fixture
def trusting(
    blobs: Container, azurite: Azurite, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> Iterator[tuple[FaultProxy, BlobDataset]]:
    """A dataset of ``blobs``, read through a fault proxy and cached in ``tmp_path``, trusting its listing."""
    with FaultProxy(azurite.port) as proxy:
        dataset = BlobDataset.from_container_url(
            proxy.url(blobs.url), credential=account_credential, cache_dir=tmp_path, cache_trust_listing=True
        )
        yield proxy, dataset


def expected(container: Container, generation: dict[int, int] | None = None) -> list[dict[str, Any]]:
    generation = generation or {}
    return [
        {"url": container.blob_url(name(index)), "data": content(index, generation.get(index, 0))}
        for index in range(COUNT)
    ]


def samples(dataset: Any) -> list[Any]:
    if isinstance(dataset, BlobDataset):
        return [dataset[index] for index in range(len(dataset))]
    return list(dataset)


def cache_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if not path.name.startswith("."))


def gets(proxy: FaultProxy) -> list[Any]:
    return [seen for seen in proxy.requests if seen.operation == "GetBlob"]


def with_seed(seed: int) -> Any:
    print(f"perturbation seed {seed}")
    return _schedule.perturbed(seed, only=frozenset({"cache.read", "cache.store", "cache.handoff"}))


# -- hits -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_epoch_two_is_served_from_the_cache_each_hit_confirmed_without_a_transfer(
    blobs: Container, azurite: Azurite, tmp_path: Path, account_credential: AzureNamedKeyCredential, kind: Any
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = kind.from_container_url(
            proxy.url(blobs.url), prefix="cache/", credential=account_credential, cache_dir=tmp_path
        )
        want = [{"url": proxy.url(item["url"]), "data": item["data"]} for item in expected(blobs)]
        assert samples(dataset) == want
        first = gets(proxy)
        assert all("if-none-match" not in seen.headers for seen in first)
        _cache.flush()  # stores happen in the background
        assert len(cache_files(tmp_path)) == COUNT
        assert samples(dataset) == want
        second = gets(proxy)[len(first) :]
    # One conditional read per blob (the empty one has no range to ask for and is read again).
    assert len([seen for seen in second if "if-none-match" in seen.headers]) == COUNT


def test_a_conditional_read_answers_nothing_for_the_current_etag(blobs: Container, account_credential: Any) -> None:
    client = AzStorageTorchBlobClient.from_url(blobs.blob_url(name(3)), account_credential)
    whole = WholeBlobRead(client, block_size=64 * 1024, max_concurrency=4)
    read = whole.read_if_changed(None)
    assert read is not None and read[1] == content(3)  # larger than one part: ranged reads in parallel
    assert whole.read_if_changed(read[0].etag) is None
    assert whole.read_if_changed('"0x0"') == read


def test_trusting_the_listing_reads_nothing_in_epoch_two(
    blobs: Container, trusting: tuple[FaultProxy, BlobDataset]
) -> None:
    proxy, dataset = trusting
    first = [sample["data"] for sample in samples(dataset)]
    seen = len(proxy.requests)
    assert [sample["data"] for sample in samples(dataset)] == first == [item["data"] for item in expected(blobs)]
    assert proxy.requests[seen:] == []  # no read, no HEAD, the empty blob included


# -- freshness --------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["urls", "container", "listing-trusted"])
def test_a_blob_replaced_between_epochs_is_served_new(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, source: str
) -> None:
    def make() -> BlobDataset[Any]:
        if source == "urls":
            return BlobDataset.from_blob_urls(
                [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path
            )
        # A trusted listing is only as new as itself: each epoch lists again (a new dataset).
        return BlobDataset.from_container_url(
            blobs.url, credential=account_credential, cache_dir=tmp_path, cache_trust_listing=source != "container"
        )

    dataset = make()
    assert samples(dataset) == expected(blobs)
    blobs.upload(name(5), content(5, generation=1))
    blobs.upload(name(0), b"no longer empty")
    if source == "listing-trusted":
        dataset = make()
    replaced = expected(blobs, {5: 1})
    replaced[0]["data"] = b"no longer empty"
    assert samples(dataset) == replaced
    assert samples(dataset) == replaced  # and the new content is what the cache holds now


# -- processes --------------------------------------------------------------------------------------


def as_list(batch: list[Any]) -> list[Any]:
    return batch


def cache_holds_intact_copies(directory: Path, container: Container) -> None:
    """Every cache file is intact and holds the current content of the blob its name stands for."""
    by_file = {_files._file_name(container.blob_url(n)): index for index, n in enumerate(NAMES)}
    reader = _cache.BlobCache(str(directory), None)
    for path in cache_files(directory):
        cached = reader._lookup(str(path))
        assert cached is not None, path
        assert cached[1] == content(by_file[path.name])


@pytest.mark.parametrize("max_bytes", [None, 1024 * 1024], ids=["unlimited", "evicting"])
def test_concurrent_workers_of_two_loaders_share_one_cache(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    stop_workers: list[Any],
    max_bytes: int | None,
) -> None:
    """Two DataLoaders with two workers each (four processes) read the same blobs at once, twice."""
    datasets: list[Any] = [
        BlobDataset.from_blob_urls(
            [blobs.blob_url(n) for n in NAMES],
            credential=account_credential,
            cache_dir=tmp_path,
            cache_max_bytes=max_bytes,
        ),
        IterableBlobDataset.from_container_url(
            blobs.url,
            credential=account_credential,
            cache_dir=tmp_path,
            cache_max_bytes=max_bytes,
            cache_trust_listing=True,
        ),
    ]
    results: dict[int, list[list[Any]]] = {}
    errors: list[BaseException] = []

    def run(which: int) -> None:
        try:
            loader = torch.utils.data.DataLoader(datasets[which], batch_size=3, num_workers=2, collate_fn=as_list)
            stop_workers.append(loader)
            results[which] = [[sample for batch in loader for sample in batch] for _epoch in range(2)]
        except BaseException as error:
            errors.append(error)

    with with_seed(random.randrange(2**32)):
        threads = [threading.Thread(target=run, args=(which,)) for which in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    _cache.flush()  # the workers stored theirs before they exited
    want = sorted(expected(blobs), key=lambda sample: sample["url"])
    for epochs in results.values():
        for epoch in epochs:
            assert sorted(epoch, key=lambda sample: sample["url"]) == want
    cache_holds_intact_copies(tmp_path, blobs)
    sizes = sum(path.stat().st_size for path in cache_files(tmp_path))
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
    if max_bytes is None:
        assert len(cache_files(tmp_path)) == COUNT
    else:
        assert sizes <= max_bytes
        # The count in the lock file is exact when no process died while storing.
        assert int.from_bytes((tmp_path / ".lock").read_bytes()[:8], "little") == sizes


# -- failures ---------------------------------------------------------------------------------------


def our_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    return [str(w.message) for w in caught if "dataset cache" in str(w.message)]


def test_a_full_disk_falls_back_to_the_service_with_one_warning(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    # ENOSPC at the one place the cache writes data, after part of the file went out: what a disk
    # that fills up mid-file does. (A small tmpfs would be more real, but needs privileges.)
    def fill_up(fd: int, data: bytes) -> None:
        os.write(fd, memoryview(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_blob_cache, "_write_all", fill_up)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=as_list)  # batches fetched in threads
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _epoch in range(2):
            assert [sample for batch in loader for sample in batch] == expected(blobs)
        _cache.flush()
    assert len(our_warnings(caught)) == 1
    assert "No space left on device" in our_warnings(caught)[0]
    assert [path.name for path in tmp_path.iterdir()] == []  # no partial file left behind


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_a_cache_dir_that_cannot_be_a_directory_falls_back_with_one_warning(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    occupied = tmp_path / "occupied"
    occupied.write_bytes(b"not a directory")
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = IterableBlobDataset.from_container_url(
            blobs.url,
            credential=account_credential,
            cache_dir=occupied if where == "a file" else occupied / "cache",
            cache_max_bytes=10**9,
        )
        for _epoch in range(2):
            assert samples(dataset) == expected(blobs)
        _cache.flush()
    assert len(our_warnings(caught)) == 1
    assert occupied.read_bytes() == b"not a directory"


def test_a_damaged_cache_file_is_detected_and_fetched_again(
    blobs: Container, tmp_path: Path, trusting: tuple[FaultProxy, BlobDataset]
) -> None:
    proxy, dataset = trusting
    want = [item["data"] for item in expected(blobs)]
    assert [sample["data"] for sample in samples(dataset)] == want
    _cache.flush()
    files = {index: tmp_path / _files._file_name(proxy.url(blobs.blob_url(name(index)))) for index in range(COUNT)}
    damaged = {
        3: lambda data: data[:-1000] + bytes([data[-1000] ^ 0x10]) + data[-999:],  # one bit flipped
        4: lambda data: data[:-1],  # truncated
        6: lambda data: b"X" + data[1:],  # header damaged
        7: lambda data: b"",  # empty (a crash before the data reached the disk)
        8: lambda data: data + b"\0",  # too long
    }
    for index, damage in damaged.items():
        files[index].write_bytes(damage(files[index].read_bytes()))
    seen = len(gets(proxy))
    assert [sample["data"] for sample in samples(dataset)] == want
    assert sorted(read.path.rsplit("/", 1)[1] for read in gets(proxy)[seen:]) == [
        name(index).rsplit("/", 1)[1] for index in sorted(damaged)
    ]
    # Repaired: the next epoch reads nothing.
    seen = len(gets(proxy))
    assert [sample["data"] for sample in samples(dataset)] == want
    assert gets(proxy)[seen:] == []
    _cache.flush()
    assert len(cache_files(tmp_path)) == COUNT


# -- eviction ---------------------------------------------------------------------------------------


def test_least_recently_used_blobs_are_evicted_and_the_cache_stays_within_its_limit(
    container: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    sized = {f"lru/{index:02d}": random.Random(index).randbytes(10_000) for index in range(20)}
    for blob_name, data in sized.items():
        container.upload(blob_name, data)
    names = sorted(sized)
    limit = 65_000  # room for six of them
    dataset = BlobDataset.from_blob_urls(
        [container.blob_url(n) for n in names],
        credential=account_credential,
        cache_dir=tmp_path,
        cache_max_bytes=limit,
    )
    recency: list[str] = []  # least recently used first
    file_names = {_files._file_name(container.blob_url(n)): n for n in names}
    order = [*range(10), 7, 3, 7, *range(10, 20), 12, 0, 1, 19, 2]
    for index in order:
        assert dataset[index]["data"] == sized[names[index]]
        _cache.flush()
        recency = [n for n in recency if n != names[index]] + [names[index]]
        present = {file_names[path.name] for path in cache_files(tmp_path)}
        assert sum(path.stat().st_size for path in cache_files(tmp_path)) <= limit
        assert names[index] in present
        # What is left is always the most recently used blobs.
        assert present == set(recency[len(recency) - len(present) :]), (index, sorted(present))
    assert len(present) >= 5  # evicted down to 90% of the limit, not to nothing


def test_files_stored_without_a_limit_leave_a_limited_cache_storing_and_counting_right(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job without cache_max_bytes (an evaluation script) shares the folder with one that has it:
    the files it stores are not in the count, which then must not go wrong in the limited job."""
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    limited = _cache.BlobCache(str(tmp_path), 10**6)
    unlimited = _cache.BlobCache(str(tmp_path), None)
    small, large, linked = (str(tmp_path / (digit * 64)) for digit in "abc")
    os.symlink("x" * 2000, linked)  # not a cache file: its size is not in the count either
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for cache, path, etag, data in [
            (limited, small, '"0x1"', b"s" * 10),
            (unlimited, large, '"0x1"', b"l" * 100_000),
            (limited, large, '"0x2"', b"the blob, rewritten smaller"),  # replaces a file not in the count
            (limited, linked, '"0x1"', b"in place of a link"),
        ]:
            cache._hand_over(path, etag, data)
            _cache.flush()
    assert our_warnings(caught) == []
    assert limited._lookup(large) == ('"0x2"', b"the blob, rewritten smaller")
    assert limited._lookup(linked) == ('"0x1"', b"in place of a link")
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
    counted = int.from_bytes((tmp_path / ".lock").read_bytes()[:8], "little")
    assert counted == sum(path.stat().st_size for path in cache_files(tmp_path))


# -- secrets ----------------------------------------------------------------------------------------


def test_a_sas_is_never_in_a_cache_file_name_or_content_and_does_not_change_the_key(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    sas = blobs.container_sas()
    signature = urllib.parse.parse_qs(sas)["sig"][0]
    with_sas = BlobDataset.from_blob_urls([f"{blobs.blob_url(n)}?{sas}" for n in NAMES], cache_dir=tmp_path)
    assert [sample["data"] for sample in samples(with_sas)] == [item["data"] for item in expected(blobs)]
    _cache.flush()
    names = {path.name for path in tmp_path.iterdir()}
    for path in tmp_path.iterdir():
        raw = path.read_bytes()
        for secret in (signature, urllib.parse.quote(signature, safe=""), "sig=", sas):
            assert secret not in path.name
            assert secret.encode() not in raw
    assert all(len(n) == 64 and set(n) <= set("0123456789abcdef") for n in names if not n.startswith("."))
    # The same blobs through a credential instead hit the same files.
    BlobDataset.from_blob_urls([blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path)[1]
    _cache.flush()
    assert {path.name for path in tmp_path.iterdir()} == names


# -- transforms -------------------------------------------------------------------------------------


def name_and_read(blob: Blob) -> tuple[str, bytes]:
    return blob.blob_name, blob.read()


def test_a_transform_reads_through_the_cache_with_blob_read(
    blobs: Container, azurite: Azurite, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = IterableBlobDataset.from_container_url(
            proxy.url(blobs.url),
            credential=account_credential,
            transform=name_and_read,
            cache_dir=tmp_path,
            cache_trust_listing=True,
        )
        want = [(n, content(index)) for index, n in enumerate(NAMES)]
        assert samples(dataset) == want
        reads = len(gets(proxy))
        assert samples(dataset) == want
        assert len(gets(proxy)) == reads


def test_a_pickled_cache_names_only_the_package(tmp_path: Path) -> None:
    """Spawned DataLoader workers and ranks unpickle the dataset's cache, with the folder's verdict:
    the pickle must not depend on which private module of the package defines what it holds."""
    cache = _cache.BlobCache(str(tmp_path), None)
    cache.check()
    pickled = pickle.dumps(cache)
    names = {arg for _, arg, _ in pickletools.genops(pickled) if isinstance(arg, str)}
    assert {name for name in names if name.startswith("azstoragetorch")} == {"azstoragetorch._cache"}
    assert {"BlobCache", "_Verdict"} <= names
    assert pickle.loads(pickled)._verdict == cache._verdict


def test_cache_options_are_checked(blobs: Container) -> None:
    with pytest.raises(ValueError, match="cache_max_bytes must be a positive int"):
        BlobDataset.from_blob_urls(blobs.blob_url(NAMES[1]), cache_dir="x", cache_max_bytes=0)
    with pytest.raises(ValueError, match="need cache_dir"):
        IterableBlobDataset.from_blob_urls(blobs.blob_url(NAMES[1]), cache_max_bytes=10)
    with pytest.raises(ValueError, match="need cache_dir"):
        BlobDataset.from_container_url(blobs.url, cache_trust_listing=True)
    with pytest.raises(TypeError, match="cache_dir must be a str or os"):
        IterableBlobDataset.from_container_url(blobs.url, cache_dir=3)


# -- storing in the background ----------------------------------------------------------------------


def test_a_sample_returns_before_its_blob_is_stored_and_is_served_from_memory_meanwhile(
    blobs: Container, azurite: Azurite, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: Any
) -> None:
    stored = threading.Event()
    write_all = _blob_cache._write_all

    def held(fd: int, data: bytes) -> None:
        # A store in the sample's own thread would wait here, and the read would fail.
        if not stored.wait(60):
            raise RuntimeError("the store held up the sample that read the blob")
        write_all(fd, data)

    monkeypatch.setattr(_blob_cache, "_write_all", held)
    with FaultProxy(azurite.port) as proxy:
        dataset = BlobDataset.from_container_url(
            proxy.url(blobs.url), credential=account_credential, cache_dir=tmp_path, cache_trust_listing=True
        )
        assert dataset[3]["data"] == content(3)
        assert cache_files(tmp_path) == []  # not stored yet
        seen = len(gets(proxy))
        assert dataset[3]["data"] == content(3)  # from memory: no second read
        assert gets(proxy)[seen:] == []
        stored.set()
        _cache.flush()
    assert [path.name for path in cache_files(tmp_path)] == [_files._file_name(proxy.url(blobs.blob_url(name(3))))]
    assert _cache.BlobCache(str(tmp_path), None)._lookup(str(cache_files(tmp_path)[0])) is not None


def test_hits_leave_the_files_untouched_without_a_limit(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    """Without cache_max_bytes nothing is evicted, so a hit costs no utime."""
    dataset = BlobDataset.from_container_url(
        blobs.url, credential=account_credential, cache_dir=tmp_path, cache_trust_listing=True
    )
    assert samples(dataset) == expected(blobs)
    _cache.flush()
    for path in cache_files(tmp_path):
        os.utime(path, ns=(10**18, 10**18))
    assert samples(dataset) == expected(blobs)
    assert {path.stat().st_mtime_ns for path in cache_files(tmp_path)} == {10**18}


def test_a_process_killed_while_storing_leaves_no_torn_file_to_be_served(
    blobs: Container, azurite: Azurite, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    finished = random.randrange(COUNT)
    print(f"stores finished before the kill: {finished}")
    with FaultProxy(azurite.port) as proxy:  # the killer's URLs and ours, so that both use the same files
        urls = [proxy.url(blobs.blob_url(n)) for n in NAMES]
        environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "AZSTORAGETORCH_TEST_ACCOUNT_KEY": ACCOUNT_KEY}
        command = [sys.executable, "-m", "tests.e2e.support.cache_filler_run", str(tmp_path), str(finished), *urls]
        with subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE, text=True) as filler:
            try:
                assert filler.stdout is not None
                printed = []  # "read" (every sample returned) may come first: the stores run behind the reads
                for line in iter(filler.stdout.readline, ""):
                    printed.append(line)
                    if line == "torn\n":
                        break
                assert printed[-1:] == ["torn\n"], printed
            finally:
                filler.kill()
            filler.wait()
        assert len([path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]) == 1  # the torn one
        by_file = {_files._file_name(url): index for index, url in enumerate(urls)}
        assert sorted(by_file[path.name] for path in cache_files(tmp_path)) == list(range(finished))

        seen = len(gets(proxy))
        dataset = BlobDataset.from_blob_urls(urls, credential=account_credential, cache_dir=tmp_path)
        assert [sample["data"] for sample in samples(dataset)] == [content(index) for index in range(COUNT)]
        full_reads = [read for read in gets(proxy)[seen:] if "if-none-match" not in read.headers]
        _cache.flush()
    assert len(full_reads) == COUNT - finished  # what the killed process had stored is served
    reader = _cache.BlobCache(str(tmp_path), None)
    assert sorted(by_file[path.name] for path in cache_files(tmp_path)) == list(range(COUNT))
    for path in cache_files(tmp_path):
        cached = reader._lookup(str(path))
        assert cached is not None and cached[1] == content(by_file[path.name])


def test_a_batch_reads_trusted_hits_in_its_own_thread_and_hands_the_rest_to_the_sample_threads(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: Any
) -> None:
    from azstoragetorch.datasets import _sample_pool

    handed: list[str] = []
    submit = _sample_pool._sample_threads.submit

    def counted(fn: Any, transform: Any, blob: Blob, *args: Any) -> Any:
        handed.append(blob.blob_name)
        return submit(fn, transform, blob, *args)

    monkeypatch.setattr(_sample_pool._sample_threads, "submit", counted)

    def listed() -> BlobDataset[Any]:
        return BlobDataset.from_container_url(
            blobs.url, credential=account_credential, cache_dir=tmp_path, cache_trust_listing=True
        )

    assert listed().__getitems__(list(range(COUNT))) == expected(blobs)
    assert sorted(handed) == NAMES  # all misses
    _cache.flush()
    blobs.upload(name(5), content(5, generation=1))  # the cached copy is stale for a new listing
    damaged = tmp_path / _files._file_name(blobs.blob_url(name(3)))
    damaged.write_bytes(damaged.read_bytes()[:-1])
    handed.clear()
    with with_seed(random.randrange(2**32)):
        assert listed().__getitems__(list(range(COUNT))) == expected(blobs, {5: 1})
    assert sorted(handed) == [name(3), name(5)]


def test_a_process_that_exits_right_after_reading_stores_everything_first(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    urls = [blobs.blob_url(n) for n in NAMES]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "AZSTORAGETORCH_TEST_ACCOUNT_KEY": ACCOUNT_KEY}
    command = [sys.executable, "-m", "tests.e2e.support.cache_filler_run", str(tmp_path), str(COUNT), *urls]
    finished = subprocess.run(command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, check=False)
    assert (finished.returncode, finished.stdout) == (0, "read\n"), finished.stderr
    assert not [path for path in tmp_path.iterdir() if path.name.startswith(".tmp-")]
    assert len(cache_files(tmp_path)) == COUNT
    cache_holds_intact_copies(tmp_path, blobs)


def test_a_lock_held_by_another_process_for_good_costs_one_warning_not_a_hang(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another job sharing the folder holds its lock and does not let go (stopped with Ctrl-Z while
    storing, or hung on the disk): this process's samples and its exit must not wait for it."""
    holder_code = (
        "import fcntl, os, sys, time\n"
        "fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        "time.sleep(600)\n"
    )
    monkeypatch.setattr(_lock, "_LOCK_TIMEOUT", 1.0)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path, cache_max_bytes=10**9
    )
    with subprocess.Popen(
        [sys.executable, "-c", holder_code, str(tmp_path)], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None and holder.stdout.readline() == "held\n"
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                for _epoch in range(2):
                    assert [sample["data"] for sample in samples(dataset)] == [content(i) for i in range(COUNT)]
                flushed = threading.Thread(target=_cache.flush, daemon=True)  # what the process does at exit
                flushed.start()
                flushed.join(60)
                assert not flushed.is_alive(), "the cache waits for the other process's lock for good"
        finally:
            holder.kill()  # lets a hung writer go on, so that the next test starts clean
    warned = our_warnings(caught)
    assert len(warned) == 1 and ".lock" in warned[0] and "another process" in warned[0], warned
    assert cache_files(tmp_path) == [] and [path.name for path in tmp_path.iterdir()] == [".lock"]


# -- trust: links, owners, modes (hostile) ----------------------------------------------------------

needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="chown needs root")
STRANGER = 12345  # a uid that is not this user's (the tests run as root, which may give files away)


def read_twice_recording_warnings(dataset: Any) -> list[str]:
    """Both epochs through a DataLoader (its batches fetched by several threads), every byte compared."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=5, collate_fn=as_list)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _epoch in range(2):
            assert [sample["data"] for batch in loader for sample in batch] == [
                content(index) for index in range(COUNT)
            ]
        _cache.flush()
    return our_warnings(caught)


def snapshot(directory: Path) -> dict[str, tuple[int, int, int, bytes | str]]:
    """Every name under ``directory`` with its owner, mode, link count and bytes (or link target)."""
    found: dict[str, tuple[int, int, int, bytes | str]] = {}
    inside = sorted(directory.rglob("*")) if directory.is_dir() and not directory.is_symlink() else []
    for path in [directory, *inside]:
        info = path.lstat()
        held: bytes | str = b""
        if path.is_symlink():
            held = os.readlink(path)
        elif path.is_file():
            held = path.read_bytes()
        found[str(path.relative_to(directory))] = (info.st_uid, info.st_mode, info.st_nlink, held)
    return found


@pytest.mark.parametrize("link", ["symbolic", "hard"])
def test_a_lock_file_that_is_a_link_is_not_written_through(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    link: str,
) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious bytes that the cache must never count into")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    if link == "symbolic":
        (cache_dir / ".lock").symlink_to(victim)
    else:
        os.link(victim, cache_dir / ".lock")
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=cache_dir, cache_max_bytes=10**9
    )
    warned = read_twice_recording_warnings(dataset)
    assert victim.read_bytes() == b"precious bytes that the cache must never count into"
    assert len(warned) == 1 and ".lock" in warned[0], warned
    assert cache_files(cache_dir) == []  # nothing was stored without its count


def forged_entry(real_entry: bytes, data: bytes) -> bytes:
    """A cache file with ``real_entry``'s ETag (so it is a hit) and other content, CRC-32 included."""
    magic, _checksum, _length, etag_length = _files._HEADER.unpack_from(real_entry)
    etag = real_entry[_files._HEADER.size : _files._HEADER.size + etag_length]
    return _files._HEADER.pack(magic, crc32(data), len(data), etag_length) + etag + data


def genuine_entry(dataset: Any, container: Container, directory: Path) -> tuple[str, bytes]:
    """The name and bytes of blob 3's cache file, once ``dataset`` (cached in ``directory``) was read."""
    samples(dataset)
    _cache.flush()
    entry_name = _files._file_name(container.blob_url(name(3)))
    return entry_name, (directory / entry_name).read_bytes()


@pytest.mark.parametrize("trust", [True, False], ids=["listing-trusted", "etag-confirmed"])
@pytest.mark.parametrize("target", ["file", "directory"])
def test_an_entry_that_is_a_symbolic_link_is_never_served_nor_written_through(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    trust: bool,
    target: str,
) -> None:
    """A link under a cache file's name, to a file that looks like a current hit (the blob's ETag, a
    valid CRC-32): followed, it would hand out any file the user can read as a sample."""

    def dataset(directory: Path) -> BlobDataset[Any]:
        return BlobDataset.from_container_url(
            blobs.url, credential=account_credential, cache_dir=directory, cache_trust_listing=trust
        )

    entry_name, genuine = genuine_entry(dataset(tmp_path / "genuine"), blobs, tmp_path / "genuine")
    elsewhere = tmp_path / "elsewhere"
    if target == "file":
        elsewhere.write_bytes(forged_entry(genuine, b"the user's private key"))
    else:
        elsewhere.mkdir()
    before = snapshot(elsewhere)
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    (cache_dir / entry_name).symlink_to(elsewhere)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    assert read_twice_recording_warnings(dataset(cache_dir)) == []
    assert snapshot(elsewhere) == before
    # The store's rename replaced the link itself: the entry is now a real cache file.
    assert not (cache_dir / entry_name).is_symlink()
    cached = _cache.BlobCache(str(cache_dir), None)._lookup(str(cache_dir / entry_name))
    assert cached is not None and cached[1] == content(3)


def test_an_entry_name_taken_by_a_fifo_is_a_miss_not_a_hang(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    """Opening a FIFO to read waits for a writer that never comes: the cache must not wait."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    entry = cache_dir / _files._file_name(blobs.blob_url(name(3)))
    os.mkfifo(entry)
    dataset = BlobDataset.from_blob_urls([blobs.blob_url(name(3))], credential=account_credential, cache_dir=cache_dir)
    read: list[bytes] = []
    reader = threading.Thread(target=lambda: read.append(dataset[0]["data"]), daemon=True)
    reader.start()
    reader.join(60)
    assert read == [content(3)]
    _cache.flush()
    assert entry.is_file()  # replaced by the blob's cache file


@pytest.mark.parametrize(
    "planted",
    [
        pytest.param("owned by another user", marks=needs_root),
        "writable by others",
    ],
)
def test_an_entry_another_user_could_have_written_is_never_served(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    planted: str,
) -> None:
    """A folder that was writable (the warning said so) and then fixed with 'chmod go-w' still holds
    what another user put there meanwhile: a file that looks like a current hit (the blob's ETag, a
    valid CRC-32), which its owner can keep rewriting whatever the folder's mode."""

    def dataset(directory: Path) -> BlobDataset[Any]:
        return BlobDataset.from_container_url(
            blobs.url, credential=account_credential, cache_dir=directory, cache_trust_listing=True
        )

    entry_name, genuine = genuine_entry(dataset(tmp_path / "genuine"), blobs, tmp_path / "genuine")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    entry = cache_dir / entry_name
    entry.write_bytes(forged_entry(genuine, b"another user's choice of sample"))
    if planted == "owned by another user":
        os.chown(entry, STRANGER, STRANGER)
        entry.chmod(0o644)
    else:
        entry.chmod(0o666)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    assert read_twice_recording_warnings(dataset(cache_dir)) == []  # content(3) served, both epochs
    # The planted file was replaced by the cache's own copy.
    assert (entry.stat().st_uid, oct(entry.stat().st_mode & 0o777)) == (os.geteuid(), "0o600")
    cached = _cache.BlobCache(str(cache_dir), None)._lookup(str(entry))
    assert cached is not None and cached[1] == content(3)


def test_a_temporary_name_taken_by_a_symbolic_link_is_not_written_through(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Temporary names are random; one planted anyway (here: predicted) is never opened through."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    fixed = uuid.UUID(int=7)
    (cache_dir / f"{_files._TEMP_PREFIX}{fixed.hex}").symlink_to(victim)
    monkeypatch.setattr(uuid, "uuid4", lambda: fixed)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    cache = _cache.BlobCache(str(cache_dir), 10**6)
    entry = str(cache_dir / ("a" * 64))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache._store(entry, '"0x1"', b"data")
    assert victim.read_bytes() == b"untouched"
    assert len(our_warnings(caught)) == 1
    assert not os.path.exists(entry)


def test_eviction_deletes_only_the_caches_own_files(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential
) -> None:
    """A user's file in the cache folder (or a link under a cache name) is neither counted nor evicted."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"v" * 100)
    kept = {"notes.txt": b"n" * 200_000, "model.pt": b"m" * 10}
    for file_name, data in kept.items():
        (cache_dir / file_name).write_bytes(data)
        os.utime(cache_dir / file_name, (1, 1))  # the least recently used of all
    (cache_dir / ("f" * 64)).symlink_to(victim)
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=cache_dir, cache_max_bytes=900_000
    )
    assert read_twice_recording_warnings(dataset) == []
    for file_name, data in kept.items():
        assert (cache_dir / file_name).read_bytes() == data
    assert (cache_dir / ("f" * 64)).is_symlink() and victim.read_bytes() == b"v" * 100
    entries = [path for path in cache_files(cache_dir) if len(path.name) == 64 and not path.is_symlink()]
    assert 0 < sum(path.stat().st_size for path in entries) <= 900_000  # the user's files do not count


@pytest.mark.parametrize(
    "layout",
    [
        pytest.param("owned by another user", marks=needs_root),
        pytest.param("made first by another user in a sticky parent", marks=needs_root),
        pytest.param("under a parent owned by another user", marks=needs_root),
        pytest.param("a link owned by another user in a sticky parent", marks=needs_root),
        "group-writable",
        "world-writable",
        "world-writable and sticky",
        "under a group-writable parent",
        "a link in a group-writable parent",
    ],
)
def test_a_cache_folder_others_could_change_is_refused_with_one_warning(
    blobs: Container,
    azurite: Azurite,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
    layout: str,
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o700)
    cache_dir = parent / "cache"
    mine = tmp_path / "mine"  # a folder of this user's, which a planted link points to
    mine.mkdir(mode=0o700)
    if layout == "owned by another user":
        cache_dir.mkdir(mode=0o700)
        os.chown(cache_dir, STRANGER, STRANGER)
    elif layout == "made first by another user in a sticky parent":  # /tmp/<name> before we make it
        parent.chmod(0o1777)
        cache_dir.mkdir(mode=0o700)
        os.chown(cache_dir, STRANGER, STRANGER)
    elif layout == "under a parent owned by another user":
        os.chown(parent, STRANGER, STRANGER)
        parent.chmod(0o755)
    elif layout == "a link owned by another user in a sticky parent":
        parent.chmod(0o1777)
        cache_dir.symlink_to(mine)
        os.lchown(cache_dir, STRANGER, STRANGER)
    elif layout == "group-writable":
        cache_dir.mkdir()
        cache_dir.chmod(0o775)
    elif layout == "world-writable":
        cache_dir.mkdir()
        cache_dir.chmod(0o777)
    elif layout == "world-writable and sticky":
        cache_dir.mkdir()
        cache_dir.chmod(0o1777)
    elif layout == "under a group-writable parent":
        parent.chmod(0o775)
    else:
        parent.chmod(0o775)
        cache_dir.symlink_to(mine)
    before = snapshot(tmp_path)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    with FaultProxy(azurite.port) as proxy:
        with warnings.catch_warnings(record=True) as caught:  # the folder is judged as the dataset is made
            warnings.simplefilter("always")
            dataset = BlobDataset.from_container_url(
                proxy.url(blobs.url), credential=account_credential, cache_dir=cache_dir, cache_trust_listing=True
            )
        warned = our_warnings(caught) + read_twice_recording_warnings(dataset)
        assert len(gets(proxy)) == 2 * COUNT  # every read from the service, none conditional
        assert all("if-none-match" not in seen.headers for seen in gets(proxy))
    assert len(warned) == 1, warned
    assert "not safe to use" in warned[0]
    assert f"uid {STRANGER}" in warned[0] or "can be written by its group or by others" in warned[0]
    assert snapshot(tmp_path) == before  # nothing created, written or changed


@pytest.mark.parametrize("layout", ["a sticky world-writable parent (/tmp)", "a link of the user's", "missing"])
def test_a_cache_folder_only_its_user_can_change_is_used(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, layout: str
) -> None:
    parent = tmp_path / "parent"
    parent.mkdir(mode=0o700)
    real = parent / "cache"
    cache_dir = real
    if layout == "a sticky world-writable parent (/tmp)":
        parent.chmod(0o1777)
    elif layout == "a link of the user's":
        cache_dir = tmp_path / "alias"
        cache_dir.symlink_to(real)
    else:
        real = cache_dir = parent / "a" / "b" / "cache"
    umask = os.umask(0)  # the modes below are the cache's own, not the umask's
    try:
        dataset = BlobDataset.from_blob_urls(
            [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=cache_dir
        )
        assert read_twice_recording_warnings(dataset) == []
    finally:
        os.umask(umask)
    assert len(cache_files(real)) == COUNT
    made = [real, real.parent, real.parent.parent] if layout == "missing" else [real]
    assert [oct(path.stat().st_mode & 0o7777) for path in made] == ["0o700"] * len(made)


def test_the_refusal_warning_is_given_once_per_process_and_folder(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    folders = [tmp_path / "one", tmp_path / "two"]
    for folder in folders:
        folder.mkdir()
        folder.chmod(0o777)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for folder in [*folders, folders[0]]:
            dataset = BlobDataset.from_blob_urls(
                [blobs.blob_url(n) for n in NAMES[:3]], credential=account_credential, cache_dir=folder
            )
            assert [sample["data"] for sample in samples(dataset)] == [content(index) for index in range(3)]
    warned = our_warnings(caught)
    assert len(warned) == 2 and str(folders[0]) in warned[0] and str(folders[1]) in warned[1], warned


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("mode", [0o777, 0o700])
def test_a_refused_folder_warns_once_in_the_main_process_not_in_each_worker_and_epoch(
    blobs: Container, tmp_path: Path, method: str, mode: int
) -> None:
    """Two workers over three epochs are six processes that use the cache: the folder is judged
    once, where the dataset is made, and the workers get the verdict with the dataset."""
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(mode)
    epochs = 3
    urls = [blobs.blob_url(n) for n in NAMES]
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "AZSTORAGETORCH_TEST_ACCOUNT_KEY": ACCOUNT_KEY}
    command = [sys.executable, "-m", "tests.e2e.support.cache_workers_run", str(cache_dir), method, str(epochs), *urls]
    finished = subprocess.run(
        command, cwd=REPOSITORY, env=environment, capture_output=True, text=True, check=False, timeout=600
    )
    assert finished.returncode == 0, finished.stderr
    *digests, main = finished.stdout.splitlines()
    assert digests == [hashlib.sha256(b"".join(content(i) for i in range(COUNT))).hexdigest()] * epochs
    warned = [
        line for line in finished.stderr.splitlines() if line.startswith("warning in ") and "dataset cache" in line
    ]
    if mode == 0o777:
        assert len(warned) == 1, warned
        assert warned[0].startswith(f"warning in {main.split()[1]}: ") and "not safe to use" in warned[0]
        assert list(cache_dir.iterdir()) == []
    else:
        assert warned == []
        assert len(cache_files(cache_dir)) == COUNT


@pytest.mark.parametrize("method", ["fork", "spawn"])
@pytest.mark.parametrize("change", ["replaced", "removed", "made writable", "a link to a safe folder"])
def test_a_worker_does_not_use_a_folder_changed_since_it_was_accepted(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    stop_workers: list[Any],
    method: str,
    change: str,
) -> None:
    cache_dir = tmp_path / "cache"
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=cache_dir
    )
    assert cache_dir.is_dir()  # made, and accepted, with the dataset
    if change == "made writable":
        cache_dir.chmod(0o777)
    else:
        cache_dir.rename(tmp_path / "accepted")
        if change == "replaced":
            cache_dir.mkdir(mode=0o700)  # the same checks pass, but it is not the folder that was accepted
        elif change == "a link to a safe folder":
            (tmp_path / "other").mkdir(mode=0o700)
            cache_dir.symlink_to(tmp_path / "other")
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=5, num_workers=2, multiprocessing_context=method, collate_fn=as_list
    )
    stop_workers.append(loader)
    for _epoch in range(2):
        assert [sample["data"] for batch in loader for sample in batch] == [content(i) for i in range(COUNT)]
    # Read from the service: nothing stored anywhere, nothing created in the folder's place.
    for folder in [tmp_path / "accepted", cache_dir, tmp_path / "other"]:
        assert not folder.exists() or list(folder.iterdir()) == []
    assert change != "removed" or not cache_dir.exists()


def test_a_data_module_checks_its_cache_folder_in_setup_not_in_init(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    from azstoragetorch.integrations.lightning import BlobDataModule

    cache_dir = tmp_path / "made" / "cache"
    data = BlobDataModule(train=blobs.url, credential=account_credential, cache_dir=cache_dir)
    assert list(tmp_path.iterdir()) == []  # __init__ changes no state, as Lightning asks
    data.setup("fit")
    assert oct(cache_dir.stat().st_mode & 0o777) == "0o700"

    refused = tmp_path / "refused"
    refused.mkdir()
    refused.chmod(0o777)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    data = BlobDataModule(train=blobs.url, credential=account_credential, cache_dir=refused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        data.setup("fit")
        data.setup("fit")
        assert our_warnings(caught) != []  # in setup, before a DataLoader worker could see the folder
        assert [sample["data"] for sample in samples(data.train_dataloader().dataset)] == [
            content(i) for i in range(COUNT)
        ]
        _cache.flush()
    warned = our_warnings(caught)
    assert len(warned) == 1 and "not safe to use" in warned[0], warned
    assert list(refused.iterdir()) == []


def test_each_cause_of_falling_back_warns_once(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An entry that cannot be read must not use up the warning of a full disk that comes next."""
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path
    )
    assert read_twice_recording_warnings(dataset) == []  # stored, then hits

    def unreadable(fd: int) -> Any:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def full(fd: int, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_blob_cache, "_read_entry", unreadable)
    monkeypatch.setattr(_blob_cache, "_write_all", full)
    monkeypatch.setattr(_failures, "_warned_pid", 0)
    warned = read_twice_recording_warnings(dataset)  # every entry unreadable, so every blob is stored again
    assert len(warned) == 2, warned
    assert "reading" in warned[0] and os.strerror(errno.EIO) in warned[0]
    assert "storing" in warned[1] and "No space left on device" in warned[1]


def test_an_empty_cache_dir_is_an_error_and_a_tilde_is_expanded(
    blobs: Container,
    tmp_path: Path,
    account_credential: AzureNamedKeyCredential,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from azstoragetorch.integrations.lightning import BlobDataModule

    makers = [
        lambda **cache: BlobDataset.from_blob_urls(blobs.blob_url(NAMES[1]), credential=account_credential, **cache),
        lambda **cache: IterableBlobDataset.from_blob_urls(blobs.blob_url(NAMES[1]), **cache),
        lambda **cache: BlobDataset.from_container_url(blobs.url, credential=account_credential, **cache),
        lambda **cache: IterableBlobDataset.from_container_url(blobs.url, credential=account_credential, **cache),
        lambda **cache: BlobDataModule(train=blobs.url, credential=account_credential, **cache),
    ]
    monkeypatch.chdir(tmp_path)
    for make in makers:
        with pytest.raises(ValueError, match="cache_dir must name a directory, got an empty string"):
            make(cache_dir="")  # (Path("") is Path("."): the current folder, a name like any other)
        with pytest.raises(ValueError, match="cache_dir must not contain a NUL"):
            make(cache_dir="cache\0/x")
        with pytest.raises(ValueError, match="cache_dir cannot be a file name here"):
            make(cache_dir="cache-\ud800")  # a lone surrogate: every sample's read failed with UnicodeEncodeError
    assert list(tmp_path.iterdir()) == []

    class BytesPath:
        def __fspath__(self) -> bytes:
            return b"/tmp/x"

    with pytest.raises(TypeError, match=r"cache_dir must be a str or os\.PathLike of str"):
        BlobDataset.from_blob_urls(blobs.blob_url(NAMES[1]), cache_dir=BytesPath())

    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir="~/x"
    )
    monkeypatch.chdir(home)  # a relative or expanded folder is fixed when the dataset is made
    assert read_twice_recording_warnings(dataset) == []
    assert len(cache_files(home / "x")) == COUNT
    assert not (tmp_path / "~").exists() and not (home / "~").exists()


def test_an_absolute_cache_dir_does_not_need_the_current_directory(
    blobs: Container, tmp_path: Path, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()  # a job whose working directory was removed under it: os.getcwd() fails
    dataset = BlobDataset.from_blob_urls(
        [blobs.blob_url(n) for n in NAMES], credential=account_credential, cache_dir=tmp_path / "cache"
    )
    assert read_twice_recording_warnings(dataset) == []
    assert len(cache_files(tmp_path / "cache")) == COUNT
