"""Reads at arbitrary positions served from chunks fetched ahead: :class:`ReadAheadWindow`."""

from __future__ import annotations

import collections
import dataclasses
from concurrent.futures import Future
from typing import Any

from azstoragetorch._client import BlobProperties, Lease, PieceChecksums, lease, pause
from azstoragetorch._reads._direct import DirectReads
from azstoragetorch._reads._source import RangeSource

# After a jump to a new position only this much is fetched: a jump is usually a short look (the
# zip directory at the end of a checkpoint), and a full chunk would delay it for nothing.
JUMP_FETCH_BYTES = 1024 * 1024
# A read goes straight into the caller's buffer, for every range of it that no chunk holds, when it
# is large enough to fill the connections alone (max_chunks * DIRECT_PART_BYTES, or max_chunks *
# block_size with smaller chunks), or when it is at least DIRECT_MIN_BYTES (at most block_size) and
# does not continue a run of such reads. That second case is torch.load's: it reads each tensor's
# storage with one readinto of the tensor's size, behind a small read of the record's header. A copy
# out of a chunk into torch.load's fresh tensor memory is a pass over memory that direct reads save;
# the small chunk fetched after the end of each direct read serves the header and small tensors
# that follow. Below a block the saving is smaller than the cost of that extra request per read (a
# request costs a few hundred microseconds of CPU), so smaller reads go through the window. A reader
# that streams through the blob in block-sized reads, one right after another, stays with the
# window too: its chunks run ahead across reads, which is what hides per-request latency there.
# DIRECT_PART_BYTES is the smallest part of a read that fills the connections alone, 4 MiB like the
# Azure SDK's own ranges: large enough that the per-request cost stays small next to the transfer.
# The smaller direct reads are split into parts of block_size.
DIRECT_PART_BYTES = 4 * 1024 * 1024
DIRECT_MIN_BYTES = 8 * 1024 * 1024
# Fetched right after the end of a direct read, in parallel with it, for the small reads that
# usually follow (the next zip header of a checkpoint), so that they need no round trip of their own.
AFTER_DIRECT_BYTES = 64 * 1024


@dataclasses.dataclass(frozen=True)
class _PinnedFetch:
    """How every range of one window's blob is fetched: from ``source``, pinned to the version it was
    opened at, checked with ``validate_content`` and, with ``checksums``, its CRC-32 recorded there.
    The chunk store and the direct reads share it, so both read the blob alike."""

    source: RangeSource
    properties: BlobProperties
    validate_content: bool
    checksums: PieceChecksums | None

    def into(self, start: int, target: memoryview) -> None:
        self.source.fetch_range_into(
            start, target, etag=self.properties.etag, validate_content=self.validate_content, checksums=self.checksums
        )

    def direct(self, *, block_size: int, max_concurrency: int) -> DirectReads:
        return DirectReads(
            self.source, block_size=block_size, max_concurrency=max_concurrency, validate_content=self.validate_content
        )


class _Chunk:
    """One ranged download into a leased buffer; the store holds the lease while the chunk is kept."""

    __slots__ = ("future", "lease", "start", "stop")

    def __init__(self, start: int, stop: int, future: Future[Any], lease: Lease) -> None:
        self.start = start
        self.stop = stop
        self.future = future
        self.lease = lease

    def view(self) -> memoryview:
        """The chunk's bytes, once downloaded; re-raises a failed download. Only for a holder of the lease."""
        self.future.result()
        return self.lease.view(self.stop - self.start)


class _ChunkStore:
    """The chunks downloaded or downloading, oldest first, at most ``capacity`` of them.

    Every chunk's buffer is a lease with up to three holders: the store (until the chunk is evicted
    or the store closes), the download thread (until its request is done or cancelled) and a reader
    copying out of it (until the copy is done). The buffer goes back to the pool only when all of
    them have let go, so eviction or a close never recycles memory that is still being written or
    read.
    """

    def __init__(self, fetch: _PinnedFetch, *, block_size: int, capacity: int) -> None:
        self._fetch = fetch
        self._block_size = block_size
        self._capacity = capacity
        self._chunks: collections.OrderedDict[int, _Chunk] = collections.OrderedDict()

    def __len__(self) -> int:
        return len(self._chunks)

    def add_downloaded(self, start: int, data: bytearray) -> None:
        done: Future[None] = Future()
        done.set_result(None)
        self._chunks[start] = _Chunk(start, start + len(data), done, Lease(data))

    def find(self, offset: int) -> _Chunk | None:
        for chunk in self._chunks.values():
            if chunk.start <= offset < chunk.stop:
                return chunk
        return None

    def next_start(self, offset: int, end: int) -> int:
        """Where the first chunk after ``offset`` starts, if before ``end``; else ``end``."""
        return min((chunk.start for chunk in self._chunks.values() if offset < chunk.start < end), default=end)

    def downloading(self) -> int:
        """How many chunks are still being downloaded (or waiting to be)."""
        return sum(not chunk.future.done() for chunk in self._chunks.values())

    def request(self, start: int, length: int) -> _Chunk:
        """Start downloading ``length`` bytes (at most a chunk) from ``start``, evicting the oldest chunks."""
        stop = min(start + min(length, self._block_size), self._fetch.properties.size)
        # Full chunks use the process's pooled buffers: allocating multi-MiB buffers afresh costs
        # page faults that, with transfer threads running, cost more CPU than the transfer itself.
        chunk_lease = lease(self._block_size if stop - start == self._block_size else stop - start)
        download_hold = chunk_lease.retain()
        future = self._fetch.source.submit(self._download, start, download_hold.view(stop - start))
        future.add_done_callback(lambda _: download_hold.release())  # also when cancelled before it ran
        chunk = _Chunk(start, stop, future, chunk_lease)
        self._chunks[start] = chunk
        while len(self._chunks) > self._capacity:
            # Oldest first: chunks behind the reader go before the read-ahead chunks requested later.
            oldest = next(iter(self._chunks.values()))
            if oldest is chunk:
                break
            self.discard(oldest)
        return chunk

    def discard(self, chunk: _Chunk) -> None:
        """Forget ``chunk`` (evicted, or its download failed); its buffer waits for its other holders."""
        if self._chunks.get(chunk.start) is chunk:
            del self._chunks[chunk.start]
            chunk.future.cancel()  # a download not started yet is not worth its request
            chunk.lease.release()

    def close(self) -> None:
        for chunk in list(self._chunks.values()):
            self.discard(chunk)

    def _download(self, start: int, target: memoryview) -> None:
        self._fetch.into(start, target)
        pause("part.finish")


