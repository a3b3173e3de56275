"""Block uploads: staging blocks in parallel while the caller keeps writing, then committing."""

from __future__ import annotations

import base64
import threading
import uuid
from concurrent.futures import Future

from azure.core.exceptions import HttpResponseError

from azstoragetorch._client import _buffers, _checksums, _schedule
from azstoragetorch._client._blob_client import AzStorageTorchBlobClient
from azstoragetorch._options import MAX_BLOCK_SIZE, TransferOptions
from azstoragetorch.exceptions import BlobWriteConflictError

# The service's limit for a block blob's block list (MAX_BLOCK_SIZE, bytes in one block, bounds block_size).
MAX_BLOCKS = 50_000
# Once a blob holds 2 * GROWTH_RATIO blocks of block_size, a new block may be up to
# 1/GROWTH_RATIO of what was written before it (see BlockUploader).
GROWTH_RATIO = 2500


def block_size_after(written: int, base: int) -> int:
    """The size of the block that starts after ``written`` bytes of a blob written with ``block_size=base``.

    The largest of ``base``, ``2 * base``, ``4 * base``, ... that is at most ``written / GROWTH_RATIO``
    (``base`` if none is), and never more than the largest block the service accepts.
    """
    size = base
    while size * 2 * GROWTH_RATIO <= written and size < MAX_BLOCK_SIZE:
        size *= 2
    return min(size, MAX_BLOCK_SIZE)


