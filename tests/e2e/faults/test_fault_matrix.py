"""Every fault on every path: BlobIO read and write, both datasets with DataLoader workers, the Lightning
plugin, and the DCP writer and reader, each through the fault-injecting proxy in front of Azurite.

A transient fault (the first matching request, or the N-th) must be survived: reads return exactly the
right bytes, writes commit exactly the right content, datasets yield every sample once. A persistent fault
must end in a clear error after bounded attempts: nothing committed, the previous content intact, no
loadable partial checkpoint. Every case also checks that its fault really hit a request, so that none can
pass without being tested. pytest-timeout turns a hang into a failure.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import AzureError
from torch.distributed.checkpoint.api import CheckpointException
from torch.utils.data import DataLoader

from azstoragetorch._client import _pipeline
from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import Action, Delay, Fault, FaultProxy, Reset, ResetRequest, Respond, SeenRequest

pytestmark = [
    pytest.mark.usefixtures("no_backoff", "short_read_timeout"),
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning"),
    pytest.mark.timeout(120),
]

KiB = 1024
BLOCK = 64 * KiB
READ_TIMEOUT = 1.0  # seconds, for the stall faults; stalls last longer


@pytest.fixture
def short_read_timeout(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A 1-second read timeout, on connections made from now on (forked workers inherit it)."""
    monkeypatch.setattr(_pipeline, "READ_TIMEOUT_SECONDS", READ_TIMEOUT)
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())
    yield


# -- the faults ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FaultKind:
    name: str
    action: Action
    reads: bool = True
    writes: bool = True
    nth: bool = False  # hit the second request of the kind (the first when there is only one)


FAULTS = [
    FaultKind("reset-before-response", Reset(after_body_bytes=None)),
    FaultKind("reset-mid-response", Reset(after_body_bytes=500, hard=True), writes=False),
    FaultKind("truncated-body", Reset(after_body_bytes=500, hard=False), writes=False),
    FaultKind("reset-mid-request", ResetRequest(after_body_bytes=1000), reads=False),
    FaultKind("500", Respond(500, "InternalError")),
    FaultKind("503-retry-after", Respond(503, "ServerBusy", headers={"Retry-After": "1"})),
    FaultKind("503", Respond(503, "ServerBusy")),
    FaultKind("stall-past-timeout", Delay(READ_TIMEOUT * 3)),
    FaultKind("fail-nth", Respond(500, "InternalError"), nth=True),
]


def matching(operation: str, *, nth: bool, path_suffix: str = "") -> Callable[[SeenRequest], bool]:
    """Matches requests of ``operation`` (with ``nth``, only from the second one on)."""
    seen = 0

    def match(request: SeenRequest) -> bool:
        nonlocal seen
        if request.operation != operation or not request.path.endswith(path_suffix):
            return False
        seen += 1
        return not nth or seen >= 2

    return match


# -- the paths -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    azurite: Azurite
    proxy: FaultProxy
    container: Container
    credential: AzureNamedKeyCredential

    def url(self, name: str) -> str:
        return self.proxy.url(self.container.blob_url(name))


class Path:
    """One way of using the package; ``operation`` is the request kind the faults hit."""

    name = ""
    operation = ""
    reads = True
    nth_always_one = False  # only one request of the kind: "the N-th" is the first

    def prepare(self, env: Env) -> None:
        """Set up what the path needs, without faults."""

    def run(self, env: Env) -> None:
        """Do it through the proxy and check the result is exactly right."""
        raise NotImplementedError

    def expect_failure(self, env: Env) -> None:
        """Do it under a persistent fault and check how it fails."""
        raise NotImplementedError


class BlobIORead(Path):
    name, operation = "blobio-read", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.data = os.urandom(8 * BLOCK + 99)
        env.container.upload("blob", self.data)

    def run(self, env: Env) -> None:
        with BlobIO(env.url("blob"), "rb", credential=env.credential, block_size=BLOCK, max_concurrency=3) as f:
            assert f.read() == self.data

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError) as error:
            BlobIO(env.url("blob"), "rb", credential=env.credential, block_size=BLOCK).read()
        assert "blob" in str(error.value)


