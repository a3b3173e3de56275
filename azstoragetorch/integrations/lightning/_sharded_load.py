"""Loading a sharded checkpoint into a strategy's model and optimizers, and reading its trainer state."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from azstoragetorch._client import not_found_as_file_not_found, redact_url
from azstoragetorch.integrations.lightning._sharded_layout import (
    _META_KEY,
    META_FILE,
    Target,
    _fsdp_sharded_state_dicts,
    _split,
)
from azstoragetorch.io import BlobIO


def read_metadata(where: Target, weights_only: bool | None) -> dict[str, Any]:
    """The trainer state saved with the checkpoint at ``where``: the copy committed with its shards,
    or, for a checkpoint that Lightning wrote on disk and that was copied here, its ``meta.pt``."""
    entry: dict[str, Any] = {_META_KEY: b""}
    if _has_meta_entry(where):
        dcp_load(entry, storage_reader=where.reader())
        data = entry[_META_KEY]
    else:
        with not_found_as_file_not_found(where.child(META_FILE), hint="(no meta.pt in this checkpoint)"):
            reader = BlobIO(where.child(META_FILE), "rb", credential=where.paths.credential, retry=where.paths.retry)
        with reader:
            data = reader.read()
    loaded: dict[str, Any] = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
    return loaded


def _has_meta_entry(where: Target) -> bool:
    metadata = where.reader().read_metadata()
    return _META_KEY in metadata.state_dict_metadata


def load_dtensor_state(where: Target, state: dict[str, Any], strict: bool, weights_only: bool | None) -> dict[str, Any]:
    """Load a sharded checkpoint into a ``ModelParallelStrategy`` (DTensor) model and its optimizers,
    as Lightning's ``_load_checkpoint`` does from disk; returns the trainer state not asked for in ``state``."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    modules, optimizers = _split(state)
    [(module_key, module)] = modules.items()
    module_state = {module_key: get_model_state_dict(module)}
    dcp_load(module_state, storage_reader=where.reader())
    module.load_state_dict(module_state[module_key], strict=strict)
    for optimizer_key, optimizer in optimizers.items():
        optimizer_state = {optimizer_key: get_optimizer_state_dict(module, optimizer)}
        dcp_load(optimizer_state, storage_reader=where.reader())
        set_optimizer_state_dict(
            module,
            optimizer,
            optim_state_dict=optimizer_state[optimizer_key],
            options=StateDictOptions(cpu_offload=True),
        )
    return _move_metadata(where, state, modules.keys() | optimizers.keys(), strict, weights_only)


def load_fsdp_state(
    where: Target, state: dict[str, Any], strict: bool, weights_only: bool | None, *, optimizers: bool = True
) -> dict[str, Any]:
    """Load a sharded checkpoint into an ``FSDPStrategy`` (FSDP1) model and its optimizers, as
    Lightning does from disk; returns the trainer state not asked for in ``state``."""
    from torch.distributed.checkpoint.optimizer import load_sharded_optimizer_state_dict
    from torch.distributed.fsdp import FullyShardedDataParallel

    modules, optimizer_states = _split(state)
    [(module_key, module)] = modules.items()
    with _fsdp_sharded_state_dicts(module):
        module_state = {module_key: module.state_dict()}
        dcp_load(module_state, storage_reader=where.reader())
        module.load_state_dict(module_state[module_key], strict=strict)
        for optimizer_key, optimizer in optimizer_states.items() if optimizers else ():
            loaded = load_sharded_optimizer_state_dict(
                model_state_dict=module_state[module_key], optimizer_key=optimizer_key, storage_reader=where.reader()
            )
            optimizer.load_state_dict(
                FullyShardedDataParallel.optim_state_dict_to_load(
                    optim_state_dict=loaded[optimizer_key], model=module, optim=optimizer
                )
            )
    return _move_metadata(where, state, modules.keys() | optimizer_states.keys(), strict, weights_only)


def _move_metadata(
    where: Target, state: dict[str, Any], loaded_keys: Any, strict: bool, weights_only: bool | None
) -> dict[str, Any]:
    """Read the checkpoint's trainer state; move the keys asked for in ``state`` into it (as Lightning
    does), and return the rest."""
    metadata = read_metadata(where, weights_only)
    requested = state.keys() - set(loaded_keys)
    missing = sorted(requested - metadata.keys())
    if strict and missing:
        raise KeyError(
            f"The requested state contains keys {missing} that are not in the checkpoint {redact_url(where.url)!r}; "
            "pass strict=False to load without them."
        )
    for key in requested & metadata.keys():
        state[key] = metadata.pop(key)
    return metadata


@contextlib.contextmanager
def local_copy(where: Target) -> Iterator[str]:
    """A single-file checkpoint downloaded to a private temporary file, for Lightning's loaders that
    memory-map it; removed afterwards."""
    directory = tempfile.mkdtemp(prefix="azstoragetorch-")
    try:
        local = os.path.join(directory, "checkpoint.ckpt")
        with not_found_as_file_not_found(where.url, hint="(no checkpoint here)"):
            reader = BlobIO(where.url, "rb", credential=where.paths.credential, retry=where.paths.retry)
        with reader, open(local, "wb") as file:
            shutil.copyfileobj(reader, file, 8 * 1024 * 1024)
        yield local
    finally:
        shutil.rmtree(directory, ignore_errors=True)
