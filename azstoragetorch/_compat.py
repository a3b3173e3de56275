"""The torch and Lightning versions azstoragetorch is tested with, and every non-public name of theirs it relies on.

torch and Lightning promise nothing about their private names, nor about the signatures of the
methods our classes override, so any release may move them. Each one is listed here, once, with the
code that uses it; ``tests/unit/test_compat.py`` checks every entry against the installed torch and
Lightning and fails naming the entry and the version. ``make test-compat`` runs the whole suite on
the newest torch and Lightning 2.6.x installable (the versions in ``TESTED_TORCH`` and
``TESTED_LIGHTNING``); outside them :func:`warn_if_untested` warns once, and the library still runs.

To add an entry: append a :class:`Reliance` to ``PRIVATE_NAMES`` (a name torch or Lightning keeps
private) or ``OVERRIDDEN`` (a public method we override or call positionally, whose parameters must
stay as they are), or name an attribute in ``INSTANCE_ATTRIBUTES``.
"""

from __future__ import annotations

import dataclasses
import re
import threading
import warnings
from importlib import metadata

from azstoragetorch.exceptions import UntestedVersionWarning

# (major, minor) releases the suites run on: `make test` pins the first, `make test-compat` the last.
TESTED_TORCH: tuple[tuple[int, int], ...] = ((2, 13), (2, 14))
TESTED_LIGHTNING: tuple[tuple[int, int], ...] = ((2, 6),)

_DCP = "azstoragetorch.integrations.dcp"
_PATHS = "azstoragetorch.integrations.lightning._path_wrappers"
_STATS = "azstoragetorch.integrations.lightning._stats"
_SHARDED = "azstoragetorch.integrations.lightning._sharded"
_FILESYSTEM = "torch.distributed.checkpoint.filesystem"


@dataclasses.dataclass(frozen=True)
class Reliance:
    """One name of torch or Lightning that azstoragetorch relies on beyond their public API.

    ``module`` is imported and ``name`` (dotted, possibly empty for the module itself) looked up in
    it. ``parameters``, for a callable, are the names of its parameters as we call or override it
    (``self`` included); ``None`` when only the name matters.
    """

    package: str  # "torch" or "lightning": whose version a failure names
    module: str
    name: str
    used_by: str
    parameters: tuple[str, ...] | None = None

    @property
    def symbol(self) -> str:
        return f"{self.module}.{self.name}" if self.name else self.module


