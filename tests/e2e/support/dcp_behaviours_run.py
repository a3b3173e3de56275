"""The ranks of tests/e2e/dcp/test_dcp_torch_behaviours.py, run by ``torch.multiprocessing.spawn``.

Each rank joins a gloo group (world size 1 or 2) and runs every scenario in ``SCENARIOS`` in turn,
each under a blob prefix of its own, with ``BlobStorageWriter``/``BlobStorageReader``. A scenario compares what it loads with what it saved (``torch.equal`` for
tensors, ``==`` for other values) and records each comparison that fails; an exception it did not
expect is recorded too, and the next scenario runs. After each scenario the rank rewrites
``<out_dir>/rank<rank>.json``: ``{"threads<T>": {scenario: {"checks": n, "failures": [...], "error":
..., "seconds": ...}}}``. One run goes through the scenarios at each thread_count it is given.

The behaviours are the ones torch's own DCP tests check on ``FileSystemWriter``: ShardedTensor and
DTensor resharding, ``Stateful`` objects, ``no_dist``, entries that are bytes or Python objects,
sharded and plain tensors loaded into one another, overwrite, and one rank's writer failing.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import io
import json
import pathlib
import shutil
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from typing import IO, Any, cast

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import ContainerClient
from torch.distributed._shard import sharded_tensor
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torch.distributed._shard.sharding_spec import (
    ChunkShardingSpec,
    EnumerableShardingSpec,
    ShardingSpec,
    ShardMetadata,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._extension import StreamTransformExtension
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

CREDENTIAL = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
# The right account with a key that is not its key: every request that writer makes is refused (403).
WRONG_KEY = AzureNamedKeyCredential(ACCOUNT_NAME, base64.b64encode(b"not the account key" * 3).decode())
# Bounds how long a rank waits in a collective for a rank that broke out of a scenario; a run
# that works never comes near it.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=5)
ROWS, COLUMNS = 10, 20


class Checks:
    """The comparisons of one scenario on one rank; a failed one is recorded, not raised, so that the
    rank stays in step with the others (every rank must reach the same collectives)."""

    def __init__(self) -> None:
        self.count = 0
        self.failures: list[str] = []

    def equal(self, what: str, actual: Any, expected: torch.Tensor) -> None:
        self.count += 1
        if not isinstance(actual, torch.Tensor):
            self.failures.append(f"{what}: a {type(actual).__name__}, not a tensor")
        elif actual.dtype != expected.dtype or actual.shape != expected.shape or not torch.equal(actual, expected):
            self.failures.append(f"{what}: {_describe(actual)} differs from the expected {_describe(expected)}")

    def same(self, what: str, actual: Any, expected: Any) -> None:
        self.count += 1
        if actual != expected:
            self.failures.append(f"{what}: {actual!r} != expected {expected!r}")

    def true(self, what: str, condition: bool) -> None:
        self.count += 1
        if not condition:
            self.failures.append(what)


def _describe(tensor: torch.Tensor) -> str:
    return f"{tensor.dtype} {tuple(tensor.shape)} {tensor.flatten()[:4].tolist()}..."


@dataclasses.dataclass
class Scenario:
    """What a scenario function gets: this rank, the configuration, and where to store."""

    rank: int
    world_size: int
    thread_count: int
    container_url: str
    prefix: str  # of this scenario in the container, without a trailing "/"
    mesh: DeviceMesh
    shared_dir: str  # a local directory every rank sees (for torch's own FileSystemWriter)

    def url(self, name: str) -> str:
        return f"{self.container_url}/{self.prefix}/{name}"

    def writer(self, name: str, **options: Any) -> BlobStorageWriter:
        options.setdefault("credential", CREDENTIAL)
        return BlobStorageWriter(self.url(name), thread_count=self.thread_count, **options)

    def reader(self, name: str) -> BlobStorageReader:
        return BlobStorageReader(self.url(name), credential=CREDENTIAL)

    def blob_names(self, name: str) -> list[str]:
        """The blobs under the checkpoint ``name``, relative to it."""
        client = ContainerClient.from_container_url(self.container_url, credential=CREDENTIAL)
        with client:
            start = f"{self.prefix}/{name}/"
            return sorted(blob.name[len(start) :] for blob in client.list_blobs(name_starts_with=start))

    def metadata_etag(self, name: str) -> str | None:
        client = ContainerClient.from_container_url(self.container_url, credential=CREDENTIAL)
        with client:
            start = f"{self.prefix}/{name}/"
            for blob in client.list_blobs(name_starts_with=start):
                if blob.name == f"{start}.metadata":
                    return str(blob.etag)
        return None


def full(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The same values on every rank for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    if dtype.is_floating_point:
        return torch.randn(*shape, generator=generator).to(dtype)
    return torch.randint(-1000, 1000, shape, generator=generator, dtype=dtype)


# -- ShardedTensor -----------------------------------------------------------------------------------


def sharding_specs(world_size: int) -> dict[str, ShardingSpec]:
    """Shardings of a ROWS x COLUMNS tensor, each with shards on every rank (at world size 1, rank 0
    holds several shards of each)."""

    def on(rank: int) -> str:
        return f"rank:{rank % world_size}/cpu"

    return {
        "rows": ChunkShardingSpec(dim=0, placements=[on(0), on(1)]),
        "rows-in-4": ChunkShardingSpec(dim=0, placements=[on(0), on(1), on(1), on(0)]),
        "columns": ChunkShardingSpec(dim=1, placements=[on(1), on(0)]),
        "uneven": EnumerableShardingSpec(
            [
                ShardMetadata(shard_offsets=[0, 0], shard_sizes=[2, COLUMNS], placement=on(1)),
                ShardMetadata(shard_offsets=[2, 0], shard_sizes=[7, COLUMNS], placement=on(0)),
                ShardMetadata(shard_offsets=[9, 0], shard_sizes=[1, COLUMNS], placement=on(1)),
            ]
        ),
    }


def sharded_like(spec: ShardingSpec, whole: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> ShardedTensor:
    """A ShardedTensor of ``spec`` holding this rank's part of ``whole`` (zeros if ``None``)."""
    made = sharded_tensor.zeros(spec, ROWS, COLUMNS, dtype=dtype)
    if whole is not None:
        for shard in made.local_shards():
            shard.tensor.copy_(_part(whole, shard.metadata))
    return made


