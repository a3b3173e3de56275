"""Block uploads: staging blocks in parallel while the caller keeps writing, then committing."""

from __future__ import annotations

import base64
import threading
import uuid
from concurrent.futures import Future

from azstoragetorch._client import _buffers, _checksums
from azstoragetorch._client._blob_client import AzStorageTorchBlobClient


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
    """

    def __init__(
        self, client: AzStorageTorchBlobClient, *, block_size: int, max_concurrency: int, validate_content: bool
    ) -> None:
        self._client = client
        self._block_size = block_size
        self._validate_content = validate_content
        # The first block grows as data arrives, so a small blob never allocates a whole block.
        self._buffer = bytearray()
        self._filled = 0
        self._block_ids: list[str] = []
        self._block_crcs: dict[int, tuple[int, int]] = {}  # block index -> (crc32, length)
        self._id_prefix = uuid.uuid4().hex
        self._in_flight: list[Future[None]] = []
        self._slots = threading.BoundedSemaphore(max_concurrency)
        self._error: BaseException | None = None

    @property
    def error(self) -> BaseException | None:
        """The first upload failure, if any; once set, nothing will be committed."""
        self._collect_finished()
        return self._error

    def write(self, data: memoryview) -> None:
        """Take a copy of ``data``; each block is handed to an upload thread as soon as it is full."""
        while len(data):
            room = self._block_size - self._filled
            piece = data[:room]
            if self._filled == len(self._buffer):
                self._buffer += piece  # the growing first block
            else:
                self._buffer[self._filled : self._filled + len(piece)] = piece
            self._filled += len(piece)
            data = data[len(piece) :]
            if self._filled == self._block_size:
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
        """Make everything written the blob's content, replacing any previous content atomically."""
        if not self._block_ids:
            self._raise_if_failed()
            data = memoryview(self._buffer)[: self._filled]
            self._client.put_blob(data, validate_content=self._validate_content, crc32=_checksums.crc32(data))
        else:
            self.flush()
            self._client.commit_block_list(self._block_ids, crc32=self._blob_crc32())
        self._drop_buffer()

    def abort(self) -> None:
        """Stop: wait for uploads already started and forget all data. Nothing is committed.

        Staged blocks that are never committed are discarded by the service (after a week).
        """
        self._drop_buffer()
        for future in self._in_flight:
            future.cancel()
        for future in self._in_flight:
            if not future.cancelled():
                future.exception()
        self._in_flight = []

    def _drop_buffer(self) -> None:
        self._recycle(self._buffer)
        self._buffer = bytearray()
        self._filled = 0

    def _stage_buffer(self) -> None:
        self._raise_if_failed()
        buffer, size = self._buffer, self._filled
        index = len(self._block_ids)
        block_id = base64.b64encode(f"{self._id_prefix}-{index:08d}".encode()).decode()
        self._block_ids.append(block_id)
        self._slots.acquire()  # back-pressure: at most max_concurrency blocks held in memory
        try:
            future = self._client.submit(self._upload_block, index, block_id, memoryview(buffer)[:size])
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._release_buffer(buffer))
        self._in_flight.append(future)
        self._buffer = self._take_buffer()
        self._filled = 0

    def _upload_block(self, index: int, block_id: str, data: memoryview) -> None:
        self._block_crcs[index] = (_checksums.crc32(data), len(data))
        self._client.stage_block(block_id, data, validate_content=self._validate_content)

    def _blob_crc32(self) -> int:
        crc = 0
        for index in range(len(self._block_ids)):
            block_crc, length = self._block_crcs[index]
            crc = _checksums.crc32_combine(crc, block_crc, length)
        return crc

    def _take_buffer(self) -> bytearray:
        return _buffers.take(self._block_size)

    def _release_buffer(self, buffer: bytearray) -> None:
        self._recycle(buffer)
        self._slots.release()

    def _recycle(self, buffer: bytearray) -> None:
        # The first block grows with the data and is only block-sized if it filled up.
        if len(buffer) == self._block_size:
            _buffers.give_back(buffer)

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
