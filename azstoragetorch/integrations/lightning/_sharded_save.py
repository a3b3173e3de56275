"""Saving a sharded checkpoint: rank 0's ``meta.pt``, then every rank's shards, in the foreground or behind training."""

from __future__ import annotations

import concurrent.futures
import io
import weakref
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from azstoragetorch.integrations.lightning._sharded_layout import (
    _META_KEY,
    META_FILE,
    Target,
    _blob_plugin,
    _delete_blob,
    _fsdp_sharded_state_dicts,
    _split,
)
from azstoragetorch.io import BlobIO


def save_sharded(
    where: Target, converted_state: dict[str, Any], metadata: dict[str, Any], rank: int, *, strategy: Any = None
) -> None:
    """Save ``converted_state`` (this rank's shards) and ``metadata`` (rank 0's) as a sharded checkpoint.

    Every rank calls this. ``meta.pt`` is written by rank 0 before the shards; ``.metadata`` is
    committed last, so the checkpoint at ``where`` is the old one until the whole new one is in place.
    When the strategy's plugin is wrapped in ``AsyncCheckpointIO``, only staging (copying the state)
    happens here: the upload runs behind training through ``dcp.async_save`` (see :func:`_save_async`).
    """
    buffer = io.BytesIO()
    torch.save(metadata, buffer)
    if rank == 0:
        with BlobIO(where.child(META_FILE), "wb", credential=where.paths.credential, retry=where.paths.retry) as meta:
            meta.write(buffer.getbuffer())
    state = {**converted_state, _META_KEY: buffer.getvalue()}
    async_io = _async_checkpoint_io(strategy) if strategy is not None else None
    if async_io is not None:
        _save_async(strategy, async_io, where, state, rank)
        return
    dcp_save(state, storage_writer=where.writer())
    if rank == 0:
        _delete_blob(where.url, where)  # a single-file checkpoint of the same name, as Lightning unlinks it


def _async_checkpoint_io(strategy: Any) -> Any:
    """The strategy's ``AsyncCheckpointIO`` around an AzureBlobCheckpointIO, if it has one (and it
    still keeps its saves in the executor and error that removals are queued behind, see _path_wrappers)."""
    from lightning.pytorch.plugins import AsyncCheckpointIO

    try:
        async_io = strategy.checkpoint_io
    except NotImplementedError:
        return None
    if not isinstance(async_io, AsyncCheckpointIO) or _blob_plugin(strategy) is None:
        return None
    if not all(hasattr(async_io, name) for name in ("_ensure_setup", "_executor", "_error")):
        return None  # saved synchronously: slower, never wrong
    return async_io


# The process group of each strategy's background saves: their collectives must not interleave with
# the training loop's on the default group.
_save_groups: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
_pending: weakref.WeakKeyDictionary[Any, concurrent.futures.Future[Any]] = weakref.WeakKeyDictionary()


def _save_async(strategy: Any, async_io: Any, where: Target, state: dict[str, Any], rank: int) -> None:
    """Stage ``state`` and hand its upload to ``dcp.async_save``; the training loop waits only for
    the staging (and for the previous save, should it still be uploading).

    The upload is joined in AsyncCheckpointIO's executor, so that ``save_top_k`` removals queued there
    run after it, its error is raised by the next save or at teardown as AsyncCheckpointIO's are, and
    teardown waits for it.
    """
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict_saver import async_save

    previous = _pending.pop(strategy, None)
    if previous is not None:
        previous.result()  # one save uploads at a time: the next one reuses the process group
    if strategy not in _save_groups:
        _save_groups[strategy] = dist.new_group(backend="gloo")  # every rank saves, so every rank gets here
    upload = async_save(state, storage_writer=where.writer(), process_group=_save_groups[strategy])
    assert isinstance(upload, concurrent.futures.Future)

    def finish() -> None:
        try:
            upload.result()
            if rank == 0:
                _delete_blob(where.url, where)
        except BaseException as error:
            if async_io._error is None:
                async_io._error = error

    async_io._ensure_setup()
    _pending[strategy] = async_io._executor.submit(finish)
    if async_io._error is not None:
        raise async_io._error


def _fabric_state(
    state: dict[str, Any], module_state: Any, optimizer_state: Any
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fabric's state split as Lightning splits it: models' and optimizers' (sharded) state dicts
    to be saved as shards, everything else as trainer state for ``meta.pt``."""
    converted: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, torch.nn.Module):
            converted[key] = module_state(value)
        elif isinstance(value, torch.optim.Optimizer):
            converted[key] = optimizer_state(value)
        elif callable(getattr(value, "state_dict", None)) and callable(getattr(value, "load_state_dict", None)):
            metadata[key] = value.state_dict()
        else:
            metadata[key] = value
    return converted, metadata


def _model_parallel_state(strategy: Any, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=False, cpu_offload=True)
    [module] = _split(state)[0].values()
    return _fabric_state(
        state,
        lambda model: get_model_state_dict(model, options=options),
        lambda optimizer: get_optimizer_state_dict(module, optimizer, options=options),
    )


def _fsdp_state(strategy: Any, state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    from torch.distributed.fsdp import FullyShardedDataParallel

    [module] = _split(state)[0].values()
    with _fsdp_sharded_state_dicts(module):
        return _fabric_state(
            state,
            lambda model: model.state_dict(),
            lambda optimizer: FullyShardedDataParallel.optim_state_dict(module, optimizer),
        )
