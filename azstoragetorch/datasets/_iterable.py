"""The iterable-style dataset: :class:`IterableBlobDataset`, sharded across ranks and DataLoader
workers, shuffled by epoch, resumable, its samples fetched ahead in order."""

from __future__ import annotations

import collections
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, cast

import torch
import torch.utils.data
from typing_extensions import Self, override

from azstoragetorch._cache import make_cache
from azstoragetorch._client import CredentialArgument, ProgressHook
from azstoragetorch._options import check_int
from azstoragetorch.datasets._arguments import _describe_arguments
from azstoragetorch.datasets._blob import Blob
from azstoragetorch.datasets._dealing import _deal, _epoch_seed, _live_rank_and_world_size, _shared_epoch
from azstoragetorch.datasets._sample_pool import MAX_SAMPLE_THREADS, _sample_threads
from azstoragetorch.datasets._samples import _apply, _checked_hook, _read_whole_blob, _TransformOutputType_co
from azstoragetorch.datasets._sources import _as_sequence, _blobs_from_urls, _list_container
from azstoragetorch.retry import RetryOptions

# Samples fetched ahead of the consumer by IterableBlobDataset. Small blobs are latency-bound, so
# many requests in flight are what makes a loader fast; transforms that decode or augment still run
# one at a time under the GIL.
DEFAULT_PREFETCH = 32


