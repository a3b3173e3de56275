"""Ranks of the many-ranks distributed-checkpoint test, run by ``torch.multiprocessing.spawn``.

Each rank joins a gloo group through a FileStore and holds its shard of a few DTensors (sharded over
all ranks on dim 0). It saves them with ``BlobStorageWriter``, loads them back into zeroed DTensors of
the same layout with ``BlobStorageReader``, then saves once more without collectives. Every phase
goes to a URL of its own for this rank: the test puts a separate counting proxy behind each, so a
proxy's requests are one rank's requests in one phase. Rank ``r`` writes ``1 + r % 2`` shard files,
so that ranks owning more files can be compared with the others.
"""

from __future__ import annotations

import json
import pathlib

import torch
import torch.distributed
import torch.distributed.checkpoint as dcp
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

PHASES = ("save", "load", "save-without-collectives")
TENSORS = 4


def files_of(rank: int) -> int:
    """The shard files rank ``rank`` writes (its writer's ``thread_count``)."""
    return 1 + rank % 2


def full_state(world_size: int) -> dict[str, torch.Tensor]:
    """The whole (unsharded) state: small tensors whose rows divide evenly between the ranks."""
    generator = torch.Generator().manual_seed(0)
    return {f"layer{i}.weight": torch.randn(8 * world_size, 64, generator=generator) for i in range(TENSORS)}


def rank_main(rank: int, world_size: int, store_path: str, urls: dict[str, list[str]], out_dir: str) -> None:
    from azure.core.credentials import AzureNamedKeyCredential

    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        mesh = init_device_mesh("cpu", (world_size,))
        full = full_state(world_size)

        def sharded(fill: bool) -> dict[str, DTensor]:
            return {
                name: DTensor.from_local(
                    (tensor if fill else torch.zeros_like(tensor)).chunk(world_size)[rank].clone(), mesh, [Shard(0)]
                )
                for name, tensor in full.items()
            }

        saved = sharded(fill=True)
        writer = BlobStorageWriter(urls["save"][rank], credential=credential, thread_count=files_of(rank))
        dcp.save(saved, storage_writer=writer)
        loaded = sharded(fill=False)
        dcp.load(loaded, storage_reader=BlobStorageReader(urls["load"][rank], credential=credential))
        same = all(torch.equal(loaded[name].to_local(), saved[name].to_local()) for name in saved)
        writer = BlobStorageWriter(
            urls["save-without-collectives"][rank], credential=credential, thread_count=files_of(rank)
        )
        dcp.save(saved, storage_writer=writer, use_collectives=False)
        torch.distributed.barrier()  # every rank finished before any tears the group down
        pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"same": same}))
    finally:
        torch.distributed.destroy_process_group()
