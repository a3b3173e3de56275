"""A whole blob in one pass: :class:`WholeBlobRead`."""

from __future__ import annotations

from collections.abc import Callable

from azstoragetorch._client import BlobNotModified, BlobProperties, IntoBytes
from azstoragetorch._reads._direct import DirectReads
from azstoragetorch._reads._source import RangeSource


class WholeBlobRead:
    """A whole blob read start to end, its memory sized by the first answer.

    The first request asks for ``block_size`` bytes from the start without knowing the blob's size;
    its headers tell the size and the ETag, the memory is allocated then, and whatever does not fit
    in that first answer follows as a :class:`~azstoragetorch._reads.DirectReads` pinned to its ETag.
    A blob within ``block_size`` costs one request and no properties request. The price is that the
    whole blob is in memory at once: this suits dataset samples, cache entries and small files, not
    a multi-GB checkpoint read piece by piece (:class:`~azstoragetorch._reads.ReadAheadWindow`).
    """

    def __init__(self, source: RangeSource, *, block_size: int, max_concurrency: int) -> None:
        self._source = source
        self._block_size = block_size
        self._max_concurrency = max_concurrency

    def read(self) -> tuple[BlobProperties, bytes]:
        """The blob's properties and its content as ``bytes``."""
        read = self._read(None)
        assert read is not None  # only a conditional read can find nothing new
        return read

    def read_if_changed(self, etag: str | None) -> tuple[BlobProperties, bytes] | None:
        """As :meth:`read`, or ``None`` if the blob still has ``etag`` (the first request carries
        ``If-None-Match``, so that answer has no body)."""
        return self._read(etag)

    def read_into(self, allocate: Callable[[int], memoryview]) -> BlobProperties:
        """The whole blob, received straight into the memory that ``allocate`` returns (no copy).

        ``allocate(size)`` is called once, when the first answer has told the blob's size, and
        returns a writable byte view of exactly ``size`` bytes: a new tensor's storage, or the
        caller's buffer after checking that it fits (it may raise; the answer is then dropped). A
        blob changed meanwhile raises :class:`~azstoragetorch.exceptions.BlobModifiedDuringReadError`,
        and every part has finished before this returns or raises.
        """
        return self._read_into(allocate, None)

    def _read(self, if_none_match: str | None) -> tuple[BlobProperties, bytes] | None:
        # A blob that its first answer holds whole becomes the sample's bytes as it is read from the
        # socket; a larger one is received into a buffer, in parallel parts, and copied once.
        body = IntoBytes()
        received: list[bytearray] = []

        def allocate(size: int) -> memoryview | IntoBytes:
            if size <= self._block_size:
                return body
            received.append(bytearray(size))
            return memoryview(received[0])

        try:
            properties = self._read_into(allocate, if_none_match)
        except BlobNotModified:
            return None
        return properties, bytes(received[0]) if received else body.data

    def _read_into(
        self, allocate: Callable[[int], memoryview | IntoBytes], if_none_match: str | None
    ) -> BlobProperties:
        whole: list[memoryview] = []

        def sized(properties: BlobProperties) -> memoryview | IntoBytes:
            recorder = self._source.recorder
            if recorder is not None and recorder.total is None:
                recorder.total = properties.size  # for a progress hook, known from the first answer
            target = allocate(properties.size)
            if isinstance(target, memoryview):
                if len(target) != properties.size:
                    raise ValueError(f"allocate returned {len(target)} bytes for a blob of {properties.size}.")
                whole.append(target)
            return target

        first = self._block_size
        properties, _ = self._source.fetch_range_into(0, sized, etag=None, length=first, if_none_match=if_none_match)
        if first < properties.size:
            rest = DirectReads(self._source, block_size=self._block_size, max_concurrency=self._max_concurrency)
            rest.read_into(first, whole[0][first:], etag=properties.etag)
        return properties
