"""Exceptions raised by azstoragetorch.

Errors reported by Azure Blob Storage itself (a missing blob, a denied request, ...) surface as the
Azure SDK's own exception types from :mod:`azure.core.exceptions`, such as
:class:`~azure.core.exceptions.ResourceNotFoundError` and
:class:`~azure.core.exceptions.ClientAuthenticationError`, with the service's error code in
``error_code``. The classes here cover the failures that are specific to this library.
"""

from __future__ import annotations

__all__ = [
    "AZStorageTorchError",
    "BlobModifiedDuringReadError",
    "BlobWriteConflictError",
    "CheckpointConflictError",
    "ChecksumMismatchError",
    "ClientRequestIdMismatchError",
    "FatalBlobIOWriteError",
    "UntestedVersionWarning",
]


class AZStorageTorchError(Exception):
    """Base class of every exception defined by azstoragetorch."""


class ClientRequestIdMismatchError(AZStorageTorchError):
    """A response carried a different ``x-ms-client-request-id`` than the request that asked for it.

    Every request sends a fresh client request ID and Blob Storage echoes it back. A response that
    echoes somebody else's ID means two requests shared one connection, which is what happens when
    a connection opened in one process is used from another after ``fork``. azstoragetorch opens
    new connections in a forked child, so seeing this error points at a connection shared outside
    of the library (for example a dataset whose samples were read in the main process and then in
    DataLoader workers through a custom transport). Creating the dataset or :class:`~azstoragetorch.io.BlobIO`
    inside the worker, or not reading samples in the main process, avoids it.

    Args:
        request_client_id: The ID that was sent with the request.
        response_client_id: The ID that came back in the response.
        service_request_id: The service's own ``x-ms-request-id`` for the response, for support cases.
    """

    def __init__(self, request_client_id: str, response_client_id: str, service_request_id: str) -> None:
        self.request_client_id = request_client_id
        self.response_client_id = response_client_id
        self.service_request_id = service_request_id
        super().__init__(
            f"The response's client request ID ({response_client_id!r}) does not match the ID sent "
            f"with the request ({request_client_id!r}); service request ID: {service_request_id!r}. "
            "The connection was probably shared between processes. Do not read a dataset's samples "
            "both in the main process and in DataLoader workers through a shared connection."
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str]]:
        # Keep the exception picklable so it survives the trip from a DataLoader worker.
        return (type(self), (self.request_client_id, self.response_client_id, self.service_request_id))


class FatalBlobIOWriteError(AZStorageTorchError):
    """Writing through a :class:`~azstoragetorch.io.BlobIO` failed and the blob will not be committed.

    Once raised, the ``BlobIO`` accepts no more writes and nothing written through it becomes
    visible: the blob keeps whatever content it had before (or stays absent). To retry, open a new
    ``BlobIO`` and write all of the data again.

    Args:
        underlying_exception: The error that made the upload fail; also available as ``__cause__``.
    """

    def __init__(self, underlying_exception: BaseException) -> None:
        self.underlying_exception = underlying_exception
        super().__init__(
            "Writing to the blob failed and none of the data written through this BlobIO will be "
            f"committed. Open a new BlobIO and write everything again. Cause: "
            f"{type(underlying_exception).__name__}: {underlying_exception}"
        )
        self.__cause__ = underlying_exception

    def __reduce__(self) -> tuple[type, tuple[BaseException]]:
        return (type(self), (self.underlying_exception,))


class BlobWriteConflictError(FatalBlobIOWriteError):
    """Another writer committed the blob while a :class:`~azstoragetorch.io.BlobIO` was writing it.

    Committing a blob discards every block staged for it that the commit does not name. So when
    two writers stage blocks for one blob at the same time, the first to commit wins, and the other
    finds at its own commit that its blocks are gone (the service answers 400 ``InvalidBlockList``).
    Nothing from this writer was committed; the blob holds what the other writer committed (or
    whatever came after it, such as a delete).

    Writing everything again would replace the other writer's content, so this is not an error to
    retry blindly: decide which of the two saves should win, or give each writer a blob of its own.
    It is a :class:`FatalBlobIOWriteError`, so code that handles that still catches it.

    Args:
        blob_url: The blob's URL with any SAS token removed.
        underlying_exception: The service's answer to the commit; also available as ``__cause__``.
    """

    def __init__(self, blob_url: str, underlying_exception: BaseException) -> None:
        super().__init__(underlying_exception)
        self.blob_url = blob_url
        self.args = (
            f"Nothing was committed: another writer committed {blob_url} while this BlobIO was writing it, "
            "which discarded the blocks this BlobIO had staged (the first commit wins). The blob keeps the "
            "other writer's content. Writing again would replace it: decide which save should win, or give "
            "each writer a blob of its own.",
        )

    def __reduce__(self) -> tuple[type, tuple[str, BaseException]]:  # type: ignore[override]
        return (type(self), (self.blob_url, self.underlying_exception))


