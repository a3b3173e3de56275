"""The map-style dataset: :class:`BlobDataset`, one sample per blob, a batch's blobs fetched together."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, cast

import torch.utils.data
from typing_extensions import Self, override

from azstoragetorch._cache import make_cache
from azstoragetorch._client import CredentialArgument, ProgressHook
from azstoragetorch.datasets._arguments import _describe_arguments
from azstoragetorch.datasets._batch_ahead import _BatchReadAhead
from azstoragetorch.datasets._blob import Blob
from azstoragetorch.datasets._sample_pool import _sample_threads
from azstoragetorch.datasets._samples import (
    _apply,
    _checked_hook,
    _read_whole_blob,
    _TransformOutputType_co,
    _whole_blob_sample,
)
from azstoragetorch.datasets._sources import _as_sequence, _blobs_from_urls, _list_container
from azstoragetorch.retry import RetryOptions


class BlobDataset(torch.utils.data.Dataset[_TransformOutputType_co]):
    """A map-style dataset with one sample per blob.

    Create it with :meth:`from_blob_urls` or :meth:`from_container_url`; the blobs are listed once,
    when it is created. By default a sample is ``{"url": <blob URL>, "data": <blob bytes>}``; pass
    ``transform`` to turn each :class:`Blob` into whatever your model needs::

        dataset = BlobDataset.from_container_url(
            "https://<account>.blob.core.windows.net/<container>", prefix="train/"
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2, shuffle=True)

    When the DataLoader asks for a batch, its blobs are fetched concurrently (through
    ``__getitems__``), not one after the other. When the batches follow each other in order (no
    shuffling), the next batch's blobs are fetched while this batch is used, one batch ahead at
    most; a shuffled order is fetched a batch at a time, overlapped by the DataLoader's workers
    (``num_workers``), which it hands their next batches early. For training on several ranks, use a
    :class:`~torch.utils.data.distributed.DistributedSampler` as with any map-style dataset
    (Lightning adds one for you).

    **Progress.** With ``progress_hook``, each read of a sample's blob calls ``hook(bytes_done,
    bytes_total)``: the default sample's read, and a transform's :meth:`Blob.read_tensor`,
    :meth:`Blob.readinto` and each :meth:`Blob.reader`. ``bytes_done`` counts that read's bytes
    and ``bytes_total`` is the blob's size, so every read ends with a call where the two are equal.
    The hook is called from the threads that fetch samples, in the process that reads them (a
    DataLoader worker), at most every 100 ms per read and once at its end; with workers started by
    ``spawn`` or ``forkserver`` it must pickle. When it is not set, nothing is reported or counted
    for it.
    """

    def __init__(
        self,
        blobs: Iterable[Blob],
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        *,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        self._blobs = _as_sequence(blobs)
        self._transform = cast(Callable[[Blob], _TransformOutputType_co], transform or _read_whole_blob)
        self._progress_hook = _checked_hook(progress_hook)

    @classmethod
    @_describe_arguments
    def from_blob_urls(
        cls,
        blob_urls: str | Iterable[str],
        *,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of the given blobs, in the given order.

        Args:
            {arguments}

        Raises:
            ValueError: A URL is malformed, ``cache_dir`` is empty, or ``cache_max_bytes`` is not positive
                or has no ``cache_dir``.
            TypeError: ``credential`` or ``cache_dir`` is of an unsupported type, ``retry`` is not a
                ``RetryOptions``, or ``progress_hook`` is not callable.
        """
        cache = make_cache(cache_dir, cache_max_bytes)
        return cls(_blobs_from_urls(blob_urls, credential, retry, cache), transform, progress_hook=progress_hook)

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
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of every blob in a container (whose name starts with ``prefix``), in name order.

        The container is listed now, following every page of the listing. The directories of an
        account with a hierarchical namespace (ADLS Gen2), listed as empty blobs, are not samples.

        Args:
            {arguments}

        Raises:
            ValueError: The URL is malformed, ``cache_dir`` is empty, or a ``cache_*`` option is out of
                range or has no ``cache_dir``.
            azure.core.exceptions.ResourceNotFoundError: The container does not exist.
            azure.core.exceptions.ClientAuthenticationError: Listing is not allowed.
            TypeError: ``progress_hook`` is not callable.
        """
        cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing)
        blobs = _list_container(container_url, prefix, credential, retry, cache)
        return cls(blobs, transform, progress_hook=progress_hook)

    def __len__(self) -> int:
        return len(self._blobs)

    @override
    def __getitem__(self, index: int) -> _TransformOutputType_co:
        return _apply(self._transform, self._blobs[index], self._progress_hook)

    def __getitems__(self, indices: list[int]) -> list[_TransformOutputType_co]:
        """Fetch a batch of samples concurrently; the DataLoader calls this for each batch.

        When the batches follow each other in order, the next one is fetched while this one is used
        (``_batch_ahead`` says when and how).
        """
        read_ahead = self._batch_read_ahead()
        futures = read_ahead.fetch(indices, self._blobs, self._start)
        try:
            return [future.result() for future in futures]
        except BaseException:
            read_ahead.discard()
            raise
        finally:
            for future in futures:
                future.cancel()

    def _start(self, blob: Blob) -> Future[Any]:
        # A default sample that the cache serves with no request (cache_trust_listing) is read here:
        # handing it to a sample thread costs more than a small hit, and parallel hits only contend
        # for the cores. Everything else goes to the sample threads.
        if self._transform is _read_whole_blob and self._progress_hook is None:
            hit = blob._trusted_hit()
            if hit is not None:
                done: Future[Any] = Future()
                done.set_result(_whole_blob_sample(blob, hit))
                return done
        return _sample_threads.submit(_apply, self._transform, blob, self._progress_hook)

    def _batch_read_ahead(self) -> _BatchReadAhead:
        read_ahead = self.__dict__.get("_read_ahead")
        if read_ahead is None or read_ahead.pid != os.getpid():  # unpickled, or in a forked worker
            read_ahead = self._read_ahead = _BatchReadAhead()
        return read_ahead

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_read_ahead", None)  # its futures and locks belong to this process
        return state
