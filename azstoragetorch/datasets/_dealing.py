"""Dealing an epoch's blobs to ranks and DataLoader workers: the epoch in shared memory, the
epoch's shuffling seed, the deal itself and the live rank and world size."""

from __future__ import annotations

import hashlib
from typing import TypeVar

import torch
import torch.distributed


def _shared_epoch(epoch: int) -> torch.Tensor:
    cell = torch.tensor([epoch], dtype=torch.int64)
    return cell.share_memory_()  # type: ignore[no-untyped-call,no-any-return]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixed rather than added, so that (seed, epoch + 1) and (seed + 1, epoch) give different orders.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_Dealt = TypeVar("_Dealt", torch.Tensor, range)


def _deal(order: _Dealt, *, rank: int, world_size: int, worker_id: int, workers: int) -> _Dealt:
    """One worker's part of an epoch's ``order``: dealt to ranks first, then to each rank's workers.

    Rank shares then differ by at most one sample. The one place that decides who reads which blob.
    """
    return order[rank::world_size][worker_id::workers]


def _live_rank_and_world_size() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None
