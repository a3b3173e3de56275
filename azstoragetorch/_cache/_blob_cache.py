"""The datasets' local disk cache of whole blobs (``cache_dir=``): epoch 2 and later read local files.

**Layout.** One file per blob, named by the SHA-256 of the blob's URL with its snapshot or version
but never its SAS token, so a file name reveals neither a secret nor, without the URL, the blob.
A file holds a header (a magic string, the content's CRC-32 and length, the blob's ETag) and the
content. A hit needs the URL and the ETag to match, so a blob rewritten since it was cached (a new
ETag) is read from the service again and its file replaced.

**Which ETag.** By default a hit is confirmed by the service: the read carries ``If-None-Match``
with the cached ETag, and an unchanged blob answers ``304 Not Modified`` with no body, so a hit
costs one round trip but no transfer. With ``trust_known_etag`` (``cache_trust_listing=True`` on a
listed dataset) the ETag the dataset already knows (from its listing) decides alone, with no
request at all; a blob rewritten after the listing is then served as it was listed.

**Across processes.** DataLoader workers and the ranks of a node share one directory. A file is
written under a temporary name in the same directory and renamed into place (``os.replace``), so a
reader sees the old file or the new one, never a part of one; a reader that opened a file keeps
reading that file even if it is replaced or evicted meanwhile (POSIX unlink semantics). Files are
not fsynced (a cache can be refetched): every read checks the length and the CRC-32, so a torn or
damaged file (a power loss, a bit flip) is fetched again.

**Storing in the background.** A blob read from the service is returned at once and handed to one
writer thread per process, which stores it (the bytes are immutable, so nothing is copied). Until
it is stored, a read in the same process is served from that memory. At most ``_PENDING_LIMIT``
bytes (or one larger blob) wait for the writer; a read that would pass it waits for room, so a
disk slower than the network slows the reads instead of growing the memory. The writer finishes
its work when the process exits normally (a DataLoader worker too); a process killed meanwhile
loses the blobs not yet stored, and at worst leaves a temporary file that is never read.

**Eviction.** With ``max_bytes``, the bytes in the directory are counted in its lock file, updated
under ``flock`` at every store; a store that would pass the limit first deletes the least recently
used files (by modification time, which every hit refreshes) down to 90% of it. Without a limit
nothing is evicted, so hits leave the files untouched (no ``utime``). A store waits at most
``_LOCK_TIMEOUT`` for the lock; a process that holds it longer (stopped, or hung on the disk) makes
this one stop storing (see "Failures"), rather than stop its samples or its exit.

**Trust.** The directory is used only if no one but its user could change what it holds, as ssh
requires of its files: it is refused (then read from the service as without a cache) if another
user owns it, if its group or others can write to it, or if a directory or symbolic link on the way
to it could be replaced by another user (one owned by someone other than the user or root, or
writable by group or others without the sticky bit, as ``/tmp`` has). The parts of the path that do
not exist are created with mode 0o700. The folder is checked once, where the dataset is made
(:func:`make_cache`; ``BlobDataModule`` in its ``setup``), which gives the one warning of a
refusal; the verdict pickles with the cache, so DataLoader workers and spawned ranks neither check
nor warn again. A process that received an accepted folder opens it by path again, walking the same
checks without creating anything, and uses it only if it is the very directory that was accepted
(same ``st_dev`` and ``st_ino``): one removed, renamed away and replaced, or made unsafe since is
not used, with one warning in that process. Every file is then opened, renamed and deleted relative to that descriptor, by a name
with no slash and with ``O_NOFOLLOW``: a symbolic link planted in the directory is never followed
(a lock or entry that is one, or a lock with another hard link, is not used; a rename replaces a
link, never its target). An entry owned by another user (planted while the directory was
writable) or writable by group or others is a miss, replaced by the store. Only names that the
cache gives its files are counted or evicted.

**Failures.** A directory that cannot be created is refused as above. One that cannot be written,
or a full disk, costs one warning per process and directory; that process then stops storing and
reads from the service as without a cache. An entry that cannot be read is a miss, with its own
one warning per process and directory: each cause warns once, so one does not silence another.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import multiprocessing.util
import os
import re
import stat
import struct
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from typing import Any, NamedTuple

from azstoragetorch._client import AzStorageTorchBlobClient, crc32, pause
from azstoragetorch._reads import WholeBlobRead

try:
    import fcntl
except ImportError:  # Windows: threads of one process still exclude each other; processes race benignly
    fcntl = None  # type: ignore[assignment]

_MAGIC = b"AZTCACH1"
_HEADER = struct.Struct("<8sIQH")  # magic, CRC-32 of the content, content length, ETag length
_USAGE = struct.Struct("<Q")  # bytes of cache files in the directory, kept in the lock file
_LOCK_NAME = ".lock"
_TEMP_PREFIX = ".tmp-"
# Eviction goes below the limit by this fraction, so that the directory is not scanned at every store.
_EVICT_TO = 0.9
# Temporary files older than this were left by a process that died while storing.
_STALE_TEMP_SECONDS = 3600.0
# Cache files up to this size are read with one system call (and their content sliced out of it).
_ONE_READ = 64 * 1024
# The most bytes of fetched blobs that wait, in one process, for the background writer to store them.
_PENDING_LIMIT = 64 * 1024 * 1024
# The longest a store waits for the directory's lock, which other processes' stores hold for
# milliseconds: one held longer belongs to a process that is stopped (Ctrl-Z) or hung on the disk,
# and waiting for it would stop this process's samples (once the writer is behind) and its exit.
_LOCK_TIMEOUT = 30.0

# Flags of every open of a file in the directory: never through a symbolic link, never inherited by
# a program the process runs. Reads add O_NONBLOCK: a FIFO planted under a cache name must not block.
_NO_LINKS = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_ENTRY_NAME = re.compile(r"[0-9a-f]{64}")  # what _file_name returns: only such files are evicted
# Symbolic links followed on the way to the directory before it counts as a loop (Linux's limit).
_MAX_LINKS = 40

_warned_pid = 0
_warned: set[tuple[str, str]] = set()  # the (directory, cause) pairs this process has warned about
_warned_lock = threading.Lock()


def _new_warned_lock() -> None:
    global _warned_lock
    _warned_lock = threading.Lock()  # a thread of the parent may have held it at the fork


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_warned_lock)


def make_cache(
    cache_dir: Any, cache_max_bytes: Any, *, trust_listing: Any = False, check: bool = True
) -> BlobCache | None:
    """The cache the datasets' ``cache_*`` options ask for (``None`` without ``cache_dir``); checks them.

    With ``check``, the folder is also checked (and created) now, in the process that makes the
    dataset: a refusal warns here, once, and the verdict travels to its workers (see "Trust").
    """
    if cache_dir is None:
        if cache_max_bytes is not None or trust_listing:
            raise ValueError("cache_max_bytes and cache_trust_listing need cache_dir: there is no cache without it.")
        return None
    if not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"cache_dir must be a str or os.PathLike, not {type(cache_dir).__name__}.")
    directory = os.fspath(cache_dir)
    if not isinstance(directory, str):
        raise TypeError("cache_dir must be a str or os.PathLike of str, not of bytes.")
    if not directory:
        raise ValueError("cache_dir must name a directory, got an empty string (leave it out for no cache).")
    if "\0" in directory:
        raise ValueError(f"cache_dir must not contain a NUL character, got {directory!r}.")
    try:
        os.fsencode(directory)  # else every sample's read would fail, with a UnicodeEncodeError
    except UnicodeEncodeError as error:
        raise ValueError(f"cache_dir cannot be a file name here ({error.reason}), got {directory!r}.") from None
    # Absolute now: the workers and a later os.chdir must not move the cache.
    directory = os.path.expanduser(directory)
    if not os.path.isabs(directory):  # (not abspath: its lexical '..' would be wrong after a link)
        directory = os.path.join(os.getcwd(), directory)
    if cache_max_bytes is not None and (
        isinstance(cache_max_bytes, bool) or not isinstance(cache_max_bytes, int) or cache_max_bytes < 1
    ):
        raise ValueError(f"cache_max_bytes must be a positive int or None, got {cache_max_bytes!r}.")
    if not isinstance(trust_listing, bool):
        raise TypeError(f"cache_trust_listing must be a bool, not {type(trust_listing).__name__}.")
    cache = BlobCache(directory, cache_max_bytes, trust_known_etag=trust_listing)
    if check:
        cache.check()
    return cache


class _ProcessState:
    """What one process keeps about a cache: locks and descriptors are never shared across a fork."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock_fd: int | None = None
        self.opening = threading.Lock()
        self.dir_fd: int | None = None  # the directory, opened and checked once (see "Trust")
        self.usable = True  # False once the directory was refused or could not be opened
        self.storing = True  # False after a store failed (unwritable directory, full disk)


