"""BlobStorageWriter and BlobStorageReader with torch.distributed.checkpoint against Azurite.

Round trips, the layout shared with FileSystemWriter (both ways), commit order and failures part way
(through the fault proxy), ranged and coalesced loads (counted at the proxy), async_save, world size 2
with DDP and FSDP2 including resharding, and what the user sees for bad input.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import io
import json
import logging
import os
import pathlib
import pickle
import random
import re
import select
import subprocess
import sys
import tempfile
import threading
import tracemalloc
import warnings
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, cast

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.distributed.checkpoint.logger as dcp_logger
import torch.multiprocessing
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension, ZStandard
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import SerializationFormat

from azstoragetorch._client import _schedule
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support import dcp_overwrite_run, dcp_worker
from tests.e2e.support._launch import run_job
from tests.e2e.support.fault_proxy import Delay, FaultProxy, Gather, Respond, SeenRequest

# torch notes that without a process group it saves and loads in one process; that is the intent.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

MiB = 1024 * 1024
REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


def state_dict(tensors: int = 6, size: int = 64 * 1024) -> dict[str, Any]:
    """Tensors of ``size`` float32 elements (different dtypes), a nested dict and plain Python values."""
    generator = torch.Generator().manual_seed(0)
    tensors_by_name = {f"layer{i}.weight": torch.randn(size, generator=generator) for i in range(tensors)}
    return {
        **tensors_by_name,
        "embedding": torch.randint(0, 1000, (256, 8), generator=generator, dtype=torch.int64),
        "half": torch.randn(128, generator=generator).to(torch.bfloat16),
        "nested": {"scale": torch.tensor(0.5), "history": [1, 2, 3]},
        "step": 1234,
        "name": "run-1",
    }


def empty_like(template: dict[str, Any]) -> dict[str, Any]:
    """A state dict of the same shape to load into: zeroed tensors, blanked Python values."""
    blank: dict[str, Any] = {}
    for key, value in template.items():
        if isinstance(value, torch.Tensor):
            blank[key] = torch.zeros_like(value)
        elif isinstance(value, dict):
            blank[key] = empty_like(value)
        else:
            blank[key] = None
    return blank


def assert_same(loaded: dict[str, Any], expected: dict[str, Any]) -> None:
    assert loaded.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, torch.Tensor):
            assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value), key
        elif isinstance(value, dict):
            assert_same(loaded[key], value)
        else:
            assert loaded[key] == value, key


def assert_loads(expected: dict[str, Any], storage_reader: Any) -> None:
    """What ``storage_reader`` loads into a blank copy of ``expected`` is ``expected``."""
    loaded = empty_like(expected)
    dcp.load(loaded, storage_reader=storage_reader)
    assert_same(loaded, expected)


def copy_down(container: Container, prefix: str, directory: pathlib.Path) -> None:
    """Every blob under ``prefix`` into ``directory``, as a user copies a checkpoint to disk."""
    for name in names(container, prefix):
        (directory / name).write_bytes(container.download(f"{prefix}/{name}"))


def copy_up(directory: pathlib.Path, container: Container, prefix: str) -> None:
    """Every file of ``directory`` under ``prefix``, as a user copies a checkpoint from disk."""
    for path in directory.iterdir():
        container.upload(f"{prefix}/{path.name}", path.read_bytes())


def names(container: Container, prefix: str) -> list[str]:
    return sorted(blob.name[len(prefix) + 1 :] for blob in container.client.list_blobs(name_starts_with=prefix + "/"))


def etags(container: Container, prefix: str) -> dict[str, str]:
    return {blob.name: blob.etag for blob in container.client.list_blobs(name_starts_with=prefix + "/")}


def plain(name: str) -> str:
    """A shard file's name as FileSystemWriter writes it: without the writer's per-save token."""
    return re.sub(r"^(__\d+_)[0-9a-f]{12}_", r"\1", name)


def plain_names(container: Container, prefix: str) -> list[str]:
    return sorted(plain(name) for name in names(container, prefix))


def size_of(container: Container, prefix: str, shard: str) -> int:
    """The size of the shard file under ``prefix`` that FileSystemWriter would name ``shard``."""
    (name,) = (name for name in names(container, prefix) if plain(name) == shard)
    return int(container.client.get_blob_client(f"{prefix}/{name}").get_blob_properties().size)


def tokens(container: Container, prefix: str) -> set[str]:
    """The save tokens in the names of the shard files under ``prefix``."""
    return {name.split("_")[3] for name in names(container, prefix) if name.endswith(".distcp")}


def writer(url: str, credential: Any, **options: Any) -> BlobStorageWriter:
    return BlobStorageWriter(url, credential=credential, **options)


def reader(url: str, credential: Any, **options: Any) -> BlobStorageReader:
    return BlobStorageReader(url, credential=credential, **options)


def root_error(error: BaseException) -> str:
    """DCP wraps each rank's failure in a CheckpointException; its text carries the rank's traceback."""
    return str(error)


# -- round trips and layout -------------------------------------------------------------------------


def test_round_trip(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    expected = state_dict()
    url = container.blob_url("ckpt/step-1")
    dcp.save(expected, storage_writer=writer(url, account_credential))

    assert_loads(expected, reader(url, account_credential))
    assert plain_names(container, "ckpt/step-1") == [".metadata", "__0_0.distcp"]


@pytest.mark.parametrize("thread_count", [1, 3])
def test_each_rank_writes_thread_count_files(
    container: Container, account_credential: AzureNamedKeyCredential, thread_count: int
) -> None:
    expected = state_dict()
    url = container.blob_url("threads")
    dcp.save(expected, storage_writer=writer(url, account_credential, thread_count=thread_count))

    assert plain_names(container, "threads") == [".metadata", *(f"__0_{n}.distcp" for n in range(thread_count))]
    assert len(tokens(container, "threads")) == 1  # one token for the whole save
    assert_loads(expected, reader(url, account_credential))


def test_layout_is_file_system_writers_but_for_the_save_token_in_shard_names(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    expected = state_dict()
    dcp.save(expected, storage_writer=FileSystemWriter(tmp_path, thread_count=2))
    dcp.save(expected, storage_writer=writer(container.blob_url("same"), account_credential, thread_count=2))

    on_disk = sorted(path.name for path in tmp_path.iterdir())
    in_container = {plain(name): name for name in names(container, "same")}
    assert sorted(in_container) == on_disk == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    for shard in ("__0_0.distcp", "__0_1.distcp"):
        assert container.download(f"same/{in_container[shard]}") == (tmp_path / shard).read_bytes()
    blob_metadata = pickle.loads(container.download("same/.metadata"))
    disk_metadata = pickle.loads((tmp_path / ".metadata").read_bytes())
    assert blob_metadata.state_dict_metadata == disk_metadata.state_dict_metadata
    assert {
        index: dataclasses.replace(info, relative_path=plain(info.relative_path))
        for index, info in blob_metadata.storage_data.items()
    } == disk_metadata.storage_data


@pytest.fixture(params=[False, True], ids=["plain", "compressed"])
def to_copy(request: pytest.FixtureRequest) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A state dict to save, plain or compressed with the tests' Zlib, and the writer's and the
    reader's options for it."""
    if request.param:
        return compressible(), {"_extensions": [Zlib()]}, {"_extension_registry": registry()}
    return state_dict(), {}, {}


