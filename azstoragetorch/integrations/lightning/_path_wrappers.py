"""Wrappers that make Lightning's own path handling treat a plugin's blob paths as blob storage.

Lightning does much of its checkpoint work by path, through fsspec, not through the CheckpointIO
plugin: ``ModelCheckpoint`` asks whether a checkpoint exists and lists its directory, ``fit(ckpt_path="last")``
looks for the newest ``last*.ckpt``, loggers write their files under ``default_root_dir``, and
``LightningModule.load_from_checkpoint`` opens a path itself. For blob URLs that goes wrong in these
ways in Lightning 2.6:

1. fsspec hands ``https://`` URLs to its plain HTTP filesystem, which neither authenticates nor
   lists a container, so every check answers "nothing there". (``cloud_io.url_to_fs``)
2. Lightning knows three object stores by class (adlfs, gcsfs, s3fs) and, for any other
   filesystem, wants a directory to exist before a logger writes into it; a blob prefix only
   exists once something is written under it. (``cloud_io._is_object_storage``)
3. ``ModelCheckpoint._find_last_checkpoints`` runs ``os.path.normpath`` over the listing, which turns
   ``https://host/...`` into ``https:/host/...`` (and, before ``setup``, lists ``default_root_dir``
   with the local filesystem), so ``ckpt_path="last"`` never finds a remote checkpoint
   (Lightning issue #18261).
4. ``load_from_checkpoint`` sends every ``http...`` path to ``torch.hub``, which downloads it
   anonymously and caches it by file name, so a second ``last.ckpt`` would load the first.
5. ``ModelCheckpoint._should_remove_checkpoint`` keeps the checkpoint a run resumed from, and
   checkpoints outside ``dirpath``, only on the local filesystem; any other path that top-k drops is
   deleted, so resuming in place deletes the checkpoint resumed from.
6. ``AsyncCheckpointIO`` queues saves for its worker thread but removes at once, so a save still
   waiting in its queue re-creates a checkpoint that top-k removed after asking for that save.

Each ``BlobPaths`` (one per ``AzureBlobCheckpointIO``, see ``_paths``) says which paths are blob paths
and which credential reads them; the plugin registers it there and calls :func:`install`, which
wraps, once per process, each of the six places above. A wrapper handles a path only when a registered
``BlobPaths`` claims it (or the filesystem is a :class:`BlobFileSystem`), and passes everything
else, with the caller's arguments, to Lightning's own function unchanged; deciding whether a path
is claimed never raises. Should a Lightning version lack what a wrapper relies on, it warns once
and leaves Lightning's behaviour as it is.
"""

from __future__ import annotations

import functools
import os
import re
import threading
import warnings
from pathlib import PurePosixPath
from typing import Any

import torch

from azstoragetorch._client import ContainerUrl, CredentialArgument, not_found_as_file_not_found
from azstoragetorch._options import TransferOptions
from azstoragetorch.integrations.lightning._filesystem import BlobFileSystem
from azstoragetorch.integrations.lightning._once import once
from azstoragetorch.integrations.lightning._paths import claim
from azstoragetorch.io import BlobIO


def load_blob_checkpoint(
    path: str,
    url: str,
    *,
    credential: CredentialArgument,
    map_location: Any,
    weights_only: bool | None,
    on_stats: Any = None,
    options: TransferOptions,
) -> Any:
    """``torch.load`` the checkpoint at ``path`` (whose blob URL is ``url``), read with ``options``.

    A missing blob or container raises ``FileNotFoundError`` naming ``path`` without any SAS token.
    ``on_stats``, if given, is called with the read's :class:`~azstoragetorch.TransferStats` after it.
    """
    with not_found_as_file_not_found(path, hint="(no checkpoint here)"):
        reader = BlobIO._open(url, "rb", credential=credential, options=options)
    with reader:
        loaded = torch.load(reader, map_location=map_location, weights_only=weights_only)
    if on_stats is not None:
        on_stats(reader.stats)
    return loaded


def _location(path: Any) -> tuple[str, str] | None:
    """Where a claimed path points, as ``(container URL, blob name or prefix)``, whatever its form
    (``az://`` or ``https://``, with or without a trailing ``/``); ``None`` for any other path."""
    try:
        text = os.fspath(path)
        paths = claim(text)
        if paths is None:
            return None
        container, name = ContainerUrl.parse_with_prefix(paths._required_url(text))
    except (TypeError, ValueError):
        return None  # not a path, or a blob path that cannot be used: Lightning's own rules apply
    return container.url_without_query.lower(), name.strip("/")


