"""The shard files a load reads, each pinned to the version first seen, with the checksums of what it reads.

A checkpoint overwritten while a load reads it must fail the load rather than mix the bytes of two
saves: the first answer about a shard file fixes its ETag, and every later range of it is read on
the condition that the ETag still holds.
"""

from __future__ import annotations

import logging
import threading

from azstoragetorch._client import AzStorageTorchBlobClient, BlobProperties, Lease, Recorder, add_checksum_outcome
from azstoragetorch._reads import PinnedBlob
from azstoragetorch.exceptions import ChecksumMismatchError
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._locations import _missing_blob_as_file_not_found
from azstoragetorch.integrations.dcp._spans import _Span

_LOGGER = logging.getLogger("azstoragetorch")


class _PinnedShardFiles:
    """The shard files under one checkpoint URL, as one load (or verification) reads them.

    :meth:`fetch` is what a :class:`~azstoragetorch._reads.PlannedSpans` calls for each span, on its
    threads. Each shard file is a :class:`~azstoragetorch._reads.PinnedBlob`, pinned to the version
    of the first answer about it and, when the reader verifies checksums, gathering the CRC-32 of
    every range read; this adds what is DCP's: files named relative to the checkpoint, a missing
    file as ``FileNotFoundError``, and the check of files read whole against the CRC-32 their writer
    recorded.
    """

    def __init__(self, files: _BlobFiles, checkpoint_url: str, recorder: Recorder | None = None) -> None:
        self._files = files
        self._checkpoint_url = checkpoint_url
        self._recorder = recorder  # counts the requests and bytes of a load
        self._lock = threading.Lock()
        self._clients: dict[str, AzStorageTorchBlobClient] = {}
        self._blobs: dict[str, PinnedBlob] = {}

    def verify_whole_files(self) -> None:
        """Check every shard file read whole against the CRC-32 its writer recorded, and count the
        files checked and those that had no CRC-32 to check."""
        if not self._files.verify_checksum:
            return
        for relative_path in sorted(self._blobs):
            blob = self._blob(relative_path)
            client = self._client(relative_path)
            if blob.version.crc32 is None:
                add_checksum_outcome(self._recorder, verified=False)
                _LOGGER.debug("%s has no recorded CRC-32: read unverified", client.display_url)
                continue
            if blob.checksums is None or blob.checksums.whole() is None:
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
        blob = self._blob(relative_path)
        properties = blob.version
        actual = None if blob.checksums is None else blob.checksums.whole()
        if actual is not None and properties.crc32 is not None and actual != properties.crc32:
            return self._client(relative_path), f"{properties.crc32:08x}", f"{actual:08x}"
        return None

    def fetch(self, span: _Span) -> Lease:
        """The span's bytes, in a lease the caller releases; the first range of a file pins its version."""
        blob = self._blob(span.relative_path)
        with _missing_blob_as_file_not_found(self._client(span.relative_path).display_url):
            return blob.read_leased(span.start, span.end - span.start)

    def pinned_version(self, relative_path: str) -> BlobProperties:
        """The shard file's properties, from a properties request if no range of it was read yet;
        the ranges read after are pinned to it. (``verify`` needs each file's size before it reads.)"""
        client = self._client(relative_path)
        with _missing_blob_as_file_not_found(client.display_url):
            return self._blob(relative_path).pin(client.get_properties)

    def _blob(self, relative_path: str) -> PinnedBlob:
        client = self._client(relative_path)
        with self._lock:
            blob = self._blobs.get(relative_path)
            if blob is None:
                blob = self._blobs[relative_path] = PinnedBlob(
                    client,
                    block_size=self._files.block_size,
                    max_concurrency=self._files.max_concurrency,
                    validate_content=self._files.validate_content,
                    verify_checksum=self._files.verify_checksum,
                )
            return blob

    def _client(self, relative_path: str) -> AzStorageTorchBlobClient:
        with self._lock:
            client = self._clients.get(relative_path)
            if client is None:
                url = self._files.concat_path(self._checkpoint_url, relative_path)
                client = self._clients[relative_path] = self._files.blob_client(url)
                client.recorder = self._recorder
            return client
