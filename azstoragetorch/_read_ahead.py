"""How :class:`~azstoragetorch.io.BlobIO` turns reads at arbitrary positions into ranged downloads.

``torch.load`` reads a checkpoint as a run of small reads (zip headers, the pickle) mixed with large
ones (tensor data), mostly moving forward, after a few jumps to the end of the file for the zip
directory. One request per read would be slow; downloading the whole blob up front would hold
multi-GB checkpoints in memory. :class:`ReadAheadBuffer` sits in between.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future
from typing import Any

from azstoragetorch._client import AzStorageTorchBlobClient, BlobProperties, _buffers
from azstoragetorch._client._checksums import PieceChecksums

# After a jump to a new position only this much is fetched: a jump is usually a short look (the
# zip directory at the end of a checkpoint), and a full chunk would delay it for nothing.
JUMP_FETCH_BYTES = 1024 * 1024
# A read of at least max_chunks * chunk_size bytes that no chunk covers goes straight into the
# caller's buffer, in parallel ranged GETs of chunk_size: it alone keeps every connection busy.
# Smaller reads go through the window, whose requests run ahead across reads; that pipelining is
# what hides Azure's per-request latency when torch.load reads many medium-sized tensors one after
# another (on loopback, where latency is nil, both paths measure the same).
# Fetched right after the end of a direct read, in parallel with it, for the small reads that
# usually follow (the next zip header of a checkpoint), so that they need no round trip of their own.
AFTER_DIRECT_BYTES = 64 * 1024


class _Chunk:
    __slots__ = ("data", "future", "start", "stop")

    def __init__(self, start: int, stop: int, future: Future[Any], data: bytearray) -> None:
        self.start = start
        self.stop = stop
        self.future = future
        self.data = data

    def view(self) -> memoryview:
        self.future.result()  # wait; re-raises a failed download
        return memoryview(self.data)


class ReadAheadBuffer:
    """A sliding window of chunks downloaded in parallel ahead of a forward-moving reader.

    Small reads are served from chunks of up to ``chunk_size`` bytes, each fetched by one ranged
    GET. While reads keep moving forward, the number of chunks requested ahead of the reader doubles, up to
    ``max_chunks - 1``, so a long sequential read keeps that many requests in flight and the
    reader rarely waits. A jump elsewhere resets the window and fetches a small chunk at the new
    position. At most ``max_chunks + 1`` chunks are kept, which bounds memory at about
    ``(max_chunks + 1) * chunk_size`` bytes whatever the blob's size.

    A read of ``max_chunks * chunk_size`` bytes or more that no chunk covers bypasses the window:
    it is split into parallel ranged GETs that write straight into the caller's buffer, while a
    small chunk after its end is fetched for the small reads that usually come next.

    All downloads are pinned to the ETag seen when the blob was opened. With ``validate_content``
    every range is checked against the MD5 the service computes for it; with ``checksums``, the
    CRC-32 of everything downloaded is recorded there, for a check of the whole blob.
    """

    def __init__(
        self,
        client: AzStorageTorchBlobClient,
        properties: BlobProperties,
        *,
        chunk_size: int,
        max_chunks: int,
        first_chunk: bytearray,
        validate_content: bool = False,
        checksums: PieceChecksums | None = None,
    ) -> None:
        self._client = client
        self._validate_content = validate_content
        self._checksums = checksums
        self._properties = properties
        self._chunk_size = chunk_size
        self._max_chunks = max(1, max_chunks)
        self._chunks: collections.OrderedDict[int, _Chunk] = collections.OrderedDict()
        self._ahead = 0
        self._next_expected = 0
        self._window_anchor = -1  # start of the chunk the read-ahead was last extended from
        if checksums is not None:
            checksums.add(0, first_chunk)
        if first_chunk:
            done: Future[None] = Future()
            done.set_result(None)
            self._chunks[0] = _Chunk(0, len(first_chunk), done, first_chunk)

    @property
    def properties(self) -> BlobProperties:
        return self._properties

    @property
    def size(self) -> int:
        return self._properties.size

    @property
    def verifies_checksum(self) -> bool:
        return self._checksums is not None

    def readinto(self, position: int, destination: memoryview) -> int:
        """Copy the blob's bytes at ``position`` into ``destination``; returns the count (0 at the end)."""
        end = min(position + len(destination), self.size)
        offset = position
        while offset < end:
            chunk = self._find(offset)
            if chunk is None and end - offset >= self._chunk_size * self._max_chunks:
                into = offset - position
                self._read_directly(offset, destination[into : into + end - offset])
                offset = end
                break
            if chunk is None:
                chunk = self._fetch_at(offset, forward=0 <= offset - self._next_expected < self._chunk_size)
            elif chunk.start != self._window_anchor:
                self._read_ahead_from(chunk)  # the reader entered another chunk
            try:
                data = chunk.view()
            except BaseException:
                self._chunks.pop(chunk.start, None)  # let a later read try again
                raise
            count = min(end, chunk.stop) - offset
            into = offset - position
            destination[into : into + count] = data[offset - chunk.start : offset - chunk.start + count]
            offset += count
        self._next_expected = max(end, position)
        return max(0, end - position)

    def close(self) -> None:
        for chunk in self._chunks.values():
            self._recycle(chunk)
        self._chunks.clear()

    def _read_directly(self, offset: int, destination: memoryview) -> None:
        end = offset + len(destination)
        if end < self.size and self._find(end) is None:
            self._ahead = 0
            self._window_anchor = self._request(end, AFTER_DIRECT_BYTES).start
        self._client.download_parallel(
            offset,
            destination,
            etag=self._properties.etag,
            part_size=self._chunk_size,
            max_concurrency=self._max_chunks,
            validate_content=self._validate_content,
        )
        if self._checksums is not None:
            self._checksums.add(offset, destination)

    def _fetch_at(self, offset: int, *, forward: bool) -> _Chunk:
        if forward:
            chunk = self._request(offset, self._chunk_size)
            self._read_ahead_from(chunk)
        else:
            self._ahead = 0
            chunk = self._request(offset, JUMP_FETCH_BYTES)
            self._window_anchor = chunk.start
        return chunk

    def _read_ahead_from(self, chunk: _Chunk) -> None:
        """Widen the window (the reader is moving forward) and request chunks after ``chunk``."""
        self._window_anchor = chunk.start
        self._ahead = min(self._max_chunks - 1, self._ahead * 2 + 1)
        start = chunk.stop
        for _ in range(self._ahead):
            if start >= self.size:
                break
            start = (self._find(start) or self._request(start, self._chunk_size)).stop

    def _find(self, offset: int) -> _Chunk | None:
        for chunk in self._chunks.values():
            if chunk.start <= offset < chunk.stop:
                return chunk
        return None

    def _request(self, start: int, length: int) -> _Chunk:
        stop = min(start + min(length, self._chunk_size), self.size)
        # Full chunks use the process's pooled buffers: allocating multi-MiB buffers afresh costs
        # page faults that, with transfer threads running, cost more CPU than the transfer itself.
        # Small chunks get small buffers of their own.
        data = _buffers.take(self._chunk_size) if stop - start == self._chunk_size else bytearray(stop - start)
        future = self._client.submit(self._download, start, memoryview(data)[: stop - start])
        chunk = _Chunk(start, stop, future, data)
        self._chunks[start] = chunk
        self._evict(keep=chunk)
        return chunk

    def _download(self, start: int, target: memoryview) -> None:
        _, filled = self._client.download_into(
            start, target, etag=self._properties.etag, validate_content=self._validate_content
        )
        if self._checksums is not None:
            self._checksums.add(start, target[:filled])

    def whole_crc32(self) -> int:
        """The whole blob's CRC-32, from everything downloaded, after downloading what never was."""
        assert self._checksums is not None
        offset = self._checksums.covered_from_start()
        window = self._chunk_size * self._max_chunks
        while (crc := self._checksums.whole()) is None:
            if offset >= self.size:  # downloads from the reachable end on always tile the rest
                raise AssertionError("downloaded ranges do not tile the blob")
            length = min(window, self.size - offset)
            gap = _buffers.take(window) if length == window else bytearray(length)
            try:
                self._client.download_parallel(
                    offset,
                    memoryview(gap)[:length],
                    etag=self._properties.etag,
                    part_size=self._chunk_size,
                    max_concurrency=self._max_chunks,
                    validate_content=self._validate_content,
                )
                self._checksums.add(offset, memoryview(gap)[:length])
            finally:
                if len(gap) == window:
                    _buffers.give_back(gap)
            offset += length
        return crc

    def _evict(self, keep: _Chunk) -> None:
        # Oldest first: chunks behind the reader go before the read-ahead chunks requested later.
        while len(self._chunks) > self._max_chunks + 1:
            oldest = next(iter(self._chunks.values()))
            if oldest is keep:
                break
            del self._chunks[oldest.start]
            self._recycle(oldest)

    def _recycle(self, chunk: _Chunk) -> None:
        # A buffer may be reused only once no thread can still be writing into it.
        if (chunk.future.cancel() or chunk.future.done()) and len(chunk.data) == self._chunk_size:
            _buffers.give_back(chunk.data)
