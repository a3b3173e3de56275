"""Transfer statistics in the Trainer's loggers, read back from a CSVLogger's metrics.csv."""

from __future__ import annotations

import csv
import pathlib

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import AsyncCheckpointIO

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, BlobDataModule, BlobSplit
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy, Respond
from tests.e2e.support.lightning_helpers import IdRecorder, TinyModel, loader, trainer, upload_ids

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def metrics(logger: CSVLogger) -> list[dict[str, float]]:
    """Every row of the logger's metrics.csv, with the empty cells left out."""
    path = pathlib.Path(logger.log_dir) / "metrics.csv"
    with path.open() as file:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(file)]


def values(rows: list[dict[str, float]], name: str) -> list[float]:
    return [row[name] for row in rows if name in row]


def test_saves_and_loads_are_logged_with_their_retries(
    container: Container, azurite: Azurite, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    proxy.add_fault(lambda seen: seen.operation == "PutBlob", Respond(503, "ServerBusy"), times=2)
    plugin = AzureBlobCheckpointIO(credential=azurite.credential, account_url=proxy.url(azurite.account_url))
    directory = proxy.url(container.blob_url("run"))
    logger = CSVLogger(tmp_path, name="save")
    checkpoints = ModelCheckpoint(dirpath=directory, filename="{epoch}", save_top_k=-1)
    trainer(max_epochs=2, plugins=[plugin], callbacks=[checkpoints], logger=logger).fit(TinyModel(), loader())

    rows = metrics(logger)
    sizes = [container.client.get_blob_client(f"run/epoch={e}.ckpt").get_blob_properties().size for e in (0, 1)]
    assert values(rows, "checkpoint/save_bytes") == sizes
    assert sum(values(rows, "checkpoint/save_throttled_retries")) == 2
    assert sum(values(rows, "checkpoint/save_retries")) == 2
    assert sum(values(rows, "checkpoint/save_requests")) == 2 + 2  # one Put Blob each, and the two retries
    assert len(values(rows, "checkpoint/save_seconds")) == 2
    assert all(value > 0 for value in values(rows, "checkpoint/save_mib_per_s"))
    assert len(values(rows, "checkpoint/save_stall_seconds")) == 2

    resumed_logger = CSVLogger(tmp_path, name="load")
    trainer(max_epochs=3, plugins=[plugin], logger=resumed_logger, enable_checkpointing=False).fit(
        TinyModel(), loader(), ckpt_path=f"{directory}/epoch=1.ckpt"
    )
    rows = metrics(resumed_logger)
    assert values(rows, "checkpoint/load_bytes") == [sizes[1]]
    assert len(values(rows, "checkpoint/load_seconds")) == 1
    assert values(rows, "checkpoint/load_retries") == [0.0]


def test_async_saves_log_their_stall_and_their_statistics(
    container: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    plugin = AsyncCheckpointIO(AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url))
    logger = CSVLogger(tmp_path)
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("async"), filename="{step}", every_n_train_steps=2)
    trainer(max_epochs=1, plugins=[plugin], callbacks=[checkpoints], logger=logger).fit(TinyModel(), loader())

    rows = metrics(logger)
    assert len(values(rows, "checkpoint/save_stall_seconds")) == 2
    # The last save finishes in AsyncCheckpointIO's thread; it is logged at teardown at the latest.
    assert len(values(rows, "checkpoint/save_seconds")) == 2
    assert all(value > 0 for value in values(rows, "checkpoint/save_bytes"))


def test_log_stats_false_logs_nothing(
    container: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    plugin = AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url, log_stats=False)
    source = upload_ids(container, "train", 8)
    data = BlobDataModule(train=source, credential=account_credential, batch_size=4, log_stats=False, transform=_DECODE)
    logger = CSVLogger(tmp_path)
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("run"))
    trainer(max_epochs=1, plugins=[plugin], callbacks=[checkpoints], logger=logger).fit(IdRecorder(), datamodule=data)
    path = pathlib.Path(logger.log_dir) / "metrics.csv"
    header = path.read_text().splitlines()[0] if path.exists() else ""
    assert "checkpoint/" not in header and "data/" not in header


_DECODE = "tests.e2e.support.lightning_helpers.decode_id"


@pytest.mark.parametrize("num_workers", [0, 2])
def test_data_loading_is_logged_per_epoch_gathered_across_workers(
    container: Container, azurite: Azurite, proxy: FaultProxy, tmp_path: pathlib.Path, num_workers: int
) -> None:
    source = upload_ids(container, "train", 12)
    proxy.add_fault(lambda seen: seen.operation == "GetBlob", Respond(503, "ServerBusy"), times=3)
    data = BlobDataModule(
        train=BlobSplit(proxy.url(source)),
        credential=azurite.credential,
        batch_size=4,
        num_workers=num_workers,
        transform=_DECODE,
    )
    logger = CSVLogger(tmp_path)
    trainer(max_epochs=2, logger=logger, enable_checkpointing=False).fit(IdRecorder(), datamodule=data)

    rows = metrics(logger)
    assert values(rows, "data/train_bytes") == [12 * 4.0, 12 * 4.0]  # every 4-byte blob once per epoch
    assert sum(values(rows, "data/train_throttled_retries")) == 3
    assert sum(values(rows, "data/train_retries")) == 3
    assert sum(values(rows, "data/train_requests")) == 2 * 12 + 3
    assert all(value > 0 for value in values(rows, "data/train_mib_per_s"))
