"""PyTorch Lightning integration: checkpoints and data in Azure Blob Storage.

- :class:`AzureBlobCheckpointIO` saves and loads Trainer checkpoints in Blob Storage.
- :class:`BlobDataModule` serves train/val/test/predict data from containers, with
  :class:`BlobSplit` describing each split.
- :class:`BlobSaveConfigCallback` lets ``LightningCLI`` save its config into a container.

Needs Lightning: ``pip install "azstoragetorch[lightning]"``.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import importlib
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, cast

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.fabric.utilities.cloud_io import get_filesystem
    from lightning.pytorch import LightningDataModule, LightningModule, Trainer
    from lightning.pytorch.cli import SaveConfigCallback
    from lightning.pytorch.utilities import rank_zero_warn
except ImportError as error:  # pragma: no cover - exercised by a test in a process without Lightning
    raise ImportError(
        "azstoragetorch.integrations.lightning needs PyTorch Lightning. "
        'Install it with: pip install "azstoragetorch[lightning]"'
    ) from error

import torch
from azure.core.exceptions import AzureError, ResourceNotFoundError
from torchdata.stateful_dataloader import StatefulDataLoader

from azstoragetorch._cache import make_cache
from azstoragetorch._client import AzStorageTorchBlobClient, BlobUrl, CredentialArgument
from azstoragetorch._client._credentials import validate_credential
from azstoragetorch._client._pipeline import scrubbed, validate_retry
from azstoragetorch._client._redaction import scrub, shown
from azstoragetorch.datasets import DEFAULT_PREFETCH, Blob, BlobDataset, IterableBlobDataset, _list_source
from azstoragetorch.integrations import _lightning_paths
from azstoragetorch.integrations._lightning_paths import BlobPaths
from azstoragetorch.io import BlobIO, _check_transfer_options
from azstoragetorch.retry import RetryOptions

__all__ = ["AzureBlobCheckpointIO", "BlobDataModule", "BlobSaveConfigCallback", "BlobSplit"]

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
            saved (see :class:`~azstoragetorch.io.BlobIO`); about 0.3 CPU seconds per GB.
        retry: How throttled or briefly failing requests are retried, for saves, loads, removals
            and Lightning's listings alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None``
            for its defaults.

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
        max_concurrency: int = 8,
        block_size: int = 8 * _MiB,
        validate_content: bool = False,
        verify_checksum: bool = False,
        retry: RetryOptions | None = None,
    ) -> None:
        super().__init__()
        validate_credential(credential)
        _check_transfer_options(max_concurrency, block_size)
        validate_retry(retry)
        self._paths = BlobPaths(_checked_account_url(account_url), credential, retry)
        self._transfer = {
            "max_concurrency": max_concurrency,
            "block_size": block_size,
            "validate_content": validate_content,
            "retry": retry,
        }
        self._verify_checksum = verify_checksum
        self._saves = _SavesInProgress()
        _lightning_paths.register(self._paths)

    def __repr__(self) -> str:
        credential = type(self._paths.credential).__name__
        return f"{type(self).__name__}(account_url={self._paths.account_url!r}, credential={credential})"

    def __getstate__(self) -> dict[str, Any]:
        # Spawned DDP processes receive a pickled copy; the lock of the original stays behind.
        return {"paths": self._paths, "transfer": self._transfer, "verify_checksum": self._verify_checksum}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._paths = state["paths"]
        self._transfer = state["transfer"]
        self._verify_checksum = state["verify_checksum"]
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
            azstoragetorch.exceptions.ChecksumMismatchError: (``verify_checksum`` or
                ``validate_content``) The bytes received do not match the checkpoint's checksum.
        """
        return _lightning_paths.load_blob_checkpoint(
            os.fspath(path),
            self._url(path),
            credential=self._paths.credential,
            map_location="cpu" if map_location is None else map_location,
            weights_only=weights_only,
            max_concurrency=self._transfer["max_concurrency"],
            block_size=self._transfer["block_size"],
            validate_content=self._transfer["validate_content"],
            verify_checksum=self._verify_checksum,
            retry=self._paths.retry,
        )

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the checkpoint at ``path``; a checkpoint that is already gone is not an error.

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
            return
        _LOGGER.debug("Removed checkpoint %s", BlobUrl.parse(url).display_url)

    def teardown(self) -> None:
        """Nothing to release: connections are shared by the process and closed with it."""

    def _url(self, path: Any) -> str:
        text = os.fspath(path)
        url = self._paths.url_for(text) if isinstance(text, str) else None
        if url is None:
            raise ValueError(f"AzureBlobCheckpointIO cannot use {shown(str(text))!r}: {self._paths.refusal(str(text))}")
        BlobUrl.parse(url)  # a container without a blob name, and other malformed URLs, raise ValueError here
        return url