class IterableBlobDataset(torch.utils.data.IterableDataset[_TransformOutputType_co]):
    """An iterable-style dataset with one sample per blob, sharded across workers and ranks.

    Create it with :meth:`from_blob_urls` or :meth:`from_container_url`. A container is listed
    once, when the dataset is created; DataLoader workers share that listing. Samples are the
    same as :class:`BlobDataset`'s, fetched ahead of the consumer (up to ``prefetch`` at once) and
    yielded in order.

    **Sharding.** Iterated by a DataLoader with workers, in a job with several
    :mod:`torch.distributed` ranks, or both, each worker of each rank gets its own share of the
    blobs: over all ranks and workers, every blob is seen exactly once per epoch, and shares differ
    in size by at most one. Blobs are dealt to ranks first, then to each rank's workers, so ranks get
    the same number of samples whenever the number of blobs divides by the number of ranks.

    **Training with DDP.** Every rank must run the same number of steps, or the ranks wait for
    each other forever at the end of the epoch. With ``balance_ranks=True``, ranks whose share is
    one short repeat a blob from the start of the epoch's order, as ``DistributedSampler`` does, so
    an epoch whose count does not divide has up to ``world_size - 1`` repeated samples.

    **Shuffling.** With ``shuffle=True`` the order is a permutation drawn from ``seed`` and the
    epoch set by :meth:`set_epoch`, the same on every rank. Call ``set_epoch(epoch)`` before each
    epoch to get a new order (as with ``DistributedSampler``); the epoch lives in shared memory, so
    it reaches DataLoader workers too, including persistent ones.

    **Resuming.** :meth:`state_dict` and :meth:`load_state_dict` record and restore the position
    within the epoch, so torchdata's ``StatefulDataLoader`` resumes mid-epoch without repeating or
    skipping a sample, with or without workers.

    **Progress.** ``progress_hook`` is given every read of a sample's blob, as for :class:`BlobDataset`.
    """

    def __init__(
        self,
        blobs: Iterable[Blob],
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        check_int("prefetch", prefetch, maximum=MAX_SAMPLE_THREADS)
        self._progress_hook = _checked_hook(progress_hook)
        self._blobs_source = blobs
        self._listed: Sequence[Blob] | None = None
        self._transform = cast(Callable[[Blob], _TransformOutputType_co], transform or _read_whole_blob)
        self._shuffle = bool(shuffle)
        self._seed = int(seed)
        self._prefetch = prefetch
        self._balance_ranks = bool(balance_ranks)
        # In shared memory, so that set_epoch in the main process reaches DataLoader workers that
        # persist across epochs (they hold a copy of the dataset, but the same memory).
        self._epoch = _shared_epoch(0)
        self._epoch_owner = os.getpid()
        self._resume_at = 0  # samples of this shard to skip on the next iteration (after a restore)
        self._yielded = 0
        self._rank_at_pickling: tuple[int, int] | None = None

    @classmethod
    @_describe_arguments
    def from_blob_urls(
        cls,
        blob_urls: str | Iterable[str],
        *,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of the given blobs, in the given order unless ``shuffle`` is set.

        Args:
            {arguments}

        Raises:
            ValueError: A URL is malformed, ``prefetch`` is out of range, ``cache_dir`` is empty, or
                ``cache_max_bytes`` is not positive or has no ``cache_dir``.
            TypeError: ``credential`` or ``cache_dir`` is of an unsupported type, or ``retry`` is not a
                ``RetryOptions``.
        """
        blobs = _blobs_from_urls(blob_urls, credential, retry, make_cache(cache_dir, cache_max_bytes))
        return cls(
            blobs,
            transform,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            balance_ranks=balance_ranks,
            progress_hook=progress_hook,
        )

    @classmethod
    @_describe_arguments
    def from_container_url(
        cls,
        container_url: str,
        *,
        prefix: str | None = None,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of every blob in a container (whose name starts with ``prefix``).

        The container is listed now, once: every epoch and every DataLoader worker (and its copy
        of the dataset) deals its share from this one listing, so a blob written while training
        runs neither shifts the shares nor appears; create a new dataset to see it. A missing
        container or a credential that may not list it raises here, naming the container. The
        directories of an account with a hierarchical namespace (ADLS Gen2), listed as empty
        blobs, are not samples.

        Args:
            {arguments}

        Raises:
            ValueError: The URL is malformed, ``prefetch`` is out of range, ``cache_dir`` is empty, or a
                ``cache_*`` option is out of range or has no ``cache_dir``.
            TypeError: ``credential``, ``prefix``, ``cache_dir`` or ``cache_trust_listing`` is of an
                unsupported type, or ``retry`` is not a ``RetryOptions``.
            azure.core.exceptions.ResourceNotFoundError: The container does not exist.
            azure.core.exceptions.ClientAuthenticationError: Listing is not allowed.
        """
        check_int("prefetch", prefetch, maximum=MAX_SAMPLE_THREADS)  # before the listing's requests
        cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing)
        # Listed here, once: DataLoader workers (forked, or sent a pickled copy) and later epochs
        # share this listing, so every worker deals its share from the same list of blobs. Listed in
        # each worker instead, a blob written between two workers' listings would shift the shares,
        # and the epoch would repeat one blob and skip another.
        blobs = _list_container(container_url, prefix, credential, retry, cache)
        return cls(
            blobs,
            transform,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            balance_ranks=balance_ranks,
            progress_hook=progress_hook,
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next iteration follows (only matters with ``shuffle=True``)."""
        if self._epoch_owner != os.getpid():
            # A copy sent to another process that sets epochs itself (a rank started by mp.spawn,
            # say) takes a cell of its own, so that it never changes its sender's epoch. DataLoader
            # workers never call this, and keep reading the cell of the process that owns them.
            self._epoch = _shared_epoch(int(self._epoch[0]))
            self._epoch_owner = os.getpid()
        self._epoch[0] = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this iteration stands: the epoch, the seed and how many samples this shard yielded."""
        return {
            "epoch": int(self._epoch[0]),
            "seed": self._seed,
            "shuffle": self._shuffle,
            "samples_yielded": self._yielded,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration skips the samples already yielded."""
        expected = {"epoch", "seed", "shuffle", "samples_yielded"}
        if not isinstance(state_dict, dict) or not expected <= set(state_dict):
            raise ValueError(
                f"Not a state dict of an IterableBlobDataset: expected the keys {sorted(expected)}, "
                f"got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}."
            )
        if (state_dict["seed"], state_dict["shuffle"]) != (self._seed, self._shuffle):
            raise ValueError(
                "The state dict was saved with a different order (seed/shuffle "
                f"{state_dict['seed']}/{state_dict['shuffle']}, this dataset has {self._seed}/{self._shuffle})."
            )
        # Written in place, not through set_epoch: StatefulDataLoader restores each worker's copy, and
        # the workers must keep sharing the epoch cell of the process that owns them.
        self._epoch[0] = int(state_dict["epoch"])
        self._resume_at = self._yielded = int(state_dict["samples_yielded"])

    @override
    def __iter__(self) -> Iterator[_TransformOutputType_co]:
        # Not a generator function: the position is reset (or restored) when the iterator is
        # created, not at its first sample, since StatefulDataLoader may take a state_dict (or
        # discard the iterator) in between.
        shard = self._my_shard()
        skip, self._resume_at = self._resume_at, 0
        self._yielded = skip
        return self._count_yielded(self._fetch_in_order(shard[skip:]))

    def _count_yielded(self, samples: Iterator[_TransformOutputType_co]) -> Iterator[_TransformOutputType_co]:
        for sample in samples:
            self._yielded += 1
            yield sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # DataLoader workers started with spawn or forkserver have no process group; they learn
        # their rank from the process that pickled the dataset.
        state["_rank_at_pickling"] = _live_rank_and_world_size() or self._rank_at_pickling
        return state

    def _my_shard(self) -> list[int]:
        """The indexes of this worker's blobs, in the epoch's order."""
        if self._listed is None:
            self._listed = _as_sequence(self._blobs_source)
        count = len(self._listed)
        if self._shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self._seed, int(self._epoch[0])))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        rank, world_size = self._rank_and_world_size()
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        dealt_count = self._dealt_count(count, world_size)
        if dealt_count > count:
            # As DistributedSampler pads: repeat the start of the order up to a multiple of the ranks.
            order = order.repeat(world_size)[:dealt_count]
        # Only this share becomes Python ints (and, as it is fetched, Blob objects).
        return cast(
            list[int], _deal(order, rank=rank, world_size=world_size, worker_id=worker_id, workers=workers).tolist()
        )

    def _share_lengths(
        self, count: int, *, workers: int, rank_and_world_size: tuple[int, int] | None = None
    ) -> list[int]:
        """How many of ``count`` blobs each of a rank's ``workers`` yields in an epoch, dealt as ``__iter__`` deals.

        The rank is this process's (or the one given), so that a DataLoader can know its exact length.
        """
        rank, world_size = rank_and_world_size or self._rank_and_world_size()
        positions = range(self._dealt_count(count, world_size))
        return [
            len(_deal(positions, rank=rank, world_size=world_size, worker_id=worker_id, workers=workers))
            for worker_id in range(workers)
        ]

    def _rank_and_world_size(self) -> tuple[int, int]:
        return _live_rank_and_world_size() or self._rank_at_pickling or (0, 1)

    def _dealt_count(self, count: int, world_size: int) -> int:
        """``count``, padded to a multiple of the ranks when they are balanced."""
        if self._balance_ranks and count and count % world_size:
            return -(-count // world_size) * world_size
        return count

    def _fetch_in_order(self, indexes: list[int]) -> Iterator[_TransformOutputType_co]:
        pending: collections.deque[Future[Any]] = collections.deque()
        blobs = cast(Sequence[Blob], self._listed)  # set by _my_shard
        upcoming = (blobs[index] for index in indexes)
        try:
            for blob in upcoming:
                pending.append(_sample_threads.submit(_apply, self._transform, blob, self._progress_hook))
                if len(pending) >= self._prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
