"""PyTorch Lightning integration: :class:`AzureBlobCheckpointIO` saves and loads Trainer checkpoints in Blob Storage.

Needs Lightning: ``pip install "azstoragetorch[lightning]"``.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import threading
import urllib.parse
from collections.abc import Iterator
from typing import Any

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
except ImportError as error:  # pragma: no cover - exercised by a test in a process without Lightning
    raise ImportError(
        "azstoragetorch.integrations.lightning needs PyTorch Lightning. "
        'Install it with: pip install "azstoragetorch[lightning]"'
    ) from error

import torch
from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._client import AzStorageTorchBlobClient, BlobUrl, CredentialArgument
from azstoragetorch._client._credentials import validate_credential
from azstoragetorch.integrations import _lightning_paths
from azstoragetorch.integrations._lightning_paths import ACCEPTED_FORMS, BlobPaths
from azstoragetorch.io import BlobIO, _check_transfer_options

__all__ = ["AzureBlobCheckpointIO"]

_LOGGER = logging.getLogger("azstoragetorch")
_MiB = 1024 * 1024
# The storage_options that Trainer.save_checkpoint may pass for one save: BlobIO's transfer settings.
_STORAGE_OPTION_KEYS = ("block_size", "max_concurrency", "validate_content")


class AzureBlobCheckpointIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that keeps checkpoints in Azure Blob Storage.

    Give it to the Trainer and point checkpoint paths at a container::

        from lightning.pytorch import Trainer
        from lightning.pytorch.callbacks import ModelCheckpoint
        from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO

        checkpoints = ModelCheckpoint(
            dirpath="https://<account>.blob.core.windows.net/<container>/run-1",
            save_top_k=3, monitor="val_loss", save_last=True,
        )
        trainer = Trainer(plugins=[AzureBlobCheckpointIO()], callbacks=[checkpoints])
        trainer.fit(model)                    # later: trainer.fit(model, ckpt_path="last")

    Saving streams :func:`torch.save` into a :class:`~azstoragetorch.io.BlobIO`, so blocks upload in
    parallel while the checkpoint is serialized, and the blob changes only when the whole
    checkpoint is committed: a failed save raises, commits nothing and leaves the previous
    checkpoint of that name as it was. Loading reads the blob with parallel ranged requests.

    Creating the plugin also teaches Lightning's own path handling about blob paths in this
    process, with this plugin's credential: ``ModelCheckpoint``'s existence checks and
    ``save_top_k`` deletions, ``fit(ckpt_path="last")``, loggers and configs under a blob
    ``default_root_dir``, and ``LightningModule.load_from_checkpoint(<blob URL>)``.

    Paths may be written as:

    - ``https://<account>.blob.core.windows.net/<container>/<path>`` (or another Azure cloud's
      blob endpoint);
    - any URL under ``account_url``: the Azurite emulator
      (``http://127.0.0.1:10000/devstoreaccount1/<container>/<path>``), a custom domain or Azure Stack;
    - fsspec style, as used with adlfs: ``abfs[s]://<container>@<account>.dfs.core.windows.net/<path>``
      names its account; ``az://<container>/<path>`` and ``abfs://<container>/<path>`` use
      ``account_url``, or else ``https://$AZURE_STORAGE_ACCOUNT_NAME.blob.core.windows.net``.

    Put a SAS token in ``credential`` (as :class:`~azure.core.credentials.AzureSasCredential`),
    not in a directory URL: Lightning appends file names to directory paths, after any query string.

    Args:
        credential: How to authorize requests, as for :class:`~azstoragetorch.io.BlobIO`: ``None``
            (the default) for :class:`azure.identity.DefaultAzureCredential`, ``False`` for anonymous
            access, an :class:`~azure.core.credentials.AzureSasCredential`,
            :class:`~azure.core.credentials.AzureNamedKeyCredential` or any token credential.
        account_url: The storage account's blob endpoint, such as
            ``https://<account>.blob.core.windows.net`` or ``http://127.0.0.1:10000/devstoreaccount1``.
            Needed for endpoints other than Azure's own and for ``az://`` paths that name no account.
        max_concurrency: Parallel requests per checkpoint saved or loaded.
        block_size: Bytes per uploaded block and per ranged read.
        validate_content: Send an MD5 of every uploaded block for the service to check.

    Raises:
        TypeError: ``credential`` is of an unsupported type.
        ValueError: ``account_url`` is not an ``http(s)://`` URL without a query string, or a
            transfer setting is out of range.
    """

    def __init__(
        self,
        credential: CredentialArgument = None,
        *,
        account_url: str | None = None,
        max_concurrency: int = 8,
        block_size: int = 8 * _MiB,
        validate_content: bool = False,
    ) -> None:
        super().__init__()
        validate_credential(credential)
        _check_transfer_options(max_concurrency, block_size)
        self._paths = BlobPaths(_checked_account_url(account_url), credential)
        self._transfer = {
            "max_concurrency": max_concurrency,
            "block_size": block_size,
            "validate_content": validate_content,
        }
        self._saves = _SavesInProgress()
        _lightning_paths.register(self._paths)

    def __repr__(self) -> str:
        credential = type(self._paths.credential).__name__
        return f"{type(self).__name__}(account_url={self._paths.account_url!r}, credential={credential})"

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP processes receive a pickled copy; the lock of the original stays behind.
        return {"paths": self._paths, "transfer": self._transfer}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._paths = state["paths"]
        self._transfer = state["transfer"]
        self._saves = _SavesInProgress()
        _lightning_paths.register(self._paths)

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` with :func:`torch.save` to the blob at ``path``, replacing it atomically.

        Args:
            checkpoint: The checkpoint Lightning assembled.
            path: Where to write it (see the class description for the accepted forms).
            storage_options: ``None``, or a dict overriding this plugin's ``max_concurrency``,
                ``block_size`` or ``validate_content`` for this one save.

        Raises:
            ValueError: ``path`` is not a blob path.
            TypeError: ``storage_options`` is not a dict, or has other keys.
            azstoragetorch.exceptions.FatalBlobIOWriteError: The upload failed. Nothing was
                committed; a previous checkpoint at ``path`` is intact.
        """
        transfer = self._transfer | _checked_storage_options(storage_options)
        url = self._url(path)
        with self._saves.saving(url), BlobIO(url, "wb", credential=self._paths.credential, **transfer) as writer:
            torch.save(checkpoint, writer)
        _LOGGER.debug("Saved checkpoint %s", BlobUrl.parse(url).display_url)

    def load_checkpoint(self, path: Any, map_location: Any | None = None, weights_only: bool | None = None) -> Any:
        """Read the checkpoint at ``path`` with :func:`torch.load`.

        Args:
            path: The checkpoint's blob path.
            map_location: As for :func:`torch.load`. ``None`` (the default) loads every tensor onto
                the CPU, like Lightning's own ``TorchCheckpointIO``; the strategy moves them on.
            weights_only: As for :func:`torch.load`.

        Raises:
            ValueError: ``path`` is not a blob path.
            FileNotFoundError: There is no checkpoint at ``path`` (the message names the URL
                without any SAS token).
        """
        return _lightning_paths.load_blob_checkpoint(
            os.fspath(path),
            self._url(path),
            credential=self._paths.credential,
            map_location="cpu" if map_location is None else map_location,
            weights_only=weights_only,
            max_concurrency=self._transfer["max_concurrency"],
            block_size=self._transfer["block_size"],
        )

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``; a checkpoint that is already gone is not an error.

        If a save of the same path is still uploading (under ``AsyncCheckpointIO``), this waits
        for it first, so that the save cannot re-create a checkpoint that ``save_top_k`` dropped.
        """
        url = self._url(path)
        self._saves.wait_for(url)
        try:
            AzStorageTorchBlobClient.from_url(url, self._paths.credential).delete()
        except ResourceNotFoundError:
            return
        _LOGGER.debug("Removed checkpoint %s", BlobUrl.parse(url).display_url)

    def teardown(self) -> None:
        """Nothing to release: connections are shared by the process and closed with it."""

    def _url(self, path: Any) -> str:
        text = os.fspath(path)
        url = self._paths.url_for(text) if isinstance(text, str) else None
        shown = _lightning_paths._shown(str(text))
        if url is None:
            raise ValueError(f"AzureBlobCheckpointIO cannot use {shown!r}: expected {ACCEPTED_FORMS}.")
        BlobUrl.parse(url)  # a container without a blob name, and other malformed URLs, raise ValueError here
        return url


class _SavesInProgress:
    """The blob URLs being written right now, so that a removal can wait for a save of the same URL."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._urls: collections.Counter[str] = collections.Counter()

    @contextlib.contextmanager
    def saving(self, url: str) -> Iterator[None]:
        with self._changed:
            self._urls[url] += 1
        try:
            yield
        finally:
            with self._changed:
                self._urls[url] -= 1
                if not self._urls[url]:
                    del self._urls[url]
                self._changed.notify_all()

    def wait_for(self, url: str) -> None:
        with self._changed:
            self._changed.wait_for(lambda: url not in self._urls)


def _checked_account_url(account_url: str | None) -> str | None:
    if account_url is None:
        return None
    if not isinstance(account_url, str):
        raise TypeError(f"account_url must be a str, not {type(account_url).__name__}.")
    parts = urllib.parse.urlsplit(account_url)
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(
            f"account_url {account_url.split('?', 1)[0]!r} must be an http(s) URL such as "
            "https://<account>.blob.core.windows.net or http://127.0.0.1:10000/devstoreaccount1."
        )
    if parts.query or parts.fragment:
        raise ValueError(
            "account_url must not have a query string; pass a SAS token as credential=AzureSasCredential(...)."
        )
    return account_url.rstrip("/")


def _checked_storage_options(storage_options: Any) -> dict[str, Any]:
    if storage_options is None:
        return {}
    if not isinstance(storage_options, dict):
        raise TypeError(
            f"storage_options must be a dict (or None) for AzureBlobCheckpointIO, not {type(storage_options).__name__}."
        )
    unknown = sorted(set(storage_options) - set(_STORAGE_OPTION_KEYS))
    if unknown:
        raise TypeError(
            f"AzureBlobCheckpointIO does not support storage_options {', '.join(map(repr, unknown))}; "
            f"supported keys: {', '.join(_STORAGE_OPTION_KEYS)}."
        )
    _check_transfer_options(storage_options.get("max_concurrency", 1), storage_options.get("block_size", 1))
    return dict(storage_options)