class _SavesInProgress:
    """The blob URLs being written right now, so that a removal can wait for a save of the same URL.

    Only saves that have started are here; saves still queued in ``AsyncCheckpointIO`` are ordered
    before a removal by queueing the removal behind them (``_lightning_paths``).
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
            f"account_url {shown(account_url)!r} must be an http(s) URL such as "
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


# -- data --------------------------------------------------------------------------------------------

_SPLITS = ("train", "val", "test", "predict")
_SPLITS_BY_STAGE = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}


@dataclasses.dataclass(repr=False)
class BlobSplit:
    """Where one split's samples come from and how it is read.

    Args:
        source: A container URL, optionally followed by a folder
            (``https://<account>.blob.core.windows.net/<container>/train`` means the blobs under
            ``train/``), whose blobs are listed at ``setup``; or a list of blob URLs. URLs may carry
            a SAS token.
        iterable: Stream the split with :class:`~azstoragetorch.datasets.IterableBlobDataset`,
            which shards itself across ranks and DataLoader workers, instead of the map-style
            :class:`~azstoragetorch.datasets.BlobDataset`, which Lightning's ``DistributedSampler``
            shards.
        transform: This split's transform, overriding the data module's: a callable taking a
            :class:`~azstoragetorch.datasets.Blob`, or its import path (``"package.module.function"``).
    """

    source: str | list[str]
    iterable: bool = False
    transform: Callable[[Blob], Any] | str | None = None

    def __repr__(self) -> str:
        # The source URLs may carry SAS tokens, which must never be shown.
        source = scrub(repr(self.source))
        return f"BlobSplit(source={source}, iterable={self.iterable!r}, transform={self.transform!r})"


class BlobDataModule(LightningDataModule):
    """A ``LightningDataModule`` whose splits are blobs in Azure Blob Storage, one sample per blob.

    ::

        from azstoragetorch.integrations.lightning import BlobDataModule, BlobSplit

        data = BlobDataModule(
            train=BlobSplit("https://<account>.blob.core.windows.net/<container>/train", iterable=True),
            val="https://<account>.blob.core.windows.net/<container>/val",
            transform="my_project.data.decode",  # Blob -> sample; a callable or its import path
            batch_size=64,
            num_workers=4,
        )
        trainer.fit(model, datamodule=data)

    A split is a :class:`BlobSplit`, or just its ``source``: a container URL with an optional folder,
    or a list of blob URLs (map-style). Each split configured for a stage is listed once, in
    ``setup``. Map-style splits are sharded across ranks by Lightning's ``DistributedSampler``;
    iterable ones shard themselves across ranks and DataLoader workers, and the training split
    gives every rank the same number of samples (``balance_ranks``), so DDP never waits at the end of
    an epoch. Either way every sample comes once per epoch when the number of blobs divides by the
    number of ranks (otherwise up to ``world_size - 1`` samples repeat, as with ``DistributedSampler``).
    Training data is shuffled anew each epoch, iterable splits by the trainer's epoch.

    Every split's DataLoader is a torchdata ``StatefulDataLoader``, so a checkpoint taken in the
    middle of an epoch (``ModelCheckpoint(every_n_train_steps=...)``, saved by
    :class:`AzureBlobCheckpointIO` or anywhere else) resumes the training data where it stopped,
    neither repeating nor skipping a sample. The module's own state records which blobs each split
    had, and warns on resuming if that changed.

    Every argument can come from a LightningCLI YAML config; callables as import paths.

    Args:
        train: The training split.
        val: The validation split.
        test: The test split.
        predict: The prediction split.
        transform: Turns a :class:`~azstoragetorch.datasets.Blob` into a sample (a callable or its
            import path); the default sample is ``{"url": ..., "data": <bytes>}``.
        collate_fn: The DataLoaders' ``collate_fn`` (a callable or its import path); ``None`` for
            PyTorch's default.
        batch_size: Samples per batch.
        num_workers: DataLoader worker processes per split.
        shuffle: Shuffle the training split (never the others).
        seed: Seeds the training order (single-process runs and iterable splits; in distributed runs
            Lightning's ``DistributedSampler`` uses the seed of ``seed_everything``).
        persistent_workers: Keep DataLoader workers between epochs (needs ``num_workers > 0``).
        pin_memory: Pin batches in page-locked memory, for faster copies to a GPU.
        credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored for URLs with a SAS token.
        prefetch: Samples fetched ahead per worker by iterable splits (1 to 128).
        retry: How throttled or briefly failing requests are retried, listing and reading alike: a
            :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
        cache_dir: A local directory in which every split keeps the blobs it reads (default samples
            and :meth:`~azstoragetorch.datasets.Blob.read`), so that later epochs read local files;
            the workers and the ranks of a node share it. Each hit is confirmed with the service
            by a conditional read (one request, no transfer). ``None``: no cache.
        cache_max_bytes: The most bytes the cache holds; least recently used blobs are deleted
            beyond it. ``None``: no limit but the disk.
        cache_trust_listing: For splits listed from a container, serve a cached blob whose ETag is
            the listing's (made in ``setup``) with no request; a blob rewritten after that is served
            as listed. URL-list splits always confirm hits.

    Raises:
        ValueError: An argument is out of range, or an import path names nothing callable.
        TypeError: A split, the credential, ``retry`` or ``cache_dir`` is of an unsupported type.
    """

    def __init__(
        self,
        train: BlobSplit | str | list[str] | None = None,
        val: BlobSplit | str | list[str] | None = None,
        test: BlobSplit | str | list[str] | None = None,
        predict: BlobSplit | str | list[str] | None = None,
        *,
        transform: Callable[[Blob], Any] | str | None = None,
        collate_fn: Callable[[list[Any]], Any] | str | None = None,
        batch_size: int = 32,
        num_workers: int = 0,
        shuffle: bool = True,
        seed: int = 0,
        persistent_workers: bool = False,
        pin_memory: bool = False,
        credential: CredentialArgument = None,
        prefetch: int = DEFAULT_PREFETCH,
        retry: RetryOptions | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
    ) -> None:
        super().__init__()
        given = {"train": train, "val": val, "test": test, "predict": predict}
        self.splits = {name: _as_split(name, value) for name, value in given.items() if value is not None}
        _check_count("batch_size", batch_size, minimum=1)
        _check_count("num_workers", num_workers, minimum=0)
        if persistent_workers and not num_workers:
            raise ValueError("persistent_workers=True needs num_workers > 0: there are no workers to keep.")
        validate_credential(credential)
        validate_retry(retry)
        self._transform = _importable("transform", transform)
        self._collate_fn = _importable("collate_fn", collate_fn)
        self._batch_size = batch_size
        self._num_workers = num_workers
        self._shuffle = bool(shuffle)
        self._seed = int(seed)
        self._persistent_workers = persistent_workers
        self._pin_memory = pin_memory
        self._credential = credential
        self._retry = retry
        self._cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing)
        self._prefetch = prefetch
        self._datasets: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}
        self._blob_counts: dict[str, int] = {}
        self._fingerprints_at_save: dict[str, str] = {}

    def setup(self, stage: str) -> None:
        """List the blobs of the splits ``stage`` uses (once per split)."""
        stage = str(getattr(stage, "value", stage))  # Lightning passes its TrainerFn enum
        if not self.splits:
            raise ValueError(
                "BlobDataModule has no split to load: pass at least one of train=, val=, test= or predict=."
            )
        needed = _SPLITS_BY_STAGE.get(stage, _SPLITS)
        if needed[0] not in self.splits and stage in _SPLITS_BY_STAGE:
            configured = ", ".join(self.splits)
            raise ValueError(
                f"trainer.{stage}() needs the {needed[0]} split, but BlobDataModule has only: {configured}. "
                f"Pass {needed[0]}=... ."
            )
        for name in needed:
            if name in self.splits and name not in self._datasets:
                self._datasets[name] = self._dataset(name)

    def train_dataloader(self) -> Any:
        return self._loader("train")

    def val_dataloader(self) -> Any:
        return self._loader("val") if "val" in self.splits else []

    def test_dataloader(self) -> Any:
        return self._loader("test")

    def predict_dataloader(self) -> Any:
        return self._loader("predict")

    def state_dict(self) -> dict[str, Any]:
        """Which blobs each listed split had (a digest of their names), to notice a changed split on resume.

        The position within the training data is saved by Lightning itself, from the training
        DataLoader's ``state_dict``.
        """
        return {"blob_digests": dict(self._fingerprints)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._fingerprints_at_save = dict(state_dict.get("blob_digests", {}))
        for name, digest in self._fingerprints.items():
            self._warn_if_changed(name, digest)

    # -- helpers ---------------------------------------------------------------------------------

    def _dataset(self, name: str) -> Any:
        split = self.splits[name]
        try:
            blobs = _list_source(split.source, self._credential, self._retry, self._cache)
        except AzureError as error:
            raise scrubbed(error, prefix=f"The {name} split could not be listed: ") from None
        digest = hashlib.sha256("\n".join(blob.url for blob in blobs).encode()).hexdigest()
        self._fingerprints[name] = digest
        self._blob_counts[name] = len(blobs)
        self._warn_if_changed(name, digest)
        transform = _importable(f"{name}.transform", split.transform) or self._transform
        training = name == "train"
        if split.iterable:
            return IterableBlobDataset(
                blobs,
                transform,
                shuffle=self._shuffle and training,
                seed=self._seed,
                prefetch=self._prefetch,
                balance_ranks=training,
            )
        return BlobDataset(blobs, transform)

    def _warn_if_changed(self, name: str, digest: str) -> None:
        saved = self._fingerprints_at_save.get(name)
        if saved is not None and saved != digest:
            rank_zero_warn(
                f"The blobs of the {name} split differ from those when the checkpoint was saved; resuming "
                "mid-epoch may repeat or skip samples of this epoch."
            )

    def _loader(self, name: str) -> StatefulDataLoader:
        if name not in self.splits:
            raise ValueError(f"BlobDataModule has no {name} split; pass {name}=... to use it.")
        if name not in self._datasets:
            self._datasets[name] = self._dataset(name)  # used without Trainer.setup, e.g. directly
        dataset = self._datasets[name]
        options: dict[str, Any] = {
            "batch_size": self._batch_size,
            "num_workers": self._num_workers,
            "collate_fn": self._collate_fn,
            "pin_memory": self._pin_memory,
            "persistent_workers": self._persistent_workers,
        }
        if isinstance(dataset, IterableBlobDataset):
            return _IterableSplitLoader(
                dataset,
                blob_count=self._blob_counts[name],
                epoch_of=self._current_epoch,
                rank_of=_rank_and_world_size,
                **options,
            )
        shuffle = self._shuffle and name == "train"
        generator = torch.Generator().manual_seed(self._seed) if shuffle else None
        return StatefulDataLoader(dataset, shuffle=shuffle, generator=generator, **options)

    def _current_epoch(self) -> int | None:
        return None if self.trainer is None else int(self.trainer.current_epoch)


class _IterableSplitLoader(StatefulDataLoader):  # type: ignore[misc]  # torchdata is untyped
    """The StatefulDataLoader of an iterable split, with two things Lightning needs from it:

    - Every epoch's iteration starts by telling the dataset the trainer's epoch (Lightning calls
      ``set_epoch`` on samplers only, and an iterable dataset has none). This runs in the main
      process, before the workers read the epoch, which lives in shared memory.
    - ``len()`` is the exact number of batches this rank will produce. Without a length, Lightning
      fetches one batch ahead to see where the epoch ends, so a checkpoint would record the loader
      one batch ahead of the model and a resumed run would skip that batch.
    """

    def __init__(
        self,
        dataset: IterableBlobDataset[Any],
        *,
        blob_count: int,
        epoch_of: Callable[[], int | None],
        rank_of: Callable[[], tuple[int, int]],
        **options: Any,
    ) -> None:
        super().__init__(dataset, **options)
        self._blob_count = blob_count
        self._epoch_of = epoch_of
        self._rank_of = rank_of

    def __iter__(self) -> Any:
        epoch = self._epoch_of()
        if epoch is not None:
            cast(IterableBlobDataset[Any], self.dataset).set_epoch(epoch)
        return super().__iter__()

    def __len__(self) -> int:
        # Mirrors how IterableBlobDataset deals blobs: to ranks (padded to equal shares when the
        # training split balances them), then to workers, each of which makes its own batches.
        rank, world_size = self._rank_of()
        count = self._blob_count
        if cast(IterableBlobDataset[Any], self.dataset)._balance_ranks and count % world_size:
            count = -(-count // world_size) * world_size
        rank_share = len(range(rank, count, world_size))
        workers = max(self.num_workers, 1)
        return sum(-(-len(range(worker, rank_share, workers)) // self.batch_size) for worker in range(workers))


def _rank_and_world_size() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _as_split(name: str, value: Any) -> BlobSplit:
    if isinstance(value, BlobSplit):
        split = value
    elif isinstance(value, dict):
        split = BlobSplit(**value)
    else:
        split = BlobSplit(value)
    source = split.source
    if isinstance(source, str) or (isinstance(source, list) and source and all(isinstance(u, str) for u in source)):
        return split
    raise TypeError(
        f"The {name} split must be a container URL (with an optional folder), a non-empty list of blob URLs "
        f"or a BlobSplit, not {type(source).__name__}."
    )


def _importable(what: str, value: Any) -> Any:
    """A callable given directly or as an import path ("package.module.name" or "package.module:name")."""
    if value is None or callable(value):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a callable or an import path string, not {type(value).__name__}.")
    module_name, _, attribute = value.replace(":", ".").rpartition(".")
    try:
        found = getattr(importlib.import_module(module_name), attribute) if module_name else None
    except (ImportError, AttributeError) as error:
        raise ValueError(f"{what} {value!r} could not be imported: {error}") from None
    if not callable(found):
        raise ValueError(f"{what} {value!r} does not name a callable.")
    return found


def _check_count(name: str, value: Any, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int of at least {minimum}, got {value!r}.")


# -- LightningCLI ------------------------------------------------------------------------------------


class BlobSaveConfigCallback(SaveConfigCallback):
    """LightningCLI's ``SaveConfigCallback``, able to save the run's ``config.yaml`` into a container.

    The standard callback writes through jsonargparse's own file handling, which cannot write to a
    blob URL; this one writes through Lightning's, which an :class:`AzureBlobCheckpointIO` teaches
    about blob paths (local log directories work as before)::

        LightningCLI(MyModel, MyData, save_config_callback=BlobSaveConfigCallback)

    Its options are those of ``SaveConfigCallback`` (pass them as ``save_config_kwargs``), except
    ``multifile``, which this callback does not support.
    """

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        if self.multifile:
            raise ValueError("BlobSaveConfigCallback saves one config file; multifile=True is not supported.")
        log_dir = trainer.log_dir  # broadcast by Lightning
        assert log_dir is not None
        config_path = f"{log_dir.rstrip('/')}/{self.config_filename}"
        filesystem = get_filesystem(log_dir)
        exists = filesystem.isfile(config_path) if trainer.is_global_zero and not self.overwrite else False
        if trainer.strategy.broadcast(exists):  # every rank raises, so none waits for the others
            raise RuntimeError(
                f"{shown(config_path)} exists already. Set LightningCLI(save_config_kwargs="
                '{"overwrite": True}) to replace it, or save_config_callback=None not to save the config.'
            )
        if trainer.is_global_zero:
            with filesystem.open(config_path, "w") as config_file:
                config_file.write(self.parser.dump(self.config, skip_none=False))
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
