"""The writer: :class:`BlobStorageWriter`, torch's ``FileSystemWriter`` over :class:`_BlobFiles`.

Two things differ from ``FileSystemWriter`` on purpose, so that an overwrite is safe at every
instant: shard file names carry a token of their save, so a save never touches a file that the
checkpoint it replaces still uses, and ``.metadata`` is committed last, in one request, and only
over the version the save found when it started.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import pickle
import re
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar, cast

from azure.core.exceptions import AzureError, ResourceNotFoundError
from torch.distributed.checkpoint import filesystem as _torch_filesystem
from torch.distributed.checkpoint.filesystem import (
    FileSystemWriter,
    SerializationFormat,
    _StoragePrefix,  # private: listed in azstoragetorch/_compat.py, as is every such name here
)
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future
from typing_extensions import Self, override

from azstoragetorch._client import (
    CredentialArgument,
    ProgressHook,
    TransferStats,
    interpreter_exiting,
    pause,
    sum_stats,
)
from azstoragetorch._options import TransferOptions, check_int
from azstoragetorch.exceptions import CheckpointConflictError
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._locations import _AtBlobLocation, _initial_location, _require_location
from azstoragetorch.integrations.dcp._shard_files import _ShardWriters
from azstoragetorch.retry import RetryOptions

if TYPE_CHECKING:
    # A private torch name needed only for an annotation: a release that moves it cannot break an import.
    from torch.distributed.checkpoint._extension import StreamTransformExtension

_MiB = 1024 * 1024
# Shard files: __<rank>_<token>_<n>.distcp as BlobStorageWriter names them (the token is its save's),
# and __<rank>_<n>.distcp as FileSystemWriter names them, so that a save over a checkpoint written
# without tokens (by FileSystemWriter and a copy, say) removes its shard files too.
_SHARD_FILE = re.compile(r"__(?P<rank>\d+)_(?:[0-9a-f]{12}_)?\d+\.distcp")
_LOGGER = logging.getLogger("azstoragetorch")


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


# torch annotates ``fs`` as its own FileSystem; any FileSystemBase works, and ours is _BlobFiles.
class BlobStorageWriter(_AtBlobLocation, FileSystemWriter):  # type: ignore[misc]
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
        options = TransferOptions.from_keywords(locals())
        self._set_up(
            url,
            credential,
            options,
            thread_count=thread_count,
            torch_settings={
                "single_file_per_rank": single_file_per_rank,
                "per_thread_copy_ahead": per_thread_copy_ahead,
                "cache_staged_state_dict": cache_staged_state_dict,
                "overwrite": overwrite,
                "_extensions": _extensions,
                "serialization_format": serialization_format,
            },
        )

    @classmethod
    def _from_options(cls, url: str, *, credential: CredentialArgument, options: TransferOptions) -> Self:
        """A writer with ``options`` already checked, one shard file per rank and torch's defaults
        for the rest: azstoragetorch's own way in (the Lightning plugin's), not the user's."""
        writer = cls.__new__(cls)
        writer._set_up(url, credential, options, thread_count=1, torch_settings={})
        return writer

    def _set_up(
        self,
        url: str | None,
        credential: CredentialArgument,
        options: TransferOptions,
        *,
        thread_count: int,
        torch_settings: dict[str, Any],
    ) -> None:
        # The rank's uploads in flight are shared by the files it writes at once, which bounds its
        # memory at (max_concurrency + thread_count) blocks whatever thread_count is.
        per_file = -(-options.max_concurrency // thread_count)
        # The writer verifies no checksum of what it reads; BlobStorageReader does.
        files = _BlobFiles(credential, dataclasses.replace(options, max_concurrency=per_file, verify_checksum=False))
        checked_url = _initial_location(files, url)
        self._stats: TransferStats | None = None
        self._seen_metadata: _SeenMetadata | None = None  # of the save under way, from its start to its commit
        super().__init__(
            checked_url,
            # A blob is durable once committed; torch's fsync fallback would sync the local disks.
            sync_files=False,
            thread_count=thread_count,
            **torch_settings,
        )
        self._use_blob_files(files, checked_url)

    @property
    def stats(self) -> TransferStats | None:
        """What this rank's last successful save through this writer cost: the sums over its shard
        files (bytes, requests, retries, the seconds their writes held up torch's writer threads),
        over the wall seconds of writing them. ``first_byte_seconds`` is ``None``; so is the whole
        property before the first save, and after ``dcp.async_save`` with the process checkpointer
        (which saves through a copy of the writer)."""
        return self._stats

    @override
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Point the writer at ``checkpoint_id`` (a URL as for the constructor) for the next save, as
        ``dcp.save(..., checkpoint_id=url)`` does; ``None`` keeps the URL. Either way the next save
        gets a new ``save_id``."""
        super().reset(checkpoint_id)

    @override
    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        _require_location(self.path, "BlobStorageWriter", "dcp.save")
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)

    @classmethod
    @override
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _BlobFiles.validate_checkpoint_id(checkpoint_id)

    @override
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

    @override
    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        # FileSystemWriter's, with one token for the whole save in every rank's file names. Run by
        # whoever commits (the coordinator, or every rank without collectives) before any shard is
        # written: the .metadata seen now is the version that finish may replace.
        seen = self.fs.version(self._get_metadata_path(self._metadata_rank()))
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
    @override
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
        files = self.fs
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
            return self.fs.version(self._get_metadata_path(None)) is not None
        except AzureError:
            return True

    def _metadata_rank(self) -> int | None:
        """The rank in the name of the ``.metadata`` this save commits: ``None`` with collectives."""
        return None if self.use_collectives else self.rank

    def _shard_files(self, rank: int | None) -> list[str]:
        """The names (under the checkpoint's URL) of its shard files: of ``rank``, or of every rank."""
        client, prefix = self.fs.container_client(self.path)
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
        files = self.fs
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
    @override
    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        files = self.fs
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


def _save_token() -> str:
    """A new save's token for its shard file names: 48 random bits, so that the chance of a save
    picking the names of the checkpoint it replaces (and overwriting its files) is 2**-48."""
    return uuid.uuid4().hex[:12]


def _shard_prefix(rank: int, token: str) -> str:
    """What torch's writer puts before ``<n>.distcp`` in the names of a rank's shard files."""
    return f"__{rank}_{token}_"
