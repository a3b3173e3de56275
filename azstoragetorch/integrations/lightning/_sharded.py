"""Sharded (distributed) checkpoints in blob storage, for the strategies that save them themselves.

``ModelParallelStrategy`` (and ``FSDPStrategy(state_dict_type="sharded")``) bypass ``CheckpointIO``:
they call ``Path(filepath)``, make that directory and run ``dcp_save(checkpoint_id=path)`` into it,
so a blob URL would become a local folder named ``http:/...``. This module wraps those strategies'
``save_checkpoint`` and ``load_checkpoint``: a path that a registered plugin claims is saved through
:class:`~azstoragetorch.integrations.dcp.BlobStorageWriter` and loaded through
:class:`~azstoragetorch.integrations.dcp.BlobStorageReader`, with Lightning's layout
(``<name>.ckpt/``: the shard files, ``.metadata`` and rank 0's ``meta.pt``); every other path goes
to Lightning's own method, with the caller's arguments.

Lightning's ``meta.pt`` (the trainer state besides weights and optimizers) is written before the
shards, for Lightning's own loader once a checkpoint is copied to disk. A copy of it travels inside
the DCP checkpoint too (the ``_META_KEY`` entry), so that it is committed with ``.metadata`` in one
request: a save killed half way through an overwrite leaves the old weights with the old trainer
state, never the new ``meta.pt`` with old weights.

A strategy that saves by local path without the plugin (DeepSpeed's does) is refused when the
Trainer sets up with the plugin, naming the strategy. Every wrapped method is looked up when the wrappers are
installed; one that has moved makes that setup raise, never a silent local save.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import io
import os
import shutil
import tempfile
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from azure.core.exceptions import ResourceNotFoundError
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    ContainerUrl,
    not_found_as_file_not_found,
    redact_url,
)
from azstoragetorch._options import TransferOptions
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import _paths
from azstoragetorch.integrations.lightning._paths import BlobPaths
from azstoragetorch.io import BlobIO

# Lightning's name for rank 0's file of trainer state in a sharded checkpoint directory.
META_FILE = "meta.pt"
# The DCP entry that holds the same trainer state, committed with the checkpoint's .metadata.
_META_KEY = "azstoragetorch_lightning_meta"
_DCP_METADATA = ".metadata"


class Target:
    """One checkpoint in blob storage: its URL and the settings its transfers use."""

    def __init__(self, paths: BlobPaths, url: str, transfer: TransferOptions) -> None:
        self.paths = paths
        self.url = url.rstrip("/")
        self.transfer = transfer

    def child(self, name: str) -> str:
        return f"{self.url}/{name}"

    def writer(self) -> BlobStorageWriter:
        return BlobStorageWriter._from_options(self.url, credential=self.paths.credential, options=self._options())

    def reader(self) -> BlobStorageReader:
        # The plugin's verify_checksum: None (its default) checks every shard file read whole that
        # has a recorded CRC-32, as BlobStorageReader does by default; only False turns it off.
        verify = None if self.transfer.verify_checksum is not False else False
        options = dataclasses.replace(self._options(), verify_checksum=verify)
        return BlobStorageReader._from_options(self.url, credential=self.paths.credential, options=options)

    def _options(self) -> TransferOptions:
        """The plugin's settings that BlobStorageWriter and BlobStorageReader share."""
        return dataclasses.replace(self.transfer, retry=self.paths.retry, progress_hook=None)

    def blob(self, name: str) -> AzStorageTorchBlobClient:
        return AzStorageTorchBlobClient.from_url(self.child(name), self.paths.credential, retry=self.paths.retry)

    def container(self) -> tuple[AzStorageTorchContainerClient, str]:
        container_url, prefix = ContainerUrl.parse_with_prefix(self.url)
        client = AzStorageTorchContainerClient(container_url, self.paths.credential, retry=self.paths.retry)
        return client, prefix.strip("/")

    def is_sharded(self) -> bool:
        """Whether a committed DCP checkpoint is here (its ``.metadata`` exists)."""
        try:
            self.blob(_DCP_METADATA).get_properties()
        except ResourceNotFoundError:
            return False
        return True


def target(strategy: Any, path: Any) -> Target | None:
    """The blob checkpoint ``path`` names, if a registered plugin claims it; ``None`` for any other path."""
    try:
        text = os.fspath(path)
    except TypeError:
        return None
    if not isinstance(text, str):
        return None
    paths = _paths.claim(text)
    if paths is None:
        return None
    url = paths.url_for(text)  # raises ValueError for a claimed path that cannot be used
    assert url is not None
    plugin = _blob_plugin(strategy)
    if plugin is not None and plugin._paths is paths:
        return Target(paths, url, plugin._transfer)
    return Target(paths, url, TransferOptions(retry=paths.retry))


def _blob_plugin(strategy: Any) -> Any:
    """The strategy's AzureBlobCheckpointIO (also inside AsyncCheckpointIO), if it has one."""
    from azstoragetorch.integrations.lightning._checkpoint_io import AzureBlobCheckpointIO

    try:
        plugin = strategy.checkpoint_io  # Fabric's sharded strategies refuse the question
    except NotImplementedError:
        return None
    for _ in range(3):  # AsyncCheckpointIO and other wrappers keep the plugin they wrap as .checkpoint_io
        if isinstance(plugin, AzureBlobCheckpointIO):
            return plugin
        plugin = getattr(plugin, "checkpoint_io", None)
    return None


# -- saving and loading ---------------------------------------------------------------------------


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
    still keeps its saves in the executor and error that removals are queued behind, see _paths)."""
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


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    modules = {key: value for key, value in state.items() if isinstance(value, torch.nn.Module)}
    optimizers = {key: value for key, value in state.items() if isinstance(value, torch.optim.Optimizer)}
    if len(modules) != 1:
        raise ValueError(
            f"A sharded checkpoint holds exactly one model: pass it in the state, as {{'model': model, ...}} "
            f"(found {len(modules)})."
        )
    return modules, optimizers


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


def _fsdp_sharded_state_dicts(module: torch.nn.Module) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.api import ShardedOptimStateDictConfig, ShardedStateDictConfig

    return FullyShardedDataParallel.state_dict_type(
        module=module,
        state_dict_type=StateDictType.SHARDED_STATE_DICT,
        state_dict_config=ShardedStateDictConfig(offload_to_cpu=True),
        optim_state_dict_config=ShardedOptimStateDictConfig(offload_to_cpu=True),
    )


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


def remove_tree(where: Target) -> bool:
    """Delete every blob under the checkpoint's prefix, ``.metadata`` first (so that what is left of a
    removal that fails half way is not a loadable checkpoint); whether there was any."""
    client, prefix = where.container()
    names = [blob.client.blob_url.blob_name for blob in client.list_blobs(f"{prefix}/")]
    metadata_name = f"{prefix}/{_DCP_METADATA}"
    for name in sorted(names, key=lambda name: name != metadata_name):
        with contextlib.suppress(ResourceNotFoundError):
            client.blob_client(name).delete()
    return bool(names)


def _delete_blob(url: str, where: Target) -> None:
    with contextlib.suppress(ResourceNotFoundError):
        AzStorageTorchBlobClient.from_url(url, where.paths.credential, retry=where.paths.retry).delete()


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


# -- the wrappers ---------------------------------------------------------------------------------


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


_lock = threading.Lock()
_installed = False
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


def install() -> None:
    """Wrap the sharded strategies' saving and loading (once per process)."""
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
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