class BlobCache:
    """Whole blobs on local disk, keyed by URL and ETag; shared by the processes of a node.

    Pickles as its settings and the folder's verdict, so DataLoader workers and spawned ranks each
    start their own state but neither check nor warn again (see the module's "Trust").
    """

    def __init__(self, directory: str, max_bytes: int | None, *, trust_known_etag: bool = False) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.trust_known_etag = trust_known_etag
        self._verdict: _Verdict | None = None  # None until the folder is checked, in any process
        self._state = _ProcessState()
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        return {
            "directory": self.directory,
            "max_bytes": self.max_bytes,
            "trust_known_etag": self.trust_known_etag,
            "verdict": self._verdict,
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["directory"], state["max_bytes"], trust_known_etag=state["trust_known_etag"])  # type: ignore[misc]
        self._verdict = state.get("verdict")

    def check(self) -> None:
        """Check (and create) the folder now, unless this process has: a refusal warns once, here."""
        self._directory_fd()

    def __repr__(self) -> str:
        return f"BlobCache({self.directory!r}, max_bytes={self.max_bytes})"

    def trusted_hit(self, client: AzStorageTorchBlobClient, known_etag: str | None) -> bytes | None:
        """The cached content if ``known_etag`` is trusted and is the cached copy's, else ``None``:
        what :meth:`read_all` serves with no request, for a caller that keeps requests elsewhere."""
        if not self.trust_known_etag or known_etag is None or self._directory_fd() is None:
            return None
        path = self._path(client)
        cached = _writer().pending(path) or self._lookup(path)
        if cached is None or cached[0] != known_etag:
            return None
        self._touch(path)
        return cached[1]

    def read_all(
        self, client: AzStorageTorchBlobClient, known_etag: str | None, *, block_size: int, max_concurrency: int
    ) -> bytes:
        """The whole blob, from the cache when the cached copy is current, else from the service
        (and then stored in the background). ``known_etag`` is the ETag the dataset knows, used
        only if trusted."""
        whole = WholeBlobRead(client, block_size=block_size, max_concurrency=max_concurrency)
        if self._directory_fd() is None:  # refused: read as without a cache
            return whole.read()[1]
        path = self._path(client)
        cached = _writer().pending(path) or self._lookup(path)
        if cached is not None:
            etag, data = cached
            if self.trust_known_etag and known_etag is not None:
                if etag == known_etag:
                    self._touch(path)
                    return data
            else:
                read = whole.read_if_changed(etag)
                if read is None:  # 304: the cached copy is the blob's current content
                    self._touch(path)
                    return data
                self._hand_over(path, read[0].etag, read[1])
                return read[1]
        properties, data = whole.read()
        self._hand_over(path, properties.etag, data)
        return data

    # -- reading ---------------------------------------------------------------------------------

    def _path(self, client: AzStorageTorchBlobClient) -> str:
        return os.path.join(self.directory, _file_name(client.blob_url.display_url))

    def _directory_fd(self) -> int | None:
        """This process's descriptor of the directory, opened at its first use; ``None`` if refused."""
        state = self._process_state()
        if state.dir_fd is None and state.usable:
            with state.opening:
                if state.dir_fd is None and state.usable:
                    state.dir_fd = self._open()
                    state.usable = state.dir_fd is not None
        return state.dir_fd

    def _open(self) -> int | None:
        verdict = self._verdict
        if verdict is None or verdict.node != _node():
            return self._judge()
        if verdict.refusal is not None:
            return None  # refused where the dataset was made, which warned
        # Accepted where the dataset was made: by path again, so the same checks, and then it must
        # be the very folder that was accepted (one renamed away and replaced since is not).
        try:
            fd = _open_directory(self.directory, create=False)
        except (_Refused, OSError) as error:
            why = str(error) if isinstance(error, _Refused) else _reason(error)
            _warn_once(self.directory, "changed", f"{self.directory} changed since the dataset was made ({why})")
            return None
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != verdict.identity:
            os.close(fd)
            _warn_once(self.directory, "changed", f"{self.directory} was replaced since the dataset was made")
            return None
        return fd

    def _judge(self) -> int | None:
        """The first check of the folder (creating it); records the verdict that pickles carry."""
        try:
            fd = _open_directory(self.directory)
        except _Refused as refusal:
            self._verdict = _Verdict(_node(), None, f"{self.directory} is not safe to use: {refusal}")
        except OSError as error:
            self._verdict = _Verdict(_node(), None, f"opening {self.directory} failed ({_reason(error)})")
        else:
            opened = os.fstat(fd)
            self._verdict = _Verdict(_node(), (opened.st_dev, opened.st_ino), None)
            return fd
        assert self._verdict.refusal is not None
        _warn_once(self.directory, "folder", self._verdict.refusal)
        return None

    def _lookup(self, path: str) -> tuple[str, bytes] | None:
        """The cached ETag and content at ``path``, if it is there and intact; a damaged file is removed."""
        dir_fd = self._directory_fd()
        if dir_fd is None:
            return None
        name = os.path.basename(path)
        try:
            # Never through a link: a planted one could hand out any file the user can read.
            fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | _NO_LINKS, dir_fd=dir_fd)
        except FileNotFoundError:
            return None
        except OSError as error:
            if error.errno == errno.ELOOP:
                return None  # a link: a miss, and the store's rename replaces the link itself
            # Not readable (permissions, I/O error): as a miss; storing will tell whether it is usable.
            _warn_once(self.directory, "read", f"reading {path} failed ({_reason(error)})")
            return None
        try:
            pause("cache.read")  # another process may now replace or evict the file
            found = _read_entry(fd)
        except OSError as error:
            _warn_once(self.directory, "read", f"reading {path} failed ({_reason(error)})")
            return None
        finally:
            os.close(fd)
        if found is None:
            # Torn or damaged (a crash before the data reached the disk, a bit flip): fetch it again.
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dir_fd)
        return found

    def _touch(self, path: str) -> None:
        """Mark the file as just used, for least-recently-used eviction (which needs a limit)."""
        dir_fd = self._process_state().dir_fd
        if self.max_bytes is not None and dir_fd is not None:
            with contextlib.suppress(OSError):  # a blob not stored yet, or evicted meanwhile
                _set_mtime_now(os.path.basename(path), dir_fd)

    # -- writing ---------------------------------------------------------------------------------

    def _hand_over(self, path: str, etag: str, data: bytes) -> None:
        """Store the blob in the background (if this process still stores)."""
        if self._process_state().storing:
            _writer().put(self, path, etag, data)

    def _store(self, path: str, etag: str, data: bytes) -> None:
        state = self._process_state()
        if not state.storing:
            return
        etag_bytes = etag.encode()
        header = _HEADER.pack(_MAGIC, crc32(data), len(data), len(etag_bytes)) + etag_bytes
        size = len(header) + len(data)
        if self.max_bytes is not None and size > self.max_bytes:
            return  # larger than the whole cache
        dir_fd = self._directory_fd()
        if dir_fd is None:
            return
        temp = f"{_TEMP_PREFIX}{uuid.uuid4().hex}"
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NO_LINKS, 0o600, dir_fd=dir_fd)
            try:
                _write_all(fd, header)
                _write_all(fd, data)
                # No fsync: it costs several times the write itself, the largest part of a small
                # blob's first epoch. The cache is disposable: a file torn by a power loss
                # fails its length or CRC-32 check and is fetched again.
                if self.max_bytes is not None:  # the eviction order; without a limit the kernel's stamp will do
                    _set_mtime_now(fd)
            finally:
                os.close(fd)
            pause("cache.store")  # another process may store or evict the same blob now
            self._publish(state, dir_fd, temp, os.path.basename(path), size)
        except OSError as error:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)
            state.storing = False
            _warn_once(self.directory, "store", f"storing in {self.directory} failed ({_reason(error)})")

    def _publish(self, state: _ProcessState, dir_fd: int, temp: str, name: str, size: int) -> None:
        """Rename ``temp`` to ``name``; with a limit, count it and evict first if it would pass it."""
        # A rename replaces whatever has the name, a symbolic link included, never what a link names.
        if self.max_bytes is None:
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            return
        with self._locked(state, dir_fd) as lock_fd:
            usage = os.pread(lock_fd, _USAGE.size, 0)
            used = -1
            if len(usage) == _USAGE.size:
                (counted,) = _USAGE.unpack(usage)
                used = counted - _size_or_zero(name, dir_fd) + size
            if used < size:
                # A new lock file, or a count below the file being replaced (stored by a process
                # without a limit, which counts nothing): count what is there.
                used = sum(entry_size for _, entry_size, _ in _entries(dir_fd)) - _size_or_zero(name, dir_fd) + size
            if used > self.max_bytes:
                used = self._evict(dir_fd, name, size)
            # Counted before the rename: a crash in between overcounts, which the next eviction's
            # scan corrects, and never lets the directory grow past the limit unnoticed.
            os.pwrite(lock_fd, _USAGE.pack(used), 0)
            os.replace(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)

    def _evict(self, dir_fd: int, name: str, incoming: int) -> int:
        """Delete the least recently used files until ``incoming`` more bytes fit below 90% of the
        limit; returns the bytes the directory will hold once ``name`` is replaced by them."""
        assert self.max_bytes is not None
        entries = sorted(entry for entry in _entries(dir_fd) if entry[2] != name)
        total = sum(entry_size for _, entry_size, _ in entries)
        target = int(self.max_bytes * _EVICT_TO)
        for _, entry_size, entry_name in entries:
            if total + incoming <= target:
                break
            # A reader that has the file open keeps reading it whole; one that opens it next misses.
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry_name, dir_fd=dir_fd)
            total -= entry_size
        return total + incoming

    @contextlib.contextmanager
    def _locked(self, state: _ProcessState, dir_fd: int) -> Iterator[int]:
        """The directory's lock: the threads of this process, then (``flock``) the other processes."""
        with state.lock:
            if state.lock_fd is None:
                state.lock_fd = _open_lock(dir_fd, os.path.join(self.directory, _LOCK_NAME))
            if fcntl is not None:
                _lock_exclusive(state.lock_fd, os.path.join(self.directory, _LOCK_NAME))
            try:
                yield state.lock_fd
            finally:
                if fcntl is not None:
                    fcntl.flock(state.lock_fd, fcntl.LOCK_UN)

    def _process_state(self) -> _ProcessState:
        if self._pid != os.getpid():
            # A forked copy: the parent's locks may be held by its threads, and a flock shared with
            # the parent through an inherited descriptor would not exclude it.
            self._state = _ProcessState()
            self._pid = os.getpid()
        return self._state


