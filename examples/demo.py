"""The whole story against a local Azurite emulator: data in a container, training from it, checkpoints to it.

This is what ``make demo`` runs. It needs no Azure account and nothing from the network:

1. start Azurite (the blob service of Microsoft's storage emulator) on a free loopback port;
2. upload a small image data set, made on the spot (``examples/shapes.py``: circles, squares,
   triangles and crosses), one blob per sample;
3. train a small convolutional network from a :class:`BlobDataModule` (the training split streamed by
   an iterable dataset with two DataLoader workers, the validation split map-style), with
   checkpoints written to the container by :class:`AzureBlobCheckpointIO`, and stop in the middle of
   the second epoch, as a preempted job would;
4. start a new Trainer that resumes from ``ckpt_path="last"``, found in the container, and trains to
   the end, continuing the data stream where it stopped;
5. save the trained model and its optimizer with ``torch.distributed.checkpoint`` through
   :class:`BlobStorageWriter` and load them into a fresh model through :class:`BlobStorageReader`;
6. save and load a 21 M-parameter transformer's weights with :class:`~azstoragetorch.io.BlobIO`,
   ``torch.save`` and ``torch.load``, for a throughput figure on a checkpoint of real size.

Along the way it shows what storage cost: the transfer statistics that the plugin and the data
module log through the first run's ``CSVLogger`` (``checkpoint/save_*`` per save, ``data/train_*``
per epoch), those of the DCP save and load (``BlobStorageWriter.stats``, ``BlobStorageReader.stats``)
and of the ``BlobIO`` transfers (``BlobIO.stats``), and the process's totals (``azstoragetorch.stats()``).

Every step is checked (the resumed run must continue the step count and the epoch's data, the
reloaded models must give identical outputs, the classifier must learn). It prints what it saw and
ends with ``demo OK``, or exits with status 1. Run it from the repository root:
``.venv/bin/python examples/demo.py``.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import pathlib
import sys
import tempfile
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed.checkpoint as dcp
from azure.storage.blob import BlobServiceClient
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import ShapesClassifier, upload_shapes

import azstoragetorch
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, BlobDataModule, BlobSplit
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite

TRAIN_SAMPLES = 2048
VAL_SAMPLES = 512
BATCH_SIZE = 64
EPOCHS = 3
STEPS_PER_EPOCH = TRAIN_SAMPLES // BATCH_SIZE  # each of the 2 workers makes 16 full batches
STOP_AT_STEP = STEPS_PER_EPOCH + 13  # in the middle of the second epoch
CHECKPOINT_EVERY = 8


@dataclasses.dataclass
class Figures:
    lines: list[str] = dataclasses.field(default_factory=list)
    problems: list[str] = dataclasses.field(default_factory=list)

    def add(self, label: str, value: str) -> None:
        self.lines.append(f"  {label:<44} {value}")
        print(f"  {label}: {value}")

    def check(self, ok: bool, problem: str) -> None:
        if not ok:
            self.problems.append(problem)
            print(f"  MISMATCH: {problem}", file=sys.stderr)


class SampleCounter(Callback):
    """Counts training samples and the wall time of training."""

    def __init__(self) -> None:
        self.samples = 0
        self.seconds = 0.0
        self._start = 0.0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, index: int
    ) -> None:
        self.samples += len(batch[1])

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.seconds = time.perf_counter() - self._start


def trainer(
    plugin: AzureBlobCheckpointIO,
    dirpath: str,
    counter: SampleCounter,
    logger: CSVLogger | None = None,
    **settings: Any,
) -> pl.Trainer:
    checkpoints = ModelCheckpoint(
        dirpath=dirpath,
        every_n_train_steps=CHECKPOINT_EVERY,
        save_last=True,
        save_top_k=2,
        monitor="train_loss",
    )
    return pl.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        plugins=[plugin],
        callbacks=[checkpoints, counter],
        logger=logger if logger is not None else False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        **settings,
    )


def data_module(azurite: Azurite) -> BlobDataModule:
    return BlobDataModule(
        train=BlobSplit(azurite.container_url("data") + "/shapes/train", iterable=True),
        val=azurite.container_url("data") + "/shapes/val",
        transform="shapes.decode",
        batch_size=BATCH_SIZE,
        num_workers=2,
        persistent_workers=True,
        seed=7,
        credential=azurite.credential,
    )


def outputs_equal(first: nn.Module, second: nn.Module, batch: torch.Tensor) -> bool:
    with torch.no_grad():
        return torch.equal(first.eval()(batch), second.eval()(batch))


def step_data(azurite: Azurite, figures: Figures) -> None:
    print("\n[1/5] Uploading the data set (one blob per sample) ...")
    start = time.perf_counter()
    size = upload_shapes(
        azurite.container_url("data") + "/shapes/train", TRAIN_SAMPLES, seed=0, credential=azurite.credential
    )
    size += upload_shapes(
        azurite.container_url("data") + "/shapes/val", VAL_SAMPLES, seed=1, credential=azurite.credential
    )
    seconds = time.perf_counter() - start
    count = TRAIN_SAMPLES + VAL_SAMPLES
    figures.add("upload: samples (785 B each)", f"{count} blobs in {seconds:.1f} s = {count / seconds:.0f} blobs/s")


def step_train_and_stop(
    azurite: Azurite, plugin: AzureBlobCheckpointIO, dirpath: str, figures: Figures
) -> SampleCounter:
    print(f"\n[2/5] Training from the container; stopping at step {STOP_AT_STEP}, mid-epoch 2 ...")
    counter = SampleCounter()
    with tempfile.TemporaryDirectory(prefix="azstoragetorch-demo-") as logs:
        logger = CSVLogger(logs, name="first-run")
        first = trainer(plugin, dirpath, counter, logger=logger, max_steps=STOP_AT_STEP)
        first.fit(ShapesClassifier(), datamodule=data_module(azurite))
        rows = logged_metrics(logger)
    figures.add(
        "training, first run (loading + training + val)",
        f"{counter.samples} samples in {counter.seconds:.1f} s = {counter.samples / counter.seconds:.0f} samples/s",
    )
    figures.check(first.global_step == STOP_AT_STEP, f"first run stopped at step {first.global_step}")
    saves = [row for row in rows if "checkpoint/save_seconds" in row]
    epochs = [row for row in rows if "data/train_mib_per_s" in row]
    figures.check(bool(saves) and bool(epochs), "no checkpoint/save_* or data/train_* metrics were logged")
    if saves:
        figures.add(
            "logged: checkpoint/save_* (mean of saves)",
            f"{len(saves)} saves, {mean(saves, 'checkpoint/save_seconds'):.3f} s, "
            f"{mean(saves, 'checkpoint/save_mib_per_s'):.1f} MiB/s, "
            f"{mean(saves, 'checkpoint/save_requests'):.0f} requests, "
            f"{sum(row['checkpoint/save_retries'] for row in saves):.0f} retries",
        )
    for index, row in enumerate(epochs):
        figures.add(
            f"logged: data/train_* of epoch {index}",
            f"{row['data/train_bytes'] / 1e6:.2f} MB at {row['data/train_mib_per_s']:.1f} MiB/s, "
            f"{row['data/train_requests']:.0f} requests, {row['data/train_retries']:.0f} retries",
        )
    return counter


def logged_metrics(logger: CSVLogger) -> list[dict[str, float]]:
    """The rows of a CSVLogger's metrics.csv, without their empty cells."""
    with (pathlib.Path(logger.log_dir) / "metrics.csv").open() as file:
        return [{key: float(value) for key, value in row.items() if value} for row in csv.DictReader(file)]