class BlobIOWrite(Path):
    name, operation, reads = "blobio-write-blocks", "PutBlock", False

    def prepare(self, env: Env) -> None:
        self.data = os.urandom(6 * BLOCK + 5)
        env.container.upload("blob", b"previous content")

    def run(self, env: Env) -> None:
        with BlobIO(env.url("blob"), "wb", credential=env.credential, block_size=BLOCK, max_concurrency=2) as f:
            f.write(self.data)
        assert env.container.download("blob") == self.data

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(FatalBlobIOWriteError):  # noqa: SIM117 (the BlobIO must be created inside)
            with BlobIO(env.url("blob"), "wb", credential=env.credential, block_size=BLOCK) as f:
                f.write(self.data)
        assert env.container.download("blob") == b"previous content"


class BlobIOCommit(BlobIOWrite):
    name, operation, nth_always_one = "blobio-write-commit", "PutBlockList", True


class DatasetWithWorkers(Path):
    operation = "GetBlob"
    iterable = False

    def prepare(self, env: Env) -> None:
        self.samples = {f"s/{index}": os.urandom(3000 + index) for index in range(8)}
        for name, data in self.samples.items():
            env.container.upload(name, data)

    def loader(self, env: Env) -> DataLoader[Any]:
        urls = [env.url(name) for name in self.samples]
        kind = IterableBlobDataset if self.iterable else BlobDataset
        dataset = kind.from_blob_urls(urls, credential=env.credential)
        return DataLoader(dataset, batch_size=None, num_workers=2, multiprocessing_context="fork")

    def run(self, env: Env) -> None:
        seen = Counter()
        for sample in self.loader(env):
            name = sample["url"].split("/", 5)[-1]
            assert sample["data"] == self.samples[name]
            seen[name] += 1
        assert seen == Counter(list(self.samples))  # every sample exactly once

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError, match=r"s/\d"):
            list(self.loader(env))


class MapDataset(DatasetWithWorkers):
    name = "map-dataset-2-workers"


class IterableDataset(DatasetWithWorkers):
    name, iterable = "iterable-dataset-2-workers", True


class LightningSave(Path):
    name, operation, reads = "lightning-save", "PutBlock", False

    def prepare(self, env: Env) -> None:
        self.plugin = AzureBlobCheckpointIO(
            credential=env.credential, account_url=env.proxy.url(env.azurite.account_url), block_size=BLOCK
        )
        self.previous = {"step": 1, "w": torch.zeros(10)}
        self.checkpoint = {"step": 2, "w": torch.randn(100_000)}
        with BlobIO(env.container.blob_url("last.ckpt"), "wb", credential=env.credential) as f:
            torch.save(self.previous, f)

    def run(self, env: Env) -> None:
        self.plugin.save_checkpoint(self.checkpoint, env.url("last.ckpt"))
        loaded = AzureBlobCheckpointIO(credential=env.credential, account_url=env.azurite.account_url).load_checkpoint(
            env.container.blob_url("last.ckpt")
        )
        assert loaded["step"] == 2 and torch.equal(loaded["w"], self.checkpoint["w"])

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(FatalBlobIOWriteError):
            self.plugin.save_checkpoint(self.checkpoint, env.url("last.ckpt"))
        plugin = AzureBlobCheckpointIO(credential=env.credential, account_url=env.azurite.account_url)
        assert plugin.load_checkpoint(env.container.blob_url("last.ckpt"))["step"] == 1  # the previous one


class LightningLoad(Path):
    name, operation = "lightning-load", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.checkpoint = {"step": 3, "w": torch.randn(100_000)}
        with BlobIO(env.container.blob_url("last.ckpt"), "wb", credential=env.credential) as f:
            torch.save(self.checkpoint, f)
        self.plugin = AzureBlobCheckpointIO(
            credential=env.credential, account_url=env.proxy.url(env.azurite.account_url), block_size=BLOCK
        )

    def run(self, env: Env) -> None:
        loaded = self.plugin.load_checkpoint(env.url("last.ckpt"))
        assert torch.equal(loaded["w"], self.checkpoint["w"])

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(AzureError):
            self.plugin.load_checkpoint(env.url("last.ckpt"))


