"""torch.distributed.checkpoint in Blob Storage: :class:`BlobStorageWriter` and :class:`BlobStorageReader`.

They are torch's ``FileSystemWriter`` and ``FileSystemReader`` with the file system swapped for a
container (the seam torch itself uses for its fsspec classes), so planning, sharding, resharding and
the checkpoint format stay torch's own: a ``.metadata`` file and shard files under a blob prefix,
with the bytes ``FileSystemWriter`` writes on disk. What changes is how the bytes move: each shard
file is a :class:`~azstoragetorch.io.BlobIO` uploading blocks in parallel, and loads fetch only the
byte ranges they need, sorted, coalesced and in parallel. Two things differ from ``FileSystemWriter``
on purpose, so that an overwrite is safe at every instant: shard file names carry a token of their
save, so a save never touches a file that the checkpoint it replaces still uses, and ``.metadata``
is committed last, in one request, and only over the version the save found when it started.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import functools
import io
import logging
import os
import pickle
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Generator, Iterator, Sequence
from typing import IO, TYPE_CHECKING, Any, TypeVar, cast

import torch
from azure.core.exceptions import AzureError, ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from torch.distributed.checkpoint import filesystem as _torch_filesystem
from torch.distributed.checkpoint.filesystem import (
    FileSystemBase,
    FileSystemReader,
    FileSystemWriter,
    SerializationFormat,
    _StoragePrefix,  # private: listed in azstoragetorch/_compat.py, as is every such name here
)
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem, SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    BlobProperties,
    ContainerUrl,
    CredentialArgument,
    Lease,
    PieceChecksums,
    ProgressHook,
    Recorder,
    TransferStats,
    add_checksum_outcome,
    crc32,
    interpreter_exiting,
    is_missing_container,
    pause,
    redact_url,
    sum_stats,
    validate_credential,
    validate_retry,
)
from azstoragetorch._compat import warn_if_untested
from azstoragetorch._options import check_int, check_transfer_options
from azstoragetorch.exceptions import CheckpointConflictError, ChecksumMismatchError
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions

if TYPE_CHECKING:
    # Private torch names needed only for annotations: a release that moves them cannot break an import.
    from torch.distributed.checkpoint._extension import ExtensionRegistry, StreamTransformExtension
    from torch.distributed.checkpoint.filesystem import _StorageInfo

__all__ = ["BlobStorageReader", "BlobStorageWriter", "CheckpointVerification"]

warn_if_untested("torch")

_MiB = 1024 * 1024
# Shard files: __<rank>_<token>_<n>.distcp as BlobStorageWriter names them (the token is its save's),
# and __<rank>_<n>.distcp as FileSystemWriter (and earlier versions of BlobStorageWriter) name them.
_SHARD_FILE = re.compile(r"__(?P<rank>\d+)_(?:[0-9a-f]{12}_)?\d+\.distcp")
_LOGGER = logging.getLogger("azstoragetorch")
# Two wanted byte ranges of a shard file closer than this are fetched by one request: the bytes in
# between cost less than another request's round trip to Azure.
_COALESCE_GAP = 256 * 1024


class _BlobFiles(FileSystemBase):
    """torch's file-system interface over blob URLs: a "path" is a blob (or prefix) URL.

    A checkpoint URL may carry a SAS token; names are joined before its query string.
    """

    def __init__(
        self,
        credential: CredentialArgument,
        *,
        max_concurrency: int,
        block_size: int,
        validate_content: bool = False,
        verify_checksum: bool = False,
        retry: RetryOptions | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        validate_credential(credential)
        validate_retry(retry)
        check_transfer_options(max_concurrency, block_size)
        if progress_hook is not None and not callable(progress_hook):
            raise TypeError(f"progress_hook must be a callable (or None), not {type(progress_hook).__name__}.")
        self.progress_hook = progress_hook
        self.credential = credential
        self.retry = retry
        self.max_concurrency = max_concurrency
        self.block_size = block_size
        self.validate_content = validate_content
        self.verify_checksum = verify_checksum
        self.shard_writers = _ShardWriters(None)  # those of the save under way; write_data starts a new one

    def __getstate__(self) -> dict[str, Any]:
        # dcp.async_save with the process checkpointer pickles the writer into its saving process;
        # the shard writers (a lock) belong to a save under way in this process, not to the copy.
        state = dict(self.__dict__)
        del state["shard_writers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.shard_writers = _ShardWriters(None)

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        url = os.fspath(path)
        options: dict[str, Any] = {
            "max_concurrency": self.max_concurrency,
            "block_size": self.block_size,
            "retry": self.retry,
        }
        if mode == "wb":
            # Only torch's writer threads open files for writing (finish writes .metadata itself).
            writers = self.shard_writers
            shard = _ShardFile(
                url,
                writers,
                credential=self.credential,
                validate_content=self.validate_content,
                progress_hook=writers.file_hook(),
                **options,
            )
            try:
                with shard:
                    yield shard
            except Exception as error:
                # Kept here, not raised: torch joins its writer threads only when the calling
                # thread's own writes succeed (and only prints the others' exceptions), and the
                # save must not return while any of them may still commit. write_data raises it.
                writers.fail(error)
            except BaseException as error:  # KeyboardInterrupt and the like: stop the others, then go
                writers.fail(error)
                raise
        elif mode == "rb":
            with _missing_blob_as_file_not_found(url):
                reading = BlobIO(
                    url,
                    "rb",
                    credential=self.credential,
                    validate_content=self.validate_content,
                    verify_checksum=None if self.verify_checksum else False,
                    **options,
                )
            with reading as f:
                yield f
        else:
            raise ValueError(f"Unsupported mode {mode!r}: checkpoint files are opened with 'rb' or 'wb'.")

    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        base, mark, query = os.fspath(path).partition("?")
        return f"{base.rstrip('/')}/{urllib.parse.quote(suffix, safe='/~')}{mark}{query}"

    def init_path(self, path: str | os.PathLike[str]) -> str:
        url = os.fspath(path)
        _parse_location(url)
        base, mark, query = url.partition("?")
        return f"{base.rstrip('/')}{mark}{query}"

    def write_whole(self, path: str | os.PathLike[str], data: bytes) -> None:
        """Make ``data`` the blob's content in one commit: before it, the blob is as it was."""
        with BlobIO(
            os.fspath(path), "wb", credential=self.credential, validate_content=self.validate_content, retry=self.retry
        ) as f:
            f.write(data)
            pause("commit")

    def version(self, path: str | os.PathLike[str]) -> str | None:
        """The blob's ETag; ``None`` if it does not exist."""
        try:
            return self.blob_client(path).get_properties().etag
        except ResourceNotFoundError as error:
            if is_missing_container(error):
                raise
            return None

    def commit_if(self, path: str | os.PathLike[str], data: bytes, version: str | None) -> bool:
        """Make ``data`` the blob's content in one request if the blob still has ETag ``version``
        (``None``: if it still does not exist). ``False``, and the blob unchanged by us, if it had
        changed."""
        client = self.blob_client(path)
        try:
            client.put_blob(
                data,
                validate_content=self.validate_content,
                crc32=crc32(data),
                if_match=version,
                if_none_match="*" if version is None else None,
            )
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError) as error:
            refused = (
                isinstance(error, ResourceModifiedError)
                or (
                    isinstance(error, ResourceExistsError) and getattr(error, "error_code", None) == "BlobAlreadyExists"
                )
                or (isinstance(error, ResourceNotFoundError) and not is_missing_container(error))
            )
            if not refused:
                raise
            # The refusal may answer a retry whose first attempt was committed (and its answer
            # lost): then the blob holds exactly these bytes, which no other save writes.
            try:
                return client.read_all(block_size=self.block_size, max_concurrency=self.max_concurrency) == data
            except ResourceNotFoundError:
                return False
        return True

    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        """Copy through this process and delete the source; the destination is committed whole, as a
        rename would be. (``BlobStorageWriter`` renames nothing; torch's ``FileSystemBase`` asks for it.)"""
        source = self.blob_client(path)
        self.write_whole(new_path, source.read_all(block_size=self.block_size, max_concurrency=self.max_concurrency))
        source.delete()

    def mkdir(self, path: str | os.PathLike[str]) -> None:
        """Nothing to do: a blob prefix exists as soon as a blob is written under it."""

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        if not isinstance(checkpoint_id, str):
            return False
        try:
            _parse_location(checkpoint_id)
        except (TypeError, ValueError):
            return False
        return True

    def exists(self, path: str | os.PathLike[str]) -> bool:
        try:
            self.blob_client(path).get_properties()
        except ResourceNotFoundError:
            return False
        return True

    def rm_file(self, path: str | os.PathLike[str]) -> None:
        with _missing_blob_as_file_not_found(os.fspath(path)):
            self.blob_client(path).delete()

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        """The URLs (without any SAS token) of the blobs under the prefix ``path``."""
        client, prefix = self.container_client(path)
        listed = client.list_blobs(f"{prefix}/" if prefix else None)
        return [blob.client.display_url for blob in listed if not blob.is_directory]  # (ADLS Gen2 folders)

    def container_client(self, path: str | os.PathLike[str]) -> tuple[AzStorageTorchContainerClient, str]:
        """The client of the container that holds the prefix ``path``, and the prefix."""
        container, prefix = _parse_location(os.fspath(path))
        return AzStorageTorchContainerClient(container, self.credential, retry=self.retry), prefix

    def blob_client(self, path: str | os.PathLike[str]) -> AzStorageTorchBlobClient:
        return AzStorageTorchBlobClient.from_url(os.fspath(path), self.credential, retry=self.retry)


