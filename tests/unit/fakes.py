"""An in-memory stand-in for the transport client, for unit tests of buffering and block logic."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from azstoragetorch._client import AzStorageTorchBlobClient, BlobProperties, BlobUrl, PieceChecksums


class InMemoryBlobClient:
    """Serves reads from ``data`` and records every request; uploads land in ``staged``/``committed``."""

    display_url = "memory://blob"
    blob_url = BlobUrl.parse("https://account.blob.core.windows.net/container/blob")

    def __init__(self, data: bytes = b"", *, fail_stage_at: int | None = None, max_blocks: int = 50_000) -> None:
        self.data = data
        self.reads: list[tuple[int, int]] = []
        self.parallel_reads: list[tuple[int, int, int]] = []
        self.staged: dict[str, bytes] = {}
        self.committed: bytes | None = None
        self.committed_block_sizes: list[int] = []
        self.max_blocks = max_blocks  # the service refuses longer block lists
        self.put_blob_calls = 0
        self.commit_calls = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.fail_stage_at = fail_stage_at
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(4)
        self.release = threading.Event()
        self.release.set()
        self.recorder: Any = None

    def with_recorder(self, recorder: Any) -> InMemoryBlobClient:
        # One shared fake: tests look at what it recorded through the client they made.
        self.recorder = recorder
        return self

    @property
    def properties(self) -> BlobProperties:
        return BlobProperties(size=len(self.data), etag='"1"')

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    def download_into(
        self,
        offset: int,
        buffer: memoryview,
        *,
        etag: str | None,
        validate_content: bool = False,
        stop: threading.Event | None = None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: PieceChecksums | None = None,
    ) -> tuple[BlobProperties, int]:
        with self._lock:
            self.reads.append((offset, len(buffer)))
        if on_response is not None:
            on_response(self.properties)
        piece = self.data[offset : offset + len(buffer)]
        buffer[: len(piece)] = piece
        if checksums is not None:
            checksums.add(offset, piece)
        return self.properties, len(piece)

    def download_parallel(
        self,
        offset: int,
        buffer: memoryview,
        *,
        etag: str | None,
        block_size: int,
        max_concurrency: int,
        validate_content: bool = False,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: PieceChecksums | None = None,
    ) -> None:
        with self._lock:
            self.parallel_reads.append((offset, len(buffer), block_size))
        # The real splitting, joining and failure handling, over this fake's download_into.
        AzStorageTorchBlobClient.download_parallel(
            self,  # type: ignore[arg-type]
            offset,
            buffer,
            etag=etag,
            block_size=block_size,
            max_concurrency=max_concurrency,
            validate_content=validate_content,
            on_response=on_response,
            checksums=checksums,
        )

    download_range = AzStorageTorchBlobClient.download_range

    def stage_block(self, block_id: str, data: bytes | memoryview, *, validate_content: bool) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            index = len(self.staged)
        try:
            self.release.wait(5)
            if self.fail_stage_at is not None and index >= self.fail_stage_at:
                raise ConnectionError("injected stage failure")
            with self._lock:
                self.staged[block_id] = bytes(data)
        finally:
            with self._lock:
                self.in_flight -= 1

    def commit_block_list(self, block_ids: list[str], *, crc32: int | None = None) -> None:
        self.commit_calls += 1
        if len(block_ids) > self.max_blocks:
            raise ValueError(f"400 BlockListTooLong: {len(block_ids)} blocks, at most {self.max_blocks} allowed")
        self.committed = b"".join(self.staged[block_id] for block_id in block_ids)
        self.committed_block_sizes = [len(self.staged[block_id]) for block_id in block_ids]
        self.recorded_crc32 = crc32

    def put_blob(
        self,
        data: bytes | memoryview,
        *,
        validate_content: bool,
        crc32: int | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> str:
        # Uploads here never replace an earlier commit, so conditions are not modelled.
        assert if_match is None and if_none_match is None, "conditional puts are tested against Azurite"
        self.put_blob_calls += 1
        self.committed = bytes(data)
        self.recorded_crc32 = crc32
        return self.properties.etag
