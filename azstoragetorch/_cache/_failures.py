"""When the cache falls back to the service: one warning per process, directory and cause."""

from __future__ import annotations

import errno
import os
import threading
import warnings

_warned_pid = 0
_warned: set[tuple[str, str]] = set()  # the (directory, cause) pairs this process has warned about
_warned_lock = threading.Lock()


def _new_warned_lock() -> None:
    global _warned_lock
    _warned_lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_warned_lock)


def _reason(error: OSError) -> str:
    return error.strerror or errno.errorcode.get(error.errno or 0, "") or type(error).__name__


def _warn_once(directory: str, cause: str, what: str) -> None:
    """One warning per process, directory and cause (``folder``, ``changed``, ``read``, ``store``) for
    what makes the cache fall back to the service: an unreadable entry does not hide a full disk."""
    global _warned_pid
    with _warned_lock:  # samples are fetched by several threads, which may fail at once
        if _warned_pid != os.getpid():
            _warned_pid = os.getpid()
            _warned.clear()
        if (directory, cause) in _warned:
            return
        _warned.add((directory, cause))
    warnings.warn(
        f"azstoragetorch: the dataset cache is not working: {what}; samples are read from Azure Blob Storage "
        "instead (this warning is shown once per process, cache directory and cause).",
        RuntimeWarning,
        stacklevel=2,
    )