def mean(rows: list[dict[str, float]], name: str) -> float:
    return sum(row[name] for row in rows) / len(rows)


def describe(stats: azstoragetorch.TransferStats | None) -> str:
    if stats is None:
        return "(none)"
    return (
        f"{stats.bytes / 1e6:.2f} MB in {stats.seconds:.2f} s = {stats.mib_per_s:.0f} MiB/s, "
        f"{stats.requests} requests, {stats.retries} retries"
    )


def step_resume(azurite: Azurite, plugin: AzureBlobCheckpointIO, dirpath: str, figures: Figures) -> ShapesClassifier:
    print('\n[3/5] A new Trainer resumes from ckpt_path="last" ...')
    counter = SampleCounter()
    resumed = trainer(plugin, dirpath, counter)
    model = ShapesClassifier()
    resumed.fit(model, datamodule=data_module(azurite), ckpt_path="last")
    last_checkpoint = (STOP_AT_STEP // CHECKPOINT_EVERY) * CHECKPOINT_EVERY
    figures.add("resumed from", f"{resumed.ckpt_path} (step {last_checkpoint})")
    figures.add(
        "training, resumed run (same)",
        f"{counter.samples} samples in {counter.seconds:.1f} s = {counter.samples / counter.seconds:.0f} samples/s",
    )
    expected = (EPOCHS * STEPS_PER_EPOCH - last_checkpoint) * BATCH_SIZE
    figures.check(counter.samples == expected, f"the resumed run trained on {counter.samples} samples, not {expected}")
    figures.check(resumed.global_step == EPOCHS * STEPS_PER_EPOCH, f"training ended at step {resumed.global_step}")
    accuracy = float(resumed.callback_metrics.get("val_accuracy", torch.tensor(0.0)))
    figures.add("validation accuracy after 3 epochs", f"{accuracy:.1%}")
    figures.check(accuracy > 0.8, f"the classifier did not learn (validation accuracy {accuracy:.1%})")
    container = BlobServiceClient.from_connection_string(azurite.connection_string).get_container_client("checkpoints")
    names = sorted(blob.name.rsplit("/", 1)[1] for blob in container.list_blobs(name_starts_with="shapes/"))
    figures.add("checkpoints in the container", ", ".join(names))
    return model


def step_dcp(azurite: Azurite, model: ShapesClassifier, figures: Figures) -> None:
    print("\n[4/5] Distributed checkpoint of model and optimizer ...")
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    optimizer = model.configure_optimizers()
    model(torch.zeros(1, 1, 28, 28)).sum().backward()
    optimizer.step()  # give the optimizer state to save
    url = azurite.blob_url("checkpoints", "shapes-dcp/final")
    model_state, optimizer_state = get_state_dict(model, optimizer)
    start = time.perf_counter()
    writer = BlobStorageWriter(url, credential=azurite.credential, thread_count=2)
    dcp.save({"model": model_state, "optim": optimizer_state}, storage_writer=writer)
    saved = time.perf_counter() - start
    fresh = ShapesClassifier(channels=model.hparams.channels)
    fresh_optimizer = fresh.configure_optimizers()
    fresh(torch.zeros(1, 1, 28, 28)).sum().backward()
    fresh_optimizer.step()
    model_state, optimizer_state = get_state_dict(fresh, fresh_optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    start = time.perf_counter()
    reader = BlobStorageReader(url, credential=azurite.credential)
    dcp.load(state, storage_reader=reader)
    loaded = time.perf_counter() - start
    set_state_dict(fresh, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    figures.add("DCP save / load of model + optimizer", f"{saved:.2f} s / {loaded:.2f} s")
    figures.add("DCP save, BlobStorageWriter.stats", describe(writer.stats))
    figures.add("DCP load, BlobStorageReader.stats", describe(reader.stats))
    figures.check(
        writer.stats is not None and reader.stats is not None and writer.stats.bytes > 0 and reader.stats.bytes > 0,
        "the DCP save or load gathered no statistics",
    )
    batch = torch.rand(16, 1, 28, 28)
    figures.check(outputs_equal(model, fresh, batch), "the model loaded through DCP gives different outputs")


class TinyLanguageModel(nn.Module):
    """A decoder-only transformer of 21 M parameters (84 MB of float32), for a checkpoint of real size."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens = nn.Embedding(8192, 512)
        layer = nn.TransformerEncoderLayer(512, 8, dim_feedforward=2048, dropout=0.0, batch_first=True)
        self.layers = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(512, 8192, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        logits: torch.Tensor = self.head(self.layers(self.tokens(tokens)))
        return logits


def step_blobio(azurite: Azurite, figures: Figures) -> None:
    print("\n[5/5] A 21 M-parameter model through BlobIO, torch.save and torch.load ...")
    torch.manual_seed(0)
    model = TinyLanguageModel()
    url = azurite.blob_url("checkpoints", "transformer/state_dict.pt")
    start = time.perf_counter()
    with BlobIO(url, "wb", credential=azurite.credential) as blob:
        torch.save(model.state_dict(), blob)
        size = blob.tell()
    saved = time.perf_counter() - start
    torch.manual_seed(1)
    restored = TinyLanguageModel()
    start = time.perf_counter()
    with BlobIO(url, "rb", credential=azurite.credential) as blob:
        restored.load_state_dict(torch.load(blob))
    loaded = time.perf_counter() - start
    figures.add(
        "BlobIO save, 84 MB state dict", f"{size / 1e6:.1f} MB in {saved:.2f} s = {size / 1e6 / saved:.0f} MB/s"
    )
    figures.add(
        "BlobIO load, 84 MB state dict", f"{size / 1e6:.1f} MB in {loaded:.2f} s = {size / 1e6 / loaded:.0f} MB/s"
    )
    figures.add("BlobIO load, BlobIO.stats", describe(blob.stats))
    tokens = torch.randint(0, 8192, (2, 16))
    figures.check(
        outputs_equal(model, restored, tokens), "the transformer loaded through BlobIO gives different outputs"
    )


def main() -> int:
    warnings.filterwarnings("ignore", category=UserWarning)  # Lightning's advice for bigger machines
    pl.seed_everything(0, verbose=False)
    figures = Figures()
    start = time.perf_counter()
    print("Starting Azurite ...")
    with Azurite() as azurite:
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        for name in ("data", "checkpoints"):
            service.create_container(name)
        plugin = AzureBlobCheckpointIO(credential=azurite.credential, account_url=azurite.account_url)
        dirpath = azurite.container_url("checkpoints") + "/shapes"
        step_data(azurite, figures)
        step_train_and_stop(azurite, plugin, dirpath, figures)
        model = step_resume(azurite, plugin, dirpath, figures)
        step_dcp(azurite, model, figures)
        step_blobio(azurite, figures)
        figures.add("this process in all, azstoragetorch.stats()", describe(azstoragetorch.stats()))
        print("\nStopping Azurite ...")
    print(f"\nSummary ({time.perf_counter() - start:.0f} s in all, against Azurite on this machine):")
    print("\n".join(figures.lines))
    if figures.problems:
        print("demo FAILED", file=sys.stderr)
        return 1
    print("demo OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