def test_a_blob_checkpoint_copied_to_disk_loads_with_file_system_reader(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path, to_copy: Any
) -> None:
    expected, writing, reading = to_copy
    dcp.save(expected, storage_writer=writer(container.blob_url("up"), account_credential, thread_count=2, **writing))
    copy_down(container, "up", tmp_path)

    assert_loads(expected, FileSystemReader(tmp_path, **reading))


def test_a_disk_checkpoint_copied_up_loads_with_blob_storage_reader(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path, to_copy: Any
) -> None:
    expected, writing, reading = to_copy
    dcp.save(expected, storage_writer=FileSystemWriter(tmp_path, thread_count=3, **writing))
    copy_up(tmp_path, container, "down")

    assert_loads(expected, reader(container.blob_url("down"), account_credential, **reading))


def test_async_save(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    expected = state_dict()
    url = container.blob_url("async")

    future = dcp.async_save(expected, storage_writer=writer(url, account_credential, thread_count=2))
    future.result(timeout=120)

    assert_loads(expected, reader(url, account_credential))


@pytest.mark.parametrize("checkpointer", ["thread", "process"])
def test_async_save_with_each_checkpointer_type_and_stager_loads_what_was_saved(
    container: Container, checkpointer: str
) -> None:
    # In a process of its own: the process checkpointer needs a process group (world size 1 here)
    # and starts a saving process of its own, to which it pickles the writer.
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    command = [sys.executable, "-m", "tests.e2e.support.dcp_async_run", checkpointer, container.blob_url(checkpointer)]

    run = run_job(command, cwd=REPOSITORY, env=environment)

    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split("\n")[:-1] == [
        "writer ok",
        "default-shared-memory ok",
        "default-private-memory ok",
    ], run.stdout


def test_sas_url_authorizes_and_stays_out_of_metadata_and_logs(
    container: Container, caplog: pytest.LogCaptureFixture
) -> None:
    sas = container.container_sas(read=True, write=True, delete=True, list=True)
    url = f"{container.blob_url('sas')}?{sas}"
    expected = state_dict(tensors=2)

    with caplog.at_level(logging.DEBUG):
        dcp.save(expected, storage_writer=BlobStorageWriter(url, credential=False))
        loaded = empty_like(expected)
        dcp.load(loaded, storage_reader=BlobStorageReader(url, credential=False))

    assert_same(loaded, expected)
    metadata = pickle.loads(container.download("sas/.metadata"))
    assert metadata.storage_meta.checkpoint_id == container.blob_url("sas")
    signature = sas.split("sig=", 1)[1]
    assert signature not in caplog.text and "sig=" not in caplog.text


# -- commit order and failures ----------------------------------------------------------------------


def commits(proxy: FaultProxy) -> list[str]:
    """The blob each committing write (Put Blob or Put Block List) created, in the order they arrived."""
    return [seen.path.rsplit("/", 1)[1] for seen in proxy.requests if seen.operation in ("PutBlob", "PutBlockList")]


def to(
    name: str, operation: tuple[str, ...] = ("PutBlob", "PutBlock", "PutBlockList")
) -> Callable[[SeenRequest], bool]:
    """Requests to the file ``name`` (a shard file's as FileSystemWriter names it) of any save."""
    return lambda seen: seen.operation in operation and plain(seen.path.rsplit("/", 1)[1]) == name


def test_metadata_is_committed_after_every_shard(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    url = proxy.url(container.blob_url("order"))
    dcp.save(state_dict(), storage_writer=writer(url, azurite.credential, thread_count=3))

    order = commits(proxy)
    assert order[-1] == ".metadata"  # in one request: torch's temporary file and rename are not used
    assert order.count(".metadata") == 1 and not any(name.endswith(".tmp") for name in order)
    shards = {plain(name) for name in order[:-1] if name.endswith(".distcp")}
    assert shards == {"__0_0.distcp", "__0_1.distcp", "__0_2.distcp"}


@pytest.mark.parametrize("failing_shard", range(4))
@pytest.mark.usefixtures("no_backoff")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # torch's thread prints it
def test_a_failed_shard_leaves_no_metadata(
    container: Container, azurite: Azurite, proxy: FaultProxy, failing_shard: int
) -> None:
    # With four writer threads, most shards are written by threads whose exceptions torch's own
    # writer only prints; the save must still fail and write no metadata.
    proxy.add_fault(to(f"__0_{failing_shard}.distcp"), Respond(503, "ServerBusy"), times=None)
    url = proxy.url(container.blob_url("broken"))

    with pytest.raises(CheckpointException, match="ServerBusy"):
        dcp.save(state_dict(tensors=8), storage_writer=writer(url, azurite.credential, thread_count=4))

    assert ".metadata" not in names(container, "broken")
    assert f"__0_{failing_shard}.distcp" not in plain_names(container, "broken")  # nothing half-committed
    with pytest.raises(CheckpointException, match="No such blob"):
        dcp.load(empty_like(state_dict(tensors=8)), storage_reader=reader(url, azurite.credential))


@pytest.mark.usefixtures("no_backoff")
def test_a_failed_overwrite_leaves_the_old_checkpoint_loadable(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    url = proxy.url(container.blob_url("replace"))
    old = state_dict()
    dcp.save(old, storage_writer=writer(url, azurite.credential, thread_count=2))
    before = etags(container, "replace")
    new = {key: value + 1 if isinstance(value, torch.Tensor) else value for key, value in old.items()}
    proxy.add_fault(to("__0_1.distcp"), Respond(500), times=None)

    with pytest.raises(CheckpointException):
        dcp.save(new, storage_writer=writer(url, azurite.credential, thread_count=2, overwrite=True))

    # The new save's shard files have names of their own: the old checkpoint is untouched.
    after = etags(container, "replace")
    assert {name: tag for name, tag in after.items() if name in before} == before
    assert_loads(old, reader(url, azurite.credential))


def torch_refusal() -> BaseException:
    """What FileSystemWriter(overwrite=False) fails with, in dcp.save, where a checkpoint exists."""
    with tempfile.TemporaryDirectory() as directory:
        dcp.save(state_dict(tensors=1), storage_writer=FileSystemWriter(directory))
        with pytest.raises(CheckpointException) as error:
            dcp.save(state_dict(tensors=1), storage_writer=FileSystemWriter(directory, overwrite=False))
    ((failure, _traceback),) = error.value.failures.values()
    return cast(BaseException, failure)


def test_overwrite_false_refuses_an_existing_checkpoint_as_torch_does(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("kept")
    first = state_dict()
    dcp.save(first, storage_writer=writer(url, account_credential))
    before = {name: container.download(f"kept/{name}") for name in names(container, "kept")}

    with pytest.raises(CheckpointException) as error:
        dcp.save(state_dict(tensors=2), storage_writer=writer(url, account_credential, overwrite=False))

    ((failure, _traceback),) = error.value.failures.values()
    expected = torch_refusal()
    assert (type(failure), str(failure)) == (type(expected), str(expected))
    assert (type(failure), str(failure)) == (RuntimeError, "Checkpoint already exists and self.overwrite=False.")
    assert {name: container.download(f"kept/{name}") for name in names(container, "kept")} == before


def test_overwrite_is_the_default_as_for_filesystemwriter(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("latest")
    first = state_dict()
    second = {key: value + 1 if isinstance(value, torch.Tensor) else value for key, value in first.items()}
    dcp.save(first, storage_writer=writer(url, account_credential))

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dcp.save(second, storage_writer=writer(url, account_credential))

    # torch's warning about an overwrite would print the URL, and with it any SAS token.
    assert not [warning for warning in caught if "existing checkpoint" in str(warning.message)]

    assert_loads(second, reader(url, account_credential))


def test_overwrite_replaces_and_removes_shards_no_longer_used(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("shrink")
    dcp.save(state_dict(), storage_writer=writer(url, account_credential, thread_count=4))
    first = names(container, "shrink")
    container.upload("shrink/__0_9.distcp", b"left by a failed save (or by FileSystemWriter)")
    container.upload("shrink/__0_0123456789ab_7.distcp", b"left by a killed save")
    container.upload("shrink/notes.txt", b"not ours")
    second = state_dict(tensors=3)

    dcp.save(second, storage_writer=writer(url, account_credential, thread_count=2, overwrite=True))

    assert plain_names(container, "shrink") == [".metadata", "__0_0.distcp", "__0_1.distcp", "notes.txt"]
    assert set(first) & set(names(container, "shrink")) == {".metadata"}  # no shard file name reused
    assert_loads(second, reader(url, account_credential))


def test_without_collectives_an_overwrite_replaces_the_ranks_own_metadata_and_shards(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("local")
    first = state_dict()
    dcp.save(first, storage_writer=writer(url, account_credential, thread_count=2), use_collectives=False)
    second = {key: value + 1 if isinstance(value, torch.Tensor) else value for key, value in first.items()}

    dcp.save(second, storage_writer=writer(url, account_credential, overwrite=True), use_collectives=False)

    assert plain_names(container, "local") == ["__0.metadata", "__0_0.distcp"]
    assert_loads(second, reader(url, account_credential))


# -- one writer and one reader for many checkpoints ------------------------------------------------------


def stepped(step: int) -> dict[str, Any]:
    """A small state dict whose every tensor and value says which step saved it."""
    return {
        "weight": torch.full((256,), float(step)),
        "bias": torch.arange(16, dtype=torch.int64) + step,
        "step": step,
    }


def test_one_writer_and_one_reader_serve_many_checkpoints_with_flat_memory(
    container: Container, account_credential: AzureNamedKeyCredential, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A training loop: one writer and one reader made once, each save and load names its checkpoint.
    # Steps 0-29 go to checkpoints of their own, 30-59 replace "latest" each time.
    save_with = BlobStorageWriter(credential=account_credential, thread_count=2)
    load_with = BlobStorageReader(credential=account_credential)
    url_of = {step: container.blob_url(f"run/step-{step}" if step < 30 else "run/latest") for step in range(60)}
    save_ids = set()
    traced = {}
    # torch's DCP logger records every call, and pytest's log capture keeps the records: the
    # harness's memory, not the loop's.
    monkeypatch.setattr(dcp_logger._dcp_logger, "disabled", True)
    tracemalloc.start()
    try:
        for step in range(60):
            dcp.save(stepped(step), checkpoint_id=url_of[step], storage_writer=save_with)
            save_ids.add(save_with.storage_meta().save_id)  # type: ignore[union-attr]
            loaded = {"weight": torch.zeros(256), "bias": torch.zeros(16, dtype=torch.int64), "step": None}
            dcp.load(loaded, checkpoint_id=url_of[step], storage_reader=load_with)
            assert_same(loaded, stepped(step))
            if step in (19, 59):
                gc.collect()
                traced[step] = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()

    assert len(save_ids) == 60  # every save got a save_id of its own
    for step in (0, 17, 29, 59):  # each checkpoint still holds its own step's values
        loaded = {"weight": torch.zeros(256), "bias": torch.zeros(16, dtype=torch.int64), "step": None}
        dcp.load(loaded, checkpoint_id=url_of[step], storage_reader=load_with)
        assert_same(loaded, stepped(step))
    assert plain_names(container, "run/latest") == [".metadata", "__0_0.distcp", "__0_1.distcp"]
    # 40 more saves and loads after warming up keep well under 16 KiB each (bounded caches such as
    # urllib's fill up): nothing a save or load holds, such as a block buffer or a plan, piles up.
    growth = traced[59] - traced[19]
    print(f"Python memory grew by {growth} bytes over 40 steps")
    assert growth < 40 * 16 * 1024


# Whether each is a checkpoint URL (a blob prefix) that the writer and the reader accept.
CHECKPOINT_URLS = {
    "https://myaccount.blob.core.windows.net/container/ckpt": True,
    "https://myaccount.blob.core.windows.net/container/runs/7/step-100/": True,
    "https://myaccount.blob.core.windows.net/container": True,
    "https://myaccount.blob.core.windows.net/container/ckpt?sv=2024-08-04&sp=racwdl&sig=c2lnbmF0dXJl": True,
    "https://myaccount.dfs.core.windows.net/container/ckpt": True,
    "http://127.0.0.1:10000/devstoreaccount1/container/ckpt": True,
    "https://myaccount.blob.core.windows.net/container/with%20space/ckpt": True,
    "s3://bucket/checkpoint": False,
    "/tmp/checkpoint": False,
    "checkpoint": False,
    "https://myaccount.blob.core.windows.net": False,
    "https://myaccount.blob.core.windows.net/container/ckpt?snapshot=2024-01-01T00:00:00Z": False,
}


@pytest.mark.parametrize("url", [url for url, accepted in CHECKPOINT_URLS.items() if accepted])
def test_every_url_the_constructors_accept_is_a_valid_checkpoint_id(url: str) -> None:
    for make in (BlobStorageWriter, BlobStorageReader):
        assert make.validate_checkpoint_id(url)
        made = make(url, credential=False)
        made.reset(url)  # what dcp.save/dcp.load(checkpoint_id=url) does
        assert "sig=" not in made.checkpoint_id
        assert made.checkpoint_id == make(url, credential=False).checkpoint_id


def test_reset_rejects_what_the_constructors_reject() -> None:
    for make in (BlobStorageWriter, BlobStorageReader):
        assert not make.validate_checkpoint_id(pathlib.Path("/tmp/checkpoint"))
        made = make(credential=False)
        for local in ("/tmp/checkpoint", pathlib.Path("/tmp/checkpoint")):
            with pytest.raises(ValueError, match="not a blob prefix URL"):
                made.reset(local)


def test_storage_meta_names_the_checkpoint_without_its_sas_and_a_new_save_id_per_reset() -> None:
    url = "https://myaccount.blob.core.windows.net/container/ckpt"
    made = BlobStorageWriter(credential=False)
    made.reset(f"{url}?sv=2024-08-04&sp=racwdl&sig=c2lnbmF0dXJl")
    first = made.storage_meta()
    made.reset()
    second = made.storage_meta()
    assert first is not None and second is not None
    assert first.checkpoint_id == second.checkpoint_id == url
    assert first.save_id != second.save_id


def test_a_writer_or_reader_without_a_url_asks_for_one(container: Container) -> None:
    with pytest.raises(CheckpointException, match=r"BlobStorageWriter has no checkpoint URL.*checkpoint_id=url"):
        dcp.save(state_dict(tensors=1), storage_writer=BlobStorageWriter(credential=False))
    with pytest.raises(CheckpointException, match=r"BlobStorageReader has no checkpoint URL.*checkpoint_id=url"):
        dcp.load(empty_like(state_dict(tensors=1)), storage_reader=BlobStorageReader(credential=False))
    assert names(container, "") == []


# -- stream transform extensions --------------------------------------------------------------------------


class Zlib(StreamTransformExtension):
    """A compressing stream transform of the tests' own: torch's ZStandard needs a package (zstandard
    or pyzstd) that the suite does not install; this one goes through the same hooks."""

    @staticmethod
    def registry_name() -> str:
        return "azstoragetorch-tests.zlib"

    @staticmethod
    def from_descriptor(version: str) -> Zlib:
        if version != "1":
            raise ValueError(f"Unknown Zlib version {version!r}")
        return Zlib()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return cast(IO[bytes], _ZlibWriter(output))

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        return io.BytesIO(zlib.decompress(input.read()))


class _ZlibWriter(io.RawIOBase):
    def __init__(self, output: IO[bytes]) -> None:
        super().__init__()
        self._output = output
        self._compressor = zlib.compressobj()

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._output.write(self._compressor.compress(view))
        return len(view)

    def close(self) -> None:
        if not self.closed:
            self._output.write(self._compressor.flush())
            self._output.close()  # torch's wrapper of the shard file: flushes, does not close it
        super().close()


def registry() -> ExtensionRegistry:
    extensions = ExtensionRegistry()
    extensions.register(Zlib)
    return extensions


def compressible(tensors: int = 6) -> dict[str, Any]:
    """state_dict() with tensors that compress well (few distinct values)."""
    return {
        key: (value * 4).round() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
        for key, value in state_dict(tensors).items()
    }


def transformed_items(metadata: Any) -> dict[str, Any]:
    return {index.fqn: info for index, info in metadata.storage_data.items() if info.transform_descriptors}


def test_a_checkpoint_written_with_an_extension_round_trips_compressed(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    expected = compressible()
    url = container.blob_url("zlib")
    dcp.save(expected, storage_writer=writer(url, account_credential, thread_count=2, _extensions=[Zlib()]))

    metadata = pickle.loads(container.download("zlib/.metadata"))
    transformed = transformed_items(metadata)
    assert transformed.keys() >= {f"layer{i}.weight" for i in range(6)}
    assert all(info.transform_descriptors == ["azstoragetorch-tests.zlib/1"] for info in transformed.values())
    assert transformed["layer0.weight"].length < expected["layer0.weight"].nbytes / 2  # stored compressed
    assert_loads(expected, reader(url, account_credential, _extension_registry=registry()))


def test_a_partial_load_of_a_compressed_checkpoint_fetches_the_items_stored_bytes(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    expected = compressible(tensors=8)
    url = proxy.url(container.blob_url("zlib-partial"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential, _extensions=[Zlib()]))
    wanted = {"layer5.weight": torch.zeros(64 * 1024), "step": None}
    before = len(proxy.requests)

    dcp.load(
        wanted,
        storage_reader=reader(url, azurite.credential, _extension_registry=registry()),
        planner=DefaultLoadPlanner(allow_partial_load=True),
    )

    assert torch.equal(wanted["layer5.weight"], expected["layer5.weight"]) and wanted["step"] == 1234
    reads = [seen for seen in shard_gets(proxy) if proxy.requests.index(seen) >= before]
    storage = pickle.loads(container.download("zlib-partial/.metadata")).storage_data
    wanted_lengths = sum(info.length for index, info in storage.items() if index.fqn in wanted)
    # Each wanted item's compressed bytes, whole, as .metadata records them; nothing else.
    assert bytes_asked(reads) == wanted_lengths < size_of(container, "zlib-partial", "__0_0.distcp") / 4


@pytest.mark.skipif(not ZStandard.is_available(), reason="torch's ZStandard needs the zstandard or pyzstd package")
def test_torchs_zstandard_round_trips_with_the_default_registry(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    expected = compressible()
    url = container.blob_url("zstd")
    dcp.save(expected, storage_writer=writer(url, account_credential, _extensions=[ZStandard()]))
    assert transformed_items(pickle.loads(container.download("zstd/.metadata")))

    assert_loads(expected, reader(url, account_credential))  # torch's default registry knows it
    copy_down(container, "zstd", tmp_path)
    assert_loads(expected, FileSystemReader(tmp_path))


# -- serialization formats --------------------------------------------------------------------------------


def test_serialization_format_torch_save_round_trips_with_file_system_writers_bytes(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    expected = state_dict()
    url = container.blob_url("torch-save")
    chosen = SerializationFormat.TORCH_SAVE
    dcp.save(expected, storage_writer=writer(url, account_credential, serialization_format=chosen))
    dcp.save(expected, storage_writer=FileSystemWriter(tmp_path, serialization_format=chosen))

    for name in names(container, "torch-save"):
        if name.endswith(".distcp"):
            assert container.download(f"torch-save/{name}") == (tmp_path / plain(name)).read_bytes()
    assert_loads(expected, reader(url, account_credential))


def test_serialization_format_safetensors_writes_what_file_system_writer_writes(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    safetensors = pytest.importorskip("safetensors.torch")  # a test extra
    expected = {key: value for key, value in state_dict().items() if isinstance(value, torch.Tensor)}
    chosen = SerializationFormat.SAFETENSORS
    dcp.save(expected, storage_writer=writer(container.blob_url("st"), account_credential, serialization_format=chosen))
    dcp.save(expected, storage_writer=FileSystemWriter(tmp_path, serialization_format=chosen))

    shards = [name for name in names(container, "st") if name.endswith(".distcp")]
    assert shards
    for name in shards:
        # The same tensors in the same format (the header's metadata names the file, so bytes differ).
        ours = safetensors.load(container.download(f"st/{name}"))
        theirs = safetensors.load((tmp_path / plain(name)).read_bytes())
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours)
    # (FileSystemReader, and so BlobStorageReader, loads only TORCH_SAVE files; safetensors files are
    # read with the safetensors package, as here, or torch's Hugging Face reader.)


def test_a_serialization_format_that_is_not_torchs_enum_is_rejected() -> None:
    # FileSystemWriter compares it with the enum's members: "torch_save" would write no tensor bytes.
    with pytest.raises(TypeError, match=r"serialization_format must be a .*SerializationFormat, not str"):
        BlobStorageWriter("https://myaccount.blob.core.windows.net/container/ckpt", serialization_format="torch_save")  # type: ignore[arg-type]


# -- verifying a checkpoint without loading it ----------------------------------------------------------


def corrupt(container: Container, name: str) -> None:
    """Change one byte of the blob ``name``, keeping its metadata (and so its recorded CRC-32)."""
    blob = container.client.get_blob_client(name)
    recorded = blob.get_blob_properties().metadata
    data = bytearray(container.download(name))
    data[len(data) // 2] ^= 0xFF
    blob.upload_blob(bytes(data), metadata=recorded, overwrite=True)


def test_verify_checks_every_file_against_its_recorded_crc32_and_names_the_bad_ones(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("verified")
    dcp.save(state_dict(), storage_writer=writer(url, account_credential, thread_count=3))
    shards = [name for name in names(container, "verified") if name.endswith(".distcp")]
    checker = reader(url, account_credential, block_size=64 * 1024, max_concurrency=2)  # many ranges per file

    healthy = checker.verify()

    assert healthy.ok and healthy.checked == [".metadata", *shards]
    assert healthy.mismatched == healthy.missing == healthy.unchecked == []
    assert healthy.checkpoint_id == url

    corrupt(container, f"verified/{shards[1]}")
    container.client.delete_blob(f"verified/{shards[2]}")
    broken = checker.verify()

    assert not broken.ok
    assert broken.mismatched == [shards[1]] and broken.missing == [shards[2]]
    assert broken.checked == [".metadata", shards[0], shards[1]]


def test_verify_lists_files_without_a_recorded_crc32_as_unchecked(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    dcp.save(state_dict(), storage_writer=FileSystemWriter(tmp_path, thread_count=2))
    copy_up(tmp_path, container, "copied")

    result = reader(container.blob_url("copied"), account_credential).verify()

    assert result.ok and result.checked == []
    assert result.unchecked == [".metadata", "__0_0.distcp", "__0_1.distcp"]


def test_verify_without_a_checkpoint_raises_file_not_found(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    with pytest.raises(FileNotFoundError, match="No such blob"):
        reader(container.blob_url("nothing"), account_credential).verify()


# -- a failed save commits nothing after it raised; an overwrite killed at any moment ------------------

UPLOADS = ("PutBlob", "PutBlock", "PutBlockList")
COMMITS = ("PutBlob", "PutBlockList")
# A shard file's path: torch's __<rank>_<n>.distcp, or with the writer's per-save token after the rank.
SHARD_PATH = re.compile(r"/__(\d+)_(?:([0-9a-f]+)_)?(\d+)\.distcp$")


def join_writer_threads() -> None:
    """Wait for torch's shard writer threads of every save: only then has each commit they make arrived."""
    for thread in threading.enumerate():
        if thread.name.endswith("(_write_files_from_queue)"):
            thread.join(timeout=120)
            assert not thread.is_alive(), f"{thread.name} is still writing"


@pytest.mark.parametrize("failing_shard", [0, 1])
@pytest.mark.usefixtures("no_backoff")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # torch's thread, before the fix
def test_a_save_that_fails_in_one_writer_thread_commits_nothing_after_it_raised(
    container: Container, azurite: Azurite, proxy: FaultProxy, failing_shard: int, seed: int
) -> None:
    # Two writer threads, one shard file each; every upload of one of them fails. The other shard's
    # commit is held 3 s at the proxy: if the failed save still sent it after dcp.save raised, it
    # lands after the retry below and replaces the retry's shard.
    url = proxy.url(container.blob_url("retried"))
    first_save: list[str] = []  # the token in the first save's shard names ("" for torch's own names)

    def of_first_save(seen: SeenRequest, shard: int, operations: tuple[str, ...]) -> bool:
        match = SHARD_PATH.search(seen.path)
        if match is None:
            return False
        if not first_save:
            first_save.append(match[2] or "")
        return seen.operation in operations and (match[2] or "") == first_save[0] and int(match[3]) == shard

    failing = proxy.add_fault(
        lambda seen: of_first_save(seen, failing_shard, UPLOADS), Respond(503, "ServerBusy"), times=None
    )
    proxy.add_fault(lambda seen: of_first_save(seen, 1 - failing_shard, COMMITS), Delay(3.0, hold_request=True))

    with _schedule.perturbed(seed), pytest.raises(CheckpointException, match="ServerBusy"):
        dcp.save(dcp_overwrite_run.versioned_state(1), storage_writer=writer(url, azurite.credential, thread_count=2))
    failing.times = failing.hits  # torch's own names repeat in every save: let the retry's through
    retried = dcp_overwrite_run.versioned_state(2)
    with _schedule.perturbed(seed):
        dcp.save(retried, storage_writer=writer(url, azurite.credential, thread_count=2))
    after_retry = etags(container, "retried")
    join_writer_threads()

    assert etags(container, "retried") == after_retry, "a shard of the failed save was committed after the retry"
    assert_loads(retried, reader(url, azurite.credential))
    assert len(after_retry) == 3  # .metadata and the retry's two shard files: nothing of the failed save


@pytest.mark.parametrize("failing_shard", [0, 2])
@pytest.mark.usefixtures("no_backoff")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # torch's thread prints it
def test_when_one_shard_file_fails_the_others_stop_and_nothing_is_left_under_the_prefix(
    container: Container, azurite: Azurite, proxy: FaultProxy, failing_shard: int
) -> None:
    # Four shard files, several blocks each: every upload of one of them is refused, while the
    # others' block uploads are slowed, so that they are still under way when it fails. They must
    # stop there and commit nothing: the prefix stays empty, also once torch's writer threads end.
    url = proxy.url(container.blob_url("stopped"))
    proxy.add_fault(to(f"__0_{failing_shard}.distcp"), Respond(503, "ServerBusy"), times=None)
    others = [to(f"__0_{shard}.distcp", ("PutBlock",)) for shard in range(4) if shard != failing_shard]
    proxy.add_fault(lambda seen: any(other(seen) for other in others), Delay(0.3), times=None)
    saving = writer(url, azurite.credential, thread_count=4, block_size=64 * 1024, max_concurrency=8)

    with pytest.raises(CheckpointException, match="ServerBusy"):
        dcp.save(state_dict(tensors=8, size=64 * 1024), storage_writer=saving)
    join_writer_threads()

    assert names(container, "stopped") == []
    assert not [seen for seen in proxy.requests if seen.operation == "PutBlockList"]  # no file even tried to commit


@contextlib.contextmanager
def savers(url: str, environment: dict[str, str]) -> Iterator[Callable[[int, threading.Event | None], str]]:
    """``overwrite(version, kill_when)``: save ``version`` at ``url`` in a new process, sent SIGKILL as
    soon as ``kill_when`` is set, unless the save returned first (see dcp_overwrite_run)."""
    command = [sys.executable, "-m", "tests.e2e.support.dcp_overwrite_run", url]
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE}
    with subprocess.Popen(command, cwd=REPOSITORY, env=environment, text=True, **pipes) as forker:
        assert forker.stdin is not None and forker.stdout is not None
        stdin, stdout = forker.stdin, forker.stdout

        def send(line: str) -> None:
            stdin.write(line + "\n")
            stdin.flush()

        def overwrite(version: int, kill_when: threading.Event | None) -> str:
            send(str(version))
            # Polls, rather than blocks on one of the two: the save may finish before kill_when is set.
            while kill_when is not None and not select.select([stdout], [], [], 0)[0]:
                if kill_when.wait(0.05):
                    send("kill")
                    break
            outcome = stdout.readline().strip()
            assert outcome == "killed" or outcome.startswith("finished "), f"the saver failed: {outcome!r}"
            return outcome

        try:
            yield overwrite
        finally:
            stdin.close()
            try:
                forker.wait(timeout=60)
            finally:
                forker.kill()


def nth_request(number: int) -> Callable[[SeenRequest], bool]:
    """Matches request ``number`` (counted from 0) from now on."""
    counter = iter(range(number + 1))
    return lambda seen: next(counter, None) == number


def metadata_put(seen: SeenRequest) -> bool:
    return seen.method == "PUT" and seen.path.endswith("/.metadata")


def loaded_version(url: str, credential: Any, candidates: tuple[int, int]) -> int:
    """Which of ``candidates`` the checkpoint at ``url`` loads as; fails on an error or a mix."""
    loaded = empty_like(dcp_overwrite_run.versioned_state(0))
    dcp.load(loaded, storage_reader=reader(url, credential))
    for version in candidates:
        expected = dcp_overwrite_run.versioned_state(version)
        if all(
            torch.equal(loaded[key], value) if isinstance(value, torch.Tensor) else loaded[key] == value
            for key, value in expected.items()
        ):
            return version
    pytest.fail(f"the checkpoint loaded as neither version {candidates[0]} nor {candidates[1]}: a mix")


def test_an_overwrite_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(
    container: Container, azurite: Azurite, proxy: FaultProxy, seed: int
) -> None:
    # The container changes only when a request takes effect, so killing a saver once its N-th
    # request has taken effect, for random N, visits the states an overwrite passes through
    # (parallel requests make the N-th a little different from save to save). A saver goes through
    # the proxy, which holds the chosen request's response (or the request itself, never forwarded)
    # while the saver is killed. The seed chooses the kills and perturbs the savers.
    chance = random.Random(seed)
    url = container.blob_url("killed")
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), _schedule.ENVIRONMENT_VARIABLE: f"{seed}:0.01"}
    dcp.save(dcp_overwrite_run.versioned_state(0), storage_writer=dcp_overwrite_run.writer(url))

    outcomes = []
    with savers(proxy.url(url), environment) as overwrite:
        overwrite(1, None)
        requests = len(proxy.requests)  # of one whole overwrite; later ones also delete what killed ones left
        current = loaded_version(url, azurite.credential, (1, 1))
        kills: list[tuple[str, Callable[[SeenRequest], bool], bool]] = [
            (f"after request {n}", nth_request(n), False) for n in sorted(chance.sample(range(requests), 10))
        ]
        kills += [
            ("before .metadata is replaced", metadata_put, True),
            ("after .metadata is replaced", metadata_put, False),
        ]
        for version, (moment, match, before) in enumerate(kills, start=2):
            reached = threading.Event()
            proxy.add_fault(match, Delay(600, hold_request=before, holding=reached))  # until the proxy stops
            outcome = overwrite(version, reached)
            previous, current = current, loaded_version(url, azurite.credential, (current, version))
            outcomes.append(f"{outcome} {moment}: {'new' if current == version else 'old'}")
            if moment.endswith("is replaced"):
                assert outcome == "killed"
                assert current == (version if moment.startswith("after") else previous), outcomes[-1]
    print(f"one overwrite made {requests} requests; " + ", ".join(outcomes))

    # A save that completes removes what the killed ones left.
    last = dcp_overwrite_run.versioned_state(20)
    dcp.save(last, storage_writer=dcp_overwrite_run.writer(url))
    assert loaded_version(url, azurite.credential, (20, 20)) == 20
    assert len(names(container, "killed")) == 3  # .metadata and two shard files


# -- ranged, coalesced, parallel loads ----------------------------------------------------------------


def is_shard_get(seen: SeenRequest) -> bool:
    return seen.operation == "GetBlob" and seen.path.endswith(".distcp")


def shard_gets(proxy: FaultProxy) -> list[SeenRequest]:
    return [seen for seen in proxy.requests if is_shard_get(seen)]


def bytes_asked(requests: list[SeenRequest]) -> int:
    return sum(last - first + 1 for first, last in (seen.byte_range or (0, -1) for seen in requests))


def test_a_partial_load_fetches_only_its_ranges(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    expected = state_dict(tensors=8, size=256 * 1024)  # 1 MiB per tensor, 8+ MiB in one shard file
    url = proxy.url(container.blob_url("partial"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential))
    shard_size = size_of(container, "partial", "__0_0.distcp")
    wanted = {"layer5.weight": torch.zeros(256 * 1024), "step": None}
    before = len(proxy.requests)

    dcp.load(
        wanted, storage_reader=reader(url, azurite.credential), planner=DefaultLoadPlanner(allow_partial_load=True)
    )

    assert torch.equal(wanted["layer5.weight"], expected["layer5.weight"]) and wanted["step"] == 1234
    reads = [seen for seen in shard_gets(proxy) if proxy.requests.index(seen) >= before]
    assert len(reads) == 2  # one for the tensor, one for the small "step" item far from it
    storage = pickle.loads(container.download("partial/.metadata")).storage_data
    wanted_lengths = sum(info.length for index, info in storage.items() if index.fqn in wanted)
    assert bytes_asked(reads) == wanted_lengths < shard_size / 7


def test_a_full_load_coalesces_many_items_into_few_requests(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    expected = state_dict(tensors=200, size=1024)  # 200 items of 4 KiB
    url = proxy.url(container.blob_url("many"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential))
    shard_size = size_of(container, "many", "__0_0.distcp")
    before = len(shard_gets(proxy))

    assert_loads(expected, reader(url, azurite.credential))
    reads = shard_gets(proxy)[before:]
    assert len(reads) == 1  # ~1.3 MiB of 205 items, in one ranged GET
    assert bytes_asked(reads) == shard_size


def test_a_shard_file_replaced_between_its_ranges_fails_the_load(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    # The file's first GET pins its version (no properties request first); the file is replaced as
    # the next GET, pinned with If-Match, reaches the proxy, so that GET must be refused.
    expected = state_dict(tensors=4, size=512 * 1024)
    url = proxy.url(container.blob_url("swapped"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential))
    (shard,) = [name for name in names(container, "swapped") if name.endswith(".distcp")]
    replaced = threading.Event()

    def replace_at_second_range(seen: SeenRequest) -> bool:
        if is_shard_get(seen) and "if-match" in seen.headers and not replaced.is_set():
            container.upload(f"swapped/{shard}", b"another version")  # straight to the emulator
            replaced.set()
        return False

    proxy.add_fault(replace_at_second_range, Respond(500), times=None)  # (the matcher acts; it never matches)
    loaded = empty_like(expected)

    with pytest.raises(CheckpointException, match="BlobModifiedDuringReadError"):
        dcp.load(loaded, storage_reader=reader(url, azurite.credential, block_size=MiB, max_concurrency=4))
    assert replaced.is_set()
    assert [seen.operation for seen in proxy.requests if seen.path.endswith(shard)].count("GetBlobProperties") == 0


def test_spans_of_one_file_wait_for_its_first_answer_under_perturbation(
    container: Container, azurite: Azurite, proxy: FaultProxy, seed: int
) -> None:
    # Two shard files of eight 1 MiB tensors, fetched as many spans of 1 MiB side by side: every span
    # but a file's first waits for that first answer's ETag. Once loaded whole; once with the first
    # GET of one file refused, which every span of that file must then fail with.
    expected = state_dict(tensors=16, size=256 * 1024)
    url = proxy.url(container.blob_url("spans"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential, thread_count=2))
    options = {"block_size": MiB // 2, "max_concurrency": 4}

    with _schedule.perturbed(seed):
        assert_loads(expected, reader(url, azurite.credential, **options))

    refused = proxy.add_fault(
        lambda seen: is_shard_get(seen) and "if-match" not in seen.headers and "_1.distcp" in seen.path,
        Respond(403, "AuthorizationFailure"),
        times=None,
    )
    with _schedule.perturbed(seed), pytest.raises(CheckpointException, match="AuthorizationFailure"):
        dcp.load(empty_like(expected), storage_reader=reader(url, azurite.credential, **options))
    assert refused.hits == 1  # the file's other spans waited for its first answer and failed with it


def test_a_missing_shard_file_fails_the_load_naming_it(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    dcp.save(state_dict(), storage_writer=writer(container.blob_url("gone"), account_credential, thread_count=2))
    shard = [name for name in names(container, "gone") if name.endswith(".distcp")][1]
    container.client.delete_blob(f"gone/{shard}")

    with pytest.raises(CheckpointException) as raised:
        dcp.load(empty_like(state_dict()), storage_reader=reader(container.blob_url("gone"), account_credential))
    assert "FileNotFoundError" in str(raised.value) and shard in str(raised.value), str(raised.value)


def test_large_ranges_are_split_into_parallel_requests(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    expected = state_dict(tensors=4, size=512 * 1024)  # 4 x 2 MiB
    url = proxy.url(container.blob_url("big"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential))
    # The file's first GET (of its small first item) goes alone: its answer pins the version that
    # the others ask for with If-Match. A tensor's 2 MiB then goes as three ranged GETs of 1 MiB or less.
    gather = Gather(parties=3)
    shard_get = to("__0_0.distcp", ("GetBlob",))
    proxy.add_fault(lambda seen: shard_get(seen) and "if-match" in seen.headers, gather, times=3)

    assert_loads(expected, reader(url, azurite.credential, block_size=MiB, max_concurrency=4))
    assert gather.opened.is_set(), "three ranged GETs were never in flight together"


def test_shard_files_are_read_in_parallel(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    expected = state_dict(tensors=8)
    url = proxy.url(container.blob_url("wide"))
    dcp.save(expected, storage_writer=writer(url, azurite.credential, thread_count=4))
    gather = Gather(parties=4)
    proxy.add_fault(is_shard_get, gather, times=4)

    assert_loads(expected, reader(url, azurite.credential))
    assert gather.opened.is_set(), "the four shard files were never read at the same time"


# -- world size 2 -------------------------------------------------------------------------------------


def spawn(world_size: int, action: str, wrapping: str, url: str, out_dir: pathlib.Path) -> list[dict[str, Any]]:
    out_dir.mkdir()
    if world_size == 1:
        dcp_worker.run(action, wrapping, 1, url, out_dir / "rank0.json")
    else:
        with tempfile.TemporaryDirectory() as store:
            torch.multiprocessing.spawn(
                dcp_worker.rank_main,
                args=(world_size, f"{store}/store", action, wrapping, url, str(out_dir)),
                nprocs=world_size,
            )
    return [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world_size)]


@pytest.mark.parametrize("wrapping", ["ddp", "fsdp"])
@pytest.mark.parametrize(("save_world", "load_world"), [(2, 1), (1, 2)], ids=["save-2-load-1", "save-1-load-2"])
def test_distributed_save_and_resharded_load(
    container: Container, tmp_path: pathlib.Path, wrapping: str, save_world: int, load_world: int
) -> None:
    url = container.blob_url(f"{wrapping}/{save_world}-{load_world}")

    saved = spawn(save_world, "save", wrapping, url, tmp_path / "saved")
    loaded = spawn(load_world, "load", wrapping, url, tmp_path / "loaded")

    assert all(report == saved[0] for report in saved)  # every saving rank saw the same full state
    assert all(report == saved[0] for report in loaded)  # and every loading rank got it back
    files = plain_names(container, f"{wrapping}/{save_world}-{load_world}")
    assert files == [".metadata", *(f"__{rank}_{n}.distcp" for rank in range(save_world) for n in range(2))]
    assert len(tokens(container, f"{wrapping}/{save_world}-{load_world}")) == 1  # the coordinator's, for all ranks


# -- bad input -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [url for url, accepted in CHECKPOINT_URLS.items() if not accepted])
def test_a_url_that_is_not_a_blob_prefix_is_rejected(url: str) -> None:
    for make in (BlobStorageWriter, BlobStorageReader):
        with pytest.raises(ValueError):
            make(url, credential=False)
        assert not make.validate_checkpoint_id(url)
    assert BlobStorageWriter.validate_checkpoint_id("https://myaccount.blob.core.windows.net/container/ckpt")


def test_options_out_of_range_are_rejected() -> None:
    url = "https://myaccount.blob.core.windows.net/container/ckpt"
    with pytest.raises(ValueError, match="thread_count"):
        BlobStorageWriter(url, thread_count=0)
    with pytest.raises(ValueError, match="block_size"):
        BlobStorageReader(url, block_size=0)
    with pytest.raises(TypeError, match="Unsupported credential"):
        BlobStorageReader(url, credential="account-key")  # type: ignore[arg-type]


def test_a_missing_checkpoint_names_the_url_without_its_sas(container: Container) -> None:
    url = f"{container.blob_url('nothing-here')}?{container.container_sas()}"

    with pytest.raises(CheckpointException) as error:
        dcp.load(empty_like(state_dict(tensors=1)), storage_reader=BlobStorageReader(url, credential=False))

    message = root_error(error.value)
    assert f"No such blob (is a checkpoint saved here?): '{container.blob_url('nothing-here')}/.metadata'" in message
    assert "sig=" not in message


@pytest.mark.parametrize(
    ("wanted", "message"),
    [
        ({"not.in.checkpoint": torch.zeros(3)}, "Missing key in checkpoint state_dict: not.in.checkpoint"),
        ({"layer0.weight": torch.zeros(3)}, "Size mismatch"),
    ],
)
def test_mismatched_state_dicts_surface_dcps_own_error(
    container: Container, account_credential: AzureNamedKeyCredential, wanted: dict[str, Any], message: str
) -> None:
    url = container.blob_url("mismatch")
    dcp.save(state_dict(tensors=1), storage_writer=writer(url, account_credential))

    with pytest.raises(CheckpointException, match=message):
        dcp.load(wanted, storage_reader=reader(url, account_credential))


def test_io_of_the_default_planner_reads_bytes_items(container: Container, account_credential: Any) -> None:
    """Non-tensor values (BYTE_IO items) come back as the same Python objects."""
    expected = {"config": {"lr": 0.1, "layers": [4, 8]}, "blob": io.BytesIO(b"raw bytes")}
    url = container.blob_url("objects")
    dcp.save(expected, storage_writer=writer(url, account_credential))

    loaded: dict[str, Any] = {"config": {"lr": None, "layers": None}, "blob": io.BytesIO()}
    dcp.load(loaded, storage_reader=reader(url, account_credential))

    assert loaded["config"] == {"lr": 0.1, "layers": [4, 8]}
    assert loaded["blob"].getvalue() == b"raw bytes"