class _Writer:
    """The thread that stores fetched blobs, one per process for all of its caches (see the module's
    "Storing in the background")."""

    def __init__(self) -> None:
        self._pid = os.getpid()
        self._condition = threading.Condition()
        # In the order handed over; an item stays (and is counted) until it is stored.
        self._queue: collections.deque[tuple[BlobCache, str, str, bytes]] = collections.deque()
        self._pending_bytes = 0
        # The latest blob handed over for each path, served to reads until it is stored.
        self._latest: dict[str, tuple[str, bytes]] = {}
        self._thread: threading.Thread | None = None

    def pending(self, path: str) -> tuple[str, bytes] | None:
        """The ETag and content handed over for ``path`` and not yet stored, if any."""
        with self._condition:
            return self._latest.get(path)

    def put(self, cache: BlobCache, path: str, etag: str, data: bytes) -> None:
        pause("cache.handoff")  # the writer may be storing an older copy of the same blob now
        with self._condition:
            while self._pending_bytes and self._pending_bytes + len(data) > _PENDING_LIMIT:
                self._condition.wait()
            self._queue.append((cache, path, etag, data))
            self._pending_bytes += len(data)
            self._latest[path] = (etag, data)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="azstoragetorch-cache-writer", daemon=True)
                self._thread.start()
                # Run at a normal exit, a DataLoader worker's included (atexit is not, in a worker).
                multiprocessing.util.Finalize(None, self.flush, exitpriority=100)
            self._condition.notify_all()

    def flush(self) -> None:
        """Wait until no blob waits to be stored (each is stored, or dropped after a failure)."""
        if self._pid != os.getpid():
            return  # a copy inherited by a forked process, without its thread
        with self._condition:
            while self._queue:
                self._condition.wait()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._queue:
                    self._condition.wait()
                cache, path, etag, data = self._queue[0]
            try:
                cache._store(path, etag, data)
            except Exception as error:  # a defect: keep the samples coming, without a cache
                cache._process_state().storing = False
                what = f"storing in {cache.directory} failed ({type(error).__name__}: {error})"
                _warn_once(cache.directory, "store", what)
            finally:
                with self._condition:
                    self._queue.popleft()
                    self._pending_bytes -= len(data)
                    if self._latest.get(path, (None, None))[1] is data:
                        del self._latest[path]  # after the rename: a read finds it on disk now
                    self._condition.notify_all()


