"""A cache file: its name, its format (header, ETag, content), and reading and writing one."""

from __future__ import annotations

import hashlib
import os
import re
import stat
import struct
import time

from azstoragetorch._client import crc32

_MAGIC = b"AZTCACH1"
_HEADER = struct.Struct("<8sIQH")  # magic, CRC-32 of the content, content length, ETag length
_TEMP_PREFIX = ".tmp-"
# Cache files up to this size are read with one system call (and their content sliced out of it).
_ONE_READ = 64 * 1024

# Flags of every open of a file in the directory: never through a symbolic link, never inherited by
# a program the process runs. Reads add O_NONBLOCK: a FIFO planted under a cache name must not block.
_NO_LINKS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")  # what _file_name returns: only such files are evicted


def _file_name(display_url: str) -> str:
    # The display URL keeps the snapshot or version (another blob's content) and drops the SAS.
    return hashlib.sha256(display_url.encode()).hexdigest()


def _read_entry(fd: int) -> tuple[str, bytes] | None:
    """The ETag and content of the cache file open at ``fd``; ``None`` if it is torn or damaged."""
    found = os.fstat(fd)
    if not stat.S_ISREG(found.st_mode):
        return None  # a directory, FIFO or device under a cache name
    if found.st_uid != os.geteuid() or found.st_mode & 0o022:
        # Planted while the folder was writable (a later 'chmod go-w' keeps it), or writable by
        # others through another name: whoever can write it chooses the sample.
        return None
    size = found.st_size
    # Few system calls, and the content copied once: a small file in one read; a large one's header
    # and ETag (a few dozen bytes) in one, then its content straight into the returned bytes.
    head = os.pread(fd, size if size <= _ONE_READ else _HEADER.size + 256, 0)
    if len(head) < _HEADER.size:
        return None
    magic, checksum, length, etag_length = _HEADER.unpack_from(head)
    start = _HEADER.size + etag_length
    if magic != _MAGIC or size != start + length:
        return None
    if len(head) < start:  # an unusually long ETag
        head = os.pread(fd, start, 0)
        if len(head) < start:
            return None
    data = head[start:] if len(head) == size else _pread_exactly(fd, length, start)
    if data is None or crc32(data) != checksum:
        return None
    return head[_HEADER.size : start].decode("utf-8", "replace"), data


def _pread_exactly(fd: int, length: int, offset: int) -> bytes | None:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    pieces = [data]  # a read returns at most about 2 GiB at once
    done = len(data)
    while done < length:
        piece = os.pread(fd, length - done, offset + done)
        if not piece:
            return None  # shorter than its header says (truncated since the fstat)
        pieces.append(piece)
        done += len(piece)
    return b"".join(pieces)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` (the seam where tests make the disk full)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _set_mtime_now(file: int | str, dir_fd: int | None = None) -> None:
    """Stamp an open file, or a name in the directory (a link's own stamp, never its target's)."""
    # From the clock in nanoseconds: the kernel stamps files from a coarse clock (a few ms), too
    # coarse to order the files of a busy cache.
    now = time.time_ns()
    if isinstance(file, int):
        os.utime(file, ns=(now, now))
    else:
        os.utime(file, ns=(now, now), dir_fd=dir_fd, follow_symlinks=False)
