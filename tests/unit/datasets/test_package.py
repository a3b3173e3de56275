"""The face of the ``azstoragetorch.datasets`` package: its public names, the module they report,
and pickles that name only the package, whichever private module defines what they hold.

Datasets built from blob URLs send no request until a sample is read, so nothing here needs a
service; the transforms return the :class:`Blob` itself rather than reading it.
"""

from __future__ import annotations

import importlib
import io
import pickle
from typing import Any

import pytest

import azstoragetorch.datasets
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset

URLS = [
    "https://acct.blob.core.windows.net/data/images/cat%201.jpg",
    "https://acct.blob.core.windows.net/data/b?versionid=2024-01-01T00:00:00.0000000Z",
    "https://acct.blob.core.windows.net/other/c",
]
PUBLIC_CLASSES = [Blob, BlobDataset, IterableBlobDataset]


def the_blob(blob: Blob) -> Blob:
    return blob


class _RecordingUnpickler(pickle.Unpickler):
    """Loads a pickle and keeps every ``module.name`` it looked up."""

    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.names: set[str] = set()

    def find_class(self, module: str, name: str) -> Any:
        self.names.add(f"{module}.{name}")
        return super().find_class(module, name)


def round_trip(obj: Any) -> tuple[Any, set[str]]:
    """``obj`` pickled and loaded again, with the names of the package's objects its pickle holds."""
    unpickler = _RecordingUnpickler(pickle.dumps(obj))
    loaded = unpickler.load()
    return loaded, {name for name in unpickler.names if name.startswith("azstoragetorch.datasets")}


def test_the_package_exports_exactly_the_public_names() -> None:
    assert azstoragetorch.datasets.__all__ == ["Blob", "BlobDataset", "IterableBlobDataset"]
    assert [getattr(azstoragetorch.datasets, name) for name in azstoragetorch.datasets.__all__] == PUBLIC_CLASSES


@pytest.mark.parametrize("cls", PUBLIC_CLASSES, ids=lambda cls: cls.__name__)
def test_public_classes_report_the_package_as_their_module(cls: type) -> None:
    assert cls.__module__ == "azstoragetorch.datasets"
    assert repr(cls) == f"<class 'azstoragetorch.datasets.{cls.__name__}'>"
    # A LightningCLI/jsonargparse class_path is built from __module__ and resolved by importing it.
    module, _, name = f"{cls.__module__}.{cls.__qualname__}".rpartition(".")
    assert getattr(importlib.import_module(module), name) is cls


def test_the_tuning_constants_and_private_helpers_import_from_their_homes() -> None:
    from azstoragetorch.datasets import DEFAULT_PREFETCH, MAX_SAMPLE_THREADS, READ_ALL_BLOCK_SIZE, READ_ALL_CONCURRENCY
    from azstoragetorch.datasets._blob import _READ_ALL
    from azstoragetorch.datasets._dealing import _deal
    from azstoragetorch.datasets._iterable import DEFAULT_PREFETCH as iterable_default
    from azstoragetorch.datasets._sample_pool import MAX_SAMPLE_THREADS as pool_threads
    from azstoragetorch.datasets._sources import _list_source

    assert (iterable_default, pool_threads) == (DEFAULT_PREFETCH, MAX_SAMPLE_THREADS)
    assert 1 <= DEFAULT_PREFETCH <= MAX_SAMPLE_THREADS
    assert _READ_ALL == {"block_size": READ_ALL_BLOCK_SIZE, "max_concurrency": READ_ALL_CONCURRENCY}
    assert _deal(range(10), rank=1, world_size=2, worker_id=0, workers=2) == range(1, 10, 4)
    assert callable(_list_source)


def test_a_blob_survives_a_pickle_that_names_it_by_the_package() -> None:
    blob = BlobDataset.from_blob_urls(URLS, transform=the_blob)[1]

    loaded, names = round_trip(blob)

    assert type(loaded) is Blob
    assert (loaded.url, loaded.blob_name, loaded.container_name) == (blob.url, blob.blob_name, blob.container_name)
    assert repr(loaded) == repr(blob)
    assert names == {"azstoragetorch.datasets.Blob"}


def test_a_map_style_dataset_survives_a_pickle_that_names_only_the_package() -> None:
    dataset = BlobDataset.from_blob_urls(URLS)  # the default transform is pickled by name too

    loaded, names = round_trip(dataset)

    assert type(loaded) is BlobDataset and len(loaded) == len(URLS)
    assert loaded._transform is dataset._transform
    # What each entry turns into, read without a request through a transform that returns the blob.
    loaded._transform = the_blob
    assert [blob.url for blob in loaded] == [url.split("?")[0] for url in URLS]
    assert all(name.rpartition(".")[0] == "azstoragetorch.datasets" for name in names), names
    assert "azstoragetorch.datasets.BlobDataset" in names


def test_an_iterable_dataset_survives_a_pickle_that_names_only_the_package() -> None:
    dataset = IterableBlobDataset.from_blob_urls(URLS, transform=the_blob, shuffle=True, seed=7, prefetch=2)
    dataset.set_epoch(3)

    loaded, names = round_trip(dataset)

    assert type(loaded) is IterableBlobDataset
    assert (
        loaded.state_dict()
        == dataset.state_dict()
        == {
            "epoch": 3,
            "seed": 7,
            "shuffle": True,
            "samples_yielded": 0,
        }
    )
    assert sorted(blob.blob_name for blob in loaded) == sorted(blob.blob_name for blob in dataset)
    assert all(name.rpartition(".")[0] == "azstoragetorch.datasets" for name in names), names
    assert "azstoragetorch.datasets.IterableBlobDataset" in names
