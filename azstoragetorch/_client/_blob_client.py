"""The blob operations azstoragetorch needs, each one REST call (plus retries) on the shared pipeline."""

from __future__ import annotations

import base64
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

from azstoragetorch._client import _checksums, _pipeline, _schedule, _stats
from azstoragetorch._client._credentials import CredentialArgument
from azstoragetorch._client._redaction import redact_error
from azstoragetorch._client._resource import ResourceClient
from azstoragetorch._client._transport import WireResponse
from azstoragetorch._client._urls import BlobUrl
from azstoragetorch.exceptions import BlobModifiedDuringReadError, ChecksumMismatchError
from azstoragetorch.retry import RetryOptions

# Failures while a response body streams in. The request itself succeeded, so the SDK's retry
# policy never sees them; fetch_range_into retries them from the first byte not yet received.
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


class IntoBytes:
    """Where :meth:`AzStorageTorchBlobClient.fetch_range_into` puts a range as one ``bytes`` object.

    Given as ``into`` (or returned by an ``into`` function), in place of a buffer: the body of the
    answer is read straight from the response into a new ``bytes``, which :attr:`data` holds once
    the fetch has returned. A buffer would need a second full copy to become ``bytes``, which is what
    a caller that hands the content on as ``bytes`` (a dataset's default sample) wants in the end.
    The price is coarser resumption: a connection reset while the body streams in loses what that
    answer had delivered (a connection that simply ended keeps it), where a buffer loses at most one
    piece. The bytes of several answers (a resumed read, or a validated one of several ranges) are
    joined once at the end.
    """

    __slots__ = ("_pieces", "data")

    def __init__(self) -> None:
        self.data = b""
        self._pieces: list[bytes] = []

    def _finish(self) -> None:
        pieces = self._pieces
        self.data = pieces[0] if len(pieces) == 1 else b"".join(pieces)


# What a fetch fills: the caller's buffer, or a new bytes object.
Target = memoryview | IntoBytes


class BlobNotModified(Exception):
    """A read with ``if_none_match`` found the blob unchanged: the caller's copy is current."""


class DownloadStopped(Exception):
    """A part of a parallel read stopped because another part failed (never reaches the caller)."""


