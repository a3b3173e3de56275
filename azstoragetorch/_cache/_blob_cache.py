"""The cached read: a blob from its file while that is current, else from the service, then stored."""

from __future__ import annotations

import contextlib
import errno
import os
import threading
import uuid
from typing import Any

from azstoragetorch._cache._eviction import _publish_within_limit
from azstoragetorch._cache._failures import _reason, _warn_once
from azstoragetorch._cache._files import (
    _HEADER,
    _MAGIC,
    _NO_LINKS,
    _TEMP_PREFIX,
    _file_name,
    _read_entry,
    _set_mtime_now,
    _write_all,
)
from azstoragetorch._cache._trust import _node, _open_directory, _Refused, _Verdict
from azstoragetorch._cache._writer import _writer
from azstoragetorch._client import AzStorageTorchBlobClient, crc32, pause
from azstoragetorch._reads import WholeBlobRead


def make_cache(
    cache_dir: Any, cache_max_bytes: Any, *, trust_listing: Any = False, check: bool = True
) -> BlobCache | None:
    """The cache the datasets' ``cache_*`` options ask for (``None`` without ``cache_dir``); checks them.

    With ``check``, the folder is also checked (and created) now, in the process that makes the
    dataset: a refusal warns here, once, and the verdict travels to its workers (see the package's "Trust").
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
        self.dir_fd: int | None = None  # the directory, opened and checked once (see the package's "Trust")
        self.usable = True  # False once the directory was refused or could not be opened
        self.storing = True  # False after a store failed (unwritable directory, full disk)


class BlobCache:
    """Whole blobs on local disk, keyed by URL and ETag; shared by the processes of a node.

    Pickles as its settings and the folder's verdict, so DataLoader workers and spawned ranks each
    start their own state but neither check nor warn again (see the package's "Trust").
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
        _publish_within_limit(self.directory, self.max_bytes, state, dir_fd, temp, name, size)

    def _process_state(self) -> _ProcessState:
        if self._pid != os.getpid():
            # A forked copy: the parent's locks may be held by its threads, and a flock shared with
            # the parent through an inherited descriptor would not exclude it.
            self._state = _ProcessState()
            self._pid = os.getpid()
        return self._state
