"""Ranges of one blob read in any order, all of one version: :class:`PinnedBlob`."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable

from azstoragetorch._client import BlobProperties, Lease, PieceChecksums
from azstoragetorch._reads._direct import DirectReads
from azstoragetorch._reads._source import RangeSource


class PinnedBlob:
    """One blob read as separate ranges, from many threads and in any order, all of one version.

    Each range is a :class:`~azstoragetorch._reads.DirectReads` into a leased buffer. The first
    answer about the blob fixes its version: the headers of the first range's answer carry the ETag,
    size and recorded CRC-32 that a properties request would, so no such request is needed; every
    other range waits for that answer and is read on the condition that the ETag still holds. A blob
    overwritten meanwhile then fails the read with
    :class:`~azstoragetorch.exceptions.BlobModifiedDuringReadError` rather than mixing the bytes of
    two versions. If that first read fails before any answer came, the ranges waiting for it fail
    with the same error.

    With ``verify_checksum``, the CRC-32 of every range read is gathered in :attr:`checksums`, so
    that a blob whose ranges tile it can be checked against the CRC-32 its writer recorded. The
    first range's CRC-32 is computed before the answer tells whether there is one to compare with;
    once the version is known to have none, later ranges skip the work.
    """

    def __init__(
        self,
        source: RangeSource,
        *,
        block_size: int,
        max_concurrency: int,
        validate_content: bool = False,
        verify_checksum: bool = False,
    ) -> None:
        self.source = source
        self.checksums = PieceChecksums() if verify_checksum else None
        self._reads = DirectReads(
            source, block_size=block_size, max_concurrency=max_concurrency, validate_content=validate_content
        )
        self._version: concurrent.futures.Future[BlobProperties] = concurrent.futures.Future()
        self._claimed = False
        self._lock = threading.Lock()

    @property
    def version(self) -> BlobProperties:
        """The pinned version's properties; waits for the first answer if a read is waiting for it."""
        return self._version.result()

    def pin(self, ask: Callable[[], BlobProperties]) -> BlobProperties:
        """The pinned version's properties, from ``ask()`` (a properties request) if nothing fixed
        it yet, for a caller that needs the blob's size before it plans its ranges."""
        if self._claim():
            try:
                self._version.set_result(ask())
            except BaseException as error:
                self._version.set_exception(error)
        return self._version.result()

    def read_leased(self, offset: int, length: int) -> Lease:
        """The blob's ``length`` bytes from ``offset``, of the pinned version, in a lease the caller releases."""
        if self._claim():
            checksums = self.checksums

            def answered(properties: BlobProperties) -> None:
                if checksums is not None:
                    checksums.size = properties.size
                self._version.set_result(properties)

            try:
                return self._reads.read_leased(offset, length, etag=None, on_response=answered, checksums=checksums)
            except BaseException as error:
                if not self._version.done():  # no answer came: the reads waiting for one fail alike
                    self._version.set_exception(error)
                raise
        properties = self._version.result()  # the first read is under way: its answer sets it
        checksums = self.checksums if properties.crc32 is not None else None
        if checksums is not None:
            checksums.size = properties.size
        return self._reads.read_leased(offset, length, etag=properties.etag, checksums=checksums)

    def _claim(self) -> bool:
        """Whether the caller is the first to need the version (and so must fix it; the others wait)."""
        with self._lock:
            first, self._claimed = not self._claimed, True
        return first
