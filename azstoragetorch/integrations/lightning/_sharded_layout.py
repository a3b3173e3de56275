"""Where a sharded checkpoint lives in blob storage, which entries it holds, and which blob commits it.

A checkpoint at ``<name>.ckpt/`` holds Lightning's layout: the shard files, ``.metadata`` and rank 0's
``meta.pt``. Its ``.metadata`` blob commits it: the checkpoint exists once that blob does, so it is
written last and removed first. Lightning's ``meta.pt`` (the trainer state besides weights and optimizers)
is written before the shards, for Lightning's own loader once a checkpoint is copied to disk; a copy
of it travels inside the DCP checkpoint too (the ``_META_KEY`` entry), so that it is committed with
``.metadata`` in one request: a save killed half way through an overwrite leaves the old weights with
the old trainer state, never the new ``meta.pt`` with old weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any

import torch
from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._client import AzStorageTorchBlobClient, AzStorageTorchContainerClient, ContainerUrl
from azstoragetorch._options import TransferOptions
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import _paths
from azstoragetorch.integrations.lightning._paths import BlobPaths

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


def _split(state: dict[str, Any]) -> tuple[dict[str, torch.nn.Module], dict[str, torch.optim.Optimizer]]:
    modules = {key: value for key, value in state.items() if isinstance(value, torch.nn.Module)}
    optimizers = {key: value for key, value in state.items() if isinstance(value, torch.optim.Optimizer)}
    if len(modules) != 1:
        raise ValueError(
            f"A sharded checkpoint holds exactly one model: pass it in the state, as {{'model': model, ...}} "
            f"(found {len(modules)})."
        )
    return modules, optimizers


def _fsdp_sharded_state_dicts(module: torch.nn.Module) -> Any:
    from torch.distributed.fsdp import FullyShardedDataParallel, StateDictType
    from torch.distributed.fsdp.api import ShardedOptimStateDictConfig, ShardedStateDictConfig

    return FullyShardedDataParallel.state_dict_type(
        module=module,
        state_dict_type=StateDictType.SHARDED_STATE_DICT,
        state_dict_config=ShardedStateDictConfig(offload_to_cpu=True),
        optim_state_dict_config=ShardedOptimStateDictConfig(offload_to_cpu=True),
    )


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
