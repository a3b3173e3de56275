"""Transfer statistics in the Trainer's loggers: checkpoint saves and loads, and data loading per epoch.

A ``CheckpointIO`` plugin never sees the Trainer, and a DataModule has no epoch hooks, so the numbers
reach the loggers through two small wrappers of Lightning's (installed once per process, the first
time a plugin or DataModule with ``log_stats=True`` is made; they fail soft as _path_wrappers's do):

- ``Trainer.save_checkpoint`` is timed: that is the stall the save caused the training loop, with or
  without ``AsyncCheckpointIO`` (which returns once the save is queued). The save's own statistics
  are logged with it when the save ran in the caller's thread, or at the next flush when it ran in
  AsyncCheckpointIO's thread.
- When the Trainer attaches its callbacks, a :class:`TransferStatsLogger` is added if the strategy's
  checkpoint plugin or the datamodule wants statistics logged. It logs the statistics of loads (at
  the start of a run) and of saves finished in the background, and each training epoch's data-loading
  statistics, gathered from the DataLoader workers (:class:`WorkerStatsTable`).

DataLoader workers are separate processes. Each one adds what its transfers cost since its previous
batch to its row of a table in shared memory, as it makes each batch; the main process sums the rows. With ``num_workers=0`` the main process's own counters are used, which then also count
anything else it transferred during the epoch (a checkpoint saved in the middle of it, for example).
"""

from __future__ import annotations

import collections
import functools
import threading
import time
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from azstoragetorch._client import TransferStats, stats

_MiB = 1024 * 1024
_FIELDS = ("bytes", "requests", "retries", "throttled_retries", "timeout_retries", "reset_retries", "blocked_seconds")


def checkpoint_metrics(kind: str, transfer: TransferStats, seconds: float) -> dict[str, float]:
    """Chartable metrics of one save or load (``kind``), over ``seconds`` it took as a whole."""
    return {
        f"checkpoint/{kind}_seconds": seconds,
        f"checkpoint/{kind}_mib_per_s": transfer.bytes / _MiB / seconds if seconds > 0 else 0.0,
        f"checkpoint/{kind}_bytes": float(transfer.bytes),
        f"checkpoint/{kind}_requests": float(transfer.requests),
        f"checkpoint/{kind}_retries": float(transfer.retries),
        f"checkpoint/{kind}_throttled_retries": float(transfer.throttled_retries),
    }


def data_metrics(split: str, transfer: TransferStats, seconds: float) -> dict[str, float]:
    """Chartable metrics of one epoch's data loading for ``split``, over the epoch's ``seconds``."""
    return {
        f"data/{split}_mib_per_s": transfer.bytes / _MiB / seconds if seconds > 0 else 0.0,
        f"data/{split}_bytes": float(transfer.bytes),
        f"data/{split}_requests": float(transfer.requests),
        f"data/{split}_retries": float(transfer.retries),
        f"data/{split}_throttled_retries": float(transfer.throttled_retries),
        f"data/{split}_timeout_retries": float(transfer.timeout_retries),
        f"data/{split}_reset_retries": float(transfer.reset_retries),
    }