def _part(whole: torch.Tensor, metadata: ShardMetadata) -> torch.Tensor:
    (row, column), (rows, columns) = metadata.shard_offsets, metadata.shard_sizes
    return whole[row : row + rows, column : column + columns]


def check_sharded(checks: Checks, what: str, loaded: ShardedTensor, whole: torch.Tensor) -> None:
    shards = loaded.local_shards()
    checks.true(f"{what}: no local shard to compare", bool(shards))  # every sharding here gives each rank one
    for shard in shards:
        checks.equal(f"{what} at {shard.metadata.shard_offsets}", shard.tensor, _part(whole, shard.metadata))


def sharded_tensor_resharding(s: Scenario, checks: Checks) -> None:
    """Saved with each sharding, loaded into every other one (rows to columns, uneven, more shards)."""
    weight, counts = full(1, ROWS, COLUMNS), full(2, ROWS, COLUMNS, dtype=torch.int64)
    specs = sharding_specs(s.world_size)
    for saved_as, spec in specs.items():
        state = {"weight": sharded_like(spec, weight), "counts": sharded_like(spec, counts, torch.int64)}
        dcp.save(state, storage_writer=s.writer(saved_as))
    for saved_as in specs:
        for loaded_as, spec in specs.items():
            if loaded_as == saved_as:
                continue
            target = {"weight": sharded_like(spec, None), "counts": sharded_like(spec, None, torch.int64)}
            dcp.load(target, storage_reader=s.reader(saved_as))
            check_sharded(checks, f"weight saved {saved_as}, loaded {loaded_as}", target["weight"], weight)
            check_sharded(checks, f"counts saved {saved_as}, loaded {loaded_as}", target["counts"], counts)


# -- DTensor -----------------------------------------------------------------------------------------


def as_dtensor(s: Scenario, whole: torch.Tensor, placement: Placement) -> DTensor:
    return distribute_tensor(whole, s.mesh, [placement])


