"""The directory's lock file, taken by the threads of a process and then by the other processes."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from azstoragetorch._cache._files import _NO_LINKS

if TYPE_CHECKING:
    from azstoragetorch._cache._blob_cache import _ProcessState

try:
    import fcntl
except ImportError:  # Windows: threads of one process still exclude each other; processes race benignly
    fcntl = None  # type: ignore[assignment]

_LOCK_NAME = ".lock"
# The longest a store waits for the directory's lock, which other processes' stores hold for
# milliseconds: one held longer belongs to a process that is stopped (Ctrl-Z) or hung on the disk,
# and waiting for it would stop this process's samples (once the writer is behind) and its exit.
_LOCK_TIMEOUT = 30.0


@contextlib.contextmanager
def _locked(state: _ProcessState, dir_fd: int, directory: str) -> Iterator[int]:
    """The lock of ``directory``: the threads of this process, then (``flock``) the other processes."""
    with state.lock:
        if state.lock_fd is None:
            state.lock_fd = _open_lock(dir_fd, os.path.join(directory, _LOCK_NAME))
        if fcntl is not None:
            _lock_exclusive(state.lock_fd, os.path.join(directory, _LOCK_NAME))
        try:
            yield state.lock_fd
        finally:
            if fcntl is not None:
                fcntl.flock(state.lock_fd, fcntl.LOCK_UN)


def _open_lock(dir_fd: int, path: str) -> int:
    try:
        fd = os.open(_LOCK_NAME, os.O_RDWR | os.O_CREAT | _NO_LINKS, 0o600, dir_fd=dir_fd)
    except OSError as error:
        if error.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, f"{path} is a symbolic link, which the cache never follows", path) from None
        raise
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode) or found.st_nlink != 1 or found.st_uid != os.geteuid():
        os.close(fd)  # another name for another file: writing the count would change that file
        raise OSError(errno.EPERM, f"{path} is not a plain file of this user's with one name", path)
    return fd


def _lock_exclusive(fd: int, path: str) -> None:
    """``flock(LOCK_EX)``, waiting at most ``_LOCK_TIMEOUT``; then an :class:`OSError` (the store fails)."""
    assert fcntl is not None
    deadline = time.monotonic() + _LOCK_TIMEOUT
    delay = 0.001
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                message = f"{path} was held by another process for {_LOCK_TIMEOUT:g} s"
                raise OSError(errno.ETIMEDOUT, message, path) from None
        time.sleep(delay)
        delay = min(2 * delay, 0.05)
