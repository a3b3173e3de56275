#!/usr/bin/env python
"""Benchmark Lightning checkpoints: ``trainer.save_checkpoint`` through AzureBlobCheckpointIO and its alternatives,
and the training-loop stall per checkpoint with and without ``AsyncCheckpointIO``.

Starts its own in-memory Azurite. Part 1 saves a model with ~200 MiB of weights, interleaved per round:

- ``blobio``: ``Trainer(plugins=[AzureBlobCheckpointIO(...)])`` saving to a blob URL;
- ``adlfs``: Lightning's default ``TorchCheckpointIO`` saving to ``abfs://`` through adlfs (fsspec), which is
  how Lightning reaches Azure without this package;
- ``local``: the default ``TorchCheckpointIO`` saving to the local disk.

Each save runs in a worker process of its own (a warm-up save, then the measured one), so that CPU time is
the variant's alone and no variant sees another's state (AzureBlobCheckpointIO, once created, also claims
``abfs://`` paths inside Lightning).

Part 2 trains the same model with a ModelCheckpoint every K steps, K chosen so that one save fits between
two checkpoints, once with AzureBlobCheckpointIO and once with AsyncCheckpointIO(AzureBlobCheckpointIO), and
reports how much longer the steps that checkpoint take than the others.

    .venv/bin/python benchmarks/bench_lightning.py [--size-mib 200] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from _common import (
    Stopwatch,
    fmt_range,
    format_machine,
    machine_info,
    package_version,
    run_benchmark_worker,
    stats,
    worker_connection_string,
)

MiB = 1024**2
GiB = 1024**3
CONTAINER = "bench"
SAVE_VARIANTS = {
    "blobio": "AzureBlobCheckpointIO",
    "adlfs": "TorchCheckpointIO + adlfs (abfs://)",
    "local": "TorchCheckpointIO, local disk",
}
STALL_VARIANTS = {"sync": "AzureBlobCheckpointIO", "async": "AsyncCheckpointIO(AzureBlobCheckpointIO)"}


# -- the worker: one process, one variant -------------------------------------------------------------


def build_model(size_mib: int) -> Any:
    """A stack of 1024x1024 linear layers (4 MiB of float32 weights each) trained with plain SGD, so the
    checkpoint holds the weights and almost nothing else."""
    import lightning.pytorch as pl
    import torch

    class Stack(pl.LightningModule):
        def __init__(self, layers: int) -> None:
            super().__init__()
            self.layers = torch.nn.Sequential(*(torch.nn.Linear(1024, 1024) for _ in range(layers)))

        def training_step(self, batch: Any, batch_index: int) -> Any:
            return self.layers(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-6)

    torch.manual_seed(0)
    return Stack(max(1, round(size_mib / 4)))


def loader(batches: int) -> Any:
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(torch.randn(batches * 4, 1024)), batch_size=4)


def quiet_trainer(**settings: Any) -> Any:
    import warnings

    import lightning.pytorch as pl

    warnings.filterwarnings("ignore")
    defaults = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_progress_bar": False}
    return pl.Trainer(**defaults, enable_model_summary=False, num_sanity_val_steps=0, **settings)


def plugin_for(args: argparse.Namespace) -> Any:
    from azure.core.credentials import AzureNamedKeyCredential

    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
    from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)  # the emulator's public development key
    return AzureBlobCheckpointIO(credential=credential, account_url=args.account_url)


def worker_save(args: argparse.Namespace) -> dict[str, Any]:
    """Fit one step, then time ``trainer.save_checkpoint`` (after one warm-up save) and check what was saved."""
    import torch

    if args.variant == "adlfs":
        os.environ["AZURE_STORAGE_CONNECTION_STRING"] = worker_connection_string()
        path = f"abfs://{CONTAINER}/adlfs.ckpt"
        plugins: list[Any] = []
    elif args.variant == "blobio":
        path = f"{args.account_url}/{CONTAINER}/blobio.ckpt"
        plugins = [plugin_for(args)]
    else:
        path = os.path.join(args.local_dir, "local.ckpt")
        plugins = []
    model = build_model(args.size_mib)
    trainer = quiet_trainer(max_steps=1, plugins=plugins, enable_checkpointing=False)
    trainer.fit(model, loader(1))

    trainer.save_checkpoint(path)  # warm-up: first connections, first allocations
    with Stopwatch() as stopwatch:
        trainer.save_checkpoint(path)

    saved = trainer.strategy.checkpoint_io.load_checkpoint(path, weights_only=True)
    for name, tensor in model.state_dict().items():
        if not torch.equal(saved["state_dict"][name], tensor):
            raise AssertionError(f"{args.variant}: {name} differs after the save")
    size = _saved_size(args, path)
    return {"seconds": stopwatch.sample.seconds, "cpu_seconds": stopwatch.sample.cpu_seconds, "bytes": size}


def _saved_size(args: argparse.Namespace, path: str) -> int:
    if args.variant == "local":
        return os.path.getsize(path)
    from azure.storage.blob import BlobServiceClient

    service = BlobServiceClient.from_connection_string(worker_connection_string())
    blob = "adlfs.ckpt" if args.variant == "adlfs" else "blobio.ckpt"
    return int(service.get_blob_client(CONTAINER, blob).get_blob_properties().size)


def worker_stall(args: argparse.Namespace) -> dict[str, Any]:
    """Train with a checkpoint every K steps; report the checkpointing steps' extra time over the others."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.plugins import AsyncCheckpointIO

    class StepTimer(pl.Callback):
        def __init__(self) -> None:
            self.starts: list[float] = []
            self.end = 0.0

        def on_train_batch_start(self, *unused: Any) -> None:
            self.starts.append(time.perf_counter())

        def on_train_batch_end(self, *unused: Any) -> None:
            self.end = time.perf_counter()  # ModelCheckpoint runs after this callback, so later ends move it

    # Calibrate: the step time without checkpoints, to space the checkpoints so one save fits between two.
    model = build_model(args.size_mib)
    calibration = StepTimer()
    quiet_trainer(max_steps=12, callbacks=[calibration], enable_checkpointing=False).fit(model, loader(12))
    plain_step = statistics.median(_durations(calibration)[2:])
    every = max(2, math.ceil(1.5 * args.save_seconds / plain_step))

    plugin = plugin_for(args)
    checkpoint_io = AsyncCheckpointIO(plugin) if args.variant == "async" else plugin
    dirpath = f"{args.account_url}/{CONTAINER}/stall-{args.variant}"
    timer = StepTimer()
    checkpoints = ModelCheckpoint(dirpath=dirpath, every_n_train_steps=every, save_top_k=1)
    steps = every * args.checkpoints + 1  # a plain last step, so that the last save falls inside a timed step
    trainer = quiet_trainer(max_steps=steps, plugins=[checkpoint_io], callbacks=[timer, checkpoints])
    fit_start = time.perf_counter()
    trainer.fit(model, loader(steps))
    fit_seconds = time.perf_counter() - fit_start

    durations = _durations(timer)
    checkpointing = [durations[i] for i in range(len(durations)) if (i + 1) % every == 0]
    others = [durations[i] for i in range(2, len(durations)) if (i + 1) % every != 0]
    normal = statistics.median(others)
    return {
        "every_n_steps": every,
        "checkpoints": len(checkpointing),
        "plain_step_seconds": plain_step,
        "normal_step_seconds": normal,
        "stalls": [duration - normal for duration in checkpointing],
        # Everything the checkpoints cost the loop, including uploads slowing other steps down.
        "loop_overhead_per_checkpoint": (sum(durations) - len(durations) * plain_step) / len(checkpointing),
        "fit_seconds": fit_seconds,
    }


