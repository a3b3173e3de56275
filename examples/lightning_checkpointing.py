"""Train with PyTorch Lightning, keeping checkpoints in Azure Blob Storage; then resume and reload.

Point it at a container you can write to::

    export AZSTORAGETORCH_CONTAINER_URL="https://<account>.blob.core.windows.net/<container>"
    python examples/lightning_checkpointing.py

Requests are authorized with ``DefaultAzureCredential`` (``az login``, a managed identity, environment
variables, ...), which needs a data role such as "Storage Blob Data Contributor" on the container.
Without the environment variable the example runs against a local Azurite emulator.

What it shows:

1. ``Trainer(plugins=[AzureBlobCheckpointIO()])`` with a ``ModelCheckpoint`` whose ``dirpath`` is in the
   container: the best two checkpoints by validation loss and ``last.ckpt``, with the ones that drop out
   of the top two deleted from the container.
2. A new Trainer resuming with ``ckpt_path="last"``, which finds ``last.ckpt`` in the container.
3. ``LightningModule.load_from_checkpoint(<blob URL>)`` for inference.
4. ``AsyncCheckpointIO`` around the plugin, so that uploads run beside training.

After the first two steps it prints what the checkpoint saves and the load cost, as the plugin logged
them through the Trainer's ``CSVLogger`` (``checkpoint/save_seconds``, ``checkpoint/save_mib_per_s``,
...; see the observability page of the docs).
"""

from __future__ import annotations

import csv
import os
import pathlib
import tempfile
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient, ContainerClient
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import AsyncCheckpointIO
from torch.utils.data import DataLoader, TensorDataset

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.testing import Azurite


class Regressor(pl.LightningModule):
    """Learns y = sum(x) with a small MLP."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_index: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=64)


def make_trainer(plugin: Any, dirpath: str, max_epochs: int, logger: CSVLogger | None = None) -> pl.Trainer:
    checkpoints = ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=2, save_last=True)
    return pl.Trainer(
        max_epochs=max_epochs,
        accelerator="cpu",
        plugins=[plugin],
        callbacks=[checkpoints],
        logger=logger if logger is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run(container_url: str, plugin: AzureBlobCheckpointIO, list_blobs: Any) -> None:
    dirpath = f"{container_url.rstrip('/')}/examples/lightning-run"

    with tempfile.TemporaryDirectory(prefix="azstoragetorch-example-") as logs:
        trainer = make_trainer(plugin, dirpath, max_epochs=4, logger=CSVLogger(logs, name="train"))
        trainer.fit(Regressor(), data(0), data(1))
        print("1. Checkpoints in the container:", ", ".join(list_blobs("examples/lightning-run/")))
        print_checkpoint_metrics(trainer, "save")

        resumed = make_trainer(plugin, dirpath, max_epochs=6, logger=CSVLogger(logs, name="resume"))
        resumed.fit(Regressor(), data(0), data(1), ckpt_path="last")
        print(f"2. Resumed from {resumed.ckpt_path}; now at step {resumed.global_step}")
        print_checkpoint_metrics(resumed, "load")

    best = resumed.checkpoint_callback.best_model_path  # type: ignore[union-attr]
    model = Regressor.load_from_checkpoint(best)
    sample = torch.ones(1, 16)
    print(f"3. Loaded {best}; it predicts {model(sample).item():.2f} for sum(x) = 16")

    asynchronous = make_trainer(AsyncCheckpointIO(plugin), f"{dirpath}-async", max_epochs=2)
    asynchronous.fit(Regressor(), data(0), data(1))
    print("4. With AsyncCheckpointIO:", ", ".join(list_blobs("examples/lightning-run-async/")))


def print_checkpoint_metrics(trainer: pl.Trainer, kind: str) -> None:
    """The ``checkpoint/<kind>_*`` values the plugin logged, read back from the CSVLogger's metrics.csv."""
    assert trainer.logger is not None and trainer.logger.log_dir is not None
    with (pathlib.Path(trainer.logger.log_dir) / "metrics.csv").open() as file:
        rows = [row for row in csv.DictReader(file) if row.get(f"checkpoint/{kind}_seconds")]
    if not rows:
        print(f"   (no checkpoint/{kind}_* metrics were logged)")
        return
    seconds = [float(row[f"checkpoint/{kind}_seconds"]) for row in rows]
    rates = [float(row[f"checkpoint/{kind}_mib_per_s"]) for row in rows]
    retries = sum(float(row[f"checkpoint/{kind}_retries"]) for row in rows)
    print(
        f"   logged: {len(rows)} checkpoint {kind}(s), {sum(seconds) / len(rows):.3f} s and "
        f"{sum(rates) / len(rates):.1f} MiB/s on average, {retries:.0f} retries "
        f"(checkpoint/{kind}_seconds, checkpoint/{kind}_mib_per_s, ...)"
    )


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's advice on the small data set
    container_url = os.environ.get("AZSTORAGETORCH_CONTAINER_URL")
    if container_url:
        container = ContainerClient.from_container_url(container_url, credential=_default_credential())
        run(container_url, AzureBlobCheckpointIO(), lambda prefix: _names(container, prefix))
        return
    print("AZSTORAGETORCH_CONTAINER_URL is not set; using a local Azurite emulator.")
    with Azurite() as azurite:
        container = BlobServiceClient.from_connection_string(azurite.connection_string).create_container("examples")
        credential: AzureNamedKeyCredential = azurite.credential
        plugin = AzureBlobCheckpointIO(credential=credential, account_url=azurite.account_url)
        run(azurite.container_url("examples"), plugin, lambda prefix: _names(container, prefix))


def _names(container: ContainerClient, prefix: str) -> list[str]:
    return [blob.name.removeprefix(prefix) for blob in container.list_blobs(name_starts_with=prefix)]


def _default_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


if __name__ == "__main__":
    main()
