"""Large reads straight into the caller's memory: :class:`DirectReads`."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from azstoragetorch._client import BlobProperties, Lease, PieceChecksums, lease, pause
from azstoragetorch._reads._source import RangeSource


class DirectReads:
    """One read of a known range, split into parts of ``block_size`` fetched in parallel into place.

    The bytes go from the socket into the caller's buffer with no copy, and up to
    ``max_concurrency`` connections work on the one read. Nothing is kept afterwards, so each call
    pays its own round trips: this suits reads large enough to fill the parts (a tensor's storage,
    a DCP span, the rest of a blob whose start has arrived), not a run of small reads, which
    :class:`~azstoragetorch._reads.ReadAheadWindow` serves.

    Every part started has finished before a call returns or raises. On the first failure the parts
    not yet started are cancelled, the running ones stop at their next request, and all of them are
    waited for: the buffer may be ``torch.load``'s tensor storage or a leased buffer that goes back
    to the pool right after, so nothing may write into it later.
    """

    def __init__(
        self, source: RangeSource, *, block_size: int, max_concurrency: int, validate_content: bool = False
    ) -> None:
        self._source = source
        self._block_size = block_size
        self._max_concurrency = max(1, max_concurrency)
        self._validate_content = validate_content

    def read_into(
        self,
        offset: int,
        buffer: memoryview,
        *,
        etag: str | None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: PieceChecksums | None = None,
    ) -> None:
        """Fill ``buffer`` with the blob's bytes from ``offset``.

        Without ``etag``, the first part's answer pins the version: the other parts are sent once its
        headers are in, with its ETag, so the bytes are of one version and no properties request is
        needed first. ``on_response`` gets that first answer's properties, and ``checksums`` the
        CRC-32 of every part.
        """
        size = self._block_size
        parts = [(start, min(start + size, len(buffer))) for start in range(0, len(buffer), size)]
        if len(parts) <= 1:
            self._fetch(offset, buffer, etag, on_response, checksums, None)
            return
        stop = threading.Event()
        first_answer: Future[BlobProperties] = Future()

        def answered(properties: BlobProperties) -> None:
            first_answer.set_result(properties)
            if on_response is not None:
                on_response(properties)

        def fetch_part(
            start: int, stop_at: int, etag: str | None, seen: Callable[[BlobProperties], None] | None
        ) -> None:
            self._fetch(offset + start, buffer[start:stop_at], etag, seen, checksums, stop)
            pause("part.finish")

        started: list[Future[None]] = [self._source.submit(fetch_part, *parts[0], etag, answered)]
        try:
            if etag is None:
                waited: list[Future[Any]] = [started[0], first_answer]
                concurrent.futures.wait(waited, return_when=concurrent.futures.FIRST_COMPLETED)
                if not first_answer.done():
                    started[0].result()  # it failed before an answer came: raises why
                etag = first_answer.result().etag
            for start, stop_at in parts[1:]:
                if len(started) >= self._max_concurrency:
                    # A slot is free once the oldest part is done.
                    started[len(started) - self._max_concurrency].result()
                started.append(self._source.submit(fetch_part, start, stop_at, etag, None))
            for future in started:
                future.result()
        except BaseException:
            stop.set()
            for future in started:
                future.cancel()
            concurrent.futures.wait(started)  # the running parts finish (or stop) before we raise
            raise

    def read_leased(
        self,
        offset: int,
        length: int,
        *,
        etag: str | None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: PieceChecksums | None = None,
    ) -> Lease:
        """The blob's ``length`` bytes from ``offset``, in a leased pooled buffer the caller releases.

        The buffer's size is ``length`` rounded up to whole parts, so that ranges of similar sizes
        reuse each other's buffers. Fetched as :meth:`read_into` does; on failure the lease is
        released, once every part has ended.
        """
        held = lease(-(-length // self._block_size) * self._block_size)
        try:
            self.read_into(offset, held.view(length), etag=etag, on_response=on_response, checksums=checksums)
        except BaseException:
            held.release()
            raise
        return held

    def _fetch(
        self,
        offset: int,
        buffer: memoryview,
        etag: str | None,
        on_response: Callable[[BlobProperties], None] | None,
        checksums: PieceChecksums | None,
        stop: threading.Event | None,
    ) -> None:
        self._source.fetch_range_into(
            offset,
            buffer,
            etag=etag,
            validate_content=self._validate_content,
            stop=stop,
            on_response=on_response,
            checksums=checksums,
        )
