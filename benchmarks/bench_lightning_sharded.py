#!/usr/bin/env python
"""Benchmark sharded Lightning checkpoints at world size 2: blob against Lightning's local sharded checkpoint.

Starts its own in-memory Azurite, then two jobs of two CPU processes each (gloo), a model of ``--size-mib``
of float32 weights sharded with FSDP2:

- ``fabric``: ``fabric.save(path, {"model": model})`` and ``fabric.load(path, ...)`` with
  ``ModelParallelStrategy``, ``path`` a blob URL (through BlobStorageWriter/BlobStorageReader) or a local
  directory (Lightning's own sharded checkpoint, the ceiling), alternated per round after a warm-up;
- ``stall``: ``Trainer(strategy=ModelParallelStrategy(...))`` with ``AzureBlobCheckpointIO``, then with
  ``AsyncCheckpointIO(AzureBlobCheckpointIO)``: how long ``trainer.save_checkpoint`` holds the training
  loop, each save after the previous one's upload has finished.

    .venv/bin/python benchmarks/bench_lightning_sharded.py [--size-mib 256] [--rounds 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

MiB = 1024**2
GiB = 1024**3
WIDTH = 2048  # each layer's weight: WIDTH x WIDTH float32 = 16 MiB


def model(size_mib: int) -> Any:
    import torch

    layers = max(1, size_mib // 16)
    torch.manual_seed(0)
    return torch.nn.Sequential(*(torch.nn.Linear(WIDTH, WIDTH, bias=False) for _ in range(layers)))


def shard(module: Any, mesh: Any) -> Any:
    from torch.distributed.fsdp import fully_shard

    for layer in module:
        fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(module, mesh=mesh["data_parallel"])
    return module


def plugin(account_url: str) -> Any:
    from azure.core.credentials import AzureNamedKeyCredential

    from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
    from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

    return AzureBlobCheckpointIO(credential=AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY), account_url=account_url)


def fabric_worker(args: argparse.Namespace) -> None:
    import torch
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy

    plugin(args.account_url)  # claims the account's URLs in this process
    fabric = Fabric(
        accelerator="cpu",
        devices=2,
        strategy=ModelParallelStrategy(parallelize_fn=shard, data_parallel_size=2, tensor_parallel_size=1),
    )
    fabric.launch()
    sharded = fabric.setup_module(model(args.size_mib))
    size = sum(p.numel() * p.element_size() for p in sharded.parameters())  # DTensors: the global sizes
    local_root = tempfile.mkdtemp(prefix="bench-sharded-") if fabric.global_rank == 0 else ""
    local_root = fabric.broadcast(local_root)
    results = []
    for round_index in range(args.rounds + 1):
        for variant in ("blob", "local") if round_index % 2 == 0 else ("local", "blob"):
            path = (
                f"{args.account_url}/bench/sharded-{round_index}.ckpt"
                if variant == "blob"
                else os.path.join(local_root, f"sharded-{round_index}.ckpt")
            )
            for kind in ("save", "load"):
                fabric.barrier()
                cpu, wall = time.process_time(), time.perf_counter()
                if kind == "save":
                    fabric.save(path, {"model": sharded})
                else:
                    fabric.load(path, {"model": sharded})
                fabric.barrier()
                seconds, cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
                all_cpu = fabric.all_reduce(torch.tensor(cpu_seconds), reduce_op="sum").item()
                if round_index > 0:
                    results.append({"variant": variant, "kind": kind, "seconds": seconds, "cpu": all_cpu})
    if fabric.global_rank == 0:
        print(json.dumps({"job": "fabric", "bytes": size, "results": results}), flush=True)


def stall_worker(args: argparse.Namespace) -> None:
    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.plugins import AsyncCheckpointIO
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.utils.data import DataLoader, TensorDataset

    from azstoragetorch.integrations.lightning import _sharded_save

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = model(args.size_mib)

        def configure_model(self) -> None:
            shard(self.net, self.device_mesh)

        def training_step(self, batch: Any, batch_index: int) -> Any:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    results = []
    for variant in ("sync", "async"):
        io = plugin(args.account_url)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
            plugins=[AsyncCheckpointIO(io) if variant == "async" else io],
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer.fit(Module(), DataLoader(TensorDataset(torch.randn(4, WIDTH)), batch_size=2))
        for round_index in range(args.rounds + 1):
            trainer.strategy.barrier()
            started = time.perf_counter()
            trainer.save_checkpoint(f"{args.account_url}/bench/stall-{variant}-{round_index}.ckpt")
            stall = time.perf_counter() - started
            pending = _sharded_save._pending.pop(trainer.strategy, None)
            if pending is not None:
                pending.result()  # the upload, outside the clock
            if round_index > 0:
                results.append({"variant": variant, "stall": stall})
        trainer.strategy.teardown()
    if trainer.global_rank == 0:
        print(json.dumps({"job": "stall", "results": results}), flush=True)


def run_job(job: str, account_url: str, args: argparse.Namespace) -> dict[str, Any]:
    command = [sys.executable, os.path.abspath(__file__), "--worker", job, "--account-url", account_url]
    command += ["--size-mib", str(args.size_mib), "--rounds", str(args.rounds)]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{job} job failed:\n{result.stderr[-4000:]}")
    [line] = [line for line in result.stdout.splitlines() if line.startswith("{")]
    loaded: dict[str, Any] = json.loads(line)
    return loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", choices=["fabric", "stall"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--account-url", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore")
    if args.worker == "fabric":
        fabric_worker(args)
        return
    if args.worker == "stall":
        stall_worker(args)
        return

    from azure.storage.blob import BlobServiceClient

    from azstoragetorch.testing import Azurite

    with Azurite() as azurite:
        BlobServiceClient(azurite.account_url, credential=azurite.credential).create_container("bench")
        fabric = run_job("fabric", azurite.account_url, args)
        stall = run_job("stall", azurite.account_url, args)

    size_gib = fabric["bytes"] / GiB
    print(f"Sharded checkpoint of {fabric['bytes'] / MiB:.0f} MiB at world size 2, {args.rounds} rounds (median)")
    print(f"{'variant':<34} {'save MiB/s':>10} {'save CPU s/GiB':>15} {'load MiB/s':>10} {'load CPU s/GiB':>15}")
    summary: dict[str, Any] = {}
    for variant, label in (("blob", "azstoragetorch (blob)"), ("local", "Lightning local sharded (ceiling)")):
        row = {}
        for kind in ("save", "load"):
            samples = [r for r in fabric["results"] if r["variant"] == variant and r["kind"] == kind]
            seconds = statistics.median(r["seconds"] for r in samples)
            cpu = statistics.median(r["cpu"] for r in samples)
            row[kind] = {"mib_per_s": fabric["bytes"] / MiB / seconds, "cpu_s_per_gib": cpu / size_gib}
        summary[variant] = row
        print(
            f"{label:<34} {row['save']['mib_per_s']:>10.1f} {row['save']['cpu_s_per_gib']:>15.2f} "
            f"{row['load']['mib_per_s']:>10.1f} {row['load']['cpu_s_per_gib']:>15.2f}"
        )
    stalls = {
        variant: statistics.median(r["stall"] for r in stall["results"] if r["variant"] == variant)
        for variant in ("sync", "async")
    }
    ratio = stalls["async"] / stalls["sync"]
    print(
        f"Training-loop stall per save: synchronous {stalls['sync']:.2f} s, AsyncCheckpointIO "
        f"{stalls['async']:.2f} s ({ratio:.0%} of synchronous; goal <= 10%)"
    )
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"fabric": fabric, "stall": stall, "summary": summary, "stalls": stalls}, file, indent=2)


if __name__ == "__main__":
    main()
