"""The package keeps the public face of the module it replaced: import paths, ``__module__``,
pickles, class paths for LightningCLI, and ``@override`` on what it overrides of torch's classes."""

from __future__ import annotations

import importlib
import inspect
import pickle
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter

import azstoragetorch.integrations.dcp as dcp_package
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter, CheckpointVerification
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._writer import _SeenMetadata

PACKAGE = "azstoragetorch.integrations.dcp"
URL = "https://account.blob.core.windows.net/container/checkpoints/step-1"
PUBLIC = (BlobStorageWriter, BlobStorageReader, CheckpointVerification)


def test_the_public_names_are_those_of_the_module_it_replaced() -> None:
    assert sorted(dcp_package.__all__) == ["BlobStorageReader", "BlobStorageWriter", "CheckpointVerification"]
    for name in dcp_package.__all__:
        assert getattr(importlib.import_module(PACKAGE), name) is getattr(dcp_package, name)


@pytest.mark.parametrize("cls", [*PUBLIC, _BlobFiles, _SeenMetadata], ids=lambda cls: cls.__name__)
def test_classes_live_at_the_package_path_that_configs_and_pickles_name(cls: type) -> None:
    assert cls.__module__ == PACKAGE
    # What LightningCLI/jsonargparse do with a class_path, and pickle with a class reference.
    module_name, _, name = f"{cls.__module__}.{cls.__qualname__}".rpartition(".")
    assert getattr(importlib.import_module(module_name), name) is cls


def test_reprs_name_the_package() -> None:
    assert repr(BlobStorageWriter(URL)).startswith(f"<{PACKAGE}.BlobStorageWriter object at ")
    assert repr(BlobStorageReader(URL)).startswith(f"<{PACKAGE}.BlobStorageReader object at ")


def _pickled(value: Any) -> bytes:
    data = pickle.dumps(value)
    # A pickle names classes by module: only the package's path keeps loading whatever its layout.
    assert f"{PACKAGE}._".encode() not in data
    return data


def test_a_writer_pickles_and_comes_back_as_configured() -> None:
    # dcp.async_save with the process checkpointer pickles the writer into its saving process.
    writer = BlobStorageWriter(
        URL,
        credential=AzureNamedKeyCredential("account", "a2V5"),
        thread_count=2,
        max_concurrency=6,
        block_size=4 * 1024 * 1024,
    )
    writer._seen_metadata = _SeenMetadata('"0x1"')  # as during a save: between its start and its commit

    copy = pickle.loads(_pickled(writer))

    assert type(copy) is BlobStorageWriter and type(copy.fs) is _BlobFiles
    assert copy.checkpoint_id == URL
    assert (copy.fs.max_concurrency, copy.fs.block_size, copy.thread_count) == (3, 4 * 1024 * 1024, 2)
    assert copy._seen_metadata == _SeenMetadata('"0x1"')
    assert copy.fs.shard_writers is not writer.fs.shard_writers  # a save under way stays in its process
    assert copy.fs.shard_writers.failure is None


def test_a_reader_pickles_and_comes_back_as_configured() -> None:
    reader = BlobStorageReader(URL, max_concurrency=3, block_size=1024 * 1024, verify_checksum=False)

    copy = pickle.loads(_pickled(reader))

    assert type(copy) is BlobStorageReader and type(copy.fs) is _BlobFiles
    assert copy.checkpoint_id == URL
    assert (copy.fs.max_concurrency, copy.fs.block_size, copy.fs.verify_checksum) == (3, 1024 * 1024, False)


def test_a_verification_pickles() -> None:
    found = CheckpointVerification(URL, [".metadata"], [], ["__0_0.distcp"], [])

    assert pickle.loads(_pickled(found)) == found
    assert repr(found).startswith("CheckpointVerification(checkpoint_id=")


def _overriding_functions(cls: type, base: type) -> list[tuple[str, Any]]:
    found = []
    for name, attribute in vars(cls).items():
        if name.startswith("__") or not hasattr(base, name):
            continue
        function = attribute.fget if isinstance(attribute, property) else attribute
        function = getattr(function, "__func__", function)  # classmethod, staticmethod
        if inspect.isfunction(function):
            found.append((name, function))
    return found


@pytest.mark.parametrize(
    ("cls", "base"),
    [(BlobStorageWriter, FileSystemWriter), (BlobStorageReader, FileSystemReader), (_BlobFiles, FileSystemBase)],
    ids=lambda cls: cls.__name__,
)
def test_every_method_that_overrides_torchs_is_marked_override(cls: type, base: type) -> None:
    overriding = _overriding_functions(cls, base)

    assert len(overriding) >= 4  # the check found them
    assert [name for name, function in overriding if not getattr(function, "__override__", False)] == []