def read_first(source: RangeSource, length: int, *, validate_content: bool) -> tuple[BlobProperties, bytearray]:
    """The blob's properties and its first ``length`` bytes (all of it, if smaller), in one request:
    what a :class:`ReadAheadWindow` starts from. The buffer is sized by the answer, so opening a
    small blob never allocates ``length``."""
    first: list[bytearray] = []

    def allocate(properties: BlobProperties) -> memoryview:
        first.append(bytearray(min(length, properties.size)))
        return memoryview(first[0])

    properties, _ = source.fetch_range_into(0, allocate, etag=None, length=length, validate_content=validate_content)
    return properties, first[0]


class ReadAheadWindow:
    """A sliding window of chunks downloaded in parallel ahead of a forward-moving reader.

    ``torch.load`` reads a checkpoint as a run of small reads (zip headers, the pickle) mixed with
    large ones (tensor data), mostly moving forward, after a few jumps to the end of the file for
    the zip directory. One request per read would be slow; downloading the whole blob up front would
    hold multi-GB checkpoints in memory. The window sits in between: it trades a copy out of its
    chunks, and memory bounded by ``max_chunks``, for requests that run ahead across reads.

    Small reads are served from chunks of up to ``block_size`` bytes, each fetched by one ranged
    GET. While reads keep moving forward, the number of chunks requested ahead of the reader doubles, up to
    ``max_chunks - 1``, so a long sequential read keeps that many requests in flight and the
    reader rarely waits. A jump elsewhere resets the window and fetches a small chunk at the new
    position. At most ``max_chunks + 1`` chunks are kept, which bounds memory at about
    ``(max_chunks + 2) * block_size`` bytes whatever the blob's size (one more for a chunk that is
    evicted while a read copies out of it).

    A read of ``max_chunks * DIRECT_PART_BYTES`` bytes or more (``max_chunks * block_size`` with
    smaller chunks), or of ``DIRECT_MIN_BYTES`` (at most ``block_size``) or more that does not start
    where an equally large read ended, bypasses the window for every range of it that no chunk
    holds: those ranges are a :class:`~azstoragetorch._reads.DirectReads`, straight into the
    caller's buffer, while a small chunk after its end is fetched for the small reads that usually
    come next. Neither such a read nor the small reads after it widen the window, until a small
    read finds no chunk, so a checkpoint's tensors, each read behind its record's header, are
    received into their destination with no copy.

    All downloads are pinned to the ETag seen when the blob was opened. With ``validate_content``
    every range is checked against the MD5 the service computes for it; with ``checksums``, the
    CRC-32 of everything downloaded is recorded there, for a check of the whole blob.
    """

    def __init__(
        self,
        source: RangeSource,
        properties: BlobProperties,
        *,
        block_size: int,
        max_chunks: int,
        first_chunk: bytearray,
        validate_content: bool = False,
        checksums: PieceChecksums | None = None,
    ) -> None:
        self._fetch = _PinnedFetch(source, properties, validate_content, checksums)
        self._block_size = block_size
        self._max_chunks = max(1, max_chunks)
        self._direct_part = min(block_size, DIRECT_PART_BYTES)
        self._direct_alone = self._direct_part * self._max_chunks
        self._direct_min = min(block_size, DIRECT_MIN_BYTES)
        self._large_read_end = -1  # where the last read ended, if it was of at least _direct_min bytes
        self._store = _ChunkStore(self._fetch, block_size=block_size, capacity=self._max_chunks + 1)
        self._ahead = 0
        # Off from a direct read until a small read misses every chunk: the small reads between large
        # direct ones (torch.load's record headers and small tensors) are served by the chunk fetched
        # after each, and widening the window from them would fetch the next large reads into chunks.
        self._widening = True
        self._next_expected = 0
        self._window_anchor = -1  # start of the chunk the read-ahead was last extended from
        if checksums is not None:
            checksums.add(0, first_chunk)
        if first_chunk:
            self._store.add_downloaded(0, first_chunk)

    @property
    def properties(self) -> BlobProperties:
        return self._fetch.properties

    @property
    def size(self) -> int:
        return self._fetch.properties.size

    @property
    def verifies_checksum(self) -> bool:
        return self._fetch.checksums is not None

    def readinto(self, position: int, destination: memoryview) -> int:
        """Copy the blob's bytes at ``position`` into ``destination``; returns the count (0 at the end)."""
        end = min(position + len(destination), self.size)
        direct = self._goes_direct(position, end - position)
        # A read too small to fill the connections alone takes whole blocks: fewer requests.
        part_bytes = self._direct_part if end - position >= self._direct_alone else self._block_size
        offset = position
        while offset < end:
            chunk = self._store.find(offset)
            if chunk is None and direct:
                # Up to the next chunk already requested: those bytes are paid for, the rest is not.
                stop = self._store.next_start(offset, end)
                gap = destination[offset - position : stop - position]
                self._read_directly(offset, gap, part_bytes=part_bytes, last=stop == end)
                offset = stop
                continue
            if chunk is None:
                chunk = self._fetch_at(offset, forward=0 <= offset - self._next_expected < self._block_size)
            # A large read does not widen the window: what it covers next is read directly.
            widen = self._widening and not direct
            offset += self._copy_out(chunk, offset, destination[offset - position : end - position], widen=widen)
        if direct:
            self._widening = False
        self._next_expected = max(end, position)
        self._large_read_end = end if end - position >= self._direct_min else -1
        return max(0, end - position)

    def _goes_direct(self, position: int, length: int) -> bool:
        if length >= self._direct_alone:
            return True
        # A medium-sized read right where the previous one ended is part of a stream of them.
        return length >= self._direct_min and position != self._large_read_end

    def close(self) -> None:
        self._store.close()

    def _copy_out(self, chunk: _Chunk, offset: int, destination: memoryview, *, widen: bool) -> int:
        """Copy from ``chunk`` at ``offset`` into ``destination``, widening the window if the reader moved on."""
        hold = chunk.lease.retain()  # pinned: the read-ahead below may evict this very chunk
        try:
            if widen and chunk.start != self._window_anchor:
                self._read_ahead_from(chunk)  # the reader entered another chunk
            pause("chunk.pick")
            try:
                data = chunk.view()
            except BaseException:
                self._store.discard(chunk)  # let a later read try again
                raise
            count = min(len(destination), chunk.stop - offset)
            pause("chunk.copy")
            destination[:count] = data[offset - chunk.start : offset - chunk.start + count]
            return count
        finally:
            hold.release()

    def _read_directly(self, offset: int, destination: memoryview, *, part_bytes: int, last: bool) -> None:
        end = offset + len(destination)
        if last and end < self.size and self._store.find(end) is None:
            self._ahead = 0
            self._window_anchor = self._store.request(end, AFTER_DIRECT_BYTES).start
        # The chunks still downloading count towards max_concurrency; the parts take what is left.
        concurrency = max(1, self._max_chunks - self._store.downloading())
        direct_block_size = min(self._block_size, max(part_bytes, -(-len(destination) // concurrency)))
        direct = self._fetch.direct(block_size=direct_block_size, max_concurrency=concurrency)
        direct.read_into(offset, destination, etag=self._fetch.properties.etag, checksums=self._fetch.checksums)

    def _fetch_at(self, offset: int, *, forward: bool) -> _Chunk:
        if forward:
            self._widening = True  # the reader has left what the last direct read fetched after itself
            return self._store.request(offset, self._block_size)  # the read-ahead follows in _copy_out
        self._ahead = 0
        chunk = self._store.request(offset, JUMP_FETCH_BYTES)
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
            start = (self._store.find(start) or self._store.request(start, self._block_size)).stop

    def whole_crc32(self, *, download_rest: bool) -> int | None:
        """The whole blob's CRC-32, from everything downloaded; with ``download_rest``, after downloading
        what never was, else ``None`` when the downloads do not cover the blob (it was read in part)."""
        checksums = self._fetch.checksums
        assert checksums is not None
        if not download_rest:
            return checksums.whole()
        offset = checksums.covered_from_start()
        window = self._block_size * self._max_chunks
        rest = self._fetch.direct(block_size=self._block_size, max_concurrency=self._max_chunks)
        while (crc := checksums.whole()) is None:
            if offset >= self.size:  # downloads from the reachable end on always tile the rest
                raise AssertionError("downloaded ranges do not tile the blob")
            length = min(window, self.size - offset)
            gap = rest.read_leased(offset, length, etag=self._fetch.properties.etag)
            try:
                checksums.add(offset, gap.view(length))
            finally:
                gap.release()
            offset += length
        return crc
