"""The blob operations azstoragetorch needs, each one REST call (plus retries) on the shared pipeline."""

from __future__ import annotations

import base64
import concurrent.futures
import dataclasses
import datetime
import hashlib
import http.client
import threading
import time
import urllib.parse
from collections.abc import Callable
from concurrent.futures import Future
from email.utils import parsedate_to_datetime
from typing import Any

import urllib3.exceptions
from azure.core.exceptions import ServiceResponseError
from azure.core.pipeline.transport import HttpResponse

from azstoragetorch._client import _buffers, _checksums, _pipeline, _schedule, _stats
from azstoragetorch._client._credentials import CredentialArgument
from azstoragetorch._client._redaction import redact_error
from azstoragetorch._client._resource import ResourceClient
from azstoragetorch._client._transport import WireResponse
from azstoragetorch._client._urls import BlobUrl
from azstoragetorch.exceptions import BlobModifiedDuringReadError, ChecksumMismatchError
from azstoragetorch.retry import RetryOptions

# Failures while a response body streams in. The request itself succeeded, so the SDK's retry
# policy never sees them; download_into retries them from the first byte not yet received.
_BODY_READ_ERRORS: tuple[type[BaseException], ...] = (
    http.client.IncompleteRead,
    # Resets, timeouts and, over TLS, ssl.SSLError (a damaged record): read straight from the
    # http.client response, the socket's own errors arrive unwrapped.
    OSError,
    # The same failures as urllib3 reports them when the body is read through it.
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    urllib3.exceptions.SSLError,
)
BODY_READ_ATTEMPTS = 5
# The largest range for which the service computes an MD5 (x-ms-range-get-content-md5).
MAX_VALIDATED_RANGE = 4 * 1024 * 1024
_BODY_PIECE_BYTES = 256 * 1024


class _NotModified(Exception):
    """A conditional read found the blob unchanged (never reaches the caller)."""


class DownloadStopped(Exception):
    """A part of a parallel read stopped because another part failed (never reaches the caller)."""


@dataclasses.dataclass(frozen=True)
class BlobProperties:
    """What a read needs to know about a blob."""

    size: int
    etag: str
    last_modified: datetime.datetime | None = None
    # The CRC-32 of the whole blob that an azstoragetorch writer recorded, if any.
    crc32: int | None = None