class BlobProperties:
    """What a read needs to know about a blob (immutable).

    ``crc32`` is the CRC-32 of the whole blob that an azstoragetorch writer recorded, if any. A
    ``Last-Modified`` header is parsed only when :attr:`last_modified` is read: parsing it costs
    more client CPU than the rest of a small blob's ranged GET, and most reads never look.
    """

    __slots__ = ("_last_modified", "_last_modified_header", "crc32", "etag", "size")
    size: int
    etag: str
    crc32: int | None
    _last_modified: datetime.datetime | None
    _last_modified_header: str | None

    def __init__(
        self,
        size: int,
        etag: str,
        last_modified: datetime.datetime | None = None,
        crc32: int | None = None,
        *,
        last_modified_header: str | None = None,
    ) -> None:
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "etag", etag)
        object.__setattr__(self, "crc32", crc32)
        object.__setattr__(self, "_last_modified", last_modified)
        object.__setattr__(self, "_last_modified_header", last_modified_header)

    @property
    def last_modified(self) -> datetime.datetime | None:
        header = self._last_modified_header
        if header is not None:
            object.__setattr__(self, "_last_modified", parsedate_to_datetime(header))
            object.__setattr__(self, "_last_modified_header", None)
        return self._last_modified

    def __setattr__(self, name: str, value: object) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (BlobProperties, (self.size, self.etag, self.last_modified, self.crc32))

    def _key(self) -> tuple[Any, ...]:
        return (self.size, self.etag, self.last_modified, self.crc32)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlobProperties):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return (
            f"BlobProperties(size={self.size!r}, etag={self.etag!r}, last_modified={self.last_modified!r}, "
            f"crc32={self.crc32!r})"
        )


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

    def fetch_range_into(
        self,
        offset: int,
        into: Target | Callable[[BlobProperties], Target],
        *,
        etag: str | None,
        length: int | None = None,
        validate_content: bool = False,
        if_none_match: str | None = None,
        stop: threading.Event | None = None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: _checksums.PieceChecksums | None = None,
    ) -> tuple[BlobProperties, int]:
        """Fill a buffer with the blob's bytes from ``offset``: every read of a blob comes down to this.

        ``into`` is the caller's buffer, or a function that returns it once the first answer's
        headers tell the blob's properties (before its body is read), for a caller that sizes its
        memory by the blob; it may raise, and the answer is then dropped. Instead of a buffer, an
        :class:`IntoBytes` receives the bytes as one ``bytes`` object read straight from the
        response (a function may choose it by the blob's size). At most ``length`` bytes are filled
        (by default ``len(into)``; required with a function or an :class:`IntoBytes`). Returns the
        blob's properties and the bytes filled, fewer only at the blob's end.

        With ``etag`` the read is pinned to that version (``If-Match``); a changed blob raises
        :class:`BlobModifiedDuringReadError`. Without it, the first answer pins the version of the
        requests that follow. With ``if_none_match``, a blob that still has that ETag raises
        :class:`BlobNotModified` (its answer has no body). Failures while the body streams in are
        retried from where they stopped, in :data:`BODY_READ_ATTEMPTS` attempts in all.

        With ``validate_content``, every request asks the service for the MD5 of its range (which it
        gives for ranges up to 4 MiB, so larger buffers take several requests) and the bytes received
        must match it; a range that breaks off or does not match is fetched again, as a whole, and
        one that still does not match after the retries raises :class:`ChecksumMismatchError`.

        Once ``stop`` is set (another part of the same parallel read failed), no further request is
        sent and :class:`DownloadStopped` is raised. ``on_response`` is called once, with the first
        answer's properties, as soon as its headers are in: a caller can pin other reads to its ETag
        without waiting. With ``checksums``, the CRC-32 of the bytes filled is added there, computed
        as they arrive. The bytes received and the retries count in this client's recorder.
        """
        if length is None and not isinstance(into, memoryview):
            raise TypeError("fetch_range_into needs a length when into is a function or an IntoBytes.")
        chosen: Target | None = None if callable(into) else into
        limit = length if length is not None else len(into)  # type: ignore[arg-type]
        filled = 0
        properties: BlobProperties | None = None
        attempt = 0
        running = None if checksums is None else _checksums.RunningCrc()
        target: Target | None = None

        def answered(first: BlobProperties) -> Target:
            nonlocal chosen
            if chosen is None:
                chosen = into(first)  # type: ignore[operator]
            if on_response is not None:
                on_response(first)
            return chosen[:limit] if isinstance(chosen, memoryview) else chosen

        def done(filled_target: Target) -> tuple[BlobProperties, int]:
            assert properties is not None
            if isinstance(filled_target, IntoBytes):
                filled_target._finish()
            if checksums is not None and running is not None:
                checksums.add_crc(offset, filled, running.value)
            return properties, filled

        while True:
            if stop is not None and stop.is_set():
                raise DownloadStopped(f"Reading {self.display_url} was stopped: another part of the read failed.")
            fetched = self._fetch_range_once(
                offset,
                answered if target is None else target,
                filled,
                etag,
                limit=limit,
                validate_content=validate_content,
                if_none_match=if_none_match,
                running=running,
            )
            if fetched is None:  # the range starts at or after the end of the blob
                if properties is None:  # (the first answer, which reported no properties)
                    properties = self.get_properties()
                    target = answered(properties)
                assert target is not None
                return done(target)
            properties, target, count, error = fetched
            etag, if_none_match = properties.etag, None  # retries must continue the same version
            filled += count
            if error is None and filled >= min(_capacity(target, limit), properties.size - offset):
                return done(target)
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
        target: Target | Callable[[BlobProperties], Target],
        filled: int,
        etag: str | None,
        *,
        limit: int,
        validate_content: bool,
        if_none_match: str | None,
        running: _checksums.RunningCrc | None,
    ) -> tuple[BlobProperties, Target, int, BaseException | None] | None:
        """One ranged GET for what ``target`` still lacks after ``filled`` bytes (at most one
        validated range), read into place.

        ``target`` is the buffer or :class:`IntoBytes`, or (for the first answer) the function that
        returns it from the answer's properties. Returns the blob's properties, the target, the
        bytes that count as received and why the body fell short (``None`` if it did not); ``None``
        instead of all that when ``offset + filled`` is past the blob's end. A validated range that
        breaks off or does not match its MD5 counts as 0 bytes: it is checked as a whole, so it is
        fetched again entirely. ``running`` takes in the CRC-32 of the bytes that count as received.
        """
        length = (limit if callable(target) else _capacity(target, limit)) - filled
        if validate_content:
            length = min(length, MAX_VALIDATED_RANGE)
        # Failures to send the request were already retried by the pipeline's retry policy.
        response = self._send_range_get(
            offset + filled, length, etag, content_md5=validate_content, if_none_match=if_none_match
        )
        if response is None:
            return None
        properties = _properties_from(response, size=_total_size(response))
        if callable(target):
            try:
                target = target(properties)
            except BaseException:
                _raw_and_body(response)[0].close()  # mid-body: never reuse the connection
                raise
        requested_end = min(filled + length, _capacity(target, limit), properties.size - offset)
        crc_before = 0 if running is None else running.value
        received: bytes | memoryview
        if isinstance(target, IntoBytes):
            piece, error = _read_body_bytes(response, requested_end - filled, running)
            received, count = piece, len(piece)
        else:
            received = target[filled:requested_end]
            count, error = _read_body_into(response, received, running)
        if error is None and count < requested_end - filled:
            error = http.client.IncompleteRead(b"", requested_end - filled - count)
        if validate_content:
            if error is None:
                error = self._md5_mismatch(response, received)
            if error is not None:
                count = 0
                if running is not None:
                    running.value = crc_before  # fetched again as a whole
        if count and isinstance(target, IntoBytes):
            target._pieces.append(piece)
        _stats.add_bytes(self.recorder, count)
        return properties, target, count, error

    def _md5_mismatch(self, response: HttpResponse, received: bytes | memoryview) -> ChecksumMismatchError | None:
        expected = response.headers.get("Content-MD5")
        actual = base64.b64encode(hashlib.md5(received).digest()).decode()
        if expected == actual:
            return None
        return ChecksumMismatchError(self.display_url, "MD5 of a range", expected or "(none sent)", actual)

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
            raise BlobNotModified
        if response.status_code == 412 and etag is not None:
            raise BlobModifiedDuringReadError(self.display_url, etag)
        if response.status_code == 200:
            # A server that ignores ranges would make us read the whole blob at every offset.
            raise ServiceResponseError(f"{self.display_url} answered a ranged read with the whole blob.")
        _pipeline.raise_for_status(response, action="read", display_url=self.display_url)


