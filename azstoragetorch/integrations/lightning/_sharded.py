"""Sharded (distributed) checkpoints in blob storage, for the strategies that save them themselves.

``ModelParallelStrategy`` (and ``FSDPStrategy(state_dict_type="sharded")``) bypass ``CheckpointIO``:
they call ``Path(filepath)``, make that directory and run ``dcp.save(checkpoint_id=path)`` into it,
so a blob URL became a local folder named ``http:/...``. This module wraps those strategies'
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

A strategy that saves by local path and is not handled here (DeepSpeed) is refused when the Trainer
sets up with the plugin, naming the strategy. Every wrapped method is looked up when the wrappers are
installed; one that has moved makes that setup raise, never a silent local save.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    ContainerUrl,
    not_found_as_file_not_found,
)
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

    def __init__(self, paths: BlobPaths, url: str, transfer: Mapping[str, Any]) -> None:
        self.paths = paths
        self.url = url.rstrip("/")
        self.transfer = dict(transfer)

    def child(self, name: str) -> str:
        return f"{self.url}/{name}"

    def writer(self) -> BlobStorageWriter:
        return BlobStorageWriter(
            self.url,
            credential=self.paths.credential,
            retry=self.paths.retry,
            max_concurrency=self.transfer.get("max_concurrency", 8),
            block_size=self.transfer.get("block_size", 8 * 1024 * 1024),
            validate_content=self.transfer.get("validate_content", False),
        )

    def reader(self) -> BlobStorageReader:
        return BlobStorageReader(
            self.url,
            credential=self.paths.credential,
            retry=self.paths.retry,
            max_concurrency=self.transfer.get("max_concurrency", 8),
            block_size=self.transfer.get("block_size", 8 * 1024 * 1024),
            validate_content=self.transfer.get("validate_content", False),
            verify_checksum=self.transfer.get("verify_checksum", False),
        )

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
    transfer = plugin._transfer | {"verify_checksum": plugin._verify_checksum} if plugin is not None else {}
    if plugin is not None and plugin._paths is not paths:
        transfer = {}
    return Target(paths, url, transfer)


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


def save_sharded(where: Target, converted_state: dict[str, Any], metadata: dict[str, Any], rank: int) -> None:
    """Save ``converted_state`` (this rank's shards) and ``metadata`` (rank 0's) as a sharded checkpoint.

    Every rank calls this. ``meta.pt`` is written by rank 0 before the shards; ``.metadata`` is
    committed last, so the checkpoint at ``where`` is the old one until the whole new one is in place.
    """
    buffer = io.BytesIO()
    torch.save(metadata, buffer)
    if rank == 0:
        with BlobIO(where.child(META_FILE), "wb", credential=where.paths.credential, retry=where.paths.retry) as meta:
            meta.write(buffer.getbuffer())
    dcp.save({**converted_state, _META_KEY: buffer.getvalue()}, storage_writer=where.writer())
    if rank == 0:
        _delete_blob(where.url, where)  # a single-file checkpoint of the same name, as Lightning unlinks it


def read_metadata(where: Target, weights_only: bool | None) -> dict[str, Any]:
    """The trainer state saved with the checkpoint at ``where``: the copy committed with its shards,
    or, for a checkpoint that Lightning wrote on disk and that was copied here, its ``meta.pt``."""
    entry: dict[str, Any] = {_META_KEY: b""}
    if _has_meta_entry(where):
        dcp.load(entry, storage_reader=where.reader())
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

    modules = {key: value for key, value in state.items() if isinstance(value, torch.nn.Module)}
    optimizers = {key: value for key, value in state.items() if isinstance(value, torch.optim.Optimizer)}
    if len(modules) != 1:
        raise ValueError(f"Loading a sharded checkpoint needs exactly one model in the state, got {len(modules)}.")
    [(module_key, module)] = modules.items()
    module_state = {module_key: get_model_state_dict(module)}
    dcp.load(module_state, storage_reader=where.reader())
    module.load_state_dict(module_state[module_key], strict=strict)
    for optimizer_key, optimizer in optimizers.items():
        optimizer_state = {optimizer_key: get_optimizer_state_dict(module, optimizer)}
        dcp.load(optimizer_state, storage_reader=where.reader())
        set_optimizer_state_dict(
            module,
            optimizer,
            optim_state_dict=optimizer_state[optimizer_key],
            options=StateDictOptions(cpu_offload=True),
        )
    metadata = read_metadata(where, weights_only)
    requested = state.keys() - modules.keys() - optimizers.keys()
    missing = sorted(requested - metadata.keys())
    if strict and missing:
        raise KeyError(
            f"The requested state contains keys {missing} that are not in the checkpoint's metadata; "
            "pass strict=False to load without them."
        )
    for key in requested & metadata.keys():
        state[key] = metadata.pop(key)
    return metadata


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


def _wrap_trainer_model_parallel_save(original: Any) -> Any:
    @functools.wraps(original)
    def save_checkpoint(self: Any, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        filepath = self.broadcast(filepath)  # first, so that every rank decides alike where rank 0 saves
        where = target(self, filepath)
        if where is None:
            return original(self, checkpoint, filepath, storage_options)  # type: ignore[no-any-return]
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint(..., storage_options=...) is not supported.")
        if not self._save_distributed_checkpoint:
            _save_full(self, checkpoint, where)
            return None
        converted = {"state_dict": checkpoint.pop("state_dict")}
        converted.update({f"optimizer_{i}": state for i, state in enumerate(checkpoint.pop("optimizer_states", []))})
        save_sharded(where, converted, checkpoint, self.global_rank)
        return None

    return save_checkpoint


def _save_full(strategy: Any, checkpoint: dict[str, Any], where: Target) -> None:
    """A full (single-file) checkpoint goes through the plugin, as for any other strategy, and
    replaces a sharded checkpoint of the same name, as Lightning's local save does."""
    from lightning.pytorch.strategies import Strategy

    Strategy.save_checkpoint(strategy, checkpoint, where.url)
    if strategy.global_rank == 0:
        remove_tree(where)


