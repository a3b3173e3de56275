"""Ranks of the distributed-checkpoint tests, run by ``torch.multiprocessing.spawn`` (which imports them by name).

Each rank joins a gloo group through a FileStore, builds a small model wrapped in DDP or sharded with
FSDP2, saves or loads model and optimizer through ``get_state_dict`` / ``set_state_dict`` and
``BlobStorageWriter`` / ``BlobStorageReader``, and writes a fingerprint of the full (unsharded) state
to ``<out_dir>/rank<rank>.json``. The same functions with ``world_size=1`` and no group are the
single-process side of a resharding test.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

CREDENTIAL = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)


def build(seed: int, wrapping: str, world_size: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model and Adam optimizer with state (one step taken), wrapped for ``world_size`` ranks."""
    torch.manual_seed(seed)
    model: torch.nn.Module = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    if world_size > 1 and wrapping == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model)
    elif world_size > 1 and wrapping == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(4, 16, generator=torch.Generator().manual_seed(seed))).sum().backward()
    optimizer.step()
    return model, optimizer


def fingerprint(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """Every parameter and Adam moment in full, whatever the sharding, as plain lists."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    flat: dict[str, list[float]] = {}
    for name, value in model_state.items():
        flat[f"model.{name}"] = _full(value)
    for name, state in optimizer_state["state"].items():
        flat[f"optim.{name}.exp_avg"] = _full(state["exp_avg"])
    return flat


def _full(value: Any) -> list[float]:
    tensor = value.full_tensor() if hasattr(value, "full_tensor") else value
    return [round(float(x), 6) for x in tensor.detach().flatten()]


def save(model: torch.nn.Module, optimizer: torch.optim.Optimizer, url: str, thread_count: int) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    writer = BlobStorageWriter(url, credential=CREDENTIAL, thread_count=thread_count, overwrite=True)
    dcp.save({"model": model_state, "optim": optimizer_state}, storage_writer=writer)


def load(model: torch.nn.Module, optimizer: torch.optim.Optimizer, url: str) -> None:
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optimizer_state}
    dcp.load(state, storage_reader=BlobStorageReader(url, credential=CREDENTIAL))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def rank_main(rank: int, world_size: int, store_path: str, action: str, wrapping: str, url: str, out_dir: str) -> None:
    """``action`` is ``"save"`` (the model built from seed 0) or ``"load"`` (into a model from seed 1)."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        run(action, wrapping, world_size, url, pathlib.Path(out_dir, f"rank{rank}.json"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


def run(action: str, wrapping: str, world_size: int, url: str, out: pathlib.Path) -> None:
    model, optimizer = build(0 if action == "save" else 1, wrapping, world_size)
    if action == "save":
        save(model, optimizer, url, thread_count=2)
    else:
        load(model, optimizer, url)
    out.write_text(json.dumps(fingerprint(model, optimizer)))