_the_writer: _Writer | None = None
_the_writer_lock = threading.Lock()


def _writer() -> _Writer:
    global _the_writer
    writer = _the_writer
    if writer is None or writer._pid != os.getpid():
        with _the_writer_lock:
            if _the_writer is None or _the_writer._pid != os.getpid():
                _the_writer = _Writer()
            writer = _the_writer
    return writer


def _forget_writer() -> None:
    global _the_writer, _the_writer_lock
    _the_writer = None  # the parent's thread is not in the child; its queue belongs to the parent
    _the_writer_lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_writer)


def flush() -> None:
    """Wait until this process has stored every blob it has read (tests, and callers that copy a cache)."""
    _writer().flush()


class _Refused(Exception):
    """The cache directory, or the way to it, could be changed by another user."""


class _Verdict(NamedTuple):
    """What checking the folder found, carried to other processes by pickling."""

    node: str  # the machine that checked: a verdict sent elsewhere is of another folder
    identity: tuple[int, int] | None  # (st_dev, st_ino) of the accepted folder
    refusal: str | None  # why it is not used, if it is not


def _node() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _open_directory(directory: str, *, create: bool = True) -> int:
    """A descriptor of ``directory`` (absolute), created with mode 0o700 where it is missing (with
    ``create``), once it and the way to it are safe (see the module's "Trust"); raises
    :class:`_Refused` if not."""
    if os.name != "posix" or os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise _Refused("this platform cannot open files without following symbolic links")
    uid = os.geteuid()
    # Walked one name at a time, following links by hand, so that every directory passed through and
    # every link followed is checked (realpath would hide a link in a directory others can write).
    todo = directory.split("/")[::-1]
    current = "/"
    found = _lstat_safe("/", uid)
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)  # a resolved path: lexical is right here
            found = os.lstat(current)
            continue
        path = os.path.join(current, part)
        try:
            found = _lstat_safe(path, uid)
        except FileNotFoundError:
            if not create:
                raise
            # Only the user can add to a safe directory, except a sticky one (/tmp), where another
            # user may have made it first: then it is theirs, and the checks below refuse it.
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            found = _lstat_safe(path, uid)
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(path)
            if target.startswith("/"):
                current = "/"
            todo.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(found.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX:
            raise _Refused(_writable_by_others(path, found))  # another user could rename what it holds
        current = path
    fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | _NO_LINKS)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
            raise _Refused(f"{current} was replaced while it was checked")
        if opened.st_uid != uid:
            raise _Refused(f"{current} is owned by uid {opened.st_uid}, not by this user (uid {uid})")
        if opened.st_mode & 0o022:  # sticky or not: another user could add files to it
            raise _Refused(_writable_by_others(current, opened))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _writable_by_others(path: str, found: os.stat_result) -> str:
    mode = stat.S_IMODE(found.st_mode)
    return f"{path} can be written by its group or by others (mode {mode:#o}); 'chmod go-w {path}' makes it safe"


def _lstat_safe(path: str, uid: int) -> os.stat_result:
    """``os.lstat(path)``, if the user or root owns it: only they may choose what a name on the way
    to the cache stands for."""
    found = os.lstat(path)
    if found.st_uid not in (uid, 0):
        raise _Refused(f"{path} is owned by uid {found.st_uid}, not by this user (uid {uid}) or root")
    return found


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


def _size_or_zero(name: str, dir_fd: int) -> int:
    """The size of the cache file ``name`` as :func:`_entries` counts it (a link or directory: 0)."""
    try:
        found = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return 0
    return found.st_size if stat.S_ISREG(found.st_mode) else 0


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
