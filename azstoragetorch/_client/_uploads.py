"""Block uploads: staging blocks in parallel while the caller keeps writing, then committing."""

from __future__ import annotations

import base64
import threading
import uuid
from concurrent.futures import Future

from azstoragetorch._client._blob_client import AzStorageTorchBlobClient


class BlockUploader:
    """Accumulates written bytes into blocks, stages them in the background and commits at the end.

    Nothing becomes visible in the container until :meth:`commit`, which creates or replaces the
    blob in a single step (Put Blob when everything fitted in one block, Put Block List
    otherwise). Memory is bounded: at most ``max_concurrency`` blocks are in flight, and
    :meth:`write` waits for one to finish before starting another.

    Block IDs start with a random prefix so that two writers racing on the same blob never stage
    into each other's blocks.
    """

    def __init__(
        self, client: AzStorageTorchBlobClient, *, block_size: int, max_concurrency: int, validate_content: bool
    ) -> None:
        self._client = client
        self._block_size = block_size
        self._validate_content = validate_content
        self._buffer = bytearray()
        self._block_ids: list[str] = []
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
        """Take a copy of ``data``; full blocks are handed to upload threads straight away."""
        if self._buffer:
            room = self._block_size - len(self._buffer)
            self._buffer += data[:room]
            data = data[room:]
            if len(self._buffer) < self._block_size:
                return
            self._stage(bytes(self._buffer))
            self._buffer = bytearray()
        # Whole blocks are cut straight from the caller's memory: one copy instead of two.
        while len(data) >= self._block_size:
            self._stage(bytes(data[: self._block_size]))
            data = data[self._block_size :]
        self._buffer += data

    def flush(self) -> None:
        """Upload everything written so far and wait for it.

        While the blob still fits in a single block nothing has been staged, and the data is kept
        for a single Put Blob at commit: uploading it now would only add a request, since nothing
        is visible before the commit either way.
        """
        if self._block_ids and self._buffer:
            self._stage(bytes(self._buffer))
            self._buffer = bytearray()
        self._wait_all()

    def commit(self) -> None:
        """Make everything written the blob's content, replacing any previous content atomically."""
        if not self._block_ids:
            self._raise_if_failed()
            self._client.put_blob(bytes(self._buffer), validate_content=self._validate_content)
            return
        self.flush()
        self._client.commit_block_list(self._block_ids)

    def abort(self) -> None:
        """Stop: wait for uploads already started and forget all data. Nothing is committed.

        Staged blocks that are never committed are discarded by the service (after a week).
        """
        self._buffer = bytearray()
        for future in self._in_flight:
            future.cancel()
        for future in self._in_flight:
            if not future.cancelled():
                future.exception()
        self._in_flight = []

    def _stage(self, block: bytes) -> None:
        self._raise_if_failed()
        block_id = base64.b64encode(f"{self._id_prefix}-{len(self._block_ids):08d}".encode()).decode()
        self._block_ids.append(block_id)
        self._slots.acquire()  # back-pressure: at most max_concurrency blocks held in memory
        try:
            future = self._client.submit(
                self._client.stage_block, block_id, block, validate_content=self._validate_content
            )
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        self._in_flight.append(future)

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
