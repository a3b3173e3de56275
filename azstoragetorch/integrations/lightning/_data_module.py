"""Training data from containers: :class:`BlobDataModule`, with :class:`BlobSplit` describing each split."""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import os
from collections.abc import Callable
from typing import Any, cast

import torch
from azure.core.exceptions import AzureError
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from torchdata.stateful_dataloader import StatefulDataLoader

from azstoragetorch._cache import make_cache
from azstoragetorch._client import (
    CredentialArgument,
    redact,
    redact_error,
    validate_credential,
)
from azstoragetorch._options import check_int, check_retry
from azstoragetorch.datasets import DEFAULT_PREFETCH, Blob, BlobDataset, IterableBlobDataset
from azstoragetorch.datasets._sources import _list_source
from azstoragetorch.integrations.lightning import _stats
from azstoragetorch.retry import RetryOptions

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
        source = redact(repr(self.source))
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
            by a conditional read (one request, no transfer). ``None``: no cache. ``~`` is expanded;
            a folder that another user could change is refused with a warning. The folder is
            checked and created in ``setup``, on every rank, not here.
        cache_max_bytes: The most bytes the cache holds; least recently used blobs are deleted
            beyond it. ``None``: no limit but the disk.
        cache_trust_listing: For splits listed from a container, serve a cached blob whose ETag is
            the listing's (made in ``setup``) with no request; a blob rewritten after that is served
            as listed. URL-list splits always confirm hits.
        log_stats: Log each training epoch's data loading through the Trainer's loggers:
            ``data/train_mib_per_s``, ``data/train_retries``, ``data/train_throttled_retries`` and more,
            gathered across the DataLoader workers; see :doc:`observability`.

    Raises:
        ValueError: An argument is out of range (``cache_dir`` empty included), or an import path names
            nothing callable.
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
        log_stats: bool = True,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
    ) -> None:
        super().__init__()
        given = {"train": train, "val": val, "test": test, "predict": predict}
        self.splits = {name: _as_split(name, value) for name, value in given.items() if value is not None}
        check_int("batch_size", batch_size, minimum=1)
        check_int("num_workers", num_workers, minimum=0)
        if persistent_workers and not num_workers:
            raise ValueError("persistent_workers=True needs num_workers > 0: there are no workers to keep.")
        validate_credential(credential)
        check_retry(retry)
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
        # The folder is checked (and made) when a split is listed, in setup() on every rank: __init__
        # changes no state.
        self._cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing, check=False)
        self._prefetch = prefetch
        self._datasets: dict[str, Any] = {}
        self._fingerprints: dict[str, str] = {}
        self._blob_counts: dict[str, int] = {}
        self._fingerprints_at_save: dict[str, str] = {}
        self._log_stats = bool(log_stats)
        self._stats_tables: dict[str, _stats.WorkerStatsTable] = {}
        if self._log_stats:
            _stats.install()

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
        if self._cache is not None:
            self._cache.check()  # in this rank's process (setup), before its DataLoader workers get the verdict
        try:
            blobs = _list_source(split.source, self._credential, self._retry, self._cache)
        except AzureError as error:
            raise redact_error(error, prefix=f"The {name} split could not be listed: ") from None
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
        if self._log_stats:
            table = self._stats_tables.setdefault(name, _stats.WorkerStatsTable(self._num_workers))
            if self._num_workers:
                options["collate_fn"] = table.collate(self._collate_fn)
        if isinstance(dataset, IterableBlobDataset):
            return _IterableSplitLoader(
                dataset,
                blob_count=self._blob_counts[name],
                epoch_of=self._current_epoch,
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
        rank_of: Callable[[], tuple[int, int]] | None = None,
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
        dataset = cast(IterableBlobDataset[Any], self.dataset)
        rank_and_world_size = self._rank_of() if self._rank_of is not None else None
        shares = dataset._share_lengths(
            self._blob_count, workers=max(self.num_workers, 1), rank_and_world_size=rank_and_world_size
        )
        # Each worker makes its own batches, the last of them possibly short.
        return sum(-(-share // self.batch_size) for share in shares)


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