def check_dtensor(s: Scenario, checks: Checks, what: str, loaded: Any, whole: torch.Tensor) -> None:
    if not isinstance(loaded, DTensor):
        checks.true(f"{what}: loaded a {type(loaded).__name__}, not a DTensor", False)
        return
    (placement,) = loaded.placements
    if isinstance(placement, Shard):  # torch.chunk's split: the first ranks get one more row when uneven
        parts = torch.chunk(whole, s.world_size, dim=placement.dim)
        expected = parts[s.rank] if s.rank < len(parts) else whole.narrow(placement.dim, 0, 0)
    else:
        expected = whole
    checks.equal(f"{what}: this rank's part", loaded.to_local(), expected)
    checks.equal(f"{what}: the whole tensor", loaded.full_tensor(), whole)


def dtensor_resharding(s: Scenario, checks: Checks) -> None:
    """Saved sharded by rows, by columns and replicated; loaded into each other placement. The
    tensors do not divide evenly by the world size."""
    tensors = {"square": full(3, 8, 6), "odd": full(4, 7, 5, dtype=torch.float64), "ids": full(5, 9, dtype=torch.int64)}
    placements: dict[str, Callable[[torch.Tensor], Placement]] = {
        "rows": lambda _: Shard(0),
        "last-dim": lambda tensor: Shard(tensor.dim() - 1),
        "replicated": lambda _: Replicate(),
    }
    for saved_as, place in placements.items():
        state = {key: as_dtensor(s, value, place(value)) for key, value in tensors.items()}
        dcp.save(state, storage_writer=s.writer(saved_as))
    for saved_as in placements:
        for loaded_as, place in placements.items():
            if loaded_as == saved_as:
                continue
            target = {key: as_dtensor(s, torch.zeros_like(value), place(value)) for key, value in tensors.items()}
            dcp.load(target, storage_reader=s.reader(saved_as))
            for key, value in tensors.items():
                check_dtensor(s, checks, f"{key} saved {saved_as}, loaded {loaded_as}", target[key], value)


# -- Stateful ----------------------------------------------------------------------------------------


class TrainingState(Stateful):
    """An application's state as torch's DCP recipe keeps it: a model and optimizer (through
    get_state_dict/set_state_dict) and a step count, counting the calls DCP makes."""

    def __init__(self, seed: int) -> None:
        torch.manual_seed(seed)
        self.model = torch.nn.Linear(6, 4)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=0.1)
        self.model(torch.randn(3, 6)).sum().backward()
        self.optimizer.step()
        self.step = seed * 100
        self.state_dict_calls = 0
        self.load_state_dict_calls = 0

    def state_dict(self) -> dict[str, Any]:
        self.state_dict_calls += 1
        model, optimizer = get_state_dict(self.model, self.optimizer)
        return {"model": model, "optim": optimizer, "step": self.step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.load_state_dict_calls += 1
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state_dict["model"], optim_state_dict=state_dict["optim"]
        )
        self.step = state_dict["step"]

    def tensors(self) -> dict[str, torch.Tensor]:
        found = {f"model.{name}": value.detach().clone() for name, value in self.model.state_dict().items()}
        for index, moments in self.optimizer.state.items():
            found |= {f"optim.{index}.{name}": value.clone() for name, value in moments.items()}
        return found


def stateful(s: Scenario, checks: Checks) -> None:
    """dcp.save asks a Stateful for its state_dict; dcp.load hands the loaded one to load_state_dict,
    once, next to plain entries."""
    saved = TrainingState(seed=1)
    expected = saved.tensors()
    dcp.save({"app": saved, "extra": full(6, 5)}, storage_writer=s.writer("app"))
    checks.true(f"save called state_dict {saved.state_dict_calls} times", saved.state_dict_calls >= 1)
    checks.same("save called load_state_dict", saved.load_state_dict_calls, 0)

    loaded = TrainingState(seed=2)
    target: dict[str, Any] = {"app": loaded, "extra": torch.zeros(5)}
    dcp.load(target, storage_reader=s.reader("app"))

    checks.same("load_state_dict calls", loaded.load_state_dict_calls, 1)
    checks.same("step", loaded.step, 100)
    checks.equal("extra", target["extra"], full(6, 5))
    checks.same("tensors restored", sorted(loaded.tensors()), sorted(expected))
    for name, value in expected.items():
        checks.equal(name, loaded.tensors().get(name), value)
    # The optimizer works on from the loaded state: the same next step as the saved one takes.
    for state in (saved, loaded):
        state.optimizer.zero_grad()
        state.model(torch.ones(2, 6)).sum().backward()
        state.optimizer.step()
    checks.equal("weight after one more step", loaded.model.weight.detach(), saved.model.weight.detach())


