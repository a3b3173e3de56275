"""Top-level functions for tests that run in spawned processes (which import them by name).

``rank_main`` is one rank of a ``torch.multiprocessing.spawn`` job: it joins a gloo process group
through a FileStore, iterates the dataset it was given through a DataLoader with workers, and
writes what it saw to ``<out_dir>/rank<rank>.json`` for the test to check.
"""

from __future__ import annotations

import json
import multiprocessing
import pathlib
from typing import Any

import torch.distributed
import torch.utils.data

from azstoragetorch.datasets import Blob, IterableBlobDataset


def name_worker_and_data(blob: Blob) -> list[Any]:
    """A transform that says which blob, which DataLoader worker, and what the blob holds."""
    worker = torch.utils.data.get_worker_info()
    with blob.reader() as reader:
        data = reader.read().decode()
    return [blob.blob_name, worker.id if worker is not None else -1, data]


def rank_main(
    rank: int,
    world_size: int,
    store_path: str,
    dataset: IterableBlobDataset[list[Any]],
    num_workers: int,
    worker_start_method: str,
    epochs: list[int],
    out_dir: str,
) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world_size)
    try:
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=num_workers,
            multiprocessing_context=multiprocessing.get_context(worker_start_method) if num_workers else None,
        )
        seen: dict[str, list[list[Any]]] = {}
        for epoch in epochs:
            # In training the gradient all-reduce keeps ranks in step; here nothing else would.
            torch.distributed.barrier()
            dataset.set_epoch(epoch)
            seen[str(epoch)] = [list(sample) for sample in loader]
        torch.distributed.barrier()  # every rank finished before any tears the group down
        pathlib.Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    finally:
        torch.distributed.destroy_process_group()
