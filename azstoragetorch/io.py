"""File-like access to a single blob: :class:`BlobIO`."""

from __future__ import annotations

import io
import os
import sys
import time
import warnings
from collections.abc import Callable
from types import TracebackType
from typing import Any, BinaryIO, Literal, NoReturn

from typing_extensions import Self

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    BlobProperties,
    BlobUrl,
    BlockUploader,
    CredentialArgument,
    Recorder,
    TransferStats,
)
from azstoragetorch._options import DEFAULT_BLOCK_SIZE, DEFAULT_MAX_CONCURRENCY, TransferOptions
from azstoragetorch._read_session import open_window, verify_whole_blob
from azstoragetorch._reads import ReadAheadWindow
from azstoragetorch._write_session import WriteSession, raise_first_failure_behind
from azstoragetorch.retry import RetryOptions

__all__ = ["BlobIO"]

_MODES = ("rb", "wb")


class BlobIO(io.IOBase, BinaryIO):
    """A binary file object over one blob in Azure Blob Storage.

    Open a blob with ``"rb"`` to read it or ``"wb"`` to (over)write it, and hand the object to
    anything that takes a binary file, most usefully :func:`torch.save` and :func:`torch.load`::

        import torch
        from azstoragetorch.io import BlobIO

        url = "https://<account>.blob.core.windows.net/<container>/checkpoints/model.pt"
        with BlobIO(url, "wb") as f:
            torch.save(model.state_dict(), f)
        with BlobIO(url, "rb") as f:
            model.load_state_dict(torch.load(f))

    **Reading** starts with one request at open, which also checks that the blob exists and is
    readable, and pins every later read to the ETag it returned: if the blob is replaced while
    it is being read, reads raise :class:`~azstoragetorch.exceptions.BlobModifiedDuringReadError`
    rather than mix old and new bytes. Forward reads are served from a read-ahead window of
    chunks downloaded in parallel, so a run of small reads costs few requests and a large read is
    spread over several connections.

    **Writing** collects data into blocks of ``block_size`` bytes that upload in background
    threads while you keep writing. The blob changes only when :meth:`close` commits: until then
    an existing blob keeps its old content, and if anything fails, the ``with`` block exits with
    an exception, or a write is interrupted (Ctrl-C), nothing is committed. A blob that fits in
    one block is sent as a single request at close.

    Memory stays near ``(max_concurrency + 1) * block_size`` bytes in either mode, whatever the
    blob's size, except that a writer past 5,000 blocks grows its later blocks (each to at most
    1/2500 of what was written before it) to stay within the 50,000 blocks a blob may have. A
    ``BlobIO`` is not thread-safe, like any file object.

    Args:
        blob_url: The blob's full URL, ``https://<account>.blob.core.windows.net/<container>/<blob>``
            (or ``http://127.0.0.1:<port>/<account>/<container>/<blob>`` for the Azurite emulator).
            A SAS token in the query string is used for authorization, and ``snapshot=`` or
            ``versionid=`` select what is read.
        mode: ``"rb"`` to read or ``"wb"`` to write.
        credential: How to authorize requests. ``None`` (the default) uses
            :class:`azure.identity.DefaultAzureCredential`; ``False`` sends anonymous requests; an
            :class:`~azure.core.credentials.AzureSasCredential`,
            :class:`~azure.core.credentials.AzureNamedKeyCredential` (account key) or any token
            credential is used as given. Ignored when ``blob_url`` carries a SAS token.
        max_concurrency: The most requests this object keeps in flight at once.
        block_size: Bytes per block when writing and per ranged request when reading. The default
            of 8 MiB suits Azure's throughput per request; see the performance guide.
        validate_content: Check every request's data with an MD5, which costs about 1.5 CPU
            seconds per GB; off by default because HTTPS already protects data in transit. Writing,
            the MD5 of each upload goes with it and the service refuses data that does not match.
            Reading, each range (of at most 4 MiB) comes with the MD5 the service computes for it,
            and a range that does not match is fetched again (and raises
            :class:`~azstoragetorch.exceptions.ChecksumMismatchError` if it never does).
        verify_checksum: (read mode) Check the whole blob against the CRC-32 that azstoragetorch
            records when it writes a blob: the CRC-32 of every range downloaded is combined, and
            :meth:`close` (the end of the ``with`` block) raises
            :class:`~azstoragetorch.exceptions.ChecksumMismatchError`, naming the blob, if the
            result differs. Costs about 0.1 CPU seconds per GB. ``None`` (the default) checks
            every blob that was read to the end and has a recorded CRC-32; a blob read only in
            part is not checked (nothing more is downloaded for it), and a blob without a recorded
            CRC-32 (written by another tool) is read unverified, which
            :attr:`stats` (``unverified_blobs``) and a DEBUG log line tell. ``True`` insists: a
            blob without a recorded CRC-32 raises ``ValueError`` at open, and parts never read are
            downloaded at close to complete the check. ``False`` checks nothing.
        retry: How requests that fail for a passing reason (throttling, a dropped connection) are
            retried: a :class:`~azstoragetorch.retry.RetryOptions`. ``None`` (the default) means
            ``RetryOptions()``, which rides out minutes of throttling; see :doc:`reliability`.
        progress_hook: A callable taking ``(bytes_done, bytes_total)``, as the Azure SDK's clients
            take it: bytes downloaded or uploaded so far, and the blob's size (``None`` while a
            write's length is not known). It is called from the transfer threads at most every
            100 ms while bytes move, and a last time in :meth:`close`. A writer's last call gives
            the final size as both numbers and comes *before* the commit: an exception the hook
            raises, at any call, fails the write and nothing is committed. A reader's last call
            comes once :meth:`close` has checked what it checks; an exception from it is raised by
            ``close()``. Either way the object is closed afterwards. ``None`` (the default) costs
            nothing. See :doc:`observability`.

    Raises:
        ValueError: The URL is malformed, ``mode`` is not ``"rb"`` or ``"wb"``, a size is out of
            range, a snapshot or version is opened for writing, or ``verify_checksum`` is asked of
            a writer or of a blob with no recorded CRC-32.
        TypeError: ``credential`` is of an unsupported type, ``retry`` is not a ``RetryOptions``,
            ``progress_hook`` is not callable, or another keyword argument is given.
        azure.core.exceptions.ResourceNotFoundError: (read mode) the blob or container does not exist.
        azure.core.exceptions.ClientAuthenticationError: (read mode) the request was not authorized.
    """

    def __init__(
        self,
        blob_url: str,
        mode: Literal["rb", "wb"],
        *,
        credential: CredentialArgument = None,
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        block_size: int = DEFAULT_BLOCK_SIZE,
        validate_content: bool = False,
        verify_checksum: bool | None = None,
        retry: RetryOptions | None = None,
        progress_hook: Callable[[int, int | None], Any] | None = None,
        **_internal_only_kwargs: Any,
    ) -> None:
        opened_at = time.perf_counter()
        self._closed = True  # until construction succeeds, so __del__ has nothing to do
        if _internal_only_kwargs:
            # The reference signature keeps the catch-all; nothing may come through it.
            raise TypeError(f"BlobIO() got unexpected keyword arguments: {', '.join(sorted(_internal_only_kwargs))}")
        options = TransferOptions.from_keywords(locals())
        self._start(blob_url, mode, credential, options, None, opened_at)

    @classmethod
    def _open(
        cls,
        blob_url: str,
        mode: Literal["rb", "wb"],
        *,
        credential: CredentialArgument = None,
        options: TransferOptions | None = None,
        client: AzStorageTorchBlobClient | None = None,
    ) -> Self:
        """Open a BlobIO with options already checked: azstoragetorch's own way in, not the user's.

        The integrations call this with the :class:`~azstoragetorch._options.TransferOptions` they
        built from their user's keywords, so that nothing is checked twice. ``client``, if given, is
        used instead of a client built from ``blob_url``, ``credential`` and ``options.retry``: the
        unit tests pass the in-memory fake of ``tests/unit/fakes.py`` here.
        """
        opened_at = time.perf_counter()
        blob = cls.__new__(cls)
        blob._closed = True  # until construction succeeds, so __del__ has nothing to do
        blob._start(blob_url, mode, credential, TransferOptions() if options is None else options, client, opened_at)
        return blob

    def _start(
        self,
        blob_url: str,
        mode: Literal["rb", "wb"],
        credential: CredentialArgument,
        options: TransferOptions,
        client: AzStorageTorchBlobClient | None,
        opened_at: float,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"Unsupported mode {mode!r}: BlobIO opens blobs with 'rb' (read) or 'wb' (write).")
        if client is None:
            client = AzStorageTorchBlobClient(BlobUrl.parse(blob_url), credential, retry=options.retry)
        progress_hook = options.progress_hook
        verify_checksum = options.verify_checksum
        self._recorder = Recorder(progress_hook if mode == "wb" else None, started=opened_at)
        # A client of its own, so that only this object's requests count towards its stats.
        self._client: AzStorageTorchBlobClient = client.with_recorder(self._recorder)
        client = self._client
        self._mode = mode
        self._position = 0
        self._reader: ReadAheadWindow | None = None
        self._writes: WriteSession | None = None
        self._handled_before: BaseException | None = None  # what was being handled when the ``with`` began
        self._verify_in_full = verify_checksum is True  # download what was never read, to check it all
        if mode == "rb":
            self._reader = open_window(client, options, self._recorder)
            if progress_hook is not None:
                self._recorder.attach_hook(progress_hook, self._reader.size)
        else:
            if verify_checksum is True:
                raise ValueError("verify_checksum checks what is read; a BlobIO opened with 'wb' records the CRC-32.")
            if client.blob_url.snapshot or client.blob_url.version_id:
                raise ValueError(f"{client.display_url} names a snapshot or version, which cannot be written.")
            self._writes = WriteSession(BlockUploader(client, options), self._recorder)
        self._closed = False
        self._recorder.add_blocked(time.perf_counter() - opened_at)

    # -- state -------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        """``True`` once :meth:`close` has been called."""
        return self._closed

    @property
    def mode(self) -> str:
        return self._mode

    @property
    def name(self) -> str:
        """The blob's URL, without any SAS token."""
        return self._client.display_url

    @property
    def stats(self) -> TransferStats:
        """What this object's transfers cost so far: bytes, requests, retries and times (see
        :class:`~azstoragetorch.TransferStats`). Final once :meth:`close` has returned."""
        return self._recorder.snapshot()

    @property
    def properties(self) -> BlobProperties:
        """(read mode) The blob's size, ETag and last-modified time as seen when it was opened."""
        return self._require_reader().properties

    def __repr__(self) -> str:
        state = " closed" if self._closed else ""
        return f"<{type(self).__name__} {self.name!r} mode={self._mode!r}{state}>"

    def __reduce__(self) -> NoReturn:
        raise TypeError("A BlobIO cannot be pickled; pass its URL instead and open a new BlobIO where it is needed.")

    def readable(self) -> bool:
        """``True`` in read mode."""
        self._check_not_closed()
        return self._mode == "rb"

    def writable(self) -> bool:
        """``True`` in write mode."""
        self._check_not_closed()
        return self._mode == "wb"

    def seekable(self) -> bool:
        """``True`` in read mode; a blob being written only grows at the end."""
        self._check_not_closed()
        return self._mode == "rb"

    def tell(self) -> int:
        """The current position: where the next read starts, or how many bytes were written."""
        self._check_not_closed()
        return self._position

    def fileno(self) -> int:
        """Always raises :class:`io.UnsupportedOperation`: a blob has no file descriptor."""
        raise io.UnsupportedOperation("A BlobIO has no file descriptor.")

    # -- reading -----------------------------------------------------------------------------

    def seek(self, offset: int, whence: int = os.SEEK_SET, /) -> int:
        """Move to ``offset`` relative to ``whence`` (``os.SEEK_SET``, ``SEEK_CUR`` or ``SEEK_END``).

        Seeking past the end is allowed (reads there return ``b""``); a negative resulting
        position raises ``ValueError``. Returns the new absolute position.
        """
        reader = self._require_reader("seek")
        if not isinstance(offset, int):
            raise TypeError(f"seek() offset must be an int, not {type(offset).__name__}.")
        bases = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: reader.size}
        if whence not in bases:
            raise ValueError(f"Invalid whence ({whence!r}): use os.SEEK_SET, os.SEEK_CUR or os.SEEK_END.")
        position = bases[whence] + offset
        if position < 0:
            raise ValueError(f"Cannot seek to negative position {position}.")
        self._position = position
        return position

    def read(self, size: int | None = -1, /) -> bytes:
        """Read up to ``size`` bytes (all remaining bytes if ``size`` is negative or ``None``)."""
        reader = self._require_reader("read")
        started = time.perf_counter()
        remaining = max(0, reader.size - self._position)
        count = remaining if size is None or size < 0 else min(size, remaining)
        buffer = bytearray(count)
        try:
            self._position += reader.readinto(self._position, memoryview(buffer))
        finally:
            self._recorder.add_blocked(time.perf_counter() - started)
        return bytes(buffer)

    def readlines(self, hint: int = -1, /) -> list[bytes]:
        """Read the remaining lines; stop once ``hint`` bytes have been read, if it is positive."""
        lines = []
        total = 0
        while line := self.readline():
            lines.append(line)
            total += len(line)
            if 0 < hint <= total:
                break
        return lines

    def readall(self) -> bytes:
        """Read until the end of the blob."""
        return self.read(-1)

    def readinto(self, buffer: Any, /) -> int:
        """Read into a writable bytes-like object; returns the number of bytes read (0 at the end)."""
        reader = self._require_reader("readinto")
        started = time.perf_counter()
        try:
            with memoryview(buffer) as view, view.cast("B") as destination:
                count = reader.readinto(self._position, destination)
        finally:
            self._recorder.add_blocked(time.perf_counter() - started)
        self._position += count
        return count

    def readline(self, size: int | None = -1, /) -> bytes:
        """Read one line, up to and including ``b"\\n"``, or at most ``size`` bytes if given."""
        reader = self._require_reader("readline")
        started = time.perf_counter()
        try:
            line = self._read_line(reader, reader.size - self._position if size is None or size < 0 else size)
        finally:
            self._recorder.add_blocked(time.perf_counter() - started)
        self._position += len(line)
        return bytes(line)

    def _read_line(self, reader: ReadAheadWindow, limit: int) -> bytearray:
        line = bytearray()
        probe = 256
        while len(line) < limit:
            piece = bytearray(min(probe, limit - len(line)))
            count = reader.readinto(self._position + len(line), memoryview(piece))
            if not count:
                break
            newline = piece.find(b"\n", 0, count)
            if newline != -1:
                line += piece[: newline + 1]
                break
            line += piece[:count]
            probe = min(probe * 2, 1 << 20)  # long lines: fewer, larger probes
        return line

    # -- writing -----------------------------------------------------------------------------

    # typing.IO spells the argument as a generic buffer; the accepted types are checked below.
    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        """Append ``data`` to the blob; returns its length in bytes.

        The data may upload later, in background threads: a successful ``write`` does not mean it
        reached Azure. :meth:`flush` and :meth:`close` wait for uploads and report their errors.

        Raises:
            TypeError: ``data`` is not bytes, bytearray or memoryview.
            FatalBlobIOWriteError: An upload failed, or the blob would need more than the 50,000
                blocks Azure allows (``ValueError`` as the cause); nothing from this ``BlobIO`` will
                be committed.
        """
        writes = self._require_writes("write")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"write() takes bytes, bytearray or memoryview, not {type(data).__name__}.")
        started = time.perf_counter()
        try:
            with memoryview(data) as view, view.cast("B") as chunk:
                count = len(chunk)
                writes.write(chunk)
        finally:
            self._recorder.add_blocked(time.perf_counter() - started)
        self._position += count
        return count

    def flush(self) -> None:
        """(write mode) Upload what was written and wait for the uploads; no effect in read mode.

        Nothing becomes visible before :meth:`close`. While everything written still fits in one
        block it is kept for a single upload at close, since an earlier upload would only cost an
        extra request.

        Raises:
            FatalBlobIOWriteError: An upload failed; nothing from this ``BlobIO`` will be committed.
        """
        self._check_not_closed()
        if self._writes is not None:
            started = time.perf_counter()
            try:
                self._writes.flush()
            finally:
                self._recorder.add_blocked(time.perf_counter() - started)

    def close(self) -> None:
        """Close the object; in write mode, upload what remains and commit the blob.

        The object is closed once this returns or raises, whatever failed; calling it again does
        nothing.

        Raises:
            FatalBlobIOWriteError: Uploading or committing failed, or the progress hook raised (its
                exception is the cause). The blob is left as it was before this ``BlobIO`` was
                opened; open a new one to retry.
            BlobWriteConflictError: (a ``FatalBlobIOWriteError``) another writer committed the
                blob while this one was writing it; the blob keeps the other writer's content.
            Exception: (read mode) whatever the progress hook's last call raised.
        """
        if self._closed:
            return
        started = time.perf_counter()
        try:
            if self._writes is not None:
                self._writes.commit(self._position)
            else:
                if self._reader is not None and self._reader.verifies_checksum:
                    verify_whole_blob(self._reader, self._recorder, self.name, download_rest=self._verify_in_full)
                self._recorder.report_last()
        finally:
            # Closed whatever happened above, a raising progress hook included: a second close()
            # has nothing left to do, and a reader's buffers go back now.
            self._recorder.add_blocked(time.perf_counter() - started)
            self._recorder.end(report=False)
            self._release()

    def __enter__(self) -> BlobIO:
        self._check_not_closed()
        # A block may start while an interruption is being handled (saving a checkpoint on Ctrl-C);
        # that interruption is not one of this block's.
        self._handled_before = sys.exc_info()[1]
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            # The code using the blob failed part way. A writer must not commit (that would replace
            # a good blob with a truncated one); a reader has nothing left worth verifying.
            if not self._closed:
                self._release()
            fatal_error = None if self._writes is None else self._writes.fatal_error
            raise_first_failure_behind(exc, since=self._handled_before, fatal_error=fatal_error)
            return
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_closed", True):
            return
        if getattr(self, "_writes", None) is not None:
            warnings.warn(
                f"{self!r} was garbage-collected without close(); its data was NOT committed.",
                ResourceWarning,
                stacklevel=2,
            )
        self._release()

    # -- helpers -----------------------------------------------------------------------------

    def _release(self) -> None:
        self._closed = True
        self._recorder.end(report=False)  # a no-op after close()'s own end()
        if self._reader is not None:
            self._reader.close()
        if self._writes is not None:
            self._writes.abort()

    def _check_not_closed(self) -> None:
        if self._closed:
            raise ValueError("I/O operation on closed BlobIO.")

    def _require_reader(self, operation: str = "this") -> ReadAheadWindow:
        self._check_not_closed()
        if self._reader is None:
            raise io.UnsupportedOperation(f"{operation}() needs a BlobIO opened with mode 'rb'.")
        return self._reader

    def _require_writes(self, operation: str) -> WriteSession:
        self._check_not_closed()
        if self._writes is None:
            raise io.UnsupportedOperation(f"{operation}() needs a BlobIO opened with mode 'wb'.")
        return self._writes
