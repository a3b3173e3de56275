"""The checkpoint plugin: :class:`AzureBlobCheckpointIO` saves and loads Trainer checkpoints in blobs."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import os
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any

import torch
from azure.core.exceptions import ResourceNotFoundError
from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    BlobUrl,
    CredentialArgument,
    TransferStats,
    redact_url,
    validate_credential,
)
from azstoragetorch._options import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_CONCURRENCY, TransferOptions
from azstoragetorch.integrations.lightning import _path_wrappers, _paths, _sharded, _sharded_layout, _stats
from azstoragetorch.integrations.lightning._paths import BlobPaths
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions

_LOGGER = logging.getLogger("azstoragetorch")
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
    - fsspec style, as used with adlfs, on the account of ``account_url`` only (other ``az://`` and
      ``abfs://`` paths stay adlfs's): ``abfs[s]://<container>@<account>.dfs.core.windows.net/<path>``
      naming that account, or ``az://<container>/<path>`` and ``abfs://<container>/<path>``, unless
      adlfs's own settings (``AZURE_STORAGE_CONNECTION_STRING``, ``AZURE_STORAGE_ACCOUNT_NAME``,
      fsspec's configuration) name another account in this process.

    Put a SAS token in ``credential`` (as :class:`~azure.core.credentials.AzureSasCredential`),
    not in a directory URL: Lightning appends file names to directory paths, after any query string.

    Args:
        credential: How to authorize requests, as for :class:`~azstoragetorch.io.BlobIO`: ``None``
            (the default) for :class:`azure.identity.DefaultAzureCredential`, ``False`` for anonymous
            access, an :class:`~azure.core.credentials.AzureSasCredential`,
            :class:`~azure.core.credentials.AzureNamedKeyCredential` or any token credential.
        account_url: The storage account's blob endpoint, such as
            ``https://<account>.blob.core.windows.net`` or ``http://127.0.0.1:10000/devstoreaccount1``.
            Needed for endpoints other than Azure's own and for ``az://`` and ``abfs[s]://`` paths.
        max_concurrency: Parallel requests per checkpoint saved or loaded.
        block_size: Bytes per uploaded block and per ranged read.
        validate_content: Check every upload and every downloaded range with an MD5 (see
            :class:`~azstoragetorch.io.BlobIO`); about 1.5 CPU seconds per GB.
        verify_checksum: Check every checkpoint loaded against the CRC-32 recorded when it was
            saved, as :class:`~azstoragetorch.io.BlobIO` does: ``None`` (the default) checks every
            checkpoint that has a recorded CRC-32 and reads one without it unverified; ``True``
            refuses a checkpoint without one; ``False`` checks nothing. About 0.1 CPU seconds per GB.
        retry: How throttled or briefly failing requests are retried, for saves, loads, removals
            and Lightning's listings alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None``
            for its defaults.
        log_stats: Log each save's and load's transfer statistics through the Trainer's loggers:
            ``checkpoint/save_seconds``, ``checkpoint/save_mib_per_s``, ``checkpoint/save_retries``,
            ``checkpoint/save_stall_seconds`` (how long ``Trainer.save_checkpoint`` held up the
            training loop, with or without ``AsyncCheckpointIO``), ``checkpoint/load_seconds`` and
            more; see :doc:`observability`.
        progress_hook: Given to every save's and load's :class:`~azstoragetorch.io.BlobIO`: called
            with ``(bytes_done, bytes_total)`` from the transfer threads at most every 100 ms.

    Raises:
        TypeError: ``credential`` is of an unsupported type, or ``retry`` is not a ``RetryOptions``.
        ValueError: ``account_url`` is not an ``http(s)://`` URL without a query string, or a
            transfer setting is out of range.
    """

    def __init__(
        self,
        credential: CredentialArgument = None,
        *,
        account_url: str | None = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        block_size: int = DEFAULT_BLOCK_SIZE,
        validate_content: bool = False,
        verify_checksum: bool | None = None,
        retry: RetryOptions | None = None,
        log_stats: bool = True,
        progress_hook: Callable[[int, int | None], Any] | None = None,
    ) -> None:
        super().__init__()
        validate_credential(credential)
        self._transfer = TransferOptions.from_keywords(locals())
        self._paths = BlobPaths(_checked_account_url(account_url), credential, self._transfer.retry)
        self._saves = _SavesInProgress()
        self._log_stats = bool(log_stats)
        self._pending_metrics = _stats.PendingMetrics()
        _paths.register(self._paths)
        _path_wrappers.install()
        _sharded.install()
        if self._log_stats:
            _stats.install()

    def __repr__(self) -> str:
        credential = type(self._paths.credential).__name__
        return f"{type(self).__name__}(account_url={self._paths.account_url!r}, credential={credential})"

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP processes receive a pickled copy; the lock of the original stays behind.
        return {"paths": self._paths, "transfer": self._transfer, "log_stats": self._log_stats}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._paths = state["paths"]
        self._transfer = state["transfer"]
        self._saves = _SavesInProgress()
        self._log_stats = state.get("log_stats", True)
        self._pending_metrics = _stats.PendingMetrics()
        _paths.register(self._paths)
        _path_wrappers.install()
        _sharded.install()
        if self._log_stats:
            _stats.install()

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
        # verify_checksum concerns reads; a writer records the CRC-32 whatever it is.
        transfer = dataclasses.replace(
            self._transfer, verify_checksum=None, **_checked_storage_options(storage_options)
        )
        url = self._url(path)
        started = time.perf_counter()
        writing = BlobIO._open(url, "wb", credential=self._paths.credential, options=transfer)
        with self._saves.saving(url), writing as writer:
            torch.save(checkpoint, writer)
        if self._log_stats:
            metrics = _stats.checkpoint_metrics("save", writer.stats, time.perf_counter() - started)
            self._pending_metrics.add(metrics)
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
            azstoragetorch.exceptions.ChecksumMismatchError: The bytes received do not match the
                CRC-32 recorded when the checkpoint was saved (unless ``verify_checksum=False``), or
                a range's MD5 (``validate_content``).
        """
        started = time.perf_counter()

        def record(stats: TransferStats) -> None:
            metrics = _stats.checkpoint_metrics("load", stats, time.perf_counter() - started)
            self._pending_metrics.add(metrics)

        return _path_wrappers.load_blob_checkpoint(
            os.fspath(path),
            self._url(path),
            credential=self._paths.credential,
            map_location="cpu" if map_location is None else map_location,
            weights_only=weights_only,
            on_stats=record if self._log_stats else None,
            options=self._transfer,
        )

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``; a checkpoint that is already gone is not an error.

        A sharded checkpoint (a ``<name>.ckpt/`` prefix, as ``ModelParallelStrategy`` saves) is
        deleted whole: every blob under the prefix, its ``.metadata`` first.

        If a save of the same path is still uploading in another thread, this waits for it first,
        so that the save cannot re-create the checkpoint after it was deleted. Under
        ``AsyncCheckpointIO``, a removal also waits its turn in the queue of saves: it runs after
        every save asked for before it, in the saving thread, so ``save_top_k`` holds once the queue
        has drained.
        """
        url = self._url(path)
        self._saves.wait_for(url)
        try:
            AzStorageTorchBlobClient.from_url(url, self._paths.credential, retry=self._paths.retry).delete()
        except ResourceNotFoundError:
            pass
        else:
            _LOGGER.debug("Removed checkpoint %s", BlobUrl.parse(url).display_url)
        if _sharded_layout.remove_tree(_sharded_layout.Target(self._paths, url, self._transfer)):
            _LOGGER.debug("Removed sharded checkpoint %s", BlobUrl.parse(url).display_url)

    def teardown(self) -> None:
        """Nothing to release: connections are shared by the process and closed with it."""

    def _url(self, path: Any) -> str:
        text = os.fspath(path)
        url = self._paths.url_for(text) if isinstance(text, str) else None
        if url is None:
            raise ValueError(
                f"AzureBlobCheckpointIO cannot use {redact_url(str(text))!r}: {self._paths.refusal(str(text))}"
            )
        BlobUrl.parse(url)  # a container without a blob name, and other malformed URLs, raise ValueError here
        return url


class _SavesInProgress:
    """The blob URLs being written right now, so that a removal can wait for a save of the same URL.

    Only saves that have started are here; saves still queued in ``AsyncCheckpointIO`` are ordered
    before a removal by queueing the removal behind them (``_path_wrappers``).
    """

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
            f"account_url {redact_url(account_url)!r} must be an http(s) URL such as "
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
    return dict(storage_options)  # checked by the TransferOptions they go into
