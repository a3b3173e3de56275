"""The compact store of a dataset's blobs (``azstoragetorch._entries``): what goes in comes out.

URLs are made up; no request is sent (property fetches are patched).
"""

from __future__ import annotations

import datetime
import gc
import pickle
import tracemalloc
import urllib.parse

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azstoragetorch._client import AzStorageTorchBlobClient, BlobProperties, BlobUrl, ContainerUrl
from azstoragetorch._entries import EntriesBuilder
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset
from tests.unit.datasets.test_dataset_sharding import fake_blobs, shard_layouts, shards_of

SIGNATURE = "c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
SAS = f"sv=2021-08-06&sr=c&sp=rl&sig={SIGNATURE}"
ACCOUNTS = [
    "https://acct.blob.core.windows.net",
    "https://other.blob.core.windows.net",
    "http://127.0.0.1:10000/devacct",
]

# Names as users write them: path-like, non-ASCII, with characters that need escaping.
name_characters = st.sampled_from([*list("abcxyz019/._- "), "é", "日本", "%", "?", "#", "\t", "🙂", "+", "&", "="])
blob_names = (
    st.lists(name_characters, min_size=1, max_size=12)
    .map("".join)
    .filter(lambda name: name.strip("/"))
    # Names with "." or ".." segments are refused (HTTP would resolve them to another blob).
    .filter(lambda name: not {".", ".."} & set(name.split("/")))
)


def name_of(blob: Blob) -> str:
    return blob.blob_name


def url_for(account: str, container: str, name: str, query: str = "", *, quote: bool = True) -> str:
    written = urllib.parse.quote(name, safe="/") if quote else name
    return f"{account}/{container}/{written}" + (f"?{query}" if query else "")


@st.composite
def url_lists(draw: st.DrawFn) -> list[str]:
    """Lists of blob URLs: mostly one container, sometimes several; with or without a SAS, snapshot
    or version; names escaped or (when they need no escaping) written as they are."""
    count = draw(st.integers(0, 30))
    same_place = draw(st.booleans())
    common_query = draw(st.sampled_from(["", SAS]))
    urls = []
    for _ in range(count):
        account = ACCOUNTS[0] if same_place else draw(st.sampled_from(ACCOUNTS))
        container = "data" if same_place else draw(st.sampled_from(["data", "other", "with%20space"]))
        name = draw(blob_names)
        query = (
            common_query if same_place else draw(st.sampled_from(["", SAS, "snapshot=2024-01-01T00:00:00.0000000Z"]))
        )
        plain = all(character.isalnum() or character in "/._-" for character in name)
        urls.append(url_for(account, container, name, query, quote=not plain or draw(st.booleans())))
    return urls


def built(urls: list[str]) -> list[BlobUrl]:
    builder = EntriesBuilder()
    builder.add_urls(urls)
    entries = builder.build()
    assert len(entries) == len(urls)
    return [entries.url(index) for index in range(len(entries))]


@settings(max_examples=300, deadline=None)
@given(urls=url_lists())
def test_every_url_comes_back_as_parsed(urls: list[str]) -> None:
    assert built(urls) == [BlobUrl.parse(url) for url in urls]


@settings(max_examples=100, deadline=None)
@given(names=st.lists(blob_names, min_size=1, max_size=20))
def test_names_round_trip_through_the_bulk_path_and_pickling(names: list[str]) -> None:
    urls = [url_for(ACCOUNTS[0], "data", name, SAS) for name in names]
    dataset = BlobDataset.from_blob_urls(urls, credential=False, transform=name_of)
    copy = pickle.loads(pickle.dumps(dataset))
    assert [copy[index] for index in range(len(copy))] == names
    assert [blob.url for blob in copy._blobs] == [url.split("?")[0] for url in urls]


def test_runs_of_containers_and_shared_name_starts_are_stored_once() -> None:
    urls = [url_for(ACCOUNTS[0], "data", f"train/images/{index:05d}.jpg", SAS) for index in range(1000)]
    urls += [url_for(ACCOUNTS[1], "other", f"val/{index}.jpg") for index in range(10)]
    urls += [url_for(ACCOUNTS[0], "data", "train/images/extra.jpg", SAS)]
    builder = EntriesBuilder()
    builder.add_urls(urls)
    entries = builder.build()
    assert [entries.url(index) for index in range(len(urls))] == [BlobUrl.parse(url) for url in urls]
    assert len(entries._runs) == 3
    # What the first run's names share ("train/images/00") is stored once, not in every name.
    assert len(entries._names) == 1000 * len("000.jpg") + 10 * len("0.jpg") + len("train/images/extra.jpg")


def test_the_same_urls_in_chunks_of_different_shared_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("azstoragetorch._entries._CHUNK", 7)
    urls = [url_for(ACCOUNTS[0], "data", f"{'abcde'[index // 10]}/{index}") for index in range(50)]
    assert built(urls) == [BlobUrl.parse(url) for url in urls]


def test_empty() -> None:
    assert built([]) == []
    dataset = BlobDataset.from_blob_urls([], credential=False)
    assert len(dataset) == 0
    with pytest.raises(IndexError):
        dataset[0]
    assert list(IterableBlobDataset.from_blob_urls([], credential=False)) == []