def _wrap_trainer_model_parallel_load(original: Any) -> Any:
    @functools.wraps(original)
    def load_checkpoint(self: Any, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        checkpoint_path = self.broadcast(checkpoint_path)
        where = target(self, checkpoint_path)
        if where is None:
            return original(self, checkpoint_path, weights_only)  # type: ignore[no-any-return]
        if not where.is_sharded():
            with local_copy(where) as local:
                return original(self, local, weights_only)  # type: ignore[no-any-return]
        state = {"state_dict": self.model, **{f"optimizer_{i}": opt for i, opt in enumerate(self.optimizers)}}
        return load_dtensor_state(where, state, strict=self.lightning_module.strict_loading, weights_only=weights_only)

    return load_checkpoint


class ShardedCheckpointSetupError(RuntimeError):
    """Raised at setup for a strategy that would save blob checkpoints to a local folder."""


# Strategies (by class name) that save by local path and cannot be sent to blob storage.
_REFUSED = {
    "DeepSpeedStrategy": "DeepSpeed writes its checkpoints itself, by local path",
}
_ADVICE = (
    "Use ModelParallelStrategy (FSDP2 and tensor parallelism), FSDPStrategy, or DDPStrategy with "
    "AzureBlobCheckpointIO, or save locally and copy the checkpoint with `azstoragetorch cp`."
)


def check_strategy(trainer: Any) -> None:
    """Refuse, at setup, a strategy that would save this plugin's blob checkpoints to a local folder,
    and a sharded strategy whose saving could not be wrapped in this Lightning version."""
    strategy = trainer.strategy
    if _blob_plugin(strategy) is None:
        return
    for cls in type(strategy).__mro__:
        if cls.__name__ in _REFUSED and cls.__module__.startswith("lightning."):
            raise ShardedCheckpointSetupError(
                f"{type(strategy).__name__} cannot save checkpoints to Azure Blob Storage: {_REFUSED[cls.__name__]}. "
                + _ADVICE
            )
    for cls, reason in _missing.items():
        if isinstance(strategy, cls):
            raise ShardedCheckpointSetupError(
                f"azstoragetorch cannot send {type(strategy).__name__}'s sharded checkpoints to Azure Blob Storage "
                f"with this Lightning version: {reason}. They would be written to a local folder instead."
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


def targets() -> list[tuple[Any, str, Any, tuple[str, ...]]]:
    """What is wrapped: (owner, attribute, wrapper, the parameters the wrapper relies on)."""
    from lightning.pytorch.strategies import ModelParallelStrategy
    from lightning.pytorch.trainer.connectors.callback_connector import _CallbackConnector

    return [
        (
            ModelParallelStrategy,
            "save_checkpoint",
            _wrap_trainer_model_parallel_save,
            ("self", "checkpoint", "filepath", "storage_options"),
        ),
        (
            ModelParallelStrategy,
            "load_checkpoint",
            _wrap_trainer_model_parallel_load,
            ("self", "checkpoint_path", "weights_only"),
        ),
        (_CallbackConnector, "_attach_model_callbacks", _wrap_attach, ("self",)),
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
    for attribute in ("_save_distributed_checkpoint",) if name == "save_checkpoint" else ():
        if attribute not in inspect.unwrap(original).__code__.co_names:
            return f"{owner.__name__}.{name} no longer uses {attribute}"
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
            setattr(owner, name, wrap(getattr(owner, name)))
        elif owner.__name__ == "_CallbackConnector":  # without it no strategy could be checked at setup
            raise ShardedCheckpointSetupError(
                f"azstoragetorch cannot check the Trainer's strategy with this Lightning version: {reason}."
            )
        else:  # the Trainer refuses that strategy at setup (check_strategy)
            _missing[owner] = reason