class AzStorageTorchBlobClient(ResourceClient):
    """Talks to one blob: reads ranges, uploads blocks, commits."""

    def __init__(
        self, blob_url: BlobUrl, credential: CredentialArgument = None, *, retry: RetryOptions | None = None
    ) -> None:
        super().__init__(blob_url, credential, retry=retry)
        self.blob_url = blob_url

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.blob_url = state["url"]

    @classmethod
    def from_url(
        cls, url: str, credential: CredentialArgument = None, *, retry: RetryOptions | None = None
    ) -> AzStorageTorchBlobClient:
        return cls(BlobUrl.parse(url), credential, retry=retry)

    # -- reads -------------------------------------------------------------------------------

    def get_properties(self) -> BlobProperties:
        response = self._send("HEAD", action="read the properties of")
        return _properties_from(response, size=int(response.headers["Content-Length"]))

    def download_start(self, length: int, *, validate_content: bool = False) -> tuple[BlobProperties, bytearray]:
        """The blob's properties and its first ``length`` bytes (all of it, if smaller), in one request.

        The buffer is sized by the response, so opening a small blob never allocates ``length``.
        ``validate_content`` checks them as :meth:`download_into` does (``length`` is then at most
        :data:`MAX_VALIDATED_RANGE`).
        """
        response = self._send_range_get(0, length, None, content_md5=validate_content)
        if response is None:  # an empty blob has no first byte to ask for
            return self.get_properties(), bytearray()
        properties = _properties_from(response, size=_total_size(response))
        data = bytearray(min(length, properties.size))
        count, error = _read_body_into(response, memoryview(data))
        if validate_content and error is None and count == len(data):
            error = self._md5_mismatch(response, memoryview(data))
        if not (validate_content and error is not None):
            _stats.add_bytes(self.recorder, count)
        if error is not None:  # what follows fetches (the rest of) it again
            _stats.add_retry(self.recorder, _stats.reason_for_error(error))
        if validate_content and error is not None:
            self.download_into(0, memoryview(data), etag=properties.etag, validate_content=True)
        elif error is not None or count < len(data):
            self.download_into(count, memoryview(data)[count:], etag=properties.etag)
        return properties, data

    def read_all(self, *, block_size: int, max_concurrency: int) -> bytes:
        """The whole blob as ``bytes``, copied as few times as possible (a dataset's default sample).

        A blob that fits in ``block_size`` arrives in one request, straight from the socket into the
        returned object. A larger one is fetched in parallel ranged GETs of ``block_size``.
        """
        read = self._read_all(None, block_size, max_concurrency, with_properties=False)
        assert read is not None  # only a conditional read can find nothing new
        return read[1]

    def read_all_if_changed(
        self, etag: str | None, *, block_size: int, max_concurrency: int
    ) -> tuple[BlobProperties, bytes] | None:
        """As :meth:`read_all`, with the properties of the version read; ``None`` if the blob still
        has ``etag`` (the first request carries ``If-None-Match``, so that answer has no body)."""
        read = self._read_all(etag, block_size, max_concurrency, with_properties=True)
        if read is None:
            return None
        properties, data = read
        assert properties is not None  # asked for, even of an empty blob
        return properties, data

    def _read_all(
        self, if_none_match: str | None, block_size: int, max_concurrency: int, *, with_properties: bool
    ) -> tuple[BlobProperties | None, bytes] | None:
        try:
            response = self._send_range_get(0, block_size, None, if_none_match=if_none_match)
        except _NotModified:
            return None
        if response is None:  # an empty blob: its properties cost a request of their own
            return (self.get_properties() if with_properties else None), b""
        size, etag = _total_size(response), response.headers.get("ETag", "")
        if self.recorder is not None and self.recorder.total is None:
            self.recorder.total = size  # for a progress hook, known from the first response
        # Parsing Last-Modified would cost more than the rest of a small blob's read: only if asked.
        properties = _properties_from(response, size=size) if with_properties else None
        first_length = min(block_size, size)
        if first_length == size:
            body = _read_whole_body(response)
            if body is not None and len(body) == first_length:
                _stats.add_bytes(self.recorder, first_length)
                return properties, body
            data = bytearray(size)  # the body broke off: fetch it again, with retries
            _stats.add_retry(self.recorder, _stats.RESET)
            self.download_into(0, memoryview(data), etag=etag)
            return properties, bytes(data)
        data = bytearray(size)
        self._fill_whole(response, etag, memoryview(data), block_size=block_size, max_concurrency=max_concurrency)
        return properties, bytes(data)

    def read_all_into(self, allocate: Callable[[int], memoryview], *, block_size: int, max_concurrency: int) -> None:
        """The whole blob, received straight into the memory that ``allocate`` returns (no copy).

        ``allocate(size)`` is called once, when the first response has told the blob's size, and
        returns a writable byte view of exactly ``size`` bytes: a new tensor's storage, or the caller's
        buffer after checking that it fits (it may raise; the response is then dropped). The first
        ``block_size`` bytes come with that response, the rest in parallel ranged GETs, all pinned to
        its ETag: a blob changed meanwhile raises :class:`BlobModifiedDuringReadError`, and every part
        has finished before this returns or raises.
        """
        response = self._send_range_get(0, block_size, None)
        if response is None:  # an empty blob
            allocate(0)
            return
        # Only the size and ETag matter here (parsing Last-Modified would cost more than the rest).
        size, etag = _total_size(response), response.headers.get("ETag", "")
        if self.recorder is not None and self.recorder.total is None:
            self.recorder.total = size  # for a progress hook, known from the first response
        try:
            buffer = allocate(size)
        except BaseException:
            _raw_and_body(response)[0].close()  # mid-body: never reuse the connection
            raise
        if len(buffer) != size:
            _raw_and_body(response)[0].close()
            raise ValueError(f"allocate returned {len(buffer)} bytes for a blob of {size}.")
        self._fill_whole(response, etag, buffer, block_size=block_size, max_concurrency=max_concurrency)

    def _fill_whole(
        self, response: HttpResponse, etag: str, buffer: memoryview, *, block_size: int, max_concurrency: int
    ) -> None:
        """Fill ``buffer`` (the whole blob) from ``response`` to a GET of its first ``block_size`` bytes,
        then the rest in parallel ranged GETs pinned to ``etag``."""
        first_length = min(block_size, len(buffer))
        count, error = _read_body_into(response, buffer[:first_length])
        _stats.add_bytes(self.recorder, count)
        if error is not None:
            _stats.add_retry(self.recorder, _stats.reason_for_error(error))
        if error is not None or count < first_length:
            self.download_into(count, buffer[count:first_length], etag=etag)
        if first_length < len(buffer):
            self.download_parallel(
                first_length, buffer[first_length:], etag=etag, block_size=block_size, max_concurrency=max_concurrency
            )

    def download_into(
        self,
        offset: int,
        buffer: memoryview,
        *,
        etag: str | None,
        validate_content: bool = False,
        stop: threading.Event | None = None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: _checksums.PieceChecksums | None = None,
    ) -> tuple[BlobProperties, int]:
        """Fill ``buffer`` with the blob's bytes from ``offset``; stops early only at the blob's end.

        With ``etag`` the read is pinned to that version of the blob; a changed blob raises
        :class:`BlobModifiedDuringReadError`. Returns the blob's properties and the bytes filled.
        Failures while the body streams in are retried from where they stopped.

        With ``validate_content``, every request asks the service for the MD5 of its range (which it
        gives for ranges up to 4 MiB, so larger buffers take several requests) and the bytes received
        must match it; a range that breaks off or does not match is fetched again, as a whole, and
        one that still does not match after the retries raises :class:`ChecksumMismatchError`.

        Once ``stop`` is set (another part of the same parallel read failed), no further request is
        sent and :class:`DownloadStopped` is raised.

        ``on_response`` is called once, with the properties of the first answer, as soon as its
        headers are in (before its body): a caller can pin other reads to its ETag without waiting.

        With ``checksums``, the CRC-32 of the bytes filled is added there, computed as they arrive.
        """
        filled = 0
        properties: BlobProperties | None = None
        attempt = 0
        running = None if checksums is None else _checksums.RunningCrc()
        while True:
            if stop is not None and stop.is_set():
                raise DownloadStopped(f"Reading {self.display_url} was stopped: another part of the read failed.")
            fetched = self._fetch_range_once(
                offset,
                buffer,
                filled,
                etag,
                validate_content=validate_content,
                on_response=on_response,
                running=running,
            )
            if fetched is None:  # the range starts at or after the end of the blob
                if properties is None:  # (the first answer; _fetch_range_once did not report it)
                    properties = self.get_properties()
                    if on_response is not None:
                        on_response(properties)
                if checksums is not None and running is not None:
                    checksums.add_crc(offset, filled, running.value)
                return properties, filled
            on_response = None  # reported: only the first answer is
            properties, count, error = fetched
            etag = properties.etag  # retries must continue the same version
            filled += count
            if error is None and filled >= min(len(buffer), properties.size - offset):
                if checksums is not None and running is not None:
                    checksums.add_crc(offset, filled, running.value)
                return properties, filled
            if error is None:
                continue  # the next range of a validated read
            attempt += 1
            if attempt >= BODY_READ_ATTEMPTS:
                if isinstance(error, ChecksumMismatchError):
                    raise error
                message = f"Reading {self.display_url} failed after {attempt} attempts: {error!r}"
                raise redact_error(ServiceResponseError(message))
            _pipeline.log_debug("Retrying read of %s at offset %d after %r", self.display_url, offset + filled, error)
            _stats.add_retry(self.recorder, _stats.reason_for_error(error))
            time.sleep(_pipeline.backoff_seconds(attempt))

    def _fetch_range_once(
        self,
        offset: int,
        buffer: memoryview,
        filled: int,
        etag: str | None,
        *,
        validate_content: bool,
        on_response: Callable[[BlobProperties], None] | None = None,
        running: _checksums.RunningCrc | None = None,
    ) -> tuple[BlobProperties, int, BaseException | None] | None:
        """One ranged GET for ``buffer[filled:]`` (at most one validated range), read into place.

        Returns the blob's properties, the bytes that count as received and why the body fell short
        (``None`` if it did not); ``None`` instead of all that when ``offset + filled`` is past the
        blob's end. A validated range that breaks off or does not match its MD5 counts as 0 bytes:
        it is checked as a whole, so it is fetched again entirely. ``running`` takes in the CRC-32 of
        the bytes that count as received.
        """
        length = len(buffer) - filled
        if validate_content:
            length = min(length, MAX_VALIDATED_RANGE)
        # Failures to send the request were already retried by the pipeline's retry policy.
        response = self._send_range_get(offset + filled, length, etag, content_md5=validate_content)
        if response is None:
            return None
        properties = _properties_from(response, size=_total_size(response))
        if on_response is not None:
            on_response(properties)
        requested_end = min(filled + length, len(buffer), properties.size - offset)
        received = buffer[filled:requested_end]
        crc_before = 0 if running is None else running.value
        count, error = _read_body_into(response, received, running)
        if error is None and count < len(received):
            error = http.client.IncompleteRead(b"", len(received) - count)
        if validate_content:
            if error is None:
                error = self._md5_mismatch(response, received)
            if error is not None:
                count = 0
                if running is not None:
                    running.value = crc_before  # fetched again as a whole
        _stats.add_bytes(self.recorder, count)
        return properties, count, error

    def _md5_mismatch(self, response: HttpResponse, received: memoryview) -> ChecksumMismatchError | None:
        expected = response.headers.get("Content-MD5")
        actual = base64.b64encode(hashlib.md5(received).digest()).decode()
        if expected == actual:
            return None
        return ChecksumMismatchError(self.display_url, "MD5 of a range", expected or "(none sent)", actual)

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
        checksums: _checksums.PieceChecksums | None = None,
    ) -> None:
        """Fill ``buffer`` from ``offset`` with up to ``max_concurrency`` ranged GETs at a time.

        Every part started is finished before this returns or raises. On the first failure the parts
        not yet started are cancelled, the running ones stop at their next request, and all of them
        are waited for: ``buffer`` may be the caller's memory (``torch.load``'s tensor storage) or a
        leased buffer that goes back to the pool right after, so nothing may write into it later.

        Without ``etag``, the first part's answer pins the version: the other parts are sent once its
        headers are in, with its ETag, so the bytes are of one version and no properties request is
        needed first. ``on_response`` gets that first answer's properties, and ``checksums`` the CRC-32
        of every part, as for :meth:`download_into`.
        """
        parts = [(start, min(start + block_size, len(buffer))) for start in range(0, len(buffer), block_size)]
        if len(parts) <= 1:
            self.download_into(
                offset,
                buffer,
                etag=etag,
                validate_content=validate_content,
                on_response=on_response,
                checksums=checksums,
            )
            return
        stop = threading.Event()
        first_answer: Future[BlobProperties] = Future()

        def answered(properties: BlobProperties) -> None:
            first_answer.set_result(properties)
            if on_response is not None:
                on_response(properties)

        def download_part(
            start: int, stop_at: int, etag: str | None, seen: Callable[[BlobProperties], None] | None
        ) -> None:
            self.download_into(
                offset + start,
                buffer[start:stop_at],
                etag=etag,
                validate_content=validate_content,
                stop=stop,
                on_response=seen,
                checksums=checksums,
            )
            _schedule.pause("part.finish")

        started: list[Future[None]] = [self.submit(download_part, *parts[0], etag, answered)]
        try:
            if etag is None:
                waited: list[Future[Any]] = [started[0], first_answer]
                concurrent.futures.wait(waited, return_when=concurrent.futures.FIRST_COMPLETED)
                if not first_answer.done():
                    started[0].result()  # it failed before an answer came: raises why
                etag = first_answer.result().etag
            for start, stop_at in parts[1:]:
                if len(started) >= max_concurrency:
                    started[len(started) - max_concurrency].result()  # a slot is free once the oldest part is done
                started.append(self.submit(download_part, start, stop_at, etag, None))
            for future in started:
                future.result()
        except BaseException:
            stop.set()
            for future in started:
                future.cancel()
            concurrent.futures.wait(started)  # the running parts finish (or stop) before we raise
            raise

    def download_range(
        self,
        offset: int,
        length: int,
        *,
        etag: str | None,
        block_size: int,
        max_concurrency: int,
        validate_content: bool = False,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: _checksums.PieceChecksums | None = None,
    ) -> _buffers.Lease:
        """The blob's ``length`` bytes from ``offset``, in a leased pooled buffer the caller releases.

        The buffer's size is ``length`` rounded up to whole parts, so that ranges of similar sizes
        reuse each other's buffers. Fetched as :meth:`download_parallel` does (``etag``,
        ``on_response`` and ``checksums`` as there).
        """
        lease = _buffers.lease(-(-length // block_size) * block_size)
        try:
            self.download_parallel(
                offset,
                lease.view(length),
                etag=etag,
                block_size=block_size,
                max_concurrency=max_concurrency,
                validate_content=validate_content,
                on_response=on_response,
                checksums=checksums,
            )
        except BaseException:
            lease.release()
            raise
        return lease

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]:
        """Run one of this client's operations on the shared transfer threads."""
        return _pipeline.submit(fn, *args, **kwargs)

    # -- writes ------------------------------------------------------------------------------

    def put_blob(
        self,
        data: bytes | memoryview,
        *,
        validate_content: bool,
        crc32: int | None = None,
        if_match: str | None = None,
        if_none_match: str | None = None,
    ) -> str:
        """Create or replace the blob with ``data``; ``crc32`` is recorded in its metadata. Returns
        the new ETag.

        ``if_match`` (an ETag) replaces only that version of the blob, and ``if_none_match="*"``
        only creates it: otherwise nothing changes and the service's refusal is raised, a
        ``ResourceModifiedError`` (412 ``ConditionNotMet``; some services answer a missing blob
        with 404, ``ResourceNotFoundError``) or a ``ResourceExistsError`` (409 ``BlobAlreadyExists``).
        """
        headers = {"x-ms-blob-type": "BlockBlob", **_crc32_metadata(crc32)}
        if if_match is not None:
            headers["If-Match"] = if_match
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        _schedule.pause("commit")
        response = self._send(
            "PUT", action="upload", headers=headers, body=data, validate_content=validate_content, expected=201
        )
        _stats.add_bytes(self.recorder, len(data))
        return str(response.headers.get("ETag", ""))

    def stage_block(self, block_id: str, data: bytes | memoryview, *, validate_content: bool) -> None:
        query = ("comp=block", f"blockid={urllib.parse.quote(block_id, safe='')}")
        self._send(
            "PUT", action="upload a block of", query=query, body=data, validate_content=validate_content, expected=201
        )
        _stats.add_bytes(self.recorder, len(data))

    def commit_block_list(self, block_ids: list[str], *, crc32: int | None = None) -> None:
        """Make the staged blocks the blob's content; ``crc32`` is recorded in its metadata."""
        body = "".join(f"<Latest>{block_id}</Latest>" for block_id in block_ids)
        xml = f'<?xml version="1.0" encoding="utf-8"?><BlockList>{body}</BlockList>'.encode()
        headers = {"Content-Type": "application/xml", **_crc32_metadata(crc32)}
        _schedule.pause("commit")
        self._send(
            "PUT",
            action="commit",
            query=("comp=blocklist",),
            headers=headers,
            body=xml,
            validate_content=False,
            expected=201,
        )

    def delete(self) -> None:
        """Delete the blob. Raises ``ResourceNotFoundError`` if it does not exist."""
        self._send("DELETE", action="delete", expected=202)

    # -- plumbing ----------------------------------------------------------------------------

    def _send_range_get(
        self,
        start: int,
        length: int,
        etag: str | None,
        *,
        content_md5: bool = False,
        if_none_match: str | None = None,
    ) -> HttpResponse | None:
        headers = {"x-ms-range": f"bytes={start}-{start + max(length, 1) - 1}"}
        if etag is not None:
            headers["If-Match"] = etag
        if if_none_match is not None:
            headers["If-None-Match"] = if_none_match
        if content_md5:
            headers["x-ms-range-get-content-md5"] = "true"
        response = self._send_unchecked("GET", headers=headers, stream=True)
        if response.status_code == 206:
            return response
        _discard(response)
        if response.status_code == 416:
            return None
        if response.status_code == 304 and if_none_match is not None:
            raise _NotModified
        if response.status_code == 412 and etag is not None:
            raise BlobModifiedDuringReadError(self.display_url, etag)
        if response.status_code == 200:
            # A server that ignores ranges would make us read the whole blob at every offset.
            raise ServiceResponseError(f"{self.display_url} answered a ranged read with the whole blob.")
        _pipeline.raise_for_status(response, action="read", display_url=self.display_url)


def _properties_from(response: HttpResponse, *, size: int) -> BlobProperties:
    last_modified = response.headers.get("Last-Modified")
    return BlobProperties(
        size=size,
        etag=response.headers.get("ETag", ""),
        last_modified=parsedate_to_datetime(last_modified) if last_modified else None,
        crc32=_checksums.parse_recorded(response.headers.get(_CRC32_HEADER)),
    )


_CRC32_HEADER = f"x-ms-meta-{_checksums.METADATA_NAME}"


def _crc32_metadata(crc32: int | None) -> dict[str, str]:
    return {} if crc32 is None else {_CRC32_HEADER: f"{crc32:08x}"}


def _total_size(response: HttpResponse) -> int:
    content_range = response.headers.get("Content-Range", "")  # "bytes 0-99/12345"
    try:
        return int(content_range.rsplit("/", 1)[1])
    except (IndexError, ValueError):
        raise ServiceResponseError(f"Unexpected Content-Range header {content_range!r} in a ranged read.") from None


def _raw_and_body(response: HttpResponse) -> tuple[Any, Any]:
    """The transport's own response (urllib3's under requests' one, if requests sent it), and what
    reads the body straight into memory when that is safe (no content encoding to undo), else
    ``None``: the response itself for our transport, the http.client one under urllib3's."""
    internal = response.internal_response
    if isinstance(internal, WireResponse):
        return internal, None if response.headers.get("Content-Encoding") else internal
    raw = getattr(internal, "raw", internal)
    body = getattr(raw, "_fp", None)
    if not hasattr(body, "readinto") or response.headers.get("Content-Encoding"):
        body = None
    return raw, body


def _read_body_into(
    response: HttpResponse, buffer: memoryview, running: _checksums.RunningCrc | None = None
) -> tuple[int, BaseException | None]:
    """Read the response body straight into ``buffer`` (and its CRC-32 into ``running``, piece by piece).

    Returns the bytes read and, if the body broke off (reset, timeout, truncation), the error, so
    that the caller can ask for just the rest. The body goes from the socket into the caller's
    memory with no intermediate copy when it is not content-encoded, which is what Blob Storage
    sends.
    """
    raw, body = _raw_and_body(response)
    direct = body is not None
    filled = 0
    try:
        while filled < len(buffer):
            # Bounded pieces: a reset loses at most one piece, not everything read so far.
            piece = buffer[filled : filled + _BODY_PIECE_BYTES]
            if direct:
                count = body.readinto(piece)  # type: ignore[union-attr]
            else:
                chunk = raw.read(len(piece))
                count = len(chunk)
                buffer[filled : filled + count] = chunk
            if not count:
                break
            if running is not None:
                running.update(piece[:count])
            filled += count
    except _BODY_READ_ERRORS as error:
        raw.close()  # the connection is mid-body: never reuse it
        return filled, error
    if filled == len(buffer) and (not direct or body.isclosed()):  # type: ignore[union-attr]
        raw.release_conn()
    else:
        raw.close()
    return filled, None


def _read_whole_body(response: HttpResponse) -> bytes | None:
    """The rest of the body in one ``bytes`` (one allocation, one copy); ``None`` if it broke off."""
    raw, body = _raw_and_body(response)
    try:
        if body is not None:
            # http.client reads a body of known length with a single read into a new bytes.
            data: bytes = body.read()  # type: ignore[union-attr]
        else:
            data = raw.read()
    except _BODY_READ_ERRORS:
        raw.close()
        return None
    raw.release_conn()
    return data


def _discard(response: HttpResponse) -> None:
    try:
        response.body()  # read the (small) error body so the connection can be reused
    except Exception:
        response.internal_response.close()
