"""The size limit: the directory's byte count, kept under its lock, and least-recently-used eviction."""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import time
from typing import TYPE_CHECKING

from azstoragetorch._cache._files import _ENTRY_NAME, _TEMP_PREFIX
from azstoragetorch._cache._lock import _locked

if TYPE_CHECKING:
    from azstoragetorch._cache._blob_cache import _ProcessState

_USAGE = struct.Struct("<Q")  # bytes of cache files in the directory, kept in the lock file
# Eviction goes below the limit by this fraction, so that the directory is not scanned at every store.
_EVICT_TO = 0.9
# Temporary files older than this were left by a process that died while storing.
_STALE_TEMP_SECONDS = 3600.0


def _publish_within_limit(
    directory: str, max_bytes: int, state: _ProcessState, dir_fd: int, temp: str, name: str, size: int
) -> None:
    """Rename ``temp`` to ``name`` under the directory's lock, counted, having evicted first if it
    would pass ``max_bytes``."""
    with _locked(state, dir_fd, directory) as lock_fd:
        usage = os.pread(lock_fd, _USAGE.size, 0)
        used = -1
        if len(usage) == _USAGE.size:
            (counted,) = _USAGE.unpack(usage)
            used = counted - _size_or_zero(name, dir_fd) + size
        if used < size:
            # A new lock file, or a count below the file being replaced (stored by a process
            # without a limit, which counts nothing): count what is there.
            used = sum(entry_size for _, entry_size, _ in _entries(dir_fd)) - _size_or_zero(name, dir_fd) + size
        if used > max_bytes:
            used = _evict(dir_fd, name, size, max_bytes)
        # Counted before the rename: a crash in between overcounts, which the next eviction's
        # scan corrects, and never lets the directory grow past the limit unnoticed.
        os.pwrite(lock_fd, _USAGE.pack(used), 0)
        os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)


def _evict(dir_fd: int, name: str, incoming: int, max_bytes: int) -> int:
    """Delete the least recently used files until ``incoming`` more bytes fit below 90% of
    ``max_bytes``; returns the bytes the directory will hold once ``name`` is replaced by them."""
    entries = sorted(entry for entry in _entries(dir_fd) if entry[2] != name)
    total = sum(entry_size for _, entry_size, _ in entries)
    target = int(max_bytes * _EVICT_TO)
    for _, entry_size, entry_name in entries:
        if total + incoming <= target:
            break
        # A reader that has the file open keeps reading it whole; one that opens it next misses.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry_name, dir_fd=dir_fd)
        total -= entry_size
    return total + incoming


def _entries(dir_fd: int) -> list[tuple[float, int, str]]:
    """(mtime, size, name) of every cache file; removes temporary files left by dead processes."""
    found = []
    now = time.time()
    with os.scandir(dir_fd) as scan:
        for entry in scan:
            try:
                entry_stat = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            if entry.name.startswith(_TEMP_PREFIX):
                if now - entry_stat.st_mtime > _STALE_TEMP_SECONDS:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(entry.name, dir_fd=dir_fd)
            elif _ENTRY_NAME.fullmatch(entry.name) and stat.S_ISREG(entry_stat.st_mode):
                # Only the cache's own names: a user's file in the directory is neither counted nor evicted.
                found.append((entry_stat.st_mtime, entry_stat.st_size, entry.name))
    return found


def _size_or_zero(name: str, dir_fd: int) -> int:
    """The size of the cache file ``name`` as :func:`_entries` counts it (a link or directory: 0)."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return found.st_size if stat.S_ISREG(found.st_mode) else 0