@dataclasses.dataclass(frozen=True)
class _SeenMetadata:
    """The checkpoint a save found when it started: the ETag of its ``.metadata``, ``None`` if none.
    The save commits only over that version."""

    etag: str | None


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _reported_at_exit(method: _Method) -> _Method:
    """A save's step whose failure is logged if the interpreter is exiting: the future of
    ``dcp.async_save`` that holds the error is then never looked at, and the exit code stays 0."""

    @functools.wraps(method)
    def reporting(self: BlobStorageWriter, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except BaseException as error:
            if interpreter_exiting():
                _LOGGER.error(
                    "The checkpoint save to %s failed while the interpreter was exiting, and nothing else will "
                    "report it: %s: %s. The checkpoint there loads as it was before this save (or as this save, "
                    "if its .metadata commit reached the service before the failure was seen).",
                    self.checkpoint_id,
                    type(error).__name__,
                    error,
                )
            raise

    return cast(_Method, reporting)


class _SaveAborted(RuntimeError):
    """Another shard file of the same save failed first; this one was not committed."""


class _ShardWriters:
    """The shard files that one ``write_data`` writes, on torch's writer threads: they fail together.

    The first failure of any of them is recorded, and from then on every other stops at its next
    write and none commits. A commit that had already begun is waited for, so once :meth:`fail`
    returns (and so before the save can raise) no commit of this save is under way or still to come.
    """

    def __init__(self, progress_hook: ProgressHook | None) -> None:
        self._state = threading.Condition()
        self._committing = 0
        self.failure: BaseException | None = None
        self.committed: list[TransferStats] = []  # of the shard files committed so far
        self._progress_hook = progress_hook
        self._written: list[int] = []  # bytes uploaded so far, by shard file (for the progress hook)
        self._reporting = threading.Lock()

    def file_hook(self) -> ProgressHook | None:
        """The progress hook of one more shard file: it reports the bytes of the whole save so far."""
        hook = self._progress_hook
        if hook is None:
            return None
        with self._reporting:
            index = len(self._written)
            self._written.append(0)

        def report(done: int, total: int | None) -> None:
            with self._reporting:  # one call at a time, so that the sums reach the hook in order
                self._written[index] = done
                hook(sum(self._written), None)  # the save's total is known once it is done

        return report

    def finished(self, stats: TransferStats) -> None:
        """A shard file of this save was committed; ``stats`` is what it cost."""
        with self._state:
            self.committed.append(stats)

    def check(self) -> None:
        """Raise if a shard file of this save has failed."""
        if self.failure is not None:
            raise _SaveAborted("Another shard file of this checkpoint save failed; this one was not committed.")

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Held while one shard file commits; raises instead if the save has failed."""
        with self._state:
            self.check()
            self._committing += 1
        try:
            yield
        finally:
            with self._state:
                self._committing -= 1
                self._state.notify_all()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (if it is the first) and wait until no shard file is committing."""
        with self._state:
            if self.failure is None:
                self.failure = error
            self._state.wait_for(lambda: self._committing == 0)


class _ShardFile(BlobIO):
    """A shard file's :class:`BlobIO`, owned by its save's :class:`_ShardWriters`: it stops writing as
    soon as another file of the save has failed, and commits only while none has."""

    def __init__(self, url: str, writers: _ShardWriters, **options: Any) -> None:
        super().__init__(url, "wb", **options)
        self._writers = writers

    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        self._writers.check()
        return super().write(data)

    def flush(self) -> None:
        """Only check the save: a shard file becomes visible at its commit, not before, and torch's
        flush after every item would cut a short block each time and wait for it."""
        self._writers.check()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self._writers.check()
            super().flush()  # the blocks are uploaded first, so that the commit is a single request
            with self._writers.committing():
                pause("commit")
                super().close()
            self._writers.finished(self.stats)
        except BaseException as error:
            if not self.closed:
                self.__exit__(type(error), error, error.__traceback__)  # stops the uploads, commits nothing
            raise


class BlobStorageWriter(FileSystemWriter):
    """Write a ``torch.distributed.checkpoint`` checkpoint under a blob prefix.

    ::

        import torch.distributed.checkpoint as dcp
        from azstoragetorch.integrations.dcp import BlobStorageWriter

        url = "https://<account>.blob.core.windows.net/<container>/checkpoints/step-1000"
        dcp.save(state_dict, storage_writer=BlobStorageWriter(url, thread_count=4))

    Every rank writes its shards as ``__<rank>_<token>_<n>.distcp``, ``thread_count`` files at once,
    each a :class:`~azstoragetorch.io.BlobIO` uploading blocks in parallel, ``max_concurrency``
    blocks in flight per rank in all. The token is new for every save, so a save never touches the
    files of the checkpoint it replaces. The coordinator commits ``.metadata`` last, in one request,
    once every shard file is committed, and only if ``.metadata`` is still the version it found when
    the save started; only then does it delete the shard files that the new ``.metadata`` does not
    use and that were there before its commit. So at every moment the prefix holds a loadable
    checkpoint: the old one until ``.metadata`` is replaced, the new one from then on. Of two saves
    to one URL at the same time (two jobs, or a restarted job while old ranks still run) that found
    the same checkpoint, the first to commit wins; the other deletes its own shard files and raises
    :class:`~azstoragetorch.exceptions.CheckpointConflictError`. When one shard file fails, the
    save's other shard files stop and commit nothing, and the save raises once none of them can
    still commit. ``dcp.async_save`` works too, with the thread and the process checkpointer (the
    process one pickles the writer into its saving process, so ``credential`` must pickle).

    Args:
        url: The checkpoint's location: ``https://<account>.blob.core.windows.net/<container>/<prefix>``
            (or ``http://127.0.0.1:10000/<account>/<container>/<prefix>`` for the Azurite emulator).
            A SAS token in the query string authorizes the requests. It may be left out and given to
            each save instead, ``dcp.save(..., checkpoint_id=url)``, which calls :meth:`reset`: one
            writer then serves any number of checkpoints.
        credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored when ``url`` carries a SAS token.
        thread_count: Shard files each rank writes at once (and so the number of files per rank).
        overwrite: Replace a checkpoint that already exists at ``url`` (the default, as for
            ``FileSystemWriter``); it stays loadable until the new ``.metadata`` replaces it.
            ``False`` refuses, with torch's error: a ``RuntimeError``, "Checkpoint already exists and
            self.overwrite=False.", which ``dcp.save`` raises inside a ``CheckpointException``.
        max_concurrency: Parallel block uploads per rank, shared by the ``thread_count`` files it
            writes at once. A rank holds about ``(max_concurrency + thread_count) * block_size`` bytes
            of blocks.
        block_size: Bytes per uploaded block.
        validate_content: Send an MD5 of every block for the service to check.
        retry: How throttled or briefly failing requests are retried: a
            :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
        single_file_per_rank: As for ``FileSystemWriter``: ``False`` writes one file per tensor.
        per_thread_copy_ahead: As for ``FileSystemWriter``: bytes copied from the GPU ahead of writing.
        cache_staged_state_dict: As for ``FileSystemWriter``, for ``dcp.async_save``.
        _extensions: As for ``FileSystemWriter`` (experimental in torch): stream transforms applied to
            every item as it is written, such as torch's ``ZStandard`` compression. ``.metadata``
            names them, and a reader given an ``_extension_registry`` that knows them (torch's
            default one knows ``ZStandard``) undoes them.
        serialization_format: As for ``FileSystemWriter``: ``SerializationFormat.TORCH_SAVE`` (the
            default) or ``SerializationFormat.SAFETENSORS`` (needs the ``safetensors`` package),
            written with the same bytes. Like ``FileSystemReader``, :class:`BlobStorageReader` loads
            ``TORCH_SAVE`` checkpoints.
        progress_hook: A callable ``hook(bytes_done, bytes_total)``, called during each save with the
            bytes this rank has uploaded so far (``bytes_total`` is ``None`` while it saves), from the
            transfer threads at most every 100 ms per shard file, and once more when the shard files
            are committed, with both numbers the rank's total. With ``dcp.async_save`` and the
            process checkpointer it is called in the saving process (and must pickle).

    Raises:
        ValueError: ``url`` is not a blob prefix URL.
        TypeError: ``credential`` or ``serialization_format`` is of an unsupported type.
        CheckpointConflictError: (From a save, inside DCP's ``CheckpointException``.) Another save
            committed the checkpoint after this one started; nothing of this one was committed.

    ``storage_meta()`` (which torch records in ``.metadata``) and :attr:`checkpoint_id` give the URL
    without its SAS token.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        credential: CredentialArgument = None,
        thread_count: int = 1,
        overwrite: bool = True,
        max_concurrency: int = 8,
        block_size: int = 8 * _MiB,
        validate_content: bool = False,
        retry: RetryOptions | None = None,
        single_file_per_rank: bool = True,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        _extensions: Sequence[StreamTransformExtension] | None = None,
        serialization_format: SerializationFormat = SerializationFormat.TORCH_SAVE,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        check_int("thread_count", thread_count)
        if not isinstance(serialization_format, SerializationFormat):
            raise TypeError(
                "serialization_format must be a torch.distributed.checkpoint.filesystem.SerializationFormat, "
                f"not {type(serialization_format).__name__}."
            )
        check_transfer_options(max_concurrency, block_size)
        # The rank's uploads in flight are shared by the files it writes at once, which bounds its
        # memory at (max_concurrency + thread_count) blocks whatever thread_count is.
        per_file = -(-max_concurrency // thread_count)
        files = _BlobFiles(
            credential,
            max_concurrency=per_file,
            block_size=block_size,
            validate_content=validate_content,
            retry=retry,
            progress_hook=progress_hook,
        )
        checked_url = _initial_location(files, url)
        self._stats: TransferStats | None = None
        self._seen_metadata: _SeenMetadata | None = None  # of the save under way, from its start to its commit
        super().__init__(
            checked_url,
            single_file_per_rank=single_file_per_rank,
            # A blob is durable once committed; torch's fsync fallback would sync the local disks.
            sync_files=False,
            thread_count=thread_count,
            per_thread_copy_ahead=per_thread_copy_ahead,
            cache_staged_state_dict=cache_staged_state_dict,
            overwrite=overwrite,
            _extensions=_extensions,
            serialization_format=serialization_format,
        )
        self.fs = files  # type: ignore[assignment]  # torch annotates its own FileSystem; any FileSystemBase works
        self.path = checked_url

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's URL without any SAS token (torch records it in ``.metadata`` and its logs)."""
        return redact_url(os.fspath(self.path))

    @property
    def stats(self) -> TransferStats | None:
        """What this rank's last successful save through this writer cost: the sums over its shard
        files (bytes, requests, retries, the seconds their writes held up torch's writer threads),
        over the wall seconds of writing them. ``first_byte_seconds`` is ``None``; so is the whole
        property before the first save, and after ``dcp.async_save`` with the process checkpointer
        (which saves through a copy of the writer)."""
        return self._stats

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Point the writer at ``checkpoint_id`` (a URL as for the constructor) for the next save, as
        ``dcp.save(..., checkpoint_id=url)`` does; ``None`` keeps the URL. Either way the next save
        gets a new ``save_id``."""
        super().reset(checkpoint_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        _require_location(self.path, "BlobStorageWriter", "dcp.save")
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _BlobFiles.validate_checkpoint_id(checkpoint_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # Replaces FileSystemWriter's version, whose warning about an overwrite would print the URL
        # with its SAS token; here an overwrite needs no warning, since the existing checkpoint stays
        # untouched until this save's .metadata replaces it (finish). A refusal is torch's, word for
        # word, so that code written against FileSystemWriter recognises it.
        if not self.overwrite and self._metadata_exists():
            raise RuntimeError(f"Checkpoint already exists and {self.overwrite=}.")
        if self.rank is not None and not self.use_collectives:
            plan = dataclasses.replace(plan, storage_data=_StoragePrefix(_shard_prefix(self.rank, _save_token())))
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # FileSystemWriter's, with one token for the whole save in every rank's file names. Run by
        # whoever commits (the coordinator, or every rank without collectives) before any shard is
        # written: the .metadata seen now is the version that finish may replace.
        seen = cast(_BlobFiles, self.fs).version(self._get_metadata_path(self._metadata_rank()))
        # overwrite=False: only a checkpoint that still does not exist at the commit.
        self._seen_metadata = _SeenMetadata(seen if self.overwrite else None)
        pause("dcp.start")
        token = _save_token()
        return [
            dataclasses.replace(plan, storage_data=_StoragePrefix(_shard_prefix(rank, token)))
            if plan.storage_data is None
            else plan
            for rank, plan in enumerate(plans)
        ]

    @_reported_at_exit
    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit ``.metadata`` in one request, if no other save did since this one started; then
        delete the shard files that were there before the commit and that it does not use (the
        replaced checkpoint's, and those left by failed saves).

        torch's own ``finish`` deletes the old ``.metadata`` and then renames a temporary file over
        it; between the two no checkpoint would be loadable. (Without collectives, every rank does
        this for its ``__<rank>.metadata`` and its own shard files.)

        Raises:
            CheckpointConflictError: Another save committed ``.metadata`` after this save started.
                This save's shard files are deleted; the other save's checkpoint stays.
        """
        seen, self._seen_metadata = self._seen_metadata, None
        if seen is None:
            raise RuntimeError("BlobStorageWriter.finish was called without prepare_global_plan for this save.")
        version = getattr(_torch_filesystem, "CURRENT_DCP_VERSION", None)  # recorded by newer torch only
        if version is not None:
            metadata.version = version
        metadata.storage_data = {result.index: result.storage_data for writes in results for result in writes}
        metadata.storage_meta = self.storage_meta()
        rank = self._metadata_rank()
        files = cast(_BlobFiles, self.fs)
        ours = {info.relative_path for info in metadata.storage_data.values()}
        # Listed before the commit: a save whose shard files are listed here started (and saw
        # .metadata) before this commit, so it can no longer commit after it, and none of its
        # files can ever be in use. A save that starts after this commit writes files that this
        # listing does not hold, and that this save leaves alone even if it deletes later.
        existing = self._shard_files(rank)
        pause("dcp.commit")
        if not files.commit_if(self._get_metadata_path(rank), pickle.dumps(metadata), seen.etag):
            self._delete_shard_files(sorted(ours))  # named by this save's token: in no other save's use
            raise CheckpointConflictError(self.checkpoint_id)
        unused = sorted(set(existing) - ours)
        if unused and rank is not None and self._has_global_metadata():
            # A save with collectives left a .metadata here, which DCP loads before any
            # __<rank>.metadata; these files may be its shards, and its names are not read here.
            _LOGGER.warning(
                "Kept %d shard files under %s: a checkpoint saved with collectives (.metadata) is there too, "
                "and a load reads it first.",
                len(unused),
                self.checkpoint_id,
            )
            return
        self._delete_shard_files(unused)

    def _has_global_metadata(self) -> bool:
        """Whether the ``.metadata`` of a save with collectives is under the checkpoint's URL (when
        in doubt, yes: a leftover only costs space)."""
        try:
            return cast(_BlobFiles, self.fs).version(self._get_metadata_path(None)) is not None
        except AzureError:
            return True

    def _metadata_rank(self) -> int | None:
        """The rank in the name of the ``.metadata`` this save commits: ``None`` with collectives."""
        return None if self.use_collectives else self.rank

    def _shard_files(self, rank: int | None) -> list[str]:
        """The names (under the checkpoint's URL) of its shard files: of ``rank``, or of every rank."""
        client, prefix = cast(_BlobFiles, self.fs).container_client(self.path)
        # Without collectives every rank runs this: each lists only its own shard files, so that
        # the listing a rank sends does not grow with the number of ranks.
        listed = (f"{prefix}/" if prefix else "") + ("" if rank is None else f"__{rank}_")
        found = []
        try:
            for blob in client.list_blobs(listed or None):
                name = blob.client.blob_url.blob_name[len(prefix) + 1 if prefix else 0 :]
                shard = _SHARD_FILE.fullmatch(name)
                if shard and (rank is None or int(shard["rank"]) == rank):
                    found.append(name)
        except AzureError as error:  # the save can still commit; leftovers only cost space
            _LOGGER.warning("Could not list the shard files under %s: %s", self.checkpoint_id, error)
            return []
        return found

    def _delete_shard_files(self, names: list[str]) -> None:
        """Delete these shard files, those already gone aside."""
        files = cast(_BlobFiles, self.fs)
        failed = []
        for name in names:
            pause("dcp.cleanup")
            try:
                files.blob_client(files.concat_path(self.path, name)).delete()
            except ResourceNotFoundError:
                pass  # deleted by the save that replaced this one's checkpoint, or by hand
            except AzureError as error:  # the checkpoint is complete; leftovers only cost space
                failed.append(f"{name} ({error})")
        if failed:
            _LOGGER.warning("Could not remove unused shard files under %s: %s", self.checkpoint_id, "; ".join(failed))

    @_reported_at_exit
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        files = cast(_BlobFiles, self.fs)
        started = time.perf_counter()
        writers = files.shard_writers = _ShardWriters(files.progress_hook)
        try:
            future = super().write_data(plan, planner)
        except BaseException as error:  # not from a shard file (create_stream keeps those): stop them all
            writers.fail(error)
            raise
        if writers.failure is not None:
            raise writers.failure
        # A writer thread that died outside a shard file leaves its items unwritten; without this
        # the metadata would be written without them.
        written = {result.index for result in future.value()}
        missing = [item.index.fqn for item in plan.items if item.index not in written]
        if missing:
            raise RuntimeError(f"Writing the checkpoint's shards did not finish; not written: {', '.join(missing[:5])}")
        self._stats = sum_stats(writers.committed, seconds=time.perf_counter() - started)
        if files.progress_hook is not None:
            files.progress_hook(self._stats.bytes, self._stats.bytes)
        return future


class BlobStorageReader(FileSystemReader):
    """Read a ``torch.distributed.checkpoint`` checkpoint from a blob prefix.

    ::

        import torch.distributed.checkpoint as dcp
        from azstoragetorch.integrations.dcp import BlobStorageReader

        dcp.load(state_dict, storage_reader=BlobStorageReader(url))

    Reads fetch only the bytes the load plan needs: the items wanted from each shard file are sorted
    by offset and neighbouring ones (less than 256 KiB apart) are fetched together, in groups of up
    to half of ``max_concurrency * block_size``, each split into ranged requests of ``block_size``;
    groups of different shard files are fetched side by side, ``max_concurrency * block_size`` bytes
    at a time. A partial load (a subset of the keys) fetches only its own ranges. Every
    shard file is pinned to the version first seen, so a checkpoint overwritten during a load raises
    :class:`~azstoragetorch.exceptions.BlobModifiedDuringReadError` instead of mixing versions.

    Args:
        url: The checkpoint's location, as for :class:`BlobStorageWriter`; it may be left out and given
            to each load instead, ``dcp.load(..., checkpoint_id=url)``.
        credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored when ``url`` carries a SAS token.
        max_concurrency: Ranged requests in flight, with ``block_size`` (of 8 MiB) bytes each. A load
            holds about ``1.5 * max_concurrency * block_size`` bytes of fetched data.
        block_size: Bytes per ranged request.
        validate_content: Check every range against the MD5 the service computes for it (ranges are
            then at most 4 MiB); about 1.5 CPU seconds per GB.
        verify_checksum: Check every shard file that the load reads whole, and ``.metadata``,
            against the CRC-32 its writer recorded: a file whose bytes changed makes the load raise
            :class:`~azstoragetorch.exceptions.ChecksumMismatchError` (wrapped in torch's
            ``CheckpointException``) naming it, after the items were copied into the state dict,
            whose values must then not be used. On by default; about 0.1 CPU seconds per GB. A
            partial load leaves files it reads in part unchecked; files without a recorded CRC-32
            (written by another tool) are read unverified, which :attr:`stats`
            (``unverified_blobs``) and a DEBUG log line tell. ``False`` checks nothing.
        retry: How throttled or briefly failing requests are retried: a
            :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
        _extension_registry: As for ``FileSystemReader`` (experimental in torch): the stream
            transforms a checkpoint's items may have been written with; ``None`` for torch's
            default registry, which knows ``ZStandard``. Loads then fetch the wanted items' stored
            (for example compressed) bytes, each item whole, as ``.metadata`` records them, and
            undo the transforms in memory, one item at a time.
        progress_hook: A callable ``hook(bytes_done, bytes_total)``, called during each load with the
            bytes this rank has fetched so far and the bytes its load plan needs (the wanted ranges,
            with the gaps that coalescing fetches), from the transfer threads at most every 100 ms
            and once at the end, when the two are equal.

    Raises:
        ValueError: ``url`` is not a blob prefix URL.
        TypeError: ``credential`` is of an unsupported type.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        credential: CredentialArgument = None,
        max_concurrency: int = 8,
        block_size: int = 8 * _MiB,
        validate_content: bool = False,
        verify_checksum: bool = True,
        retry: RetryOptions | None = None,
        _extension_registry: ExtensionRegistry | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        files = _BlobFiles(
            credential,
            max_concurrency=max_concurrency,
            block_size=block_size,
            validate_content=validate_content,
            verify_checksum=verify_checksum,
            retry=retry,
            progress_hook=progress_hook,
        )
        checked_url = _initial_location(files, url)
        self._stats: TransferStats | None = None
        super().__init__(checked_url, _extension_registry=_extension_registry)
        self.fs = files  # type: ignore[assignment]  # torch annotates its own FileSystem; any FileSystemBase works
        self.path = checked_url

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's URL without any SAS token."""
        return redact_url(os.fspath(self.path))

    @property
    def stats(self) -> TransferStats | None:
        """What this rank's last successful load through this reader cost: the bytes, requests and
        retries of reading its shard files, over the wall seconds of reading them (``.metadata``
        aside); ``None`` before the first load."""
        return self._stats

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Point the reader at ``checkpoint_id`` (a URL as for the constructor) for the next load, as
        ``dcp.load(..., checkpoint_id=url)`` does; ``None`` keeps the URL. What the last load read
        is forgotten either way."""
        super().reset(checkpoint_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _BlobFiles.validate_checkpoint_id(checkpoint_id)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        _require_location(self.path, "BlobStorageReader", "dcp.load")
        metadata = super().read_metadata(*args, **kwargs)
        if metadata.storage_meta is not None and isinstance(metadata.storage_meta.checkpoint_id, str):
            metadata.storage_meta.checkpoint_id = redact_url(metadata.storage_meta.checkpoint_id)
        return metadata

    def verify(self) -> CheckpointVerification:
        """Check every file of the checkpoint against the CRC-32 its writer recorded, without loading it.

        Reads ``.metadata`` and then every shard file it names, whole (``max_concurrency`` ranged
        requests of ``block_size`` in flight, the reader's memory bound), and compares each file's
        CRC-32 with the one recorded when it was committed. Nothing is raised for a bad file: the
        result names every file that does not match, is missing, or has no recorded CRC-32 (written
        by another tool, such as ``FileSystemWriter`` and a copy). Only checkpoints saved with
        collectives (one ``.metadata``) are covered.

        Raises:
            FileNotFoundError: There is no ``.metadata`` at the URL.
        """
        if not os.fspath(self.path):
            raise ValueError(
                "BlobStorageReader has no checkpoint URL: pass it to BlobStorageReader(url) or reset(url)."
            )
        files = cast(_BlobFiles, self.fs)
        checking = _BlobFiles(
            files.credential,
            max_concurrency=files.max_concurrency,
            block_size=files.block_size,
            validate_content=files.validate_content,
            verify_checksum=True,
            retry=files.retry,
        )
        metadata_name = ".metadata"
        with checking.create_stream(self._get_metadata_path(), "rb") as stream:
            metadata = cast(Metadata, pickle.load(stream))
        names = [metadata_name, *sorted({info.relative_path for info in metadata.storage_data.values()})]
        fetcher = _SpanFetcher(checking, os.fspath(self.path))
        missing, unchecked, spans = [], [], []
        max_span = max(files.block_size, files.max_concurrency * files.block_size // 2)
        for name in names:
            try:
                properties = fetcher.pinned_version(name)
            except FileNotFoundError:
                missing.append(name)
                continue
            if properties.crc32 is None:
                unchecked.append(name)
                continue
            spans += [
                _Span(name, start, min(start + max_span, properties.size), [])
                for start in range(0, properties.size, max_span)
            ]
        for _ in fetcher.fetch_in_order(spans):
            pass  # the bytes only feed the checksums
        checked = [name for name in names if name not in missing and name not in unchecked]
        return CheckpointVerification(
            checkpoint_id=self.checkpoint_id,
            checked=checked,
            mismatched=[name for name in checked if fetcher.mismatch(name) is not None],
            missing=missing,
            unchecked=unchecked,
        )

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Not FileSystemReader's read loop, which opens each shard file as a stream through the
        # FileSystemBase seam and reads item by item: here the plan's items of all files are
        # coalesced into ranged fetches that run in parallel, and each item is loaded from memory
        # (_load_item). The seam still serves .metadata (read_metadata) and everything else.
        files = cast(_BlobFiles, self.fs)
        window = files.max_concurrency * files.block_size
        spans = _coalesce(plan.items, self.storage_data, max_span=max(files.block_size, window // 2))
        recorder = Recorder(files.progress_hook, total=sum(span.end - span.start for span in spans))
        fetcher = _SpanFetcher(files, os.fspath(self.path), recorder)
        for span, data in fetcher.fetch_in_order(spans):
            for request in span.requests:
                info: _StorageInfo = self.storage_data[request.storage_index]
                start = info.offset - span.start
                self._load_item(request, info, data[start : start + info.length], planner)
        fetcher.verify_whole_files()
        recorder.end()
        self._stats = recorder.snapshot()
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _load_item(self, request: ReadItem, info: _StorageInfo, data: memoryview, planner: LoadPlanner) -> None:
        """What torch's ``FileSystemReader`` does with one item's bytes, from memory instead of a file."""
        raw = cast(IO[bytes], _MemoryFile(data))
        stream = self.transforms.transform_load_stream(request, info.transform_descriptors or (), raw)
        if request.type == LoadItemType.BYTE_IO:
            planner.load_bytes(request, io.BytesIO(stream.read(-1)))
            return
        seekable = stream if stream.seekable() else io.BytesIO(stream.read(-1))
        tensor = torch.load(seekable, map_location="cpu", weights_only=True)
        tensor = _narrow(tensor, request.storage_offsets, request.lengths)
        target = planner.resolve_tensor(request).detach()
        if target.size() != tensor.size():
            raise AssertionError(f"req {request.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
        _copy_on_this_thread(target, tensor)
        planner.commit_tensor(request, target)


@dataclasses.dataclass(frozen=True)
class CheckpointVerification:
    """What :meth:`BlobStorageReader.verify` found. File names are relative to the checkpoint's URL."""

    checkpoint_id: str
    """The checkpoint's URL, without any SAS token."""
    checked: list[str]
    """The files read whole and compared with their recorded CRC-32 (``.metadata`` first)."""
    mismatched: list[str]
    """Those of ``checked`` whose CRC-32 is not the recorded one: their bytes changed after the commit."""
    missing: list[str]
    """Files ``.metadata`` names that do not exist."""
    unchecked: list[str]
    """Files without a recorded CRC-32 (not written by azstoragetorch), which could not be checked."""

    @property
    def ok(self) -> bool:
        """Every file exists and matches its recorded CRC-32 (files without one aside)."""
        return not self.mismatched and not self.missing


# -- loading: which bytes, in which requests ------------------------------------------------------------


@dataclasses.dataclass
class _Span:
    """One contiguous byte range of one shard file, covering the items in ``requests``."""

    relative_path: str
    start: int
    end: int
    requests: list[ReadItem]


def _coalesce(items: list[ReadItem], storage_data: dict[Any, _StorageInfo], *, max_span: int) -> list[_Span]:
    """Group the wanted items into spans: per file, by offset, neighbours within ``_COALESCE_GAP``
    together, no span above ``max_span`` unless one item is larger. Spans of different files are
    interleaved, so that files are read side by side."""
    by_file: dict[str, list[ReadItem]] = collections.defaultdict(list)
    for item in items:
        by_file[storage_data[item.storage_index].relative_path].append(item)
    spans_by_file: list[list[_Span]] = []
    for relative_path, file_items in sorted(by_file.items()):
        file_items.sort(key=lambda item: storage_data[item.storage_index].offset)
        spans: list[_Span] = []
        for item in file_items:
            info = storage_data[item.storage_index]
            item_end = info.offset + info.length
            current = spans[-1] if spans else None
            if (
                current is not None
                and info.offset <= current.end + _COALESCE_GAP
                and max(current.end, item_end) - current.start <= max_span
            ):
                current.end = max(current.end, item_end)
                current.requests.append(item)
            else:
                spans.append(_Span(relative_path, info.offset, item_end, [item]))
        spans_by_file.append(spans)
    interleaved = []
    for round_ in range(max((len(spans) for spans in spans_by_file), default=0)):
        interleaved += [spans[round_] for spans in spans_by_file if round_ < len(spans)]
    return interleaved


class _ByteBudget:
    """The bytes of spans a load holds at once: being fetched, fetched and waiting, or being consumed.

    It only answers whether one more span fits; which span frees room, and when, is the order of
    hand-over, decided by :meth:`_SpanFetcher.fetch_in_order`. Only the consuming thread uses it
    (the fetching threads never touch it), so it needs no lock.
    """

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._held = 0

    def admits(self, size: int) -> bool:
        """Whether a span of ``size`` bytes fits beside those held. (A span larger than the limit
        never fits: the caller starts it once every span before it has been handed over.)"""
        return self._held + size <= self._limit

    def take(self, size: int) -> None:
        self._held += size

    def give_back(self, size: int) -> None:
        self._held -= size


class _SpanFetcher:
    """Downloads spans in parallel, handing them back in order while holding a bounded amount of memory.

    Spans run on threads of their own: a span waits for its ranged requests, which run on the shared
    transfer threads, and waiting for work queued behind oneself in one pool could deadlock it.
    """

    def __init__(self, files: _BlobFiles, checkpoint_url: str, recorder: Recorder | None = None) -> None:
        self._files = files
        self._checkpoint_url = checkpoint_url
        self._recorder = recorder  # counts the requests and bytes of a load
        self._budget = files.max_concurrency * files.block_size  # bytes being fetched, beside the span in use
        self._lock = threading.Lock()
        self._clients: dict[str, AzStorageTorchBlobClient] = {}
        # Each shard file's properties, from the first answer about it: every range read is pinned to it.
        self._versions: dict[str, concurrent.futures.Future[BlobProperties]] = {}
        self._checksums: dict[str, PieceChecksums] = {}

    def fetch_in_order(self, spans: list[_Span]) -> Iterator[tuple[_Span, memoryview]]:
        """Each span with its bytes, in the order given; the bytes are valid until the next span is asked for.

        Two jobs, kept apart: the :class:`_ByteBudget` says whether the next span may start (memory),
        and this keeps the started spans in a queue and hands them over oldest first (order). Handing
        over is the only way bytes go back to the budget, so a span waits only for spans before it.
        """
        budget = _ByteBudget(self._budget)
        started: collections.deque[tuple[_Span, concurrent.futures.Future[Lease]]] = collections.deque()
        workers = max(1, min(len(spans), 2 * self._files.max_concurrency))
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="azstoragetorch-dcp") as pool:
            try:
                for span in spans:
                    while started and not budget.admits(span.end - span.start):
                        yield from self._hand_over(started.popleft(), budget)
                    budget.take(span.end - span.start)
                    started.append((span, pool.submit(self._fetch, span)))
                while started:
                    yield from self._hand_over(started.popleft(), budget)
            finally:
                # Spans fetched but never handed over: their leases are ours to release, once fetched.
                for _, future in started:
                    future.cancel()
                    future.add_done_callback(_release_fetched)

    @staticmethod
    def _hand_over(
        entry: tuple[_Span, concurrent.futures.Future[Lease]], budget: _ByteBudget
    ) -> Generator[tuple[_Span, memoryview], None, None]:
        """Give the consumer one span's bytes, then its buffer back to the pool and its bytes to ``budget``."""
        span, future = entry
        lease = future.result()
        try:
            yield span, lease.view(span.end - span.start)
        finally:
            lease.release()  # the consumer is done with it (it asked for the next span, or stopped)
        budget.give_back(span.end - span.start)

    def verify_whole_files(self) -> None:
        """Check every shard file read whole against the CRC-32 its writer recorded, and count the
        files checked and those that had no CRC-32 to check."""
        if not self._files.verify_checksum:
            return
        for relative_path in sorted(self._versions):
            client = self._client(relative_path)
            if self._version(relative_path)[0].result().crc32 is None:
                add_checksum_outcome(self._recorder, verified=False)
                _LOGGER.debug("%s has no recorded CRC-32: read unverified", client.display_url)
                continue
            checksums = self._checksums.get(relative_path)
            if checksums is None or checksums.whole() is None:
                _LOGGER.debug("%s was read in part: its CRC-32 was not checked", client.display_url)
                continue
            found = self.mismatch(relative_path)
            if found is not None:
                client, expected, actual = found
                raise ChecksumMismatchError(client.display_url, "CRC-32 of the shard file", expected, actual)
            add_checksum_outcome(self._recorder, verified=True)

    def mismatch(self, relative_path: str) -> tuple[AzStorageTorchBlobClient, str, str] | None:
        """For a file read whole whose CRC-32 differs from the recorded one: its client, the recorded
        and the actual CRC-32 (hex). ``None`` otherwise, also for a file not read whole, or empty."""
        checksums = self._checksums.get(relative_path)
        client, properties = self._client(relative_path), self._version(relative_path)[0].result()
        actual = None if checksums is None else checksums.whole()
        if actual is not None and properties.crc32 is not None and actual != properties.crc32:
            return client, f"{properties.crc32:08x}", f"{actual:08x}"
        return None

    def _fetch(self, span: _Span) -> Lease:
        client = self._client(span.relative_path)
        version, first = self._version(span.relative_path)
        length = span.end - span.start
        options: dict[str, Any] = {
            "block_size": self._files.block_size,
            "max_concurrency": self._files.max_concurrency,
            "validate_content": self._files.validate_content,
        }
        if first:
            # The first range of a file pins its version: the answer's headers carry the ETag, size
            # and recorded CRC-32 that a properties request would, and every other range of the file
            # (this span's and the others') is then read with If-Match on that ETag. Its CRC-32 is
            # taken before the answer tells whether one was recorded to compare it with.
            checksums = self._checksums_of(span.relative_path, None)

            def answered(properties: BlobProperties) -> None:
                if checksums is not None:
                    checksums.size = properties.size
                version.set_result(properties)

            try:
                with _missing_blob_as_file_not_found(client.display_url):
                    lease = client.download_range(
                        span.start, length, etag=None, on_response=answered, checksums=checksums, **options
                    )
            except BaseException as error:
                if not version.done():  # no answer came: the spans waiting for one fail alike
                    version.set_exception(error)
                raise
        else:
            properties = version.result()  # the first span of the file is running: it sets it
            recorded = properties.crc32 is not None
            checksums = self._checksums_of(span.relative_path, properties.size) if recorded else None
            lease = client.download_range(span.start, length, etag=properties.etag, checksums=checksums, **options)
        return lease

    def _checksums_of(self, relative_path: str, size: int | None) -> PieceChecksums | None:
        """Where the CRC-32s of the file's ranges go, while the load verifies what it reads (``size``:
        the file's, if known yet)."""
        if not self._files.verify_checksum:
            return None
        with self._lock:
            checksums = self._checksums.setdefault(relative_path, PieceChecksums())
        if size is not None:
            checksums.size = size
        return checksums

    def pinned_version(self, relative_path: str) -> BlobProperties:
        """The shard file's properties, from a properties request if no range of it was read yet;
        the ranges read after are pinned to it. (``verify`` needs each file's size before it reads.)"""
        version, first = self._version(relative_path)
        if first:
            client = self._client(relative_path)
            try:
                with _missing_blob_as_file_not_found(client.display_url):
                    version.set_result(client.get_properties())
            except BaseException as error:
                version.set_exception(error)
        return version.result()

    def _version(self, relative_path: str) -> tuple[concurrent.futures.Future[BlobProperties], bool]:
        """The future of the shard file's pinned properties, and whether the caller is the first to
        ask (and so must set it; the others wait for it)."""
        with self._lock:
            future = self._versions.get(relative_path)
            if future is not None:
                return future, False
            future = self._versions[relative_path] = concurrent.futures.Future()
            return future, True

    def _client(self, relative_path: str) -> AzStorageTorchBlobClient:
        with self._lock:
            client = self._clients.get(relative_path)
            if client is None:
                url = self._files.concat_path(self._checkpoint_url, relative_path)
                client = self._clients[relative_path] = self._files.blob_client(url)
                client.recorder = self._recorder
            return client


def _release_fetched(future: concurrent.futures.Future[Lease]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result().release()


class _MemoryFile(io.RawIOBase):
    """A read-only, seekable file over a memoryview, without copying it (``io.BytesIO`` would)."""

    def __init__(self, data: memoryview) -> None:
        super().__init__()
        self._data = data
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self._data)}[whence]
        self._position = max(0, base + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        chunk = self._data[self._position : self._position + len(buffer)]
        memoryview(buffer).cast("B")[: len(chunk)] = chunk
        self._position += len(chunk)
        return len(chunk)


# -- helpers ----------------------------------------------------------------------------------------


def _narrow(tensor: torch.Tensor, offsets: Sequence[int], lengths: Sequence[int]) -> torch.Tensor:
    """The part of a stored tensor that a load asked for: ``lengths`` elements from ``offsets``, per dimension.

    What torch's ``FileSystemReader`` does with its private ``narrow_tensor_by_index``, with the public
    ``Tensor.narrow``: a view, no copy; a dimension read whole is left alone.
    """
    for dim, (offset, length) in enumerate(zip(offsets, lengths, strict=True)):
        if length < tensor.size(dim):
            tensor = tensor.narrow(dim, offset, length)
    return tensor


def _copy_on_this_thread(target: torch.Tensor, source: torch.Tensor) -> None:
    """``target.copy_(source)`` as one memory copy on the calling thread, where the layouts allow it.

    ``copy_`` splits a large copy across torch's OpenMP threads, which then spin for a while waiting
    for the next parallel region. A load makes one such copy per item, between fetches that need the
    cores: the spinning took about half of a load's CPU time on two cores, and slowed the transfers
    (and, on the same machine, the service) down. ``ctypes.memmove`` also lets go of the GIL.
    """
    plain = all(
        tensor.device.type == "cpu"
        and tensor.layout == torch.strided
        and tensor.is_contiguous()
        and not tensor.is_conj()
        and not tensor.is_neg()
        and not tensor.is_quantized
        for tensor in (target, source)
    )
    if plain and target.dtype == source.dtype and target.size() == source.size():
        ctypes.memmove(target.data_ptr(), source.data_ptr(), source.nbytes)
    else:
        target.copy_(source)


def _save_token() -> str:
    """A new save's token for its shard file names: 48 random bits, so that the chance of a save
    picking the names of the checkpoint it replaces (and overwriting its files) is 2**-48."""
    return uuid.uuid4().hex[:12]


def _shard_prefix(rank: int, token: str) -> str:
    """What torch's writer puts before ``<n>.distcp`` in the names of a rank's shard files."""
    return f"__{rank}_{token}_"


def _initial_location(files: _BlobFiles, url: str | None) -> str:
    """The constructor's checkpoint URL, checked; ``""`` when there is none yet (``dcp.save`` and
    ``dcp.load`` then give it as ``checkpoint_id``)."""
    return "" if url is None else files.init_path(url)


def _require_location(path: str | os.PathLike[str], owner: str, call: str) -> None:
    if not os.fspath(path):
        raise ValueError(
            f"{owner} has no checkpoint URL: pass it to {owner}(url) or as {call}(..., checkpoint_id=url)."
        )


def _parse_location(url: str) -> tuple[ContainerUrl, str]:
    """The container and blob prefix of a checkpoint URL; ``ValueError`` for anything else."""
    if not isinstance(url, str):
        raise TypeError(f"A checkpoint location must be a blob URL string, not {type(url).__name__}.")
    if "://" not in url or url.split("://", 1)[0].lower() not in ("http", "https"):
        raise ValueError(
            f"{redact_url(url)!r} is not a blob prefix URL: expected "
            "https://<account>.blob.core.windows.net/<container>/<prefix> "
            "(or http://127.0.0.1:10000/<account>/<container>/<prefix> for Azurite)."
        )
    container, prefix = ContainerUrl.parse_with_prefix(url)
    return container, prefix.strip("/")


@contextlib.contextmanager
def _missing_blob_as_file_not_found(url: str) -> Iterator[None]:
    try:
        yield
    except ResourceNotFoundError as error:
        what = "container" if is_missing_container(error) else "blob"
        raise FileNotFoundError(
            errno.ENOENT, f"No such {what} (is a checkpoint saved here?)", redact_url(url)
        ) from None
