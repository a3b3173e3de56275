"""A small LightningModule and Trainer settings shared by the Lightning tests and their scripts."""

from __future__ import annotations

import argparse
from typing import Any

import lightning.pytorch as pl
import torch
from azure.core.credentials import AzureNamedKeyCredential
from torch.utils.data import DataLoader, TensorDataset

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME


class TinyModel(pl.LightningModule):
    """A two-layer regression model.

    ``val_losses`` makes the logged ``val_loss`` a fixed value per epoch, so that which checkpoints
    ``save_top_k`` keeps is known in advance.
    """

    def __init__(self, width: int = 8, val_losses: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.hidden = torch.nn.Linear(4, width)
        self.output = torch.nn.Linear(width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_index: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.hparams.val_losses is not None:
            loss = torch.tensor(self.hparams.val_losses[self.current_epoch])
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader(samples: int = 32, batch_size: int = 8) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(samples, 4, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=batch_size)


def trainer(**overrides: Any) -> pl.Trainer:
    """A quiet CPU Trainer; ``overrides`` replace any of the defaults."""
    settings: dict[str, Any] = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
    }
    return pl.Trainer(**(settings | overrides))


def emulator_plugin(account_url: str) -> AzureBlobCheckpointIO:
    """The checkpoint plugin for the emulator's account at ``account_url``, with its key."""
    return AzureBlobCheckpointIO(credential=AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY), account_url=account_url)


def checkpoint_run_parser(*, devices: int, resume_help: str) -> argparse.ArgumentParser:
    """The options every script that trains with checkpoints in a container takes: the account, the
    checkpoint directory, how long and on how many ranks to train, what to resume from, and the
    folder each rank reports to."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--account-url", required=True)
    parser.add_argument("--dirpath", required=True)
    parser.add_argument("--max-epochs", type=int, required=True)
    parser.add_argument("--devices", type=int, default=devices)
    parser.add_argument("--resume", default=None, help=resume_help)
    parser.add_argument("--out", required=True)
    return parser


def same_weights(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


# -- for the BlobDataModule tests ----------------------------------------------------------------------


def upload_ids(container: Any, folder: str, count: int) -> str:
    """Blobs ``<folder>/<n>`` holding the number ``n``; returns the folder's URL."""
    for index in range(count):
        container.upload(f"{folder}/{index:04d}", index.to_bytes(4, "little"))
    return container.blob_url(folder)


def decode_id(blob: Any) -> dict[str, torch.Tensor]:
    """A transform for :func:`upload_ids` blobs (importable by path, for configs and spawned workers)."""
    with blob.reader() as reader:
        return {"id": torch.tensor(int.from_bytes(reader.read(), "little"))}


def decode_id_read(blob: Any) -> dict[str, torch.Tensor]:
    """As :func:`decode_id`, through ``Blob.read`` (and so through the dataset's cache, if any)."""
    return {"id": torch.tensor(int.from_bytes(blob.read(), "little"))}


class IdRecorder(pl.LightningModule):
    """Records, per epoch and in order, the sample ids of every training batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[int]] = {}

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        self.seen.setdefault(self.current_epoch, []).extend(batch["id"].tolist())
        return (self.weight * batch["id"].float().mean()) ** 2

    def validation_step(self, batch: Any, batch_index: int) -> None:
        self.log("val_seen", batch["id"].float().sum(), reduce_fx="sum", sync_dist=True)

    def test_step(self, batch: Any, batch_index: int) -> None:
        self.log("test_seen", batch["id"].float().sum(), reduce_fx="sum")

    def predict_step(self, batch: Any, batch_index: int) -> Any:
        return batch

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)