def _is_within(location: tuple[str, str], directory: tuple[str, str]) -> bool:
    container, name = location
    directory_container, prefix = directory
    return container == directory_container and (not prefix or name.startswith(f"{prefix}/"))


@once
def install() -> None:
    """Wrap Lightning's path handling (once per process)."""
    from lightning.fabric.utilities import cloud_io
    from lightning.pytorch.callbacks import model_checkpoint
    from lightning.pytorch.core import saving
    from lightning.pytorch.plugins import AsyncCheckpointIO

    targets: list[tuple[Any, str, Any, str]] = [
        (cloud_io, "url_to_fs", _wrap_url_to_fs, _PATHS_MAY_FAIL),
        (cloud_io, "_is_object_storage", _wrap_is_object_storage, _PATHS_MAY_FAIL),
        (saving, "pl_load", _wrap_load, _PATHS_MAY_FAIL),
        (model_checkpoint.ModelCheckpoint, "_find_last_checkpoints", _wrap_find_last_checkpoints, _PATHS_MAY_FAIL),
        (
            model_checkpoint.ModelCheckpoint,
            "_should_remove_checkpoint",
            _wrap_should_remove_checkpoint,
            _TOP_K_MAY_DELETE,
        ),
        (AsyncCheckpointIO, "remove_checkpoint", _wrap_async_remove_checkpoint, _ASYNC_MAY_RECREATE),
    ]
    for owner, name, wrap, what_may_fail in targets:
        original = getattr(owner, name, None)
        if original is None:
            _warn_unsupported(f"{owner.__name__}.{name}", what_may_fail, stacklevel=4)
            continue
        setattr(owner, name, wrap(original))


# What may go wrong, for blob paths, when a Lightning version lacks what a wrapper relies on.
_PATHS_MAY_FAIL = (
    "Lightning's own handling of blob paths (existence checks, listings, ckpt_path='last', "
    "load_from_checkpoint) may not work"
)
_LAST_MAY_FAIL = "ckpt_path='last' may not find blob checkpoints"
_TOP_K_MAY_DELETE = "save_top_k may delete the blob checkpoint a run resumed from, or blob checkpoints outside dirpath"
_ASYNC_MAY_RECREATE = "a blob checkpoint save still queued in AsyncCheckpointIO may re-create what save_top_k removed"


_warned: set[str] = set()  # what _warn_unsupported_once has warned about in this process
_warned_lock = threading.Lock()


def _warn_unsupported_once(missing: str, what_may_fail: str) -> None:
    """Warn about a missing Lightning internal noticed at a call, once per process."""
    with _warned_lock:
        if missing in _warned:
            return
        _warned.add(missing)
    _warn_unsupported(missing, what_may_fail, stacklevel=4)


def _warn_unsupported(missing: str, what_may_fail: str, *, stacklevel: int) -> None:
    warnings.warn(
        f"azstoragetorch: this Lightning version has no {missing}, so {what_may_fail}. "
        "Saving and loading through AzureBlobCheckpointIO is unaffected.",
        RuntimeWarning,
        stacklevel=stacklevel,
    )


def _wrap_url_to_fs(original: Any) -> Any:
    """Lightning's ``get_filesystem`` resolves every path through this one function.

    A call with fsspec options (``get_filesystem(path, account_name=...)``) configures a filesystem
    of the caller's own choosing: it goes to fsspec with its options, whatever the path.
    """

    @functools.wraps(original)
    def url_to_fs(url: Any, **kwargs: Any) -> Any:
        paths = None if kwargs else claim(str(url))
        if paths is None:
            return original(url, **kwargs)
        return paths.filesystem(), str(url)

    return url_to_fs


def _wrap_is_object_storage(original: Any) -> Any:
    """A blob container is object storage: any path that is not a blob can be written under."""

    @functools.wraps(original)
    def _is_object_storage(fs: Any) -> bool:
        return isinstance(fs, BlobFileSystem) or bool(original(fs))

    return _is_object_storage


