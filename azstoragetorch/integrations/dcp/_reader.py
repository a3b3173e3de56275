"""The reader: :class:`BlobStorageReader`, torch's ``FileSystemReader`` over :class:`_BlobFiles`,
with its own ``read_data`` that fetches only the byte ranges a load needs, coalesced and in
parallel; and :class:`CheckpointVerification`, what :meth:`BlobStorageReader.verify` finds."""

from __future__ import annotations

import dataclasses
import io
import os
import pickle
from typing import IO, TYPE_CHECKING, Any, cast

import torch
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future
from typing_extensions import Self, override

from azstoragetorch._client import CredentialArgument, ProgressHook, Recorder, TransferStats, redact_url
from azstoragetorch._options import TransferOptions
from azstoragetorch._reads import PlannedSpans
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._in_memory import _copy_on_this_thread, _MemoryFile, _narrow
from azstoragetorch.integrations.dcp._locations import _AtBlobLocation, _initial_location, _require_location
from azstoragetorch.integrations.dcp._pinned_files import _PinnedShardFiles
from azstoragetorch.integrations.dcp._spans import _coalesce, _Span
from azstoragetorch.retry import RetryOptions

if TYPE_CHECKING:
    # Private torch names needed only for annotations: a release that moves them cannot break an import.
    from torch.distributed.checkpoint._extension import ExtensionRegistry
    from torch.distributed.checkpoint.filesystem import _StorageInfo

_MiB = 1024 * 1024


# torch annotates ``fs`` as its own FileSystem; any FileSystemBase works, and ours is _BlobFiles.
class BlobStorageReader(_AtBlobLocation, FileSystemReader):  # type: ignore[misc]
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
        # BlobIO's None: check every file read whole that has a recorded CRC-32.
        options = TransferOptions.from_keywords(locals(), verify_checksum=None if verify_checksum else False)
        self._set_up(url, credential, options, _extension_registry)

    @classmethod
    def _from_options(cls, url: str, *, credential: CredentialArgument, options: TransferOptions) -> Self:
        """A reader with ``options`` already checked and torch's default extension registry:
        azstoragetorch's own way in (the Lightning plugin's), not the user's. ``verify_checksum``
        is BlobIO's: ``None`` checks the files read whole that have a recorded CRC-32."""
        reader = cls.__new__(cls)
        reader._set_up(url, credential, options, None)
        return reader

    def _set_up(
        self,
        url: str | None,
        credential: CredentialArgument,
        options: TransferOptions,
        extension_registry: ExtensionRegistry | None,
    ) -> None:
        files = _BlobFiles(credential, options)
        checked_url = _initial_location(files, url)
        self._stats: TransferStats | None = None
        super().__init__(checked_url, _extension_registry=extension_registry)
        self._use_blob_files(files, checked_url)

    @property
    def stats(self) -> TransferStats | None:
        """What this rank's last successful load through this reader cost: the bytes, requests and
        retries of reading its shard files, over the wall seconds of reading them (``.metadata``
        aside); ``None`` before the first load."""
        return self._stats

    @override
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """Point the reader at ``checkpoint_id`` (a URL as for the constructor) for the next load, as
        ``dcp.load(..., checkpoint_id=url)`` does; ``None`` keeps the URL. What the last load read
        is forgotten either way."""
        super().reset(checkpoint_id)

    @classmethod
    @override
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return _BlobFiles.validate_checkpoint_id(checkpoint_id)

    @override
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
        files = self.fs
        checking = _BlobFiles(
            files.credential, dataclasses.replace(files.options, verify_checksum=None, progress_hook=None)
        )
        metadata_name = ".metadata"
        with checking.create_stream(self._get_metadata_path(), "rb") as stream:
            metadata = cast(Metadata, pickle.load(stream))
        names = [metadata_name, *sorted({info.relative_path for info in metadata.storage_data.values()})]
        shards = _PinnedShardFiles(checking, os.fspath(self.path))
        missing, unchecked, spans = [], [], []
        max_span = max(files.block_size, files.max_concurrency * files.block_size // 2)
        for name in names:
            try:
                properties = shards.pinned_version(name)
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
        fetcher = PlannedSpans(shards.fetch, max_concurrency=checking.max_concurrency, block_size=checking.block_size)
        for _ in fetcher.fetch_in_order(spans):
            pass  # the bytes only feed the checksums
        checked = [name for name in names if name not in missing and name not in unchecked]
        return CheckpointVerification(
            checkpoint_id=self.checkpoint_id,
            checked=checked,
            mismatched=[name for name in checked if shards.mismatch(name) is not None],
            missing=missing,
            unchecked=unchecked,
        )

    @override
    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        # Not FileSystemReader's read loop, which opens each shard file as a stream through the
        # FileSystemBase seam and reads item by item: here the plan's items of all files are
        # coalesced into ranged fetches that run in parallel, and each item is loaded from memory
        # (_load_item). The seam still serves .metadata (read_metadata) and everything else.
        files = self.fs
        window = files.max_concurrency * files.block_size
        spans = _coalesce(plan.items, self.storage_data, max_span=max(files.block_size, window // 2))
        recorder = Recorder(files.progress_hook, total=sum(span.end - span.start for span in spans))
        shards = _PinnedShardFiles(files, os.fspath(self.path), recorder)
        fetcher = PlannedSpans(shards.fetch, max_concurrency=files.max_concurrency, block_size=files.block_size)
        for span, data in fetcher.fetch_in_order(spans):
            for request in span.requests:
                info: _StorageInfo = self.storage_data[request.storage_index]
                start = info.offset - span.start
                self._load_item(request, info, data[start : start + info.length], planner)
        shards.verify_whole_files()
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