# -- no_dist -----------------------------------------------------------------------------------------


def ranks_own_state(rank: int) -> dict[str, Any]:
    return {"weight": full(10 + rank, 64, 3), "bias": full(20 + rank, 3, dtype=torch.int32), "rank": rank}


def no_dist(s: Scenario, checks: Checks) -> None:
    """Each rank saves and loads a checkpoint of its own with no_dist=True, ignoring the process group:
    files named as rank 0's, no collective; another rank's checkpoint loads the same way."""
    own = ranks_own_state(s.rank)
    dcp.save(own, storage_writer=s.writer(f"rank{s.rank}"), no_dist=True)
    shards = [name for name in s.blob_names(f"rank{s.rank}") if name != ".metadata"]
    checks.true(
        f"no_dist shard files are named as rank 0's: {shards}",
        bool(shards) and all(name.startswith("__0_") for name in shards),
    )
    checks.true(".metadata written", ".metadata" in s.blob_names(f"rank{s.rank}"))
    torch.distributed.barrier()  # every rank's checkpoint is complete
    for rank in sorted({s.rank, (s.rank + 1) % s.world_size}):
        target: dict[str, Any] = {"weight": torch.zeros(64, 3), "bias": torch.zeros(3, dtype=torch.int32), "rank": -1}
        dcp.load(target, storage_reader=s.reader(f"rank{rank}"), no_dist=True)
        expected = ranks_own_state(rank)
        checks.equal(f"rank {rank}'s weight", target["weight"], expected["weight"])
        checks.equal(f"rank {rank}'s bias", target["bias"], expected["bias"])
        checks.same(f"rank {rank}'s rank", target["rank"], rank)


# -- entries that are bytes or Python objects --------------------------------------------------------


@dataclasses.dataclass
class RunInfo:
    """A picklable object of the test's own class (DCP stores it pickled, as a bytes entry)."""

    name: str
    step: int
    tags: tuple[str, ...]


def bytes_only(s: Scenario, checks: Checks) -> None:
    """A checkpoint with no tensor at all: raw bytes (io.BytesIO), lists, strings, a nested dict, an
    object of our own class; and entries only one rank has, which every rank can load."""
    raw = bytes(range(256)) * 40
    saved: dict[str, Any] = {
        "blob": io.BytesIO(raw),
        "empty": io.BytesIO(b""),
        "numbers": [1, 2.5, None],
        "text": "checkpoint π",
        "config": {"lr": 0.01, "betas": (0.9, 0.999)},
        "info": RunInfo("run-7", 7, ("a", "b")),
        f"rank{s.rank}.note": f"written by rank {s.rank}".encode(),
    }
    dcp.save(saved, storage_writer=s.writer("objects"))

    other = (s.rank + 1) % s.world_size
    target: dict[str, Any] = {
        "blob": io.BytesIO(),
        "empty": io.BytesIO(b"not empty"),
        "numbers": [],
        "text": "",
        "config": {"lr": 0.0, "betas": ()},
        "info": None,
        f"rank{other}.note": b"",
    }
    dcp.load(target, storage_reader=s.reader("objects"))

    checks.same("io.BytesIO", target["blob"].getvalue() if isinstance(target["blob"], io.BytesIO) else None, raw)
    checks.same("empty io.BytesIO", target["empty"].getvalue() if isinstance(target["empty"], io.BytesIO) else 0, b"")
    checks.same("list", target["numbers"], [1, 2.5, None])
    checks.same("str", target["text"], "checkpoint π")
    checks.same("nested dict", target["config"], {"lr": 0.01, "betas": (0.9, 0.999)})
    checks.same("object", target["info"], RunInfo("run-7", 7, ("a", "b")))
    checks.same(f"rank {other}'s entry", target[f"rank{other}.note"], f"written by rank {other}".encode())