def bytes_that_fit(blocks: int, written: int, base: int) -> int:
    """How many bytes ``blocks`` more blocks hold, full, after ``written`` bytes of a blob."""
    total = 0
    while blocks > 0:
        size = block_size_after(written + total, base)
        if size == MAX_BLOCK_SIZE:
            return total + blocks * size
        # Blocks of this size follow until what was written reaches the next doubling.
        count = min(blocks, -(-(size * 2 * GROWTH_RATIO - written - total) // size))
        total += count * size
        blocks -= count
    return total


def most_bytes(base: int) -> int:
    """The largest blob a writer with ``block_size=base`` can write (with no partial blocks from ``flush``)."""
    return bytes_that_fit(MAX_BLOCKS, 0, base)


class BlockUploader:
    """Accumulates written bytes into blocks, stages them in the background and commits at the end.

    Nothing becomes visible in the container until :meth:`commit`, which creates or replaces the
    blob in a single step (Put Blob when everything fitted in one block, Put Block List
    otherwise). Memory is bounded: at most ``max_concurrency`` blocks are in flight, and
    :meth:`write` waits for one to finish before starting another.

    Block IDs start with a random prefix so that two writers racing on the same blob never stage
    into each other's blocks.

    The blob's CRC-32 is recorded in its metadata at commit: each block's CRC-32 is computed by the
    thread that uploads it (zlib releases the GIL), and the commit combines them in order.

    Every byte is copied once, from the caller's memory into a block buffer that is then sent as
    it is. Block buffers come from the process's buffer pool and go back to it once their upload
    finishes, so that uploads (and the many shard files of a distributed checkpoint) do not pay
    page faults on fresh memory for every block.

    **Blobs of more than 50,000 blocks.** A block list holds at most 50,000 blocks, each of at most
    4000 MiB. Rather than find out at the commit, after hundreds of GiB, that the blob needs more
    blocks, later blocks grow: a block is ``block_size`` until the blob holds 5,000 blocks of
    ``block_size``, and from then on the largest power-of-two multiple of ``block_size`` that is at
    most 1/2500 of what was written before it (up to 4000 MiB). The service accepts blocks of
    different sizes in one list. With the default 8 MiB, blocks stay 8 MiB up to 39 GiB, are 16 MiB
    up to 78 GiB, 32 MiB around 100 GiB, 256 MiB around 1 TiB; 50,000 blocks then hold 105.1 TiB,
    and 4000 MiB blocks 190.7 TiB, the most a block blob can hold. No schedule that starts below
    4000 MiB reaches that exactly: every smaller block leaves some of it unused. Growing sooner
    would come closer, at the cost of memory for every large checkpoint (a ratio of 500 reaches
    173.6 TiB but holds 1.1 GiB of blocks while writing 100 GiB); this one keeps memory small and
    still allows single blobs of over 100 TiB, far beyond any checkpoint. A write that would take the
    blob past what its remaining blocks can hold raises ``ValueError`` before taking any of its bytes
    (each ``flush`` of a partly filled block uses a block too).

    Memory stays bounded, and proportional to the blob only beyond 5,000 blocks: at most
    ``max_concurrency`` blocks are in flight and one is being filled, each at most
    ``max(block_size, written / 2500)`` bytes, so an uploader holds at most
    ``(max_concurrency + 1) * block_size`` bytes, or, for larger blobs, 0.36% of what was written
    (with ``max_concurrency=8``: 288 MiB while writing 100 GiB). The block size depends on the bytes
    written, not on the number of blocks, so a caller that flushes often does not make blocks grow.
    """

    def __init__(self, client: AzStorageTorchBlobClient, options: TransferOptions) -> None:
        self._client = client
        self._block_size = options.block_size
        self._validate_content = options.validate_content
        # The block being filled; the first grows as data arrives, so a small blob never allocates a
        # whole block. Staging hands its lease to the upload thread, which releases it when done.
        self._block = _buffers.Lease(bytearray())
        self._filled = 0
        self._staged_bytes = 0  # in the blocks handed to upload threads
        self._block_ids: list[str] = []
        self._block_crcs: dict[int, tuple[int, int]] = {}  # block index -> (crc32, length)
        self._id_prefix = uuid.uuid4().hex
        self._in_flight: list[Future[None]] = []
        self._slots = threading.BoundedSemaphore(options.max_concurrency)
        self._error: BaseException | None = None
        self._current_size = 0  # the size of the block being filled
        self._room_after_current = 0  # what the blocks after it can hold
        # None while open; then why nothing more may be written or committed.
        self._finished: str | None = None
        self._plan_next_block()

    def write(self, data: memoryview) -> None:
        """Take a copy of ``data``; each block is handed to an upload thread as soon as it is full.

        Raises ``ValueError``, taking none of ``data``, if the blob's remaining blocks cannot hold it.
        Should anything interrupt a write part-way (``KeyboardInterrupt``), the uploader must be
        aborted: what it holds is then torn.
        """
        self._check_open("write")
        if len(data) > self._current_size - self._filled + self._room_after_current:
            self._raise_too_large(len(data))
        while len(data):
            room = self._current_size - self._filled
            piece = data[:room]
            buffer = self._block.buffer
            if self._filled == len(buffer):
                buffer += piece  # the growing first block
            else:
                buffer[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
            data = data[len(piece) :]
            if self._filled == self._current_size:
                self._stage_buffer()

    def flush(self) -> None:
        """Upload everything written so far and wait for it.

        While the blob still fits in a single block nothing has been staged, and the data is kept
        for a single Put Blob at commit: uploading it now would only add a request, since nothing
        is visible before the commit either way.
        """
        if self._block_ids and self._filled:
            self._stage_buffer()
        self._wait_all()

    def commit(self) -> None:
        """Make everything written the blob's content, replacing any previous content atomically.

        Raises :class:`~azstoragetorch.exceptions.BlobWriteConflictError` if another writer
        committed the blob after this one staged its first block: that commit discarded this
        writer's blocks, and the first commit wins.

        An uploader commits at most once: a second call, or a call after :meth:`abort`, raises
        ``RuntimeError`` and sends nothing, whatever became of the first (its buffer is gone, and a
        second Put Blob would replace the blob with nothing). A commit that failed stays failed.
        """
        self._check_open("commit")
        self._finished = "failed to commit"  # until it succeeds
        if not self._block_ids:
            self._raise_if_failed()
            data = self._block.view(self._filled)
            self._client.put_blob(data, validate_content=self._validate_content, crc32=_checksums.crc32(data))
        else:
            self.flush()
            try:
                self._client.commit_block_list(self._block_ids, crc32=self._blob_crc32())
            except HttpResponseError as error:
                # Every block in the list was staged successfully, so a list the service calls
                # invalid names blocks that were discarded since: another writer committed the blob.
                if error.status_code == 400 and getattr(error, "error_code", None) == "InvalidBlockList":
                    raise BlobWriteConflictError(self._client.display_url, error) from error
                raise
        self._finished = "was committed"
        self._drop_buffer()

    def abort(self) -> None:
        """Stop: wait for uploads already started and forget all data. Nothing is committed.

        Staged blocks that are never committed are discarded by the service (after a week).
        """
        self._finished = self._finished or "was aborted"
        self._drop_buffer()
        for future in self._in_flight:
            future.cancel()
        for future in self._in_flight:
            if not future.cancelled():
                future.exception()
        self._in_flight = []

    def _check_open(self, operation: str) -> None:
        if self._finished is not None:
            raise RuntimeError(
                f"Cannot {operation}: the upload to {self._client.display_url} {self._finished} already; "
                "nothing was sent."
            )

    def _drop_buffer(self) -> None:
        self._block.release()
        self._block = _buffers.Lease(bytearray())
        self._filled = 0

    def _stage_buffer(self) -> None:
        self._raise_if_failed()
        block, size = self._block, self._filled
        index = len(self._block_ids)
        block_id = base64.b64encode(f"{self._id_prefix}-{index:08d}".encode()).decode()
        self._block_ids.append(block_id)
        self._slots.acquire()  # back-pressure: at most max_concurrency blocks held in memory
        try:
            future = self._client.submit(self._upload_block, index, block_id, block.view(size))
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._release_block(block))
        self._in_flight.append(future)
        self._staged_bytes += size
        self._plan_next_block()
        self._block = _buffers.lease(self._current_size)
        self._filled = 0

    def _plan_next_block(self) -> None:
        blocks_left = MAX_BLOCKS - len(self._block_ids)
        self._current_size = block_size_after(self._staged_bytes, self._block_size) if blocks_left else 0
        self._room_after_current = bytes_that_fit(
            blocks_left - 1, self._staged_bytes + self._current_size, self._block_size
        )

    def _raise_too_large(self, length: int) -> None:
        total = self._staged_bytes + self._filled + length
        most = self._staged_bytes + self._current_size + self._room_after_current
        raise ValueError(
            f"Writing {length} more bytes would make {self._client.display_url} {total:,} bytes, more than the "
            f"{most:,} bytes that a block blob of at most {MAX_BLOCKS:,} blocks can hold when written with "
            f"block_size={self._block_size} ({len(self._block_ids):,} blocks used so far; every flush of a partly "
            "filled block uses one). Write it with a larger block_size (at most 4000 MiB), or split it over "
            "several blobs."
        )

    def _upload_block(self, index: int, block_id: str, data: memoryview) -> None:
        self._block_crcs[index] = (_checksums.crc32(data), len(data))
        self._client.stage_block(block_id, data, validate_content=self._validate_content)
        _schedule.pause("part.finish")

    def _blob_crc32(self) -> int:
        crc = 0
        for index in range(len(self._block_ids)):
            block_crc, length = self._block_crcs[index]
            crc = _checksums.crc32_combine(crc, block_crc, length)
        return crc

    def _release_block(self, block: _buffers.Lease) -> None:
        block.release()  # the upload was its last user (or it was cancelled before it started)
        self._slots.release()

    def _collect_finished(self) -> None:
        still_running = []
        for future in self._in_flight:
            if not future.done():
                still_running.append(future)
            elif self._error is None and future.exception() is not None:
                self._error = future.exception()
        self._in_flight = still_running

    def _wait_all(self) -> None:
        for future in self._in_flight:
            exception = future.exception()
            if exception is not None and self._error is None:
                self._error = exception
        self._in_flight = []
        self._raise_if_failed()

    def _raise_if_failed(self) -> None:
        self._collect_finished()
        if self._error is not None:
            raise self._error