class PendingMetrics:
    """Metrics of finished saves and loads, waiting for a point where the Trainer's loggers can take them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: collections.deque[dict[str, float]] = collections.deque()

    def add(self, metrics: dict[str, float]) -> None:
        with self._lock:
            self._pending.append(metrics)

    def take(self) -> list[dict[str, float]]:
        with self._lock:
            taken = list(self._pending)
            self._pending.clear()
        return taken


def log(trainer: Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


# -- DataLoader workers ------------------------------------------------------------------------------


class WorkerStatsTable:
    """What the DataLoader workers of one loader transferred: a row per worker, in shared memory.

    Rows only grow (each worker adds the difference since its last publication), so that workers
    started anew every epoch add to what their predecessors left.
    """

    def __init__(self, num_workers: int) -> None:
        self.rows = torch.zeros((max(num_workers, 1), len(_FIELDS)), dtype=torch.float64).share_memory_()  # type: ignore[no-untyped-call]
        self.in_workers = num_workers > 0

    def total(self) -> TransferStats:
        """The sum over the workers (or this process's counters without workers)."""
        if not self.in_workers:
            return stats()
        sums = self.rows.sum(dim=0).tolist()
        values: dict[str, Any] = {name: int(value) for name, value in zip(_FIELDS, sums, strict=True)}
        values["blocked_seconds"] = float(sums[-1])
        return TransferStats(seconds=time.perf_counter(), **values)

    def collate(self, collate_fn: Any) -> Any:
        """``collate_fn`` (``None``: PyTorch's default), publishing each worker's counters with every batch."""
        return _PublishingCollate(self.rows, collate_fn)


class _PublishingCollate:
    """A DataLoader's collate function that, in a worker, adds what the worker transferred since its
    last batch to its row. Once a worker's last batch of an epoch is made, all its reads are counted;
    publishing once per batch costs a snapshot for every ``batch_size`` samples."""

    def __init__(self, rows: torch.Tensor, collate_fn: Any) -> None:
        self._rows = rows
        self._collate_fn = collate_fn or torch.utils.data.default_collate
        self._published: TransferStats | None = None

    def __call__(self, batch: Any) -> Any:
        collated = self._collate_fn(batch)
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            now = stats()
            delta = now if self._published is None else now.minus(self._published)
            self._published = now
            self._rows[worker.id].add_(
                torch.tensor([float(getattr(delta, name)) for name in _FIELDS], dtype=torch.float64)
            )
        return collated


# -- the callback -----------------------------------------------------------------------------------


class TransferStatsLogger(Callback):
    """Logs azstoragetorch's transfer statistics through the Trainer's loggers (added automatically)."""

    def __init__(self) -> None:
        self._epoch_start: tuple[float, TransferStats] | None = None

    def _flush(self, trainer: Trainer) -> None:
        plugin = blob_checkpoint_io(trainer)
        if plugin is None or not getattr(plugin, "_log_stats", False):
            return
        for metrics in plugin._pending_metrics.take():
            log(trainer, metrics)

    def _data_table(self, trainer: Trainer) -> WorkerStatsTable | None:
        datamodule = getattr(trainer, "datamodule", None)
        tables = getattr(datamodule, "_stats_tables", None)
        if not tables or not getattr(datamodule, "_log_stats", False):
            return None
        table: WorkerStatsTable | None = tables.get("train")
        return table

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._flush(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        table = self._data_table(trainer)
        self._epoch_start = None if table is None else (time.perf_counter(), table.total())

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        table = self._data_table(trainer)
        if table is not None and self._epoch_start is not None:
            started, before = self._epoch_start
            log(trainer, data_metrics("train", table.total().minus(before), time.perf_counter() - started))
            self._epoch_start = None
        self._flush(trainer)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._flush(trainer)  # after AsyncCheckpointIO's last saves, before the loggers finalize


def blob_checkpoint_io(trainer: Any) -> Any:
    """The trainer's AzureBlobCheckpointIO (also inside AsyncCheckpointIO), or ``None``."""
    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

    plugin = getattr(getattr(trainer, "strategy", None), "checkpoint_io", None)
    for _ in range(3):  # wrappers of wrappers
        if isinstance(plugin, AzureBlobCheckpointIO):
            return plugin
        plugin = getattr(plugin, "checkpoint_io", None)
    return None


def _wants_stats(trainer: Any) -> bool:
    plugin = blob_checkpoint_io(trainer)
    datamodule = getattr(trainer, "datamodule", None)
    return bool(getattr(plugin, "_log_stats", False) or getattr(datamodule, "_log_stats", False))


# -- the wrappers -----------------------------------------------------------------------------------

_installed = False
_install_lock = threading.Lock()


def install() -> None:
    """Wrap ``Trainer.save_checkpoint`` and the attaching of callbacks (once per process)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        _installed = True
        try:
            from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector

            attach = _CallbackConnector._attach_model_callbacks
            save = Trainer.save_checkpoint
        except (ImportError, AttributeError):
            warnings.warn(
                "azstoragetorch cannot log transfer statistics with this Lightning version "
                "(Trainer.save_checkpoint or _CallbackConnector._attach_model_callbacks is missing).",
                stacklevel=3,
            )
            return
        _CallbackConnector._attach_model_callbacks = _wrap_attach(attach)  # type: ignore[method-assign]
        Trainer.save_checkpoint = _wrap_save(save)  # type: ignore[method-assign]


def _wrap_attach(original: Any) -> Any:
    @functools.wraps(original)
    def _attach_model_callbacks(self: Any) -> None:
        original(self)
        trainer = self.trainer
        if _wants_stats(trainer) and not any(isinstance(c, TransferStatsLogger) for c in trainer.callbacks):
            # First, so that an epoch's data statistics are taken before ModelCheckpoint saves.
            trainer.callbacks.insert(0, TransferStatsLogger())

    return _attach_model_callbacks


def _wrap_save(original: Any) -> Any:
    @functools.wraps(original)
    def save_checkpoint(self: Trainer, *args: Any, **kwargs: Any) -> None:
        plugin = blob_checkpoint_io(self)
        if plugin is None or not plugin._log_stats:
            return original(self, *args, **kwargs)  # type: ignore[no-any-return]
        started = time.perf_counter()
        original(self, *args, **kwargs)
        stall = time.perf_counter() - started
        if self.is_global_zero:
            log(self, {"checkpoint/save_stall_seconds": stall})
            for metrics in plugin._pending_metrics.take():
                log(self, metrics)
        return None

    return save_checkpoint
