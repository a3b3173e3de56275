"""Sends the sharded saves and loads of the strategies that bypass ``CheckpointIO`` to blob storage.

``ModelParallelStrategy`` (and ``FSDPStrategy(state_dict_type="sharded")``) bypass ``CheckpointIO``:
they call ``Path(filepath)``, make that directory and run ``dcp_save(checkpoint_id=path)`` into it,
so a blob URL would become a local folder named ``http:/...``. This module wraps those strategies'
``save_checkpoint`` and ``load_checkpoint``, Trainer's and Fabric's: a path that a registered plugin
claims is saved through :class:`~azstoragetorch.integrations.dcp.BlobStorageWriter` (``_sharded_save``)
and loaded through :class:`~azstoragetorch.integrations.dcp.BlobStorageReader` (``_sharded_load``),
in Lightning's layout (``_sharded_layout``); every other path goes to Lightning's own method, with
the caller's arguments.

A strategy that saves by local path without the plugin (DeepSpeed's does) is refused when the
Trainer sets up with the plugin, naming the strategy. Every wrapped method is looked up when the wrappers are
installed; one that has moved makes that setup raise, never a silent local save.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from typing import Any

import torch

from azstoragetorch.integrations.lightning._once import once
from azstoragetorch.integrations.lightning._sharded_layout import Target, _blob_plugin, remove_tree, target
from azstoragetorch.integrations.lightning._sharded_load import load_dtensor_state, load_fsdp_state, local_copy
from azstoragetorch.integrations.lightning._sharded_save import _fsdp_state, _model_parallel_state, save_sharded
from azstoragetorch.io import BlobIO


def _wrap_trainer_save(model_key: str, saves_sharded: Any) -> Any:
    """A Trainer strategy's ``save_checkpoint``: ``saves_sharded(strategy)`` says whether it saves a
    sharded checkpoint (``True``), a single file (``False``) or something unknown to leave to it (``None``);
    the model's shards go under ``model_key``, as Lightning names them."""

    def wrap(original: Any) -> Any:
        @functools.wraps(original)
        def save_checkpoint(self: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
            filepath = self.broadcast(filepath)  # first, so that every rank decides alike where rank 0 saves
            where = target(self, filepath)
            sharded = saves_sharded(self) if where is not None else None
            if where is None or sharded is None:
                return original(self, checkpoint, filepath, storage_options)  # type: ignore[no-any-return]
            if storage_options is not None:
                raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported.")
            if not sharded:
                _save_full(self, checkpoint, where)
                return None
            converted = {model_key: checkpoint.pop("state_dict")}
            optimizers = checkpoint.pop("optimizer_states", [])
            converted.update({f"optimizer_{index}": state for index, state in enumerate(optimizers)})
            save_sharded(where, converted, checkpoint, self.global_rank, strategy=self)
            return None

        return save_checkpoint

    return wrap


def _save_full(strategy: Any, checkpoint: dict[str, Any], where: Target) -> None:
    """A full (single-file) checkpoint goes through the plugin, as for any other strategy, and
    replaces a sharded checkpoint of the same name, as Lightning's local save does."""
    from lightning.pytorch.strategies import Strategy

    Strategy.save_checkpoint(strategy, checkpoint, where.url)
    if strategy.global_rank == 0:
        remove_tree(where)


def _wrap_trainer_load(load_sharded: Any) -> Any:
    """A Trainer strategy's ``load_checkpoint``: ``load_sharded(strategy, where, weights_only)`` loads a
    sharded checkpoint into the strategy's model and optimizers and returns the trainer state."""

    def wrap(original: Any) -> Any:
        @functools.wraps(original)
        def load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
            checkpoint_path = self.broadcast(checkpoint_path)
            where = target(self, checkpoint_path)
            if where is None:
                return original(self, checkpoint_path, weights_only)  # type: ignore[no-any-return]
            if not where.is_sharded():
                with local_copy(where) as local:
                    return original(self, local, weights_only)  # type: ignore[no-any-return]
            return load_sharded(self, where, weights_only)  # type: ignore[no-any-return]

        return load_checkpoint

    return wrap


def _load_trainer_model_parallel(strategy: Any, where: Target, weights_only: bool | None) -> dict[str, Any]:
    state = {"state_dict": strategy.model, **{f"optimizer_{i}": opt for i, opt in enumerate(strategy.optimizers)}}
    return load_dtensor_state(where, state, strategy.lightning_module.strict_loading, weights_only)


def _load_trainer_fsdp(strategy: Any, where: Target, weights_only: bool | None) -> dict[str, Any]:
    from lightning.pytorch.trainer.states import TrainerFn

    state = {"model": strategy.model, **{f"optimizer_{i}": opt for i, opt in enumerate(strategy.optimizers)}}
    fitting = strategy.lightning_module.trainer.state.fn == TrainerFn.FITTING
    strict = strategy.lightning_module.strict_loading
    return load_fsdp_state(where, state, strict, weights_only, optimizers=fitting)


def _fsdp_saves_sharded(strategy: Any) -> bool | None:
    return {"sharded": True, "full": False}.get(strategy._state_dict_type)


def _wrap_fabric_save(sharded_state: Any, is_sharded: Any) -> Any:
    """A Fabric strategy's ``save_checkpoint``: ``sharded_state(strategy, state)`` gives the shards and
    trainer state, ``is_sharded(strategy)`` whether the strategy saves sharded checkpoints."""

    def wrap(original: Any) -> Any:
        @functools.wraps(original)
        def save_checkpoint(
            self: Any, path: Any, state: dict[str, Any], storage_options: Any = None, filter: Any = None
        ) -> None:
            path = self.broadcast(path)
            where = target(self, path)
            if where is None or storage_options is not None or (filter is not None and is_sharded(self)):
                return original(self, path, state, storage_options, filter)  # type: ignore[no-any-return]
            if not is_sharded(self):
                _fabric_save_full(self, original, where, state, filter)
                return None
            converted, metadata = sharded_state(self, state)
            save_sharded(where, converted, metadata, self.global_rank)
            return None

        return save_checkpoint

    return wrap


def _fabric_save_full(strategy: Any, original: Any, where: Target, state: dict[str, Any], filter: Any) -> None:
    """A full checkpoint: Lightning writes it (on rank 0) to a private local file, which is uploaded."""
    directory = tempfile.mkdtemp(prefix="azstoragetorch-") if strategy.global_rank == 0 else ""
    try:
        local = os.path.join(directory, "checkpoint.ckpt") if directory else ""
        original(strategy, local, state, None, filter)
        if strategy.global_rank == 0:
            with (
                open(local, "rb") as file,
                BlobIO(where.url, "wb", credential=where.paths.credential, retry=where.paths.retry) as blob,
            ):
                shutil.copyfileobj(file, blob, 8 * 1024 * 1024)
            remove_tree(where)
    finally:
        if directory:
            shutil.rmtree(directory, ignore_errors=True)
    strategy.barrier()


def _wrap_fabric_load(load_sharded: Any) -> Any:
    def wrap(original: Any) -> Any:
        @functools.wraps(original)
        def load_checkpoint(
            self: Any, path: Any, state: Any = None, strict: bool = True, weights_only: bool | None = None
        ) -> dict[str, Any]:
            path = self.broadcast(path)
            where = target(self, path) if state else None
            if where is None or isinstance(state, torch.optim.Optimizer):
                return original(self, path, state, strict, weights_only)  # type: ignore[no-any-return]
            if not where.is_sharded():
                with local_copy(where) as local:
                    return original(self, local, state, strict, weights_only)  # type: ignore[no-any-return]
            if isinstance(state, torch.nn.Module):
                load_sharded(where, {"model": state}, strict, weights_only)
                return {}
            return load_sharded(where, state, strict, weights_only)  # type: ignore[no-any-return]

        return load_checkpoint

    return wrap


class ShardedCheckpointSetupError(RuntimeError):
    """Raised at setup for a strategy that would save blob checkpoints to a local folder."""


_ADVICE = (
    "Use ModelParallelStrategy (FSDP2, tensor parallelism), FSDPStrategy or DDPStrategy with "
    "AzureBlobCheckpointIO, or save to a local directory and copy the checkpoints with `azstoragetorch cp`."
)


def check_strategy(trainer: Any) -> None:
    """Refuse, at setup, a strategy that would save this plugin's blob checkpoints to a local folder:
    one whose ``save_checkpoint`` neither uses the ``CheckpointIO`` plugin nor hands over to a parent
    class's (DeepSpeed's, for one), and a sharded strategy whose saving this Lightning version did
    not let us wrap."""
    strategy = trainer.strategy
    if _blob_plugin(strategy) is None:
        return
    for cls, reason in _missing.items():
        if isinstance(strategy, cls):
            raise ShardedCheckpointSetupError(
                f"azstoragetorch cannot send {type(strategy).__name__}'s sharded checkpoints to Azure Blob Storage "
                f"with this Lightning version ({reason}): they would be written to a local folder. " + _ADVICE
            )
    save = getattr(type(strategy), "save_checkpoint", None)
    if save is None or save in _wrapped:
        return
    names = getattr(getattr(save, "__code__", None), "co_names", ())
    if "checkpoint_io" not in names and "super" not in names:
        raise ShardedCheckpointSetupError(
            f"{type(strategy).__name__} cannot save checkpoints to Azure Blob Storage: it writes them itself, "
            "by local path, without the CheckpointIO plugin, so a blob URL would become a local folder. " + _ADVICE
        )


def _wrap_attach(original: Any) -> Any:
    @functools.wraps(original)
    def _attach_model_callbacks(self: Any) -> None:
        check_strategy(self.trainer)
        original(self)

    return _attach_model_callbacks


_missing: dict[type, str] = {}  # strategy classes whose wrapper could not be installed, and why
_wrapped: set[Any] = set()  # the wrappers installed


def targets() -> list[tuple[Any, str, Any, tuple[str, ...]]]:
    """What is wrapped: (owner, attribute, wrapper, the parameters the wrapper relies on)."""
    from lightning.fabric.strategies.fsdp import FSDPStrategy as FabricFSDP
    from lightning.fabric.strategies.model_parallel import ModelParallelStrategy as FabricModelParallel
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
    from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector

    trainer_save = ("self", "checkpoint", "filepath", "storage_options")
    trainer_load = ("self", "checkpoint_path", "weights_only")
    fabric_save = ("self", "path", "state", "storage_options", "filter")
    fabric_load = ("self", "path", "state", "strict", "weights_only")
    return [
        (_CallbackConnector, "_attach_model_callbacks", _wrap_attach, ("self",)),
        (
            ModelParallelStrategy,
            "save_checkpoint",
            _wrap_trainer_save("state_dict", lambda strategy: bool(strategy._save_distributed_checkpoint)),
            trainer_save,
        ),
        (ModelParallelStrategy, "load_checkpoint", _wrap_trainer_load(_load_trainer_model_parallel), trainer_load),
        (FSDPStrategy, "save_checkpoint", _wrap_trainer_save("model", _fsdp_saves_sharded), trainer_save),
        (FSDPStrategy, "load_checkpoint", _wrap_trainer_load(_load_trainer_fsdp), trainer_load),
        (
            FabricModelParallel,
            "save_checkpoint",
            _wrap_fabric_save(_model_parallel_state, lambda strategy: strategy._save_distributed_checkpoint),
            fabric_save,
        ),
        (FabricModelParallel, "load_checkpoint", _wrap_fabric_load(load_dtensor_state), fabric_load),
        (
            FabricFSDP,
            "save_checkpoint",
            _wrap_fabric_save(_fsdp_state, lambda strategy: strategy._state_dict_type == "sharded"),
            fabric_save,
        ),
        (FabricFSDP, "load_checkpoint", _wrap_fabric_load(load_fsdp_state), fabric_load),
    ]


def moved(owner: Any, name: str, parameters: tuple[str, ...]) -> str | None:
    """Why ``owner.name`` is not what its wrapper expects, or ``None`` if it is."""
    import inspect

    original = getattr(owner, name, None)
    if original is None or not callable(original):
        return f"{owner.__name__}.{name} is missing"
    found = tuple(inspect.signature(inspect.unwrap(original)).parameters)
    if found != parameters:
        return f"{owner.__name__}.{name} takes {found}, not {parameters}"
    attributes = {"ModelParallelStrategy": "_save_distributed_checkpoint", "FSDPStrategy": "_state_dict_type"}
    attribute = attributes.get(owner.__name__) if name == "save_checkpoint" else None
    if attribute is not None and attribute not in inspect.unwrap(original).__code__.co_names:
        return f"{owner.__name__}.{name} no longer decides by {attribute}"
    return None


@once
def install() -> None:
    """Wrap the sharded strategies' saving and loading (once per process)."""
    for owner, name, wrap, parameters in targets():
        reason = moved(owner, name, parameters)
        if reason is None:
            wrapper = wrap(getattr(owner, name))
            _wrapped.add(wrapper)
            setattr(owner, name, wrapper)
        elif owner.__module__.startswith("lightning.pytorch.strategies"):
            _missing[owner] = reason  # the Trainer refuses that strategy at setup (check_strategy)
        else:
            # Without the Trainer's hook no strategy could be checked at setup; Fabric has no setup
            # step of ours, so creating the plugin is where a moved Fabric method must stop the user.
            raise ShardedCheckpointSetupError(
                f"azstoragetorch cannot keep sharded checkpoints in Blob Storage with this Lightning version: {reason}."
            )