def _wrap_load(original: Any) -> Any:
    """``load_from_checkpoint`` reads by path: blob paths are read like any fsspec path, not via torch.hub."""

    @functools.wraps(original)
    def load(path_or_url: Any, map_location: Any = None, weights_only: bool | None = None) -> Any:
        paths = claim(path_or_url) if isinstance(path_or_url, str) else None
        if paths is None:
            return original(path_or_url, map_location=map_location, weights_only=weights_only)
        url = paths._required_url(path_or_url)
        return load_blob_checkpoint(
            path_or_url,
            url,
            credential=paths.credential,
            map_location=map_location,
            weights_only=weights_only,
            options=TransferOptions(retry=paths.retry),
        )

    return load


# ModelCheckpoint's private (name-mangled) method that says which directory it checkpoints into.
_RESOLVE_CKPT_DIR = "_ModelCheckpoint__resolve_ckpt_dir"


def _wrap_find_last_checkpoints(original: Any) -> Any:
    """List a blob checkpoint directory with the blob filesystem and keep full URLs (no ``normpath``)."""

    @functools.wraps(original)
    def _find_last_checkpoints(self: Any, trainer: Any) -> set[str]:
        resolve_ckpt_dir = getattr(self, _RESOLVE_CKPT_DIR, None)
        if resolve_ckpt_dir is None:  # renamed in this Lightning version: its own lookup, unchanged
            _warn_unsupported_once("ModelCheckpoint.__resolve_ckpt_dir", _LAST_MAY_FAIL)
            return set(original(self, trainer))
        directory = resolve_ckpt_dir(trainer)
        paths = claim(os.fspath(directory)) if directory else None
        if paths is None:
            return set(original(self, trainer))
        filesystem = paths.filesystem()
        if not filesystem.exists(directory):
            return set()
        last_name = re.compile(rf"^{self.CHECKPOINT_NAME_LAST}(-(\d+))?")  # Lightning's own test of a name

        def is_last(name: str) -> bool:
            file_name = PurePosixPath(name.rsplit("/", 1)[-1])
            return file_name.suffix == self.FILE_EXTENSION and last_name.match(file_name.stem) is not None

        return {name for name in filesystem.ls(directory, detail=False) if is_last(name)}

    return _find_last_checkpoints


def _wrap_should_remove_checkpoint(original: Any) -> Any:
    """Top-k keeps, for blob paths as Lightning does for local ones, the checkpoint the run resumed
    from and any checkpoint outside ``dirpath`` (Lightning deletes every such remote checkpoint)."""

    @functools.wraps(original)
    def _should_remove_checkpoint(self: Any, trainer: Any, previous: str, current: str) -> bool:
        location = _location(previous)
        if location is None:
            return bool(original(self, trainer, previous, current))
        if location == _location(current):
            return False  # the new checkpoint replaced it
        resumed_from = trainer.ckpt_path
        if resumed_from is not None and _location(resumed_from) == location:
            return False
        directory = _location(self.dirpath) if self.dirpath is not None else None
        return directory is not None and _is_within(location, directory)

    return _should_remove_checkpoint


def _wrap_async_remove_checkpoint(original: Any) -> Any:
    """Removals of blob paths join AsyncCheckpointIO's queue, behind the saves asked for before them.

    AsyncCheckpointIO saves in its worker thread but removes in the caller's. A removal that ran
    while a save of the same checkpoint still waited in the queue would be undone by that save.
    Queued instead, a removal runs after every save submitted before it has started (the queue is
    first in, first out), and the plugin's removal waits for a save of its path that is still
    running. A failed removal is reported as AsyncCheckpointIO reports a failed save: from the
    next save or from ``teardown``.
    """

    @functools.wraps(original)
    def remove_checkpoint(self: Any, *args: Any, **kwargs: Any) -> None:
        path = kwargs["path"] if "path" in kwargs else args[0] if args else None
        queue = _save_queue(self) if _location(path) is not None else None
        if queue is None:
            original(self, *args, **kwargs)
            return

        def remove() -> None:
            try:
                original(self, *args, **kwargs)
            except BaseException as error:
                if self._error is None:
                    self._error = error

        queue.submit(remove)

    return remove_checkpoint


def _save_queue(async_io: Any) -> Any:
    """The executor that runs ``async_io``'s saves, or ``None`` when no save is queued (none since
    setup or teardown) or this Lightning version keeps its saves elsewhere."""
    if not (hasattr(async_io, "_executor") and hasattr(async_io, "_error")):
        _warn_unsupported("AsyncCheckpointIO._executor", _ASYNC_MAY_RECREATE, stacklevel=4)
        return None
    return async_io._executor