def test_indexes_count_from_the_end_like_a_list() -> None:
    urls = [url_for(ACCOUNTS[0], "data", f"b{index}") for index in range(5)]
    dataset = BlobDataset.from_blob_urls(urls, credential=False, transform=name_of)
    assert (dataset[-1], dataset[-5], dataset[4]) == ("b4", "b0", "b4")
    for index in (5, -6):
        with pytest.raises(IndexError):
            dataset[index]


@pytest.mark.parametrize(
    "bad",
    [
        "https://acct.blob.core.windows.net/data/",
        "https://acct.blob.core.windows.net/data",
        "ftp://acct.blob.core.windows.net/data/x",
        "https://acct.blob.core.windows.net/data/x#fragment",
    ],
)
def test_a_bad_url_among_good_ones_raises_as_parsing_does(bad: str) -> None:
    with pytest.raises(ValueError) as expected:
        BlobUrl.parse(bad)
    urls = [url_for(ACCOUNTS[0], "data", f"b{index}") for index in range(100)]
    for position in (0, 50, 100):
        with pytest.raises(ValueError) as raised:
            built([*urls[:position], bad, *urls[position:]])
        assert str(raised.value) == str(expected.value)


def test_properties_round_trip() -> None:
    when = datetime.datetime(2026, 11, 29, 21, 0, 5, tzinfo=datetime.timezone.utc)
    listed = [
        BlobProperties(size=10, etag='"0x8DC1234567890AB"', last_modified=when),
        BlobProperties(size=0, etag='"0x08DC"', last_modified=None),  # a leading zero: kept as text
        BlobProperties(size=2**40, etag="W/odd", last_modified=when),
        BlobProperties(
            size=3, etag='"0x1"', last_modified=when.astimezone(datetime.timezone(datetime.timedelta(hours=2)))
        ),
        BlobProperties(size=4, etag='"0xFFFFFFFFFFFFFFFF"', last_modified=when, crc32=12345),
    ]
    builder = EntriesBuilder()
    builder.add_urls([url_for(ACCOUNTS[0], "data", "named")])
    builder.add_names(ContainerUrl.parse(f"{ACCOUNTS[0]}/data?{SAS}"), [f"l{index}" for index in range(5)], listed)
    entries = pickle.loads(pickle.dumps(builder.build()))
    assert [entries.properties(index) for index in range(6)] == [None, *listed]
    for index, properties in enumerate(listed, start=1):
        assert entries.properties(index).last_modified == properties.last_modified  # type: ignore[union-attr]


def test_properties_fetched_for_a_named_blob_are_remembered(monkeypatch: pytest.MonkeyPatch) -> None:
    fetched = BlobProperties(size=7, etag='"0x8DC"', last_modified=None)
    calls = []
    monkeypatch.setattr(AzStorageTorchBlobClient, "get_properties", lambda client: calls.append(client) or fetched)
    dataset = BlobDataset.from_blob_urls(
        [url_for(ACCOUNTS[0], "data", f"b{index}") for index in range(3)], credential=False, transform=lambda b: b.size
    )
    assert [dataset[index] for index in (0, 1, 0, 1, 2)] == [7] * 5
    assert len(calls) == 3


def test_no_sas_in_reprs() -> None:
    dataset = BlobDataset.from_blob_urls([url_for(ACCOUNTS[0], "data", "a", SAS)], credential=False)
    shown = repr(dataset._blobs) + repr(dataset._blobs._entries) + repr(dataset._blobs[0])
    assert SIGNATURE not in shown and "sig=" not in shown


def test_a_dataset_of_many_urls_takes_under_100_bytes_per_blob() -> None:
    # Allocation counts, not timings: deterministic. Names like an image data set's.
    count = 50_000
    urls = [
        url_for(ACCOUNTS[0], "data", f"train/n{index % 1000:08d}/n{index % 1000:08d}_{index}.JPEG")
        for index in range(count)
    ]
    gc.collect()
    tracemalloc.start()
    try:
        dataset = BlobDataset.from_blob_urls(urls, credential=False)
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(dataset) == count
    assert held / count <= 100, f"{held / count:.0f} bytes per blob"


@settings(max_examples=40, deadline=None)
@given(
    layout=shard_layouts(max_world_size=3, max_workers=3, max_count=25),
    shuffle=st.booleans(),
    balance_ranks=st.booleans(),
)
def test_compact_datasets_shard_as_lists_of_blobs_do(
    layout: tuple[int, int, int], shuffle: bool, balance_ranks: bool
) -> None:
    world_size, num_workers, count = layout
    options = {"transform": name_of, "shuffle": shuffle, "seed": 7, "balance_ranks": balance_ranks}
    urls = [blob.url for blob in fake_blobs(count)]
    compact = IterableBlobDataset.from_blob_urls(urls, credential=False, **options)
    listed = IterableBlobDataset(fake_blobs(count), **options)
    assert shards_of(compact, world_size, num_workers) == shards_of(listed, world_size, num_workers)