PRIVATE_NAMES: tuple[Reliance, ...] = (
    # torch.distributed.checkpoint (integrations/dcp/)
    Reliance(
        "torch",
        _FILESYSTEM,
        "_StoragePrefix",
        f"{_DCP}: BlobStorageWriter names each save's shard files (prepare_local_plan, prepare_global_plan)",
        ("prefix",),
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "_StorageInfo",
        f"{_DCP}: BlobStorageReader.read_data finds each item's bytes by its fields",
        ("relative_path", "offset", "length", "transform_descriptors"),
    ),
    Reliance(
        "torch",
        "torch.distributed.checkpoint._extension",
        "StreamTransformExtension",
        f"{_DCP}: the type of BlobStorageWriter's _extensions (annotation only; FileSystemWriter's experimental option)",
    ),
    Reliance(
        "torch",
        "torch.distributed.checkpoint._extension",
        "ExtensionRegistry",
        f"{_DCP}: the type of BlobStorageReader's _extension_registry (annotation only)",
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "FileSystemWriter._get_metadata_path",
        f"{_DCP}: BlobStorageWriter.finish commits .metadata where FileSystemWriter would",
        ("self", "rank"),
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "FileSystemWriter._metadata_exists",
        f"{_DCP}: BlobStorageWriter.prepare_local_plan refuses to overwrite as FileSystemWriter does",
        ("self",),
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "FileSystemReader._get_metadata_path",
        f"{_DCP}: BlobStorageReader.verify reads .metadata where FileSystemReader would",
        ("self", "rank"),
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "_StorageReaderTransforms.transform_load_stream",
        f"{_DCP}: BlobStorageReader._load_item undoes an item's stream transforms (reader.transforms)",
        ("self", "read_item", "transform_descriptors", "raw_stream"),
    ),
    # Lightning (integrations/lightning): each wrapper passes everything it does not claim through.
    Reliance(
        "lightning",
        "lightning.fabric.utilities.cloud_io",
        "_is_object_storage",
        f"{_PATHS}: a blob container counts as object storage",
        ("fs",),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.core.saving",
        "pl_load",
        f"{_PATHS}: load_from_checkpoint reads blob paths (saving's import of cloud_io._load)",
        ("path_or_url", "map_location", "weights_only"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.callbacks.model_checkpoint",
        "ModelCheckpoint._find_last_checkpoints",
        f"{_PATHS}: ckpt_path='last' finds blob checkpoints",
        ("self", "trainer"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.callbacks.model_checkpoint",
        "ModelCheckpoint._ModelCheckpoint__resolve_ckpt_dir",
        f"{_PATHS}: the directory _find_last_checkpoints lists",
        ("self", "trainer"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.callbacks.model_checkpoint",
        "ModelCheckpoint._should_remove_checkpoint",
        f"{_PATHS}: save_top_k keeps the blob checkpoint a run resumed from",
        ("self", "trainer", "previous", "current"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.trainer.connectors.callback_connector",
        "_CallbackConnector._attach_model_callbacks",
        f"{_STATS}: TransferStatsLogger is attached when log_stats is on; "
        f"{_SHARDED}: a strategy that saves by local path is refused at setup",
        ("self",),
    ),
)

# Public methods whose signatures matter: we override them, or forward arguments to them by name.
OVERRIDDEN: tuple[Reliance, ...] = (
    Reliance(
        "torch",
        _FILESYSTEM,
        "FileSystemWriter.__init__",
        f"{_DCP}: BlobStorageWriter offers and forwards each option",
        (
            "self",
            "path",
            "single_file_per_rank",
            "sync_files",
            "thread_count",
            "per_thread_copy_ahead",
            "cache_staged_state_dict",
            "overwrite",
            "_extensions",
            "serialization_format",
        ),
    ),
    Reliance(
        "torch",
        _FILESYSTEM,
        "FileSystemReader.__init__",
        f"{_DCP}: BlobStorageReader forwards _extension_registry",
        ("self", "path", "_extension_registry"),
    ),
    *(
        Reliance("torch", _FILESYSTEM, f"FileSystemWriter.{method}", f"{_DCP}: BlobStorageWriter.{method}", params)
        for method, params in (
            ("reset", ("self", "checkpoint_id")),
            ("set_up_storage_writer", ("self", "is_coordinator", "args", "kwargs")),
            ("validate_checkpoint_id", ("checkpoint_id",)),
            ("prepare_local_plan", ("self", "plan")),
            ("prepare_global_plan", ("self", "plans")),
            ("finish", ("self", "metadata", "results")),
            ("write_data", ("self", "plan", "planner")),
            ("storage_meta", ("self",)),
        )
    ),
    *(
        Reliance("torch", _FILESYSTEM, f"FileSystemReader.{method}", f"{_DCP}: BlobStorageReader.{method}", params)
        for method, params in (
            ("reset", ("self", "checkpoint_id")),
            ("validate_checkpoint_id", ("checkpoint_id",)),
            ("read_metadata", ("self", "args", "kwargs")),
            ("read_data", ("self", "plan", "planner")),
        )
    ),
    *(
        Reliance("torch", _FILESYSTEM, f"FileSystemBase.{method}", f"{_DCP}: _BlobFiles.{method}", params)
        for method, params in (
            ("create_stream", ("self", "path", "mode")),
            ("concat_path", ("self", "path", "suffix")),
            ("init_path", ("self", "path")),
            ("rename", ("self", "path", "new_path")),
            ("mkdir", ("self", "path")),
            ("validate_checkpoint_id", ("checkpoint_id",)),
            ("exists", ("self", "path")),
            ("rm_file", ("self", "path")),
        )
    ),
    Reliance(
        "lightning",
        "lightning.fabric.utilities.cloud_io",
        "url_to_fs",
        f"{_PATHS}: Lightning's get_filesystem resolves blob URLs to BlobFileSystem",
        ("url", "kwargs"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.plugins",
        "AsyncCheckpointIO.remove_checkpoint",
        f"{_PATHS}: removals of blob checkpoints join the queue of saves",
        ("self", "args", "kwargs"),
    ),
    Reliance(
        "lightning",
        "lightning.pytorch",
        "Trainer.save_checkpoint",
        f"{_STATS}: the save's stall is logged",
        ("self", "filepath", "weights_only", "storage_options"),
    ),
    # The sharded strategies save and load by local path, bypassing CheckpointIO: _sharded wraps
    # these methods (install() also checks them, and that each save still decides by the private
    # _save_distributed_checkpoint or _state_dict_type attribute).
    *(
        Reliance("lightning", module, f"{cls}.{method}", f"{_SHARDED}: blob paths go to BlobStorage{role}", params)
        for module in ("lightning.pytorch.strategies", "lightning.fabric.strategies")
        for cls in ("ModelParallelStrategy", "FSDPStrategy")
        for method, role, params in (
            (
                "save_checkpoint",
                "Writer",
                ("self", "checkpoint", "filepath", "storage_options")
                if module.startswith("lightning.pytorch")
                else ("self", "path", "state", "storage_options", "filter"),
            ),
            (
                "load_checkpoint",
                "Reader",
                ("self", "checkpoint_path", "weights_only")
                if module.startswith("lightning.pytorch")
                else ("self", "path", "state", "strict", "weights_only"),
            ),
        )
    ),
    Reliance(
        "lightning",
        "lightning.pytorch.cli",
        "SaveConfigCallback.setup",
        "azstoragetorch.integrations.lightning._config_callback: BlobSaveConfigCallback.setup",
        ("self", "trainer", "pl_module", "stage"),
    ),
)

# Attributes that torch's and Lightning's constructors set and our subclasses or wrappers use:
# (package, module, class) -> attribute names. The guard test constructs each class to check them.
INSTANCE_ATTRIBUTES: dict[tuple[str, str, str], tuple[str, ...]] = {
    ("torch", _FILESYSTEM, "FileSystemWriter"): ("fs", "path", "overwrite", "rank", "use_collectives", "transforms"),
    ("torch", _FILESYSTEM, "FileSystemReader"): ("fs", "path", "storage_data", "transforms"),
    # _path_wrappers' removal wrapper queues removals on the executor that runs the saves; _sharded_save's
    # asynchronous sharded saves join that executor too (and start it with _ensure_setup).
    ("lightning", "lightning.pytorch.plugins", "AsyncCheckpointIO"): ("_executor", "_error", "_ensure_setup"),
}


def release(version: str) -> tuple[int, int] | None:
    """``(major, minor)`` of a version string such as ``2.14.1+cu130`` or ``2.15.0a0+git1234``."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match[1]), int(match[2])) if match else None


def installed_version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


_warned: set[str] = set()
_lock = threading.Lock()


def warn_if_untested(package: str) -> None:
    """Warn (once per process and package) if the installed ``torch`` or ``lightning`` is not a tested release."""
    with _lock:
        if package in _warned:
            return
        _warned.add(package)
    version = installed_version(package)
    tested = {"torch": TESTED_TORCH, "lightning": TESTED_LIGHTNING}[package]
    if version is None or release(version) in tested:
        return
    from azstoragetorch import __version__

    names = " and ".join(f"{major}.{minor}" for major, minor in tested)
    warnings.warn(
        f"azstoragetorch {__version__} is tested with {package} {names}, not with {package} {version}. "
        "It may work; if something fails, please report it with both versions. See 'Supported versions' "
        "in the documentation, and filter azstoragetorch.exceptions.UntestedVersionWarning to silence this.",
        UntestedVersionWarning,
        stacklevel=3,
    )
