"""An in-memory stand-in for the transport client, for unit tests of buffering and block logic."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from azstoragetorch._client import AzStorageTorchBlobClient, BlobNotModified, BlobProperties, BlobUrl, IntoBytes
from azstoragetorch._client._blob_client import DownloadStopped
from azstoragetorch._reads._source import signature_of
from azstoragetorch.exceptions import BlobModifiedDuringReadError


class InMemoryBlobClient:
    """Serves reads from ``data`` and records every request; uploads land in ``staged``/``committed``."""

    display_url = "memory://blob"
    blob_url = BlobUrl.parse("https://account.blob.core.windows.net/container/blob")

    def __init__(
        self,
        data: bytes = b"",
        *,
        recorded_crc32: int | None = None,
        fail_stage_at: int | None = None,
        max_blocks: int = 50_000,
    ) -> None:
        self.data = data
        # The CRC-32 recorded with the blob (None: written by another tool); a commit records its own.
        self.recorded_crc32 = recorded_crc32
        self.reads: list[tuple[int, int]] = []
        self.etags: list[str | None] = []  # the ETag condition of every ranged read, None for none
        self.properties_requests = 0
        self.parallel_reads: list[tuple[int, int, int]] = []  # filled by tests that watch DirectReads
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
        return BlobProperties(size=len(self.data), etag='"1"', crc32=self.recorded_crc32)

    def get_properties(self) -> BlobProperties:
        with self._lock:
            self.properties_requests += 1
        return self.properties

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._pool.submit(fn, *args, **kwargs)

    # The keywords of the client's fetch_range_into (tests/unit/test_fakes.py keeps them in step),
    # each honoured here but validate_content, which has nothing to check in memory.
    FETCH_KEYWORDS = frozenset(
        {"etag", "length", "validate_content", "if_none_match", "stop", "on_response", "checksums"}
    )

    @signature_of(AzStorageTorchBlobClient.fetch_range_into)
    def fetch_range_into(
        self,
        offset: int,
        into: memoryview | IntoBytes | Callable[[BlobProperties], memoryview | IntoBytes],
        **request: Any,
    ) -> tuple[BlobProperties, int]:
        if unknown := request.keys() - self.FETCH_KEYWORDS:
            raise TypeError(f"fetch_range_into() got unexpected keyword arguments: {', '.join(sorted(unknown))}")
        etag, length, if_none_match = request["etag"], request.get("length"), request.get("if_none_match")
        stop, on_response, checksums = request.get("stop"), request.get("on_response"), request.get("checksums")
        with self._lock:
            self.etags.append(etag)
        properties = self.properties
        if stop is not None and stop.is_set():
            raise DownloadStopped("stopped: another part of the read failed")
        if etag is not None and etag != properties.etag:
            raise BlobModifiedDuringReadError(self.display_url, etag)
        if if_none_match is not None and if_none_match == properties.etag:
            raise BlobNotModified
        target = into(properties) if callable(into) else into
        if on_response is not None:
            on_response(properties)
        if isinstance(target, IntoBytes):
            assert length is not None, "the real client needs a length with IntoBytes"
            limit = min(length, max(0, len(self.data) - offset))  # as a buffer sized by the answer
        else:
            limit = len(target) if length is None else min(len(target), length)
        with self._lock:
            self.reads.append((offset, limit))
        piece = self.data[offset : offset + limit]
        if isinstance(target, IntoBytes):
            target.data = piece
        else:
            target[: len(piece)] = piece
        if checksums is not None:
            checksums.add(offset, piece)
        return properties, len(piece)

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