def _durations(timer: Any) -> list[float]:
    marks = [*timer.starts, timer.end]
    return [later - earlier for earlier, later in itertools.pairwise(marks)]


# -- the coordinator ---------------------------------------------------------------------------------


def run_worker(kind: str, variant: str, azurite: Any, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    arguments = ["--worker", kind, "--variant", variant, "--size-mib", str(args.size_mib)]
    arguments += ["--account-url", azurite.account_url, "--local-dir", args.local_dir]
    for name, value in extra.items():
        arguments += [f"--{name.replace('_', '-')}", str(value)]
    report: dict[str, Any] = run_benchmark_worker(
        __file__,
        arguments,
        connection_string=azurite.connection_string,
        timeout=1800,
        what=f"{kind} worker for {variant}",
    )
    return report


def fresh_azurite() -> Any:
    from azure.storage.blob import BlobServiceClient

    from azstoragetorch.testing import Azurite

    azurite = Azurite().start()
    BlobServiceClient.from_connection_string(azurite.connection_string).create_container(CONTAINER)
    return azurite


def rotate(items: list[str], by: int) -> list[str]:
    shift = by % len(items)
    return [*items[shift:], *items[:shift]]


def measure_saves(args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    """Each round: a fresh Azurite (it frees overwritten blobs only every few minutes), every variant once."""
    samples: dict[str, list[dict[str, Any]]] = {variant: [] for variant in SAVE_VARIANTS}
    for round_index in range(1, args.rounds + 1):
        azurite = fresh_azurite()
        try:
            for variant in rotate(list(SAVE_VARIANTS), round_index):
                sample = run_worker("save", variant, azurite, args)
                samples[variant].append(sample)
                mibps = sample["bytes"] / MiB / sample["seconds"]
                print(
                    f"round {round_index}/{args.rounds}  save {variant:<7} {sample['seconds']:7.3f} s  "
                    f"{mibps:7.1f} MiB/s  cpu {sample['cpu_seconds']:6.3f} s",
                    flush=True,
                )
        finally:
            azurite.stop()
    return samples


def measure_stalls(args: argparse.Namespace, save_seconds: float) -> dict[str, dict[str, Any]]:
    reports = {}
    for variant in STALL_VARIANTS:
        azurite = fresh_azurite()
        try:
            reports[variant] = run_worker(
                "stall", variant, azurite, args, save_seconds=save_seconds, checkpoints=args.checkpoints
            )
        finally:
            azurite.stop()
        report = reports[variant]
        print(
            f"stall {variant:<5} every {report['every_n_steps']} steps: stalls "
            + ", ".join(f"{stall:.3f}" for stall in report["stalls"])
            + f" s; loop overhead {report['loop_overhead_per_checkpoint']:.3f} s per checkpoint",
            flush=True,
        )
    return reports


def summarize(samples: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    rows = {}
    for variant, runs in samples.items():
        size = runs[0]["bytes"]
        rows[variant] = {
            "bytes": size,
            "mibps": stats([run["bytes"] / MiB / run["seconds"] for run in runs]),
            "cpu_per_gib": stats([run["cpu_seconds"] / (run["bytes"] / GiB) for run in runs]),
            "seconds": stats([run["seconds"] for run in runs]),
        }
    return rows


def report(rows: dict[str, dict[str, Any]], stalls: dict[str, dict[str, Any]], rounds: int) -> str:
    blobio, adlfs = rows["blobio"], rows["adlfs"]
    size = blobio["bytes"] / MiB
    lines = [
        f"SAVE: trainer.save_checkpoint of a {size:.1f} MiB checkpoint; median [min-max] of {rounds} rounds",
        f"{'variant':<40} {'MiB/s':>22} {'CPU s/GiB':>20}",
    ]
    for variant, label in SAVE_VARIANTS.items():
        row = rows[variant]
        lines.append(f"{label:<40} {fmt_range(row['mibps'], 1):>22} {fmt_range(row['cpu_per_gib'], 2):>20}")
    speed = blobio["mibps"].median / adlfs["mibps"].median
    cpu = blobio["cpu_per_gib"].median / adlfs["cpu_per_gib"].median
    lines += [
        "",
        f"target: >= 1.2x the adlfs path's MiB/s:     {speed:.2f}x  {'met' if speed >= 1.2 else 'MISSED'}",
        f"target: <= 0.5x the adlfs path's CPU/GiB:   {cpu:.2f}x  {'met' if cpu <= 0.5 else 'MISSED'}",
        "",
        "STALL: extra time of the training steps that checkpoint (mean over checkpoints)",
    ]
    sync_stall = statistics.mean(stalls["sync"]["stalls"])
    for variant, label in STALL_VARIANTS.items():
        stall = stalls[variant]
        lines.append(
            f"{label:<42} stall {statistics.mean(stall['stalls']):7.3f} s   loop overhead "
            f"{stall['loop_overhead_per_checkpoint']:7.3f} s/checkpoint   (checkpoint every "
            f"{stall['every_n_steps']} steps of {stall['plain_step_seconds'] * 1000:.0f} ms)"
        )
    ratio = statistics.mean(stalls["async"]["stalls"]) / sync_stall
    lines.append(
        f"target: async stall <= 10% of the synchronous save: {ratio:.1%}  {'met' if ratio <= 0.1 else 'MISSED'}"
    )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=200, help="weights in the model (default 200)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds of the save comparison")
    parser.add_argument("--checkpoints", type=int, default=4, help="checkpoints in each stall run")
    parser.add_argument("--json", help="also write the results to this file")
    # Internal: the worker processes.
    parser.add_argument("--worker", choices=["save", "stall"], help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--account-url", help=argparse.SUPPRESS)
    parser.add_argument("--local-dir", help=argparse.SUPPRESS)
    parser.add_argument("--save-seconds", type=float, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        work = worker_save if args.worker == "save" else worker_stall
        print(json.dumps(work(args)))
        return 0
    info = machine_info(lightning=package_version("lightning"), adlfs=package_version("adlfs"))
    print(format_machine(info), flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as local_dir:
        args.local_dir = local_dir
        rows = summarize(measure_saves(args))
        stalls = measure_stalls(args, save_seconds=rows["blobio"]["seconds"].median)
    info["loadavg_end"] = os.getloadavg()
    print("\n" + report(rows, stalls, args.rounds))
    print(f"\nload average: start {info['loadavg_start'][0]:.2f}, end {info['loadavg_end'][0]:.2f} (1 min)")
    if args.json:
        serializable = {
            variant: {key: (value.__dict__ if hasattr(value, "__dict__") else value) for key, value in row.items()}
            for variant, row in rows.items()
        }
        with open(args.json, "w") as out:
            json.dump({"machine": info, "saves": serializable, "stalls": stalls}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
