"""Save and load a distributed checkpoint with two processes, straight to and from Azure Blob Storage.

Point it at a container you can write to::

    export AZSTORAGETORCH_CONTAINER_URL="https://<account>.blob.core.windows.net/<container>"
    python examples/dcp_checkpoint.py

Requests are authorized with ``DefaultAzureCredential``, which needs a data role such as "Storage Blob
Data Contributor" on the container. Without the environment variable the example runs against a local
Azurite emulator.

Two processes (``torch.multiprocessing.spawn``, gloo on the CPU) train a DDP model for a step, save model
and optimizer with ``dcp.save`` and ``BlobStorageWriter``, then load them into fresh models with
``BlobStorageReader``. Finally a single process loads the same checkpoint (resharding from two ranks to
one) and checks that it holds the same weights. On many machines, the same code runs under ``torchrun``.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from azure.storage.blob import BlobServiceClient
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.nn.parallel import DistributedDataParallel

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import Azurite


def build(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def train_one_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    inputs = torch.randn(
        32, 64, generator=torch.Generator().manual_seed(dist.get_rank() if dist.is_initialized() else 0)
    )
    torch.nn.functional.cross_entropy(model(inputs), torch.zeros(32, dtype=torch.long)).backward()
    optimizer.step()
    optimizer.zero_grad()


def rank_main(rank: int, world_size: int, init_file: str, url: str, credential: Any) -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model, optimizer = build(seed=0)
        ddp_model = DistributedDataParallel(model)
        train_one_step(ddp_model, optimizer)

        model_state, optimizer_state = get_state_dict(ddp_model, optimizer)
        writer = BlobStorageWriter(url, credential=credential, thread_count=2, overwrite=True)
        dcp.save({"model": model_state, "optim": optimizer_state}, storage_writer=writer)
        if rank == 0:
            print(f"rank 0: saved model and optimizer to {url.split('?')[0]}")

        fresh_model, fresh_optimizer = build(seed=1)
        fresh_ddp = DistributedDataParallel(fresh_model)
        train_one_step(fresh_ddp, fresh_optimizer)  # so the optimizer has state to fill in
        model_state, optimizer_state = get_state_dict(fresh_ddp, fresh_optimizer)
        state = {"model": model_state, "optim": optimizer_state}
        dcp.load(state, storage_reader=BlobStorageReader(url, credential=credential))
        set_state_dict(fresh_ddp, fresh_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        same = all(
            torch.equal(a, b)
            for a, b in zip(model.state_dict().values(), fresh_model.state_dict().values(), strict=True)
        )
        print(f"rank {rank}: loaded the checkpoint back, weights identical: {same}")
        if not same:
            raise SystemExit(f"rank {rank}: the loaded weights differ")
    finally:
        dist.destroy_process_group()


def load_in_one_process(url: str, credential: Any) -> float:
    model, optimizer = build(seed=2)
    train_one_step(model, optimizer)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, storage_reader=BlobStorageReader(url, credential=credential))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return float(sum(parameter.sum() for parameter in model.parameters()))


def run(url: str, credential: Any) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        mp.spawn(rank_main, args=(2, os.path.join(scratch, "init"), url, credential), nprocs=2)
    warnings.filterwarnings("ignore", category=UserWarning)  # "no process group: loading in one process"
    total = load_in_one_process(url, credential)
    print(f"one process: loaded the two-rank checkpoint (sum of weights {total:.4f})")
    print("dcp example OK")


def main() -> None:
    container_url = os.environ.get("AZSTORAGETORCH_CONTAINER_URL")
    if container_url:
        base, _, sas = container_url.partition("?")
        run(f"{base.rstrip('/')}/examples/dcp-checkpoint" + (f"?{sas}" if sas else ""), credential=None)
        return
    print("AZSTORAGETORCH_CONTAINER_URL is not set; using a local Azurite emulator.")
    with Azurite() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container("examples")
        run(azurite.blob_url("examples", "dcp-checkpoint"), azurite.credential)


if __name__ == "__main__":
    main()