# -- sharded and plain tensors loaded into one another ----------------------------------------------


def sharded_to_plain(s: Scenario, checks: Checks) -> None:
    """Saved as a ShardedTensor and a DTensor, loaded into plain tensors on every rank; and by rank 0
    alone (no_dist, as a single process would) into plain tensors."""
    first, second, third = full(30, ROWS, COLUMNS), full(31, ROWS, COLUMNS), full(32, 12, dtype=torch.int64)
    specs = sharding_specs(s.world_size)
    dcp.save(
        {
            "sharded": sharded_like(specs["uneven"], first),
            "dtensor": as_dtensor(s, second, Shard(1)),
            "ids": as_dtensor(s, third, Shard(0)),
        },
        storage_writer=s.writer("sharded"),
    )
    plain_targets = {
        "sharded": torch.zeros(ROWS, COLUMNS),
        "dtensor": torch.zeros(ROWS, COLUMNS),
        "ids": torch.zeros(12, dtype=torch.int64),
    }
    dcp.load(plain_targets, storage_reader=s.reader("sharded"))
    checks.equal("ShardedTensor into a tensor", plain_targets["sharded"], first)
    checks.equal("DTensor into a tensor", plain_targets["dtensor"], second)
    checks.equal("int64 DTensor into a tensor", plain_targets["ids"], third)
    if s.rank == 0:
        alone: dict[str, Any] = {"sharded": torch.zeros(ROWS, COLUMNS), "dtensor": torch.zeros(ROWS, COLUMNS)}
        dcp.load(alone, storage_reader=s.reader("sharded"), no_dist=True)
        checks.equal("ShardedTensor into a tensor, one process", alone["sharded"], first)
        checks.equal("DTensor into a tensor, one process", alone["dtensor"], second)
    torch.distributed.barrier()


def plain_to_sharded(s: Scenario, checks: Checks) -> None:
    """Saved as plain tensors, by every rank (replicated) and by rank 0 alone (no_dist, as a single
    process would); loaded into ShardedTensors and DTensors."""
    first, second = full(40, ROWS, COLUMNS), full(41, ROWS, COLUMNS, dtype=torch.float64)
    specs = sharding_specs(s.world_size)
    dcp.save({"a": first, "b": second}, storage_writer=s.writer("replicated"))
    if s.rank == 0:
        dcp.save({"a": first, "b": second}, storage_writer=s.writer("one-process"), no_dist=True)
    torch.distributed.barrier()
    for saved_as in ("replicated", "one-process"):
        target: dict[str, Any] = {
            "a": sharded_like(specs["rows-in-4"], None),
            "b": as_dtensor(s, torch.zeros_like(second), Shard(1)),
        }
        dcp.load(target, storage_reader=s.reader(saved_as))
        check_sharded(checks, f"{saved_as} tensor into a ShardedTensor", target["a"], first)
        check_dtensor(s, checks, f"{saved_as} tensor into a DTensor", target["b"], second)


# -- overwrite ---------------------------------------------------------------------------------------


def versioned(version: int) -> dict[str, Any]:
    return {"weight": full(50 + version, 32, 8), "step": version}


def load_version(s: Scenario, name: str) -> dict[str, Any]:
    target: dict[str, Any] = {"weight": torch.zeros(32, 8), "step": -1}
    dcp.load(target, storage_reader=s.reader(name))
    return target


def check_version(checks: Checks, what: str, loaded: dict[str, Any], version: int) -> None:
    checks.equal(f"{what}: weight", loaded["weight"], versioned(version)["weight"])
    checks.same(f"{what}: step", loaded["step"], version)


def failures_of(error: CheckpointException) -> dict[int, tuple[str, str]]:
    return {rank: (type(failure).__name__, str(failure)) for rank, (failure, _) in error.failures.items()}


