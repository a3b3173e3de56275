"""The shard files a load reads, each pinned to the version first seen, with the checksums of what it reads.

A checkpoint overwritten while a load reads it must fail the load rather than mix the bytes of two
saves: the first answer about a shard file fixes its ETag, and every later range of it is read on
the condition that the ETag still holds.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from typing import Any

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    BlobProperties,
    Lease,
    PieceChecksums,
    Recorder,
    add_checksum_outcome,
)
from azstoragetorch.exceptions import ChecksumMismatchError
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._locations import _missing_blob_as_file_not_found
from azstoragetorch.integrations.dcp._spans import _Span

_LOGGER = logging.getLogger("azstoragetorch")


class _PinnedShardFiles:
    """The shard files under one checkpoint URL, as one load (or verification) reads them.

    :meth:`fetch` is what a :class:`~azstoragetorch.integrations.dcp._fetching._SpanFetcher` calls
    for each span, on its threads: it keeps one client per file, pins each file to the version of
    the first answer about it, and, when the reader verifies checksums, gathers the CRC-32 of every
    range read so that files read whole can be checked against the CRC-32 their writer recorded.
    """

    def __init__(self, files: _BlobFiles, checkpoint_url: str, recorder: Recorder | None = None) -> None:
        self._files = files
        self._checkpoint_url = checkpoint_url
        self._recorder = recorder  # counts the requests and bytes of a load
        self._lock = threading.Lock()
        self._clients: dict[str, AzStorageTorchBlobClient] = {}
        # Each shard file's properties, from the first answer about it: every range read is pinned to it.
        self._versions: dict[str, concurrent.futures.Future[BlobProperties]] = {}
        self._checksums: dict[str, PieceChecksums] = {}

    def verify_whole_files(self) -> None:
        """Check every shard file read whole against the CRC-32 its writer recorded, and count the
        files checked and those that had no CRC-32 to check."""
        if not self._files.verify_checksum:
            return
        for relative_path in sorted(self._versions):
            client = self._client(relative_path)
            if self._version(relative_path)[0].result().crc32 is None:
                add_checksum_outcome(self._recorder, verified=False)
                _LOGGER.debug("%s has no recorded CRC-32: read unverified", client.display_url)
                continue
            checksums = self._checksums.get(relative_path)
            if checksums is None or checksums.whole() is None:
                _LOGGER.debug("%s was read in part: its CRC-32 was not checked", client.display_url)
                continue
            found = self.mismatch(relative_path)
            if found is not None:
                client, expected, actual = found
                raise ChecksumMismatchError(client.display_url, "CRC-32 of the shard file", expected, actual)
            add_checksum_outcome(self._recorder, verified=True)

    def mismatch(self, relative_path: str) -> tuple[AzStorageTorchBlobClient, str, str] | None:
        """For a file read whole whose CRC-32 differs from the recorded one: its client, the recorded
        and the actual CRC-32 (hex). ``None`` otherwise, also for a file not read whole, or empty."""
        checksums = self._checksums.get(relative_path)
        client, properties = self._client(relative_path), self._version(relative_path)[0].result()
        actual = None if checksums is None else checksums.whole()
        if actual is not None and properties.crc32 is not None and actual != properties.crc32:
            return client, f"{properties.crc32:08x}", f"{actual:08x}"
        return None

    def fetch(self, span: _Span) -> Lease:
        """The span's bytes, in a lease the caller releases; the first range of a file pins its version."""
        client = self._client(span.relative_path)
        version, first = self._version(span.relative_path)
        length = span.end - span.start
        options: dict[str, Any] = {
            "block_size": self._files.block_size,
            "max_concurrency": self._files.max_concurrency,
            "validate_content": self._files.validate_content,
        }
        if first:
            # The first range of a file pins its version: the answer's headers carry the ETag, size
            # and recorded CRC-32 that a properties request would, and every other range of the file
            # (this span's and the others') is then read with If-Match on that ETag. Its CRC-32 is
            # taken before the answer tells whether one was recorded to compare it with.
            checksums = self._checksums_of(span.relative_path, None)

            def answered(properties: BlobProperties) -> None:
                if checksums is not None:
                    checksums.size = properties.size
                version.set_result(properties)

            try:
                with _missing_blob_as_file_not_found(client.display_url):
                    lease = client.download_range(
                        span.start, length, etag=None, on_response=answered, checksums=checksums, **options
                    )
            except BaseException as error:
                if not version.done():  # no answer came: the spans waiting for one fail alike
                    version.set_exception(error)
                raise
        else:
            properties = version.result()  # the first span of the file is running: it sets it
            recorded = properties.crc32 is not None
            checksums = self._checksums_of(span.relative_path, properties.size) if recorded else None
            lease = client.download_range(span.start, length, etag=properties.etag, checksums=checksums, **options)
        return lease

    def _checksums_of(self, relative_path: str, size: int | None) -> PieceChecksums | None:
        """Where the CRC-32s of the file's ranges go, while the load verifies what it reads (``size``:
        the file's, if known yet)."""
        if not self._files.verify_checksum:
            return None
        with self._lock:
            checksums = self._checksums.setdefault(relative_path, PieceChecksums())
        if size is not None:
            checksums.size = size
        return checksums

    def pinned_version(self, relative_path: str) -> BlobProperties:
        """The shard file's properties, from a properties request if no range of it was read yet;
        the ranges read after are pinned to it. (``verify`` needs each file's size before it reads.)"""
        version, first = self._version(relative_path)
        if first:
            client = self._client(relative_path)
            try:
                with _missing_blob_as_file_not_found(client.display_url):
                    version.set_result(client.get_properties())
            except BaseException as error:
                version.set_exception(error)
        return version.result()

    def _version(self, relative_path: str) -> tuple[concurrent.futures.Future[BlobProperties], bool]:
        """The future of the shard file's pinned properties, and whether the caller is the first to
        ask (and so must set it; the others wait for it)."""
        with self._lock:
            future = self._versions.get(relative_path)
            if future is not None:
                return future, False
            future = self._versions[relative_path] = concurrent.futures.Future()
            return future, True

    def _client(self, relative_path: str) -> AzStorageTorchBlobClient:
        with self._lock:
            client = self._clients.get(relative_path)
            if client is None:
                url = self._files.concat_path(self._checkpoint_url, relative_path)
                client = self._clients[relative_path] = self._files.blob_client(url)
                client.recorder = self._recorder
            return client
