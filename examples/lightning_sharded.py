"""Sharded checkpoints in Azure Blob Storage: ``ModelParallelStrategy`` (FSDP2) on two CPU processes.

Point it at a container you can write to::

    export AZSTORAGETORCH_CONTAINER_URL="https://<account>.blob.core.windows.net/<container>"
    python examples/lightning_sharded.py

Requests are authorized with ``DefaultAzureCredential``. Without the environment variable the example
runs against a local Azurite emulator. Lightning starts the second process by running this script
again; that process finds the emulator through an environment variable the first one sets.

What it shows:

1. ``Trainer(strategy=ModelParallelStrategy(...), plugins=[AzureBlobCheckpointIO()])`` with a
   ``ModelCheckpoint`` in the container: every checkpoint is a ``<name>.ckpt/`` prefix holding each
   rank's shard file, rank 0's ``meta.pt`` and ``.metadata``; ``save_top_k`` deletes whole prefixes.
2. A new Trainer resuming with ``ckpt_path="last"``: each rank reads its own shards back.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient, ContainerClient
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader, TensorDataset

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite

# Set by the first process when it started Azurite, for the process Lightning starts next.
_EMULATOR = "AZSTORAGETORCH_EXAMPLE_EMULATOR_URL"
RUN = "examples/lightning-sharded"


class Regressor(pl.LightningModule):
    """Learns y = sum(x); ``configure_model`` shards its layers across the processes with FSDP2."""

    def __init__(self, hidden: int = 64) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch: Any, batch_index: int) -> None:
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def data(seed: int) -> DataLoader[Any]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 16, generator=generator)
    return DataLoader(TensorDataset(x, x.sum(dim=1, keepdim=True)), batch_size=32)


def make_trainer(plugin: AzureBlobCheckpointIO, dirpath: str, max_epochs: int) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        plugins=[plugin],
        callbacks=[ModelCheckpoint(dirpath=dirpath, monitor="val_loss", save_top_k=1, save_last=True)],
        max_epochs=max_epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )


def run(container_url: str, plugin: AzureBlobCheckpointIO, list_blobs: Any) -> None:
    dirpath = f"{container_url.rstrip('/')}/{RUN}"

    trainer = make_trainer(plugin, dirpath, max_epochs=3)
    trainer.fit(Regressor(), data(0), data(1))
    if trainer.is_global_zero:
        print("1. Sharded checkpoints in the container:", ", ".join(list_blobs(f"{RUN}/")))

    resumed = make_trainer(plugin, dirpath, max_epochs=4)
    resumed.fit(Regressor(), data(0), data(1), ckpt_path="last")
    if resumed.is_global_zero:
        print(f"2. Resumed from {resumed.ckpt_path}; now at step {resumed.global_step}")
        print("lightning sharded example OK")


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's advice on the small data set
    container_url = os.environ.get("AZSTORAGETORCH_CONTAINER_URL")
    if container_url:
        container = ContainerClient.from_container_url(container_url, credential=_default_credential())
        run(container_url, AzureBlobCheckpointIO(), lambda prefix: _names(container, prefix))
        return
    emulator = os.environ.get(_EMULATOR)
    if emulator:  # the second process, started by Lightning
        run_on_emulator(emulator)
        return
    print("AZSTORAGETORCH_CONTAINER_URL is not set; using a local Azurite emulator.")
    with Azurite() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container("examples")
        os.environ[_EMULATOR] = azurite.account_url
        run_on_emulator(azurite.account_url)


def run_on_emulator(account_url: str) -> None:
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    container = ContainerClient(account_url, "examples", credential=credential)
    plugin = AzureBlobCheckpointIO(credential=credential, account_url=account_url)
    run(f"{account_url}/examples", plugin, lambda prefix: _names(container, prefix))


def _names(container: ContainerClient, prefix: str) -> list[str]:
    return sorted({blob.name.removeprefix(prefix).split("/")[0] + "/" for blob in container.list_blobs(prefix)})


def _default_credential() -> Any:
    from azure.identity import DefaultAzureCredential

    return DefaultAzureCredential()


if __name__ == "__main__":
    main()
