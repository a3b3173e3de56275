"""Where a dataset's blobs come from: blob URLs, or a container (or folder) listed once, kept
compactly as :class:`_Blobs`."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator, Sequence

from typing_extensions import override

from azstoragetorch._cache import BlobCache
from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    BlobProperties,
    ContainerUrl,
    CredentialArgument,
    validate_credential,
)
from azstoragetorch._entries import Entries, EntriesBuilder
from azstoragetorch._options import check_retry
from azstoragetorch.datasets._blob import Blob
from azstoragetorch.retry import RetryOptions


class _Blobs(Sequence[Blob]):
    """A dataset's blobs, stored compactly (see ``_entries``); each access makes a new :class:`Blob`.

    The entries are a few large buffers, so DataLoader workers forked from a process that holds
    them share their pages instead of copying them as they touch millions of objects.
    """

    def __init__(
        self,
        entries: Entries,
        credential: CredentialArgument,
        retry: RetryOptions | None,
        cache: BlobCache | None = None,
    ) -> None:
        self._entries = entries
        self._credential = credential
        self._retry = retry
        self._cache = cache

    @override
    def __len__(self) -> int:
        return len(self._entries)

    @override
    def __getitem__(self, index: int) -> Blob:  # type: ignore[override]
        position = self._entries.position(index)
        url, properties = self._entries[position]
        blob = Blob(AzStorageTorchBlobClient(url, self._credential, retry=self._retry), properties)
        if properties is None:
            blob._remember = functools.partial(self._entries.remember, position)
        blob._cache = self._cache
        return blob

    @override
    def __iter__(self) -> Iterator[Blob]:
        return (self[index] for index in range(len(self)))

    def __repr__(self) -> str:
        return f"<{len(self)} blobs>"


def _blobs_from_urls(
    blob_urls: str | Iterable[str],
    credential: CredentialArgument,
    retry: RetryOptions | None = None,
    cache: BlobCache | None = None,
) -> _Blobs:
    validate_credential(credential)
    check_retry(retry)
    builder = EntriesBuilder()
    builder.add_urls([blob_urls] if isinstance(blob_urls, str) else blob_urls)
    return _Blobs(builder.build(), credential, retry, cache)


def _list_source(
    source: str | Iterable[str],
    credential: CredentialArgument,
    retry: RetryOptions | None = None,
    cache: BlobCache | None = None,
) -> Sequence[Blob]:
    """The blobs a data source names, listed now: a container URL whose path after the container is a
    folder (``.../<container>/train`` means the blobs under ``train/``), or an iterable of blob URLs."""
    if not isinstance(source, str):
        return _blobs_from_urls(source, credential, retry, cache)
    container, folder = ContainerUrl.parse_with_prefix(source)
    prefix = folder.strip("/")
    client = AzStorageTorchContainerClient(container, credential, retry=retry)
    return _listed_files(client, f"{prefix}/" if prefix else None, cache)


# Listed blobs are stored a page at a time.
_LISTING_BATCH = 5000


def _listed_files(client: AzStorageTorchContainerClient, prefix: str | None, cache: BlobCache | None = None) -> _Blobs:
    """The blobs under ``prefix``, in name order, without the directories of a hierarchical namespace
    (ADLS Gen2), which are listed as empty blobs but are not samples."""
    builder = EntriesBuilder()
    names: list[str] = []
    properties: list[BlobProperties] = []
    for listed in client.list_blobs(prefix):
        if not listed.is_directory:
            names.append(listed.client.blob_url.blob_name)
            properties.append(listed.properties)
        if len(names) >= _LISTING_BATCH:
            builder.add_names(client.container_url, names, properties)
            names, properties = [], []
    builder.add_names(client.container_url, names, properties)
    return _Blobs(builder.build(), client.credential, client.retry, cache)


def _as_sequence(blobs: Iterable[Blob]) -> Sequence[Blob]:
    if isinstance(blobs, _Blobs):
        return blobs
    return list(blobs)


def _list_container(
    container_url: str,
    prefix: str | None,
    credential: CredentialArgument,
    retry: RetryOptions | None,
    cache: BlobCache | None = None,
) -> _Blobs:
    """The blobs of a container (under ``prefix``), listed now: what ``from_container_url`` serves."""
    check_retry(retry)
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str or None, not {type(prefix).__name__}.")
    client = AzStorageTorchContainerClient(ContainerUrl.parse(container_url), credential, retry=retry)
    return _listed_files(client, prefix, cache)
