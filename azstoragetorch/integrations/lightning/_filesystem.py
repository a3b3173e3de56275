"""An fsspec filesystem over blob URLs, for libraries that do their path work through fsspec.

Lightning checks whether checkpoints exist, lists checkpoint directories and writes its logs and
configs through fsspec. This filesystem answers those calls for blob URLs with the same clients as
the rest of azstoragetorch (and the same credential), so that a directory of checkpoints in a
container looks to Lightning like a directory on disk.

Paths are full URLs, kept in the form they were given (``https://...`` or ``az://...``), and the
names it returns are in that same form. Blob Storage has no directories: a "directory" is a name
prefix ending in ``/``, which exists while some blob's name starts with it, and ``mkdir`` has
nothing to do. Accounts with a hierarchical namespace (ADLS Gen2) do have directories, which the
Blob API lists as empty blobs with the metadata ``hdi_isfolder=true``: this filesystem reports them
as directories, and deletes them only after everything in them.
"""

from __future__ import annotations

import contextlib
import errno
import io
from collections.abc import Callable
from types import TracebackType
from typing import Any

from azure.core.exceptions import ResourceNotFoundError
from fsspec import AbstractFileSystem
from fsspec.utils import stringify_path

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    BlobProperties,
    ContainerUrl,
    CredentialArgument,
    not_found_as_file_not_found,
    redact,
)
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions


class BlobFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec is untyped
    """fsspec's view of blob URLs.

    Args:
        credential: As for :class:`~azstoragetorch.io.BlobIO`.
        retry: As for :class:`~azstoragetorch.io.BlobIO`.
        to_url: Turns a path this filesystem is given into the blob (or prefix) URL it names;
            raises ``ValueError`` for paths it does not accept.
    """

    protocol = ("azstoragetorch",)  # never looked up by name: instances are handed out directly
    cachable = False  # cheap to create, and a credential is no key for fsspec's instance cache

    def __init__(
        self, *, credential: CredentialArgument, to_url: Callable[[str], str], retry: RetryOptions | None = None
    ) -> None:
        super().__init__()
        self._credential = credential
        self._retry = retry
        self._to_url = to_url

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = stringify_path(path)
        return path if path.endswith("://") else path.rstrip("/")

    def unstrip_protocol(self, name: str) -> str:
        return name

    # -- what is where -----------------------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        path = self._strip_protocol(path)
        container, name = self._locate(path)
        with _not_found_as_file_not_found(path):
            level = container.list_level(f"{name}/" if name else "")
        entries = [
            self._file_entry(_child(path, blob.client.blob_url.blob_name[len(name) :]), blob.properties)
            for blob in level.blobs
            if not blob.is_directory
        ]
        # A directory of a hierarchical namespace is listed as a blob, and also as a prefix once it has entries.
        directories = {prefix[len(name) :].rstrip("/") for prefix in level.prefixes}
        directories.update(blob.client.blob_url.blob_name[len(name) :] for blob in level.blobs if blob.is_directory)
        entries += [_directory_entry(_child(path, directory)) for directory in sorted(directories)]
        if not entries and name:
            entry = self.info(path)  # a blob, an empty directory, or FileNotFoundError
            entries = [] if entry["type"] == "directory" else [entry]
        return entries if detail else [entry["name"] for entry in entries]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        path = self._strip_protocol(path)
        container, name = self._locate(path)
        with _not_found_as_file_not_found(path):
            if not name:
                container.list_level("", max_results=1)  # raises for a missing container
                return _directory_entry(path)
            try:
                properties = container.blob_client(name).get_properties()
            except ResourceNotFoundError:
                pass
            else:
                if properties.size or not _is_directory_blob(container, name):
                    return self._file_entry(path, properties)
                return _directory_entry(path)
            level = container.list_level(f"{name}/", max_results=1)
        if level.blobs or level.prefixes:
            return _directory_entry(path)
        raise _file_not_found(path)

    # fsspec's defaults answer "no" to any error, which would turn a refused credential into "no
    # checkpoint here" and make Lightning silently start training from scratch. Only a missing
    # blob is a "no"; every other failure is raised.
    def exists(self, path: str, **kwargs: Any) -> bool:
        try:
            self.info(path)
        except FileNotFoundError:
            return False
        return True

    def isdir(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "directory")
        except FileNotFoundError:
            return False

    def isfile(self, path: str) -> bool:
        try:
            return bool(self.info(path)["type"] == "file")
        except FileNotFoundError:
            return False

    def modified(self, path: str) -> Any:
        """A blob's last modification time; for a prefix that holds a ``torch.distributed.checkpoint``
        checkpoint (a sharded Lightning checkpoint), that of its ``.metadata``, committed last."""
        entry = self.info(path)
        if entry["type"] != "file":
            try:
                entry = self.info(f"{self._strip_protocol(path)}/.metadata")
            except FileNotFoundError:
                raise IsADirectoryError(errno.EISDIR, "A blob prefix has no modification time", redact(path)) from None
        return entry["last_modified"]

    # -- changing things ---------------------------------------------------------------------

    def mkdir(self, path: str, create_parents: bool = True, **kwargs: Any) -> None:
        """Nothing to do: a prefix exists as soon as a blob is written under it."""

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        """Nothing to do: a prefix exists as soon as a blob is written under it."""

    def rmdir(self, path: str) -> None:
        """Nothing to do: a prefix disappears with the last blob under it."""

    def rm_file(self, path: str) -> None:
        path = self._strip_protocol(path)
        container, name = self._locate(path)
        with _not_found_as_file_not_found(path):
            container.blob_client(name).delete()

    def rm(self, path: str | list[str], recursive: bool = False, maxdepth: int | None = None) -> None:
        for one_path in [path] if isinstance(path, str) else path:
            if self.isfile(one_path):
                self.rm_file(one_path)
            elif not recursive:
                raise IsADirectoryError(errno.EISDIR, "Pass recursive=True to delete a blob prefix", redact(one_path))
            else:
                container, name = self._locate(self._strip_protocol(one_path))
                with _not_found_as_file_not_found(one_path):
                    self._rm_tree(container, name)

    @staticmethod
    def _rm_tree(container: AzStorageTorchContainerClient, name: str) -> None:
        """Delete everything under the prefix ``name``, and the directory ``name`` itself if it is one.

        A hierarchical namespace refuses to delete a directory that still has entries, so files go
        first, then directories, each after the ones inside it (in reverse name order, a directory's
        entries come before it).
        """
        directories: list[AzStorageTorchBlobClient] = []
        for blob in container.list_blobs(f"{name}/" if name else None):
            if blob.is_directory:
                directories.append(blob.client)
            else:
                blob.client.delete()
        for directory in sorted(directories, key=lambda client: client.blob_url.blob_name, reverse=True):
            directory.delete()
        if name and _is_directory_blob(container, name):
            container.blob_client(name).delete()

    # -- contents ----------------------------------------------------------------------------

    def open(self, path: str, mode: str = "rb", **kwargs: Any) -> Any:
        if "b" in mode:
            return super().open(path, mode, **kwargs)
        text_options = {key: kwargs.pop(key) for key in ("encoding", "errors", "newline") if key in kwargs}
        return _TextBlob(super().open(path, mode.replace("t", "") + "b", **kwargs), **text_options)

    def _open(
        self,
        path: str,
        mode: str = "rb",
        block_size: int | None = None,
        autocommit: bool = True,
        cache_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> BlobIO:
        if not autocommit:
            raise NotImplementedError("Blob writes commit at close(); fsspec transactions are not supported.")
        url = self._to_url(path)
        if mode == "rb":
            with _not_found_as_file_not_found(path):
                return BlobIO(url, "rb", credential=self._credential, retry=self._retry)
        if mode == "wb":
            return BlobIO(url, "wb", credential=self._credential, retry=self._retry)
        if mode == "ab":
            # Block blobs cannot be appended to in place: the new blob is the old content plus
            # what is written, committed as a whole at close (fine for logs and small files).
            previous = self.cat_file(path) if self.isfile(path) else b""
            writer = BlobIO(url, "wb", credential=self._credential, retry=self._retry)
            writer.write(previous)
            return writer
        raise ValueError(f"Unsupported mode {mode!r} for a blob: use 'rb', 'wb' or 'ab' (or their text forms).")

    # -- helpers -----------------------------------------------------------------------------

    def _locate(self, path: str) -> tuple[AzStorageTorchContainerClient, str]:
        """The container client and the blob name (or prefix, without a trailing ``/``) of ``path``."""
        container_url, name = ContainerUrl.parse_with_prefix(self._to_url(path))
        return AzStorageTorchContainerClient(container_url, self._credential, retry=self._retry), name.strip("/")

    @staticmethod
    def _file_entry(name: str, properties: BlobProperties) -> dict[str, Any]:
        return {
            "name": name,
            "size": properties.size,
            "type": "file",
            "last_modified": properties.last_modified,
            "etag": properties.etag,
        }


class _TextBlob(io.TextIOWrapper):
    """Text over a :class:`BlobIO` that, like BlobIO itself, commits nothing when its ``with``
    block raises or when it is garbage-collected without ``close()`` (a plain ``TextIOWrapper``
    would close, and so commit, a half-written blob in both cases)."""

    def __del__(self) -> None:
        # Replaces TextIOWrapper's finalizer, which would close the BlobIO. Doing nothing drops the
        # text not yet handed to the BlobIO and leaves the BlobIO to its own finalizer, which
        # warns (ResourceWarning) and commits nothing, as in binary mode.
        pass

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            super().__exit__(exc_type, exc, tb)
            return
        blob: BlobIO = self.detach()  # type: ignore[assignment]  # always a BlobIO here
        blob.__exit__(exc_type, exc, tb)


def _child(path: str, relative_name: str) -> str:
    """The name of an entry below ``path``, in the same URL form as ``path``."""
    relative_name = relative_name.lstrip("/")
    if path.split("://", 1)[0].lower() in ("http", "https"):
        # Only what would otherwise end the path or start a fragment needs escaping in a URL.
        relative_name = relative_name.replace("%", "%25").replace("?", "%3F").replace("#", "%23")
    return f"{path}/{relative_name}"


def _is_directory_blob(container: AzStorageTorchContainerClient, name: str) -> bool:
    """Whether the blob ``name`` is a directory of a hierarchical namespace, as its listing entry says."""
    # Listed from ``name`` on, the blob itself comes first: every other name there is longer.
    level = container.list_level(name, max_results=1)
    return bool(level.blobs) and level.blobs[0].client.blob_url.blob_name == name and level.blobs[0].is_directory


def _directory_entry(name: str) -> dict[str, Any]:
    return {"name": name, "size": 0, "type": "directory"}


def _file_not_found(path: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, "No such blob or blob prefix", redact(path))


def _not_found_as_file_not_found(path: str) -> contextlib.AbstractContextManager[None]:
    """Missing blobs and containers become ``FileNotFoundError``, which is what fsspec callers expect."""
    return not_found_as_file_not_found(path)