def refusals(save: Callable[[], object]) -> dict[int, tuple[str, str]] | None:
    """What ``save`` fails with, by rank; ``None`` if it did not fail."""
    try:
        save()
    except CheckpointException as error:
        return failures_of(error)
    return None


def overwrite(s: Scenario, checks: Checks) -> None:
    """The default replaces the checkpoint (and its shard files); overwrite=False refuses on every
    rank with torch's error, as FileSystemWriter does, and leaves the checkpoint as it was."""
    dcp.save(versioned(1), storage_writer=s.writer("latest", overwrite=False))  # nothing there yet
    check_version(checks, "first save with overwrite=False", load_version(s, "latest"), 1)
    first_files = set(s.blob_names("latest"))
    torch.distributed.barrier()  # every rank listed before the next save replaces them

    dcp.save(versioned(2), storage_writer=s.writer("latest"))
    check_version(checks, "saved again with the default", load_version(s, "latest"), 2)
    left = set(s.blob_names("latest")) & first_files
    checks.same("files of the replaced checkpoint left", sorted(left), [".metadata"])

    before = s.metadata_etag("latest")
    ours = refusals(lambda: dcp.save(versioned(3), storage_writer=s.writer("latest", overwrite=False)))
    torch.distributed.barrier()
    check_version(checks, "after overwrite=False refused", load_version(s, "latest"), 2)
    checks.same(".metadata after the refusal", s.metadata_etag("latest"), before)

    # torch's FileSystemWriter in the same place on disk, for what it raises and on which ranks.
    directory = f"{s.shared_dir}/overwrite"
    dcp.save(versioned(1), storage_writer=FileSystemWriter(directory, thread_count=s.thread_count))
    torchs = refusals(lambda: dcp.save(versioned(3), storage_writer=FileSystemWriter(directory, overwrite=False)))
    checks.true("torch's FileSystemWriter refused", torchs is not None)
    checks.same("refusal (by rank: type, message) against FileSystemWriter's", ours, torchs)
    checks.same(
        "refusal on this rank",
        (ours or {}).get(s.rank),
        ("RuntimeError", "Checkpoint already exists and self.overwrite=False."),
    )


# -- one rank's writer fails -------------------------------------------------------------------------


class FailingWrites(StreamTransformExtension):
    """A stream transform whose every write fails: given to one rank's writer, its shard files fail
    part way (after the file was opened, before it could commit), while the rest of that writer,
    such as the coordinator's write of .metadata, works."""

    @staticmethod
    def registry_name() -> str:
        return "azstoragetorch-tests.failing-writes"

    @staticmethod
    def from_descriptor(version: str) -> FailingWrites:
        return FailingWrites()

    def get_descriptor(self) -> str:
        return f"{self.registry_name()}/1"

    def transform_to(self, output: IO[bytes]) -> IO[bytes]:
        return cast(IO[bytes], _FailingStream())

    def transform_from(self, input: IO[bytes]) -> IO[bytes]:
        raise NotImplementedError("nothing is loaded from a save that failed")


