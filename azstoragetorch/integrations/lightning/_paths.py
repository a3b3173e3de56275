"""How Lightning's own path handling comes to understand blob URLs.

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

Each :class:`BlobPaths` (one per ``AzureBlobCheckpointIO``) says which paths are blob paths and
which credential reads them. :func:`register` records it and installs, once per process, one
wrapper around each of the six places above. A wrapper handles a path only when a registered
``BlobPaths`` claims it (or the filesystem is a :class:`BlobFileSystem`), and passes everything
else, with the caller's arguments, to Lightning's own function unchanged; deciding whether a path
is claimed never raises. Should a Lightning version lack what a wrapper relies on, it warns once
and leaves Lightning's behaviour as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import re
import threading
import urllib.parse
import warnings
from pathlib import PurePosixPath
from typing import Any

import fsspec.config
import torch
from azure.core.utils import parse_connection_string

from azstoragetorch._client import (
    FSSPEC_PROTOCOLS,
    BlobUrl,
    ContainerUrl,
    CredentialArgument,
    fsspec_path_to_url,
    is_azure_blob_host,
    not_found_as_file_not_found,
    redact_url,
)
from azstoragetorch._options import TransferOptions
from azstoragetorch.integrations.lightning._filesystem import BlobFileSystem
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions

ACCEPTED_FORMS = (
    "https://<account>.blob.core.windows.net/<container>/<path> (or another Azure cloud's blob endpoint), "
    "a URL under the plugin's account_url (such as the Azurite emulator's "
    "http://127.0.0.1:10000/devstoreaccount1/<container>/<path>), "
    "or, on the account of account_url, az://<container>/<path> or "
    "abfs[s]://<container>@<account>.dfs.core.windows.net/<path>"
)
# What adlfs reads to choose the account of an az:// path that names none.
_ADLFS_SETTINGS = "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME or fsspec's configuration"


@dataclasses.dataclass(frozen=True)
class BlobPaths:
    """Which paths name blobs for one plugin, how they become URLs, and the credential that reaches them.

    A plugin's paths are:

    - URLs on Azure's blob endpoints (fsspec would hand them to its anonymous HTTP filesystem);
    - URLs under ``account_url``, which is how emulators, custom domains and Azure Stack endpoints
      are recognised;
    - the fsspec-style ``az://``, ``abfs://`` and ``abfss://`` paths, which are adlfs's too, only
      on the account of ``account_url``: a path that names that account
      (``abfss://<container>@<account>.dfs.core.windows.net/...``), or one that names no account
      unless adlfs's own settings (a connection string or account name in the environment or in
      fsspec's configuration) name another. A plugin without ``account_url`` has none of them, so it
      never takes an adlfs user's path.
    """

    account_url: str | None
    credential: CredentialArgument = dataclasses.field(compare=False)
    retry: RetryOptions | None = dataclasses.field(default=None, compare=False)

    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of this plugin's paths. Never raises: anything else is "not mine"."""
        try:
            scheme = path.split("://", 1)[0].lower() if "://" in path else ""
            if scheme in FSSPEC_PROTOCOLS:
                return self._fsspec_refusal(path) is None
            if scheme not in ("http", "https"):
                return False
            return is_azure_blob_host(urllib.parse.urlsplit(path).hostname or "") or self.is_under_account_url(path)
        except (AttributeError, TypeError, ValueError):  # not a str, or not a URL at all
            return False

    def is_under_account_url(self, url: str) -> bool:
        return self.account_url is not None and _is_under(url, self.account_url)

    def url_for(self, path: str) -> str | None:
        """The blob (or prefix) URL that ``path`` names, or ``None`` if it is not one of this plugin's paths.

        Raises ``ValueError`` for a path that is this plugin's but cannot be used as a blob path.
        """
        if not self.owns(path):
            return None
        if path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS:
            return fsspec_path_to_url(path, account_url=self.account_url)
        if _has_file_name_in_query(urllib.parse.urlsplit(path).query):
            raise ValueError(
                f"{redact_url(path)!r} has a file name after its query string: Lightning appended it to a directory "
                "URL that carries a SAS token. Pass the SAS token as credential=AzureSasCredential(...) and "
                "keep directory URLs free of query strings."
            )
        return path

    def refusal(self, path: str) -> str:
        """Why ``path`` is not one of this plugin's paths: a sentence for an error message that names the path."""
        reason = self._fsspec_refusal(path) if path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS else None
        return reason or f"expected {ACCEPTED_FORMS}."

    def filesystem(self) -> BlobFileSystem:
        return BlobFileSystem(credential=self.credential, retry=self.retry, to_url=self._required_url)

    def _required_url(self, path: str) -> str:
        url = self.url_for(path)
        if url is None:
            raise ValueError(f"{redact_url(path)!r} is not a blob path here: {self.refusal(path)}")
        return url

    def _fsspec_refusal(self, path: str) -> str | None:
        """``None`` if an ``az://``/``abfs[s]://`` path is this plugin's, otherwise why not."""
        if self.account_url is None:
            return (
                "az:// and abfs[s]:// paths are adlfs's too, so a plugin uses them only on the account of its "
                "account_url. Pass account_url='https://<account>.blob.core.windows.net', or write the path as "
                "an https:// URL."
            )
        location = path.split("://", 1)[1].split("/", 1)[0]
        _, at, host = location.partition("@")
        if at:
            named = _fsspec_account_url(host)
            if named is None or named.lower() != self.account_url.lower():
                return (
                    f"it names another account than the plugin's account_url {self.account_url!r}; such paths are "
                    "left to adlfs."
                )
            return None
        adlfs_endpoint = _adlfs_endpoint()
        if adlfs_endpoint is not None and adlfs_endpoint.lower() != self.account_url.lower():
            return (
                f"it names no account, and this process sets adlfs up ({_ADLFS_SETTINGS}) for another account "
                f"than the plugin's account_url {self.account_url!r}. Name the account in the path "
                "(abfss://<container>@<account>.dfs.core.windows.net/...) or use a URL under account_url."
            )
        return None


def _fsspec_account_url(host: str) -> str | None:
    """The blob endpoint of ``<account>.dfs.core.windows.net`` (as written after ``@`` in an adlfs path)."""
    try:
        return BlobUrl.parse(fsspec_path_to_url(f"az://c@{host}/b", account_url=None)).account_url
    except ValueError:
        return None


def _adlfs_endpoint() -> str | None:
    """The blob endpoint adlfs would use for an ``az://`` path that names no account, as set up by
    fsspec's configuration or adlfs's environment variables (a connection string first, as adlfs
    does); ``""`` when they set up one that cannot be told; ``None`` when nothing sets one up."""
    options: dict[str, Any] = {}
    for protocol in FSSPEC_PROTOCOLS:  # adlfs reads fsspec's configuration under each of its names
        options.update(fsspec.config.conf.get(protocol, {}))
    connection_string = options.get("connection_string") or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        try:
            settings = parse_connection_string(connection_string, case_sensitive_keys=False)
        except ValueError:
            return ""
        if settings.get("usedevelopmentstorage", "").lower() == "true":
            return "http://127.0.0.1:10000/devstoreaccount1"
        if settings.get("blobendpoint"):
            return str(settings["blobendpoint"]).rstrip("/")
        account = settings.get("accountname")
        suffix = settings.get("endpointsuffix", "core.windows.net")
        scheme = settings.get("defaultendpointsprotocol", "https")
        return f"{scheme}://{account}.blob.{suffix}" if account else ""
    account = options.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    return f"https://{account}.blob.core.windows.net" if account else None


def _is_under(url: str, account_url: str) -> bool:
    candidate = urllib.parse.urlsplit(url)
    account = urllib.parse.urlsplit(account_url)
    same_origin = (candidate.scheme.lower(), candidate.netloc.lower()) == (
        account.scheme.lower(),
        account.netloc.lower(),
    )
    account_path = account.path.rstrip("/")
    return same_origin and (not account_path or candidate.path.startswith(account_path + "/"))


def _has_file_name_in_query(query: str) -> bool:
    """Whether a query string ends in ``/<name>.<extension>``, as a SAS does once a file name is joined to it.

    A SAS's own values can contain ``/`` (base64 signatures) but never a ``.`` after it.
    """
    if "/" not in query:
        return False
    last_segment = urllib.parse.unquote(query).rsplit("/", 1)[1]
    return "." in last_segment


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


# -- the registry ------------------------------------------------------------------------------

_lock = threading.Lock()
_registered: list[BlobPaths] = []  # newest first; one entry per account_url


def register(paths: BlobPaths) -> None:
    """Make Lightning treat the paths that ``paths`` owns as blob paths, in this process."""
    with _lock:
        _registered[:] = [paths, *(entry for entry in _registered if entry.account_url != paths.account_url)]
    _install_wrappers()


def claim(path: Any) -> BlobPaths | None:
    """The registered :class:`BlobPaths` that handles ``path``, if any. Never raises.

    A path under a plugin's ``account_url`` (and an ``az://`` path on its account) is that plugin's;
    a URL on one of Azure's endpoints that no such plugin has belongs to the most recently created
    plugin that owns it.
    """
    with _lock:
        candidates = list(_registered)
    owners = [paths for paths in candidates if paths.owns(path)]
    for paths in owners:
        if paths.account_url is not None and (
            path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS or paths.is_under_account_url(path)
        ):
            return paths
    return owners[0] if owners else None


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


# -- the wrappers ------------------------------------------------------------------------------

_installed = False


def _install_wrappers() -> None:
    global _installed
    with _lock:
        if _installed:
            return
        _installed = True
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


def _warn_unsupported_once(missing: str, what_may_fail: str) -> None:
    """Warn about a missing Lightning internal noticed at a call, once per process."""
    with _lock:
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
