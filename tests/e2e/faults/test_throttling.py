"""Throttling through :class:`FaultProxy`: a throttled account is waited out on every path.

Azure answers an overloaded account with ``503 ServerBusy`` (or ``500 OperationTimedOut``), sometimes
with ``Retry-After``, for as long as the load lasts: a minute or more is ordinary. No test here waits
for real. ``time.sleep`` (through which the retry policy waits) is replaced by a recorder, and the
tests count requests and add up the waits the policy asked for.
"""

from __future__ import annotations

import itertools
import os
import time
import traceback
from collections.abc import Callable

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from azstoragetorch._client import AzStorageTorchContainerClient, ContainerUrl
from azstoragetorch.datasets import BlobDataset
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions
from tests.conftest import Container
from tests.e2e.faults.test_faults import nth_block
from tests.e2e.support.fault_proxy import FaultProxy, Respond, SeenRequest

KiB = 1024
BLOCK = 16 * KiB
# Before retries were reworked, a request was given up after 4 attempts (the SDK's default of 3
# status retries capped retry_total=5), over 2 to 4 seconds: a throttle of 8 answers outlasts that.
THROTTLED_ANSWERS = 8


@pytest.fixture
def waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The waits asked of ``time.sleep`` during the test, which return at once."""
    recorded: list[float] = []
    monkeypatch.setattr(time, "sleep", recorded.append)
    return recorded


def throttle(proxy: FaultProxy, match: Callable[[SeenRequest], bool], times: int = THROTTLED_ANSWERS) -> None:
    proxy.add_fault(match, Respond(503, "ServerBusy"), times=times)


def operation(name: str) -> Callable[[SeenRequest], bool]:
    return lambda seen: seen.operation == name


def test_a_throttled_read_is_ridden_out_for_more_than_a_minute(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    data = os.urandom(3 * BLOCK)
    url = proxy.url(container.upload("blob", data))
    throttle(proxy, operation("GetBlob"))
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK) as f:
        assert f.read() == data
    assert proxy.count("GetBlob") == THROTTLED_ANSWERS + 3
    # The default policy backs off exponentially: the waits it asked for span more than a minute.
    assert len(waits) == THROTTLED_ANSWERS and sum(waits) > 60
    assert all(later >= earlier for earlier, later in itertools.pairwise(waits[:4]))
    # Each throttled answer was read, so its connection carried the next attempt.
    assert proxy.connections_accepted <= 3


def test_a_throttled_block_upload_is_ridden_out(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    data = os.urandom(4 * BLOCK + 5)
    throttle(proxy, nth_block(0))
    with BlobIO(proxy.url(container.blob_url("out")), "wb", credential=account_credential, block_size=BLOCK) as f:
        f.write(data)
    assert proxy.count("PutBlock") == 5 + THROTTLED_ANSWERS and proxy.count("PutBlockList") == 1
    assert container.download("out") == data


@pytest.mark.parametrize(("operation_name", "size"), [("PutBlockList", 3 * BLOCK + 1), ("PutBlob", BLOCK - 1)])
def test_a_throttled_commit_is_ridden_out(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    waits: list[float],
    operation_name: str,
    size: int,
) -> None:
    data = os.urandom(size)
    throttle(proxy, operation(operation_name))
    with BlobIO(proxy.url(container.blob_url("out")), "wb", credential=account_credential, block_size=BLOCK) as f:
        f.write(data)
    assert proxy.count(operation_name) == THROTTLED_ANSWERS + 1
    assert container.download("out") == data


def test_a_throttled_listing_is_ridden_out(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    for name in ("a", "b"):
        container.upload(name, name.encode())
    throttle(proxy, operation("GET comp=list"))
    dataset = BlobDataset.from_container_url(proxy.url(container.url), credential=account_credential)
    assert [sample["data"] for sample in dataset] == [b"a", b"b"]
    assert proxy.count("GET comp=list") == THROTTLED_ANSWERS + 1


def test_retry_after_is_honoured_but_never_shortens_the_backoff(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    url = proxy.url(container.upload("blob", b"content"))
    retry = RetryOptions(retry_backoff_factor=0.5, retry_backoff_max=30)
    proxy.add_fault(operation("GetBlob"), Respond(503, "ServerBusy", headers={"Retry-After": "7"}), times=1)
    proxy.add_fault(operation("GetBlob"), Respond(503, "ServerBusy", headers={"Retry-After": "0"}), times=1)
    proxy.add_fault(operation("GetBlob"), Respond(503, "ServerBusy", headers={"Retry-After": "600"}), times=1)
    with BlobIO(url, "rb", credential=account_credential, retry=retry) as f:
        assert f.read() == b"content"
    assert waits[0] == 7  # as the service asked
    assert 0.5 <= waits[1] <= 1.0  # the second backoff (0.5 * 2, jittered down to half), not zero
    assert waits[2] == 30  # capped at retry_backoff_max


def test_the_retry_option_sets_the_attempts_and_the_backoff(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    url = proxy.url(container.upload("blob", b"content"))
    proxy.add_fault(operation("GetBlob"), Respond(503, "ServerBusy"), times=None)
    retry = RetryOptions(retry_total=4, retry_backoff_factor=0.01, retry_backoff_max=0.03)
    with pytest.raises(HttpResponseError, match="ServerBusy"):
        BlobIO(url, "rb", credential=account_credential, retry=retry)
    assert proxy.count("GetBlob") == 5
    bounds = [0.01, 0.02, 0.03, 0.03]  # doubling from the factor, capped at the maximum
    assert len(waits) == 4 and all(bound / 2 <= wait <= bound for wait, bound in zip(waits, bounds, strict=True))


def test_no_retries_fails_a_write_at_the_first_throttled_block(
    proxy: FaultProxy, container: Container, account_credential: AzureNamedKeyCredential, waits: list[float]
) -> None:
    proxy.add_fault(operation("PutBlock"), Respond(503, "ServerBusy"), times=1)
    url = proxy.url(container.blob_url("out"))
    f = BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, retry=RetryOptions(retry_total=0))
    with pytest.raises(FatalBlobIOWriteError, match="ServerBusy"), f:
        f.write(os.urandom(3 * BLOCK))
    assert waits == [] and proxy.count("PutBlockList") == 0 and not container.exists("out")


def test_a_listing_client_keeps_its_retry_options_for_its_blobs(proxy: FaultProxy, container: Container) -> None:
    container.upload("a", b"a")
    retry = RetryOptions(retry_total=1)
    listing = AzStorageTorchContainerClient(ContainerUrl.parse(proxy.url(container.url)), False, retry=retry)
    assert listing.blob_client("a").retry is retry


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"retry_total": -1}, ValueError),
        ({"retry_total": 1.5}, TypeError),
        ({"retry_total": True}, TypeError),
        ({"retry_backoff_factor": -0.1}, ValueError),
        ({"retry_backoff_max": float("inf")}, ValueError),
        ({"retry_backoff_max": "60"}, TypeError),
    ],
)
def test_bad_retry_options_name_the_problem(options: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error, match=next(iter(options))):
        RetryOptions(**options)  # type: ignore[arg-type]


def test_retry_must_be_retry_options(container: Container) -> None:
    with pytest.raises(TypeError, match="RetryOptions"):
        BlobIO(container.blob_url("blob"), "wb", retry={"retry_total": 3})  # type: ignore[arg-type]


NO_RETRIES = RetryOptions(retry_total=0)


def _lightning_save(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    plugin = AzureBlobCheckpointIO(credential, account_url=proxy.url(container.url).rsplit("/", 1)[0], retry=NO_RETRIES)
    throttle(proxy, lambda seen: seen.method == "PUT", times=1)
    plugin.save_checkpoint({"step": 1}, proxy.url(container.blob_url("model.ckpt")))


def _lightning_load(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    import torch

    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    with BlobIO(container.blob_url("model.ckpt"), "wb", credential=credential) as f:
        torch.save({"step": 1}, f)
    plugin = AzureBlobCheckpointIO(credential, account_url=proxy.url(container.url).rsplit("/", 1)[0], retry=NO_RETRIES)
    throttle(proxy, operation("GetBlob"), times=1)
    plugin.load_checkpoint(proxy.url(container.blob_url("model.ckpt")))


def _lightning_listing(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    container.upload("ckpts/a.ckpt", b"x")
    plugin = AzureBlobCheckpointIO(credential, account_url=proxy.url(container.url).rsplit("/", 1)[0], retry=NO_RETRIES)
    throttle(proxy, lambda seen: seen.query.get("comp") == "list", times=1)
    plugin._paths.filesystem().ls(proxy.url(container.blob_url("ckpts")))


def _dcp_save(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageWriter

    throttle(proxy, lambda seen: seen.method == "PUT", times=1)
    writer = BlobStorageWriter(proxy.url(container.blob_url("dcp")), credential=credential, retry=NO_RETRIES)
    dcp.save({"w": torch.ones(4)}, storage_writer=writer, no_dist=True)


def _dcp_load(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    import torch
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter

    dcp.save({"w": torch.ones(4)}, storage_writer=BlobStorageWriter(container.blob_url("dcp"), credential=credential))
    throttle(proxy, operation("GetBlob"), times=1)
    reader = BlobStorageReader(proxy.url(container.blob_url("dcp")), credential=credential, retry=NO_RETRIES)
    dcp.load({"w": torch.zeros(4)}, storage_reader=reader, no_dist=True)


def _map_dataset_read(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    url = proxy.url(container.upload("sample", b"x"))
    dataset = BlobDataset.from_blob_urls([url], credential=credential, retry=NO_RETRIES)
    throttle(proxy, operation("GetBlob"), times=1)
    dataset[0]


def _iterable_dataset_listing(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    from azstoragetorch.datasets import IterableBlobDataset

    container.upload("sample", b"x")
    throttle(proxy, lambda seen: seen.query.get("comp") == "list", times=1)
    IterableBlobDataset.from_container_url(proxy.url(container.url), credential=credential, retry=NO_RETRIES)  # lists


def _data_module_listing(proxy: FaultProxy, container: Container, credential: AzureNamedKeyCredential) -> None:
    from azstoragetorch.integrations.lightning import BlobDataModule

    container.upload("train/sample", b"x")
    module = BlobDataModule(train=proxy.url(container.blob_url("train")), credential=credential, retry=NO_RETRIES)
    throttle(proxy, lambda seen: seen.query.get("comp") == "list", times=1)
    module.setup("fit")


@pytest.mark.parametrize(
    "path",
    [
        _lightning_save,
        _lightning_load,
        _lightning_listing,
        _dcp_save,
        _dcp_load,
        _map_dataset_read,
        _iterable_dataset_listing,
        _data_module_listing,
    ],
    ids=lambda path: path.__name__,
)
def test_the_retry_option_reaches_the_datasets_and_integrations(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    waits: list[float],
    path: Callable[[FaultProxy, Container, AzureNamedKeyCredential], None],
) -> None:
    """With retries turned off, one throttled answer fails the operation (the default rides it out)."""
    with pytest.raises(BaseException) as caught:  # torch's CheckpointException is a BaseException
        path(proxy, container, account_credential)
    everything_said = "".join(traceback.format_exception(caught.value))  # torch wraps rank errors in text
    assert "ServerBusy" in everything_said
    assert waits == []  # failed at the first answer: no retry was waited for