class _FailingStream(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(INJECTED)


INJECTED = "injected failure of a shard file's write"


def sharded_version(s: Scenario, version: int) -> dict[str, Any]:
    """Every rank holds rows of the tensor, so every rank has shard data to write."""
    return {"weight": as_dtensor(s, full(50 + version, 32, 8), Shard(0)), "step": version}


def check_sharded_version(s: Scenario, checks: Checks, what: str, name: str, version: int) -> None:
    target: dict[str, Any] = {"weight": as_dtensor(s, torch.zeros(32, 8), Shard(0)), "step": -1}
    try:
        dcp.load(target, storage_reader=s.reader(name))
    except CheckpointException as error:  # raised on every rank alike: the ranks stay in step
        checks.true(f"{what}: the checkpoint does not load: {failures_of(error)}", False)
        return
    check_dtensor(s, checks, f"{what}: weight", target["weight"], full(50 + version, 32, 8))
    checks.same(f"{what}: step", target["step"], version)


def failure_on_one_rank(s: Scenario, checks: Checks) -> None:
    """One rank's writer fails: refused every request (a wrong account key), or its shard files' writes
    fail part way. dcp.save raises on every rank, naming that rank alone; no .metadata is committed,
    so a new checkpoint does not exist and an old one loads as it was. Then a save with working
    writers succeeds in the same places."""
    failures: dict[str, tuple[dict[str, Any], str]] = {
        "refused": ({"credential": WRONG_KEY}, "403"),
        "failing-writes": ({"_extensions": [FailingWrites()]}, INJECTED),
    }
    for failing in sorted({0, s.world_size - 1}):  # the coordinator, and a rank that is not
        for kind, (options, sign) in failures.items():
            old, new = f"old-{kind}-rank{failing}", f"new-{kind}-rank{failing}"
            dcp.save(sharded_version(s, 1), storage_writer=s.writer(old))
            before = s.metadata_etag(old)
            torch.distributed.barrier()

            for name in (old, new):
                try:
                    dcp.save(
                        sharded_version(s, 2), storage_writer=s.writer(name, **options if s.rank == failing else {})
                    )
                except CheckpointException as error:
                    failed = failures_of(error)
                    checks.same(f"{name}: the ranks that failed", sorted(failed), [failing])
                    kind_of, message = failed.get(failing, ("", ""))
                    checks.true(f"{name}: the failure says what failed: {kind_of}: {message[:300]}", sign in message)
                else:
                    checks.true(f"{name}: dcp.save returned although rank {failing}'s writer failed", False)
                torch.distributed.barrier()

            checks.same(f"{old}: .metadata after the failed save", s.metadata_etag(old), before)
            check_sharded_version(s, checks, f"{old}: after the failed save", old, 1)
            checks.same(f"{new}: .metadata after the failed save", s.metadata_etag(new), None)
            torch.distributed.barrier()

            for name in (old, new):
                dcp.save(sharded_version(s, 3), storage_writer=s.writer(name))
                check_sharded_version(s, checks, f"{name}: saved again with working writers", name, 3)


SCENARIOS: dict[str, Callable[[Scenario, Checks], None]] = {
    "sharded_tensor_resharding": sharded_tensor_resharding,
    "dtensor_resharding": dtensor_resharding,
    "stateful": stateful,
    "no_dist": no_dist,
    "bytes_only": bytes_only,
    "sharded_to_plain": sharded_to_plain,
    "plain_to_sharded": plain_to_sharded,
    "overwrite": overwrite,
    "failure_on_one_rank": failure_on_one_rank,
}


def rank_main(
    rank: int, world_size: int, store_path: str, container_url: str, thread_counts: list[int], out_dir: str
) -> None:
    """Every scenario at each of ``thread_counts``, under ``world<N>-threads<T>/<scenario>`` in the container."""
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size, timeout=COLLECTIVE_TIMEOUT
    )
    warnings.filterwarnings("ignore", category=UserWarning)  # torch: ShardedTensor and no_dist notices
    warnings.filterwarnings("ignore", category=FutureWarning)
    out = pathlib.Path(out_dir, f"rank{rank}.json")
    results: dict[str, dict[str, Any]] = {}
    shared = [tempfile.mkdtemp(prefix="dcp-behaviours-") if rank == 0 else ""]
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        torch.distributed.broadcast_object_list(shared)
        for thread_count in thread_counts:
            for name, scenario in SCENARIOS.items():
                prefix = f"world{world_size}-threads{thread_count}/{name}"
                context = Scenario(rank, world_size, thread_count, container_url, prefix, mesh, f"{shared[0]}/{prefix}")
                checks = Checks()
                error = None
                began = time.monotonic()
                try:
                    scenario(context, checks)
                except (Exception, CheckpointException):  # (torch's is a BaseException)
                    error = traceback.format_exc()
                took = round(time.monotonic() - began, 2)
                report = {"checks": checks.count, "failures": checks.failures, "error": error, "seconds": took}
                results.setdefault(f"threads{thread_count}", {})[name] = report
                out.write_text(json.dumps(results))
                torch.distributed.barrier()
        torch.distributed.barrier()  # every rank is done with the shared directory
    finally:
        torch.distributed.destroy_process_group()
        if rank == 0:
            shutil.rmtree(shared[0], ignore_errors=True)