class CheckpointConflictError(AZStorageTorchError):
    """Another save committed the checkpoint while this ``torch.distributed.checkpoint`` save was writing it.

    Two saves went to one checkpoint URL at the same time: two jobs, or a restarted job while ranks
    of the old one still ran. A save commits its ``.metadata`` only if the checkpoint is still the
    version it found when it started, so the first to commit wins and every other one raises this.
    Nothing of this save was committed, and it removed its own shard files (and nothing else): the
    checkpoint is the one the other save committed, complete (or whatever replaced it since).

    Saving again would replace the other save's checkpoint: decide which job should save there, or
    give each job a URL of its own. ``dcp.save`` raises it inside its ``CheckpointException`` (in
    ``failures``), on every rank.

    Args:
        checkpoint_id: The checkpoint's URL with any SAS token removed.
    """

    def __init__(self, checkpoint_id: str) -> None:
        self.checkpoint_id = checkpoint_id
        super().__init__(
            f"Nothing was saved: another save committed the checkpoint {checkpoint_id} after this save "
            "started (two saves to one checkpoint at the same time, such as two jobs, or a restarted job "
            "while ranks of the old one still run). The checkpoint is the one the other save committed; "
            "this save removed its own shard files (a logged warning names any it could not). Saving again "
            "would replace the other save's checkpoint: decide which job saves there, or give each job a "
            "checkpoint URL of its own."
        )

    def __reduce__(self) -> tuple[type, tuple[str]]:
        return (type(self), (self.checkpoint_id,))


class BlobModifiedDuringReadError(AZStorageTorchError):
    """The blob was replaced or changed after a :class:`~azstoragetorch.io.BlobIO` started reading it.

    Reads are pinned to the ETag seen on the first request, so a reader never returns a mix of old
    and new bytes. Open a new ``BlobIO`` to read the new content.

    Args:
        blob_url: The blob's URL with any SAS token removed.
        expected_etag: The ETag the reader was pinned to.
    """

    def __init__(self, blob_url: str, expected_etag: str) -> None:
        self.blob_url = blob_url
        self.expected_etag = expected_etag
        super().__init__(
            f"The blob {blob_url} changed while it was being read (it no longer has ETag "
            f"{expected_etag}). Open a new BlobIO to read its current content."
        )

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        return (type(self), (self.blob_url, self.expected_etag))


class ChecksumMismatchError(AZStorageTorchError):
    """Bytes read from a blob do not match their checksum: they were corrupted on the way, or
    changed after they were written.

    Raised when a checksum check fails: the MD5 the service sends with a range
    (``validate_content=True``), after the retries, or the CRC-32 an azstoragetorch writer
    recorded for the whole blob, which readers check by default (``verify_checksum``). The data
    must not be used.

    Args:
        blob_url: The blob's URL with any SAS token removed.
        what: Which checksum did not match, for example ``"CRC-32 of the whole blob"``.
        expected: The checksum the blob (or the service) gave.
        actual: The checksum of the bytes received.
    """

    def __init__(self, blob_url: str, what: str, expected: str, actual: str) -> None:
        self.blob_url = blob_url
        self.what = what
        self.expected = expected
        self.actual = actual
        super().__init__(
            f"The {what} of {blob_url} does not match: expected {expected}, computed {actual} from the bytes "
            "received. The data was corrupted on the way or changed after it was written, and must not be used."
        )

    def __reduce__(self) -> tuple[type, tuple[str, str, str, str]]:
        return (type(self), (self.blob_url, self.what, self.expected, self.actual))


class UntestedVersionWarning(UserWarning):
    """The installed torch or Lightning is not a release azstoragetorch was tested with.

    Issued once per process, when a module that uses torch or Lightning is imported; the library
    runs anyway. The documentation's "Supported versions" section lists the tested releases. To
    silence it::

        import warnings
        from azstoragetorch.exceptions import UntestedVersionWarning

        warnings.filterwarnings("ignore", category=UntestedVersionWarning)
    """