class DcpSave(Path):
    name, operation, reads = "dcp-save", "PutBlob", False

    def prepare(self, env: Env) -> None:
        self.state = {f"w{index}": torch.randn(2000) for index in range(6)}

    def run(self, env: Env) -> None:
        dcp.save(
            self.state, storage_writer=BlobStorageWriter(env.url("ckpt"), credential=env.credential, thread_count=2)
        )
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        dcp.load(target, storage_reader=BlobStorageReader(env.container.blob_url("ckpt"), credential=env.credential))
        assert all(torch.equal(target[name], tensor) for name, tensor in self.state.items())

    def expect_failure(self, env: Env) -> None:
        with pytest.raises(CheckpointException):
            dcp.save(
                self.state, storage_writer=BlobStorageWriter(env.url("ckpt"), credential=env.credential, thread_count=2)
            )
        assert not env.container.exists("ckpt/.metadata")  # no loadable partial checkpoint


class DcpLoad(Path):
    name, operation = "dcp-load", "GetBlob"

    def prepare(self, env: Env) -> None:
        self.state = {f"w{index}": torch.randn(20_000) for index in range(6)}
        dcp.save(
            self.state,
            storage_writer=BlobStorageWriter(env.container.blob_url("ckpt"), credential=env.credential, thread_count=2),
        )

    def run(self, env: Env) -> None:
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        reader = BlobStorageReader(env.url("ckpt"), credential=env.credential, block_size=BLOCK)
        dcp.load(target, storage_reader=reader)
        assert all(torch.equal(target[name], tensor) for name, tensor in self.state.items())

    def expect_failure(self, env: Env) -> None:
        target = {name: torch.empty_like(tensor) for name, tensor in self.state.items()}
        with pytest.raises(CheckpointException):
            dcp.load(target, storage_reader=BlobStorageReader(env.url("ckpt"), credential=env.credential))


PATHS = [
    BlobIORead(),
    BlobIOWrite(),
    BlobIOCommit(),
    MapDataset(),
    IterableDataset(),
    LightningSave(),
    LightningLoad(),
    DcpSave(),
    DcpLoad(),
]
CASES = [
    pytest.param(path, fault, id=f"{path.name}-{fault.name}")
    for path in PATHS
    for fault in FAULTS
    if (fault.reads if path.reads else fault.writes)
]


@pytest.fixture
def env(azurite: Azurite, proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential) -> Env:
    return Env(azurite, proxy, container, account_credential)


@pytest.mark.parametrize(("path", "fault"), CASES)
def test_a_transient_fault_is_survived_exactly(env: Env, path: Path, fault: FaultKind) -> None:
    path.prepare(env)
    nth = fault.nth and not path.nth_always_one
    injected: Fault = env.proxy.add_fault(matching(path.operation, nth=nth), fault.action, times=1)

    path.run(env)

    assert injected.hits == 1, f"the fault never hit a {path.operation} request"


PERSISTENT = [
    pytest.param(path, fault, id=f"{path.name}-{fault.name}")
    for path in PATHS
    for fault in FAULTS
    if fault.name in (("503", "reset-mid-response") if path.reads else ("503", "reset-mid-request"))
]


@pytest.mark.parametrize(("path", "fault"), PERSISTENT)
def test_a_persistent_fault_fails_clearly_and_loses_nothing(env: Env, path: Path, fault: FaultKind) -> None:
    path.prepare(env)
    injected = env.proxy.add_fault(matching(path.operation, nth=False), fault.action, times=None)

    path.expect_failure(env)

    assert injected.hits >= 2  # retried, then gave up


def test_a_read_that_stalls_every_time_gives_up_after_its_attempts(env: Env) -> None:
    path = BlobIORead()
    path.prepare(env)
    injected = env.proxy.add_fault(matching("GetBlob", nth=False), Delay(READ_TIMEOUT * 3), times=None)

    path.expect_failure(env)

    assert 2 <= injected.hits <= 1 + _pipeline.TRANSPORT_RETRIES