def _properties_from(response: HttpResponse, *, size: int) -> BlobProperties:
    return BlobProperties(
        size=size,
        etag=response.headers.get("ETag", ""),
        crc32=_checksums.parse_recorded(response.headers.get(_CRC32_HEADER)),
        last_modified_header=response.headers.get("Last-Modified") or None,
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


def _read_body_bytes(
    response: HttpResponse, length: int, running: _checksums.RunningCrc | None = None
) -> tuple[bytes, BaseException | None]:
    """Read the response body, ``length`` bytes, as one ``bytes`` object (and its CRC-32 into ``running``).

    Returns what was read and, if the body broke off, the error. One read, so that the bytes go
    from the socket into the object returned with no copy in between; a body that ends early keeps
    what arrived, but a reset or timeout in the middle loses it (the caller asks for it again).
    """
    raw, body = _raw_and_body(response)
    direct = body is not None
    data = b""
    error: BaseException | None = None
    try:
        data = (body if direct else raw).read(length)
    except http.client.IncompleteRead as incomplete:  # (urllib3's gives a count, not the bytes)
        data = incomplete.partial if isinstance(incomplete.partial, bytes) else b""
        error = incomplete
    except _BODY_READ_ERRORS as broken:
        error = broken
    if running is not None and data:
        running.update(data)
    if error is None and len(data) == length and (not direct or body.isclosed()):
        raw.release_conn()
    else:
        raw.close()  # the connection is mid-body (or ended): never reuse it
    return data, error


def _capacity(target: Target, limit: int) -> int:
    return len(target) if isinstance(target, memoryview) else limit


def _discard(response: HttpResponse) -> None:
    try:
        response.body()  # read the (small) error body so the connection can be reused
    except Exception:
        response.internal_response.close()
