"""One file moved: a download renamed into place once whole, an upload committed only if unchanged."""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import secrets
import stat
import threading
from typing import Any

from azstoragetorch._cli._output import _MiB
from azstoragetorch._cli._plan import _Copy, _Refused
from azstoragetorch._client import CredentialArgument, TransferStats
from azstoragetorch.io import BlobIO

_COPY_PIECE = 8 * _MiB
_PARTIAL_SUFFIX = ".partial"


class _Stopped(Exception):
    """Raised in a transfer thread that was told to stop (Ctrl-C, or another file failed)."""


class _Transfers:
    """What the copy's threads share: the order to stop, and the hidden ``.partial`` files in progress.

    A download writes ``.<name>.<random>.partial`` beside its file and renames it into place only
    once complete. Stopping removes every ``.partial`` file, and a file is created or renamed into
    place only under the lock and only while not stopped: after :meth:`stop` returns, no thread can
    leave a partial or complete-looking file behind, even one still waiting on a request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._partials: dict[int, tuple[int, str]] = {}  # descriptor of the file -> (its folder's, its name)

    def check(self) -> None:
        if self._stopped.is_set():
            raise _Stopped()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            for folder, name in self._partials.values():
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=folder)
            self._partials.clear()

    def create_partial(self, folder: int, name: str) -> tuple[int, str]:
        partial = f".{name[:48]}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._lock:
            self.check()
            descriptor = os.open(partial, flags, 0o666, dir_fd=folder)
            self._partials[descriptor] = (folder, partial)
        return descriptor, partial

    def complete(self, descriptor: int, folder: int, name: str) -> None:
        """Rename the finished ``.partial`` file (still registered under ``descriptor``) to ``name``."""
        with self._lock:
            self.check()
            partial = self._partials.pop(descriptor)[1]
            os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)

    def discard(self, descriptor: int) -> None:
        with self._lock:
            found = self._partials.pop(descriptor, None)
            if found is not None:
                with contextlib.suppress(OSError):
                    os.unlink(found[1], dir_fd=found[0])


def _open_destination(root: pathlib.Path) -> int:
    """A descriptor of the local folder DST (created if missing); the user named it, so it may be a link."""
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        # Without them no path inside DST could be opened without following a planted link.
        raise OSError(
            errno.ENOSYS,
            "cp downloads need a POSIX system (Linux, macOS): this one cannot open files "
            "relative to a folder without following symbolic links",
        )
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_folder(root: int, copy: _Copy) -> int:
    """A descriptor of the folder inside ``root`` that ``copy``'s file goes in, created as needed.

    Reached one level at a time from ``root``'s descriptor and never through a symbolic link, so a
    link planted inside the destination (``ck -> /etc``) cannot lead the copy out of it.
    """
    folder = os.dup(root)
    try:
        for level in copy.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(level, 0o777, dir_fd=folder)
            try:
                inner = os.open(level, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise _Refused(copy.blob, f"{level!r} on its local path is a symbolic link or not a folder") from None
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder


def _remove_old_metadata(root: int, copy: _Copy) -> None:
    """Remove the local file that the download of a ``.metadata`` will replace, before any other.

    A DCP checkpoint downloaded over an older one (``__0_0.distcp`` is the same name in each save
    that torch's own writer makes) would otherwise be, until its new ``.metadata`` lands or forever if
    the copy stops, the old ``.metadata`` over a mix of old and new shard files: wrong tensors, not an
    error. Without it the folder is plainly not a checkpoint until the copy completes.
    """
    try:
        folder = _open_folder(root, copy)
    except (_Refused, OSError):
        return  # the download itself reports this
    try:
        os.unlink(copy.parts[-1], dir_fd=folder)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise OSError(error.errno, f"cannot remove the old {copy.destination}: {error.strerror or error}") from error
    finally:
        os.close(folder)


def _download_one(
    copy: _Copy, root: int, credential: CredentialArgument, hook: Any, transfers: _Transfers, verify: bool = True
) -> TransferStats:
    """Download into a hidden ``.partial`` file, renamed to its name only once the blob is whole.

    Whatever goes wrong (a full disk, a failed request, Ctrl-C, a blob that does not match its
    recorded CRC-32, which BlobIO checks at close unless ``verify`` is off), the ``.partial`` file
    is removed.
    """
    transfers.check()
    try:
        folder = _open_folder(root, copy)
    except OSError as error:
        raise _local_error(error, copy.destination) from error
    descriptor = -1
    try:
        checking = None if verify else False
        with BlobIO(copy.source, "rb", credential=credential, progress_hook=hook, verify_checksum=checking) as reader:
            try:
                descriptor, _ = transfers.create_partial(folder, copy.parts[-1])
                with open(descriptor, "wb", closefd=False) as file:
                    buffer = bytearray(_COPY_PIECE)
                    while count := reader.readinto(buffer):
                        transfers.check()
                        file.write(memoryview(buffer)[:count])
            except OSError as error:  # a full or read-only disk, a file too large, ...
                raise _local_error(error, copy.destination) from error
        try:
            transfers.complete(descriptor, folder, copy.parts[-1])
        except OSError as error:
            raise _local_error(error, copy.destination) from error
        return reader.stats
    finally:
        if descriptor >= 0:
            transfers.discard(descriptor)
            os.close(descriptor)
        os.close(folder)


def _local_error(error: OSError, path: str) -> OSError:
    """``error`` as it happened to the local file ``path``, named as the user knows it."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}; its partial download was removed")


def _upload_one(copy: _Copy, credential: CredentialArgument, hook: Any, transfers: _Transfers) -> TransferStats:
    """Upload a file; the blob is committed only if nothing told the copy to stop before the commit,
    and only if the file did not change while it was read (the blob would hold a mix of both)."""
    transfers.check()
    try:
        # O_NONBLOCK: a file swapped for a FIFO since the plan must not hang the copy on its open.
        descriptor = os.open(copy.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise OSError(error.errno, f"cannot read {copy.blob}: {error.strerror or error}") from error
    with open(descriptor, "rb") as file:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(errno.EINVAL, f"cannot read {copy.blob}: it is no longer a regular file")
        with BlobIO(copy.destination, "wb", credential=credential, progress_hook=hook) as writer:
            read = 0
            while piece := file.read(_COPY_PIECE):
                transfers.check()
                writer.write(piece)
                read += len(piece)
            after = os.fstat(descriptor)
            if read != after.st_size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                raise OSError(
                    f"{copy.blob} changed while it was being uploaded; nothing was committed for it "
                    "(copy it again once whatever writes it has finished)"
                )
            writer.flush()  # every block staged: what is left is the commit, a single request
            transfers.check()
    return writer.stats
