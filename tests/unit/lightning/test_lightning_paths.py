"""Lightning's path handling with plugins registered: which paths they take, and which they leave to
fsspec (adlfs) or to Lightning, with the caller's options intact. No network: fsspec filesystems are
only created, never used."""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest
from adlfs import AzureBlobFileSystem
from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch.callbacks import ModelCheckpoint

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, _path_wrappers
from azstoragetorch.integrations.lightning import _paths as _lightning_paths
from azstoragetorch.integrations.lightning._filesystem import BlobFileSystem
from azstoragetorch.integrations.lightning._paths import BlobPaths
from tests.e2e.support.lightning_helpers import TinyModel, loader, trainer

MINE = "https://mine.blob.core.windows.net"
_ADLFS_SETTINGS = ("AZURE_STORAGE_ACCOUNT_NAME", "AZURE_STORAGE_CONNECTION_STRING")


@pytest.fixture(autouse=True)
def registry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Only this test's plugins are registered, and adlfs is not set up by the environment."""
    monkeypatch.setattr(_lightning_paths, "_registered", [])
    for name in _ADLFS_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(fsspec.config, "conf", {})
    yield


def adlfs_account(filesystem: Any) -> str:
    assert isinstance(filesystem, AzureBlobFileSystem), type(filesystem)
    return str(filesystem.account_name)


def test_adlfs_paths_called_with_storage_options_go_to_adlfs_with_them() -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)

    for path in ("az://c/logs", "abfs://c/logs"):
        assert adlfs_account(get_filesystem(path, account_name="theirs", anon=True)) == "theirs"
    https_url = f"{MINE}/c/logs"  # fsspec's HTTP filesystem, with its options, if the caller asks for it
    assert get_filesystem(https_url, client_kwargs={"trust_env": False}).client_kwargs == {"trust_env": False}


def test_adlfs_paths_on_another_account_go_to_adlfs() -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)

    for path in ("abfs://c@theirs.dfs.core.windows.net/logs", "az://c@theirs.blob.core.windows.net/logs"):
        assert adlfs_account(get_filesystem(path)) == "theirs"
        assert BlobPaths(MINE, None).url_for(path) is None


def test_account_less_adlfs_paths_go_to_adlfs_when_it_is_set_up_for_another_account(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "theirs")

    assert adlfs_account(get_filesystem("az://c/logs")) == "theirs"
    with pytest.raises(ValueError, match="AZURE_STORAGE_ACCOUNT_NAME"):
        AzureBlobCheckpointIO(credential=False, account_url=MINE).save_checkpoint({}, "az://c/model.ckpt")

    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "mine")  # adlfs would use the same account
    assert isinstance(get_filesystem("az://c/logs"), BlobFileSystem)

    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_NAME")
    monkeypatch.setattr(fsspec.config, "conf", {"abfs": {"account_name": "theirs"}})
    assert adlfs_account(get_filesystem("az://c/logs")) == "theirs"


def test_a_connection_string_for_adlfs_is_compared_by_endpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    emulator = "http://127.0.0.1:10000/devstoreaccount1"
    AzureBlobCheckpointIO(credential=False, account_url=emulator)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", "UseDevelopmentStorage=true")
    assert isinstance(get_filesystem("az://c/logs"), BlobFileSystem)

    monkeypatch.setenv(
        "AZURE_STORAGE_CONNECTION_STRING", "AccountName=theirs;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    )
    assert BlobPaths(emulator, None).url_for("az://c/logs") is None


def test_a_plugin_without_account_url_takes_no_adlfs_paths_and_breaks_no_other_plugin() -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)
    AzureBlobCheckpointIO(credential=False)  # newer, and not configured for any account

    filesystem = get_filesystem("az://c/logs")  # used to raise ValueError: no account

    assert isinstance(filesystem, BlobFileSystem)
    assert filesystem._to_url("az://c/logs") == f"{MINE}/c/logs"
    assert BlobPaths(None, None).url_for("abfss://c@mine.dfs.core.windows.net/x") is None
    with pytest.raises(ValueError, match="account_url"):
        AzureBlobCheckpointIO(credential=False).save_checkpoint({}, "abfss://c@mine.dfs.core.windows.net/x")


def test_a_url_under_a_plugins_account_url_goes_to_that_plugin() -> None:
    mine = AzureBlobCheckpointIO(credential=False, account_url=MINE)
    AzureBlobCheckpointIO(credential=False)  # newer; takes Azure URLs on any account

    assert _lightning_paths.claim(f"{MINE}/c/x.ckpt") == mine._paths
    assert _lightning_paths.claim("https://other.blob.core.windows.net/c/x.ckpt") == BlobPaths(None, None)


def test_a_path_on_the_account_url_named_in_adlfs_style_is_the_plugins() -> None:
    assert BlobPaths(MINE, None).url_for("abfss://c@mine.dfs.core.windows.net/run/x.ckpt") == f"{MINE}/c/run/x.ckpt"


def test_other_paths_still_go_to_lightning() -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)

    assert get_filesystem("/tmp/checkpoints").protocol[0] == "file"
    assert type(get_filesystem("memory://run")).__name__ == "MemoryFileSystem"


# -- Lightning's private names -----------------------------------------------------------------------

_RESOLVE = "_ModelCheckpoint__resolve_ckpt_dir"


def _rename_in_lightning(monkeypatch: pytest.MonkeyPatch, old: str, new: str) -> None:
    """Make ModelCheckpoint look as if Lightning had renamed ``old`` to ``new``: the attribute moves
    and Lightning's own methods (not the wrappers around them) use the new name."""
    monkeypatch.setattr(ModelCheckpoint, new, getattr(ModelCheckpoint, old), raising=False)
    monkeypatch.delattr(ModelCheckpoint, old)
    for attribute in vars(ModelCheckpoint).values():
        function = inspect.unwrap(attribute) if inspect.isfunction(attribute) else None
        if function is None or old not in function.__code__.co_names:
            continue
        assert "lightning" in function.__code__.co_filename
        names = tuple(new if name == old else name for name in function.__code__.co_names)
        monkeypatch.setattr(function, "__code__", function.__code__.replace(co_names=names))


def test_resuming_from_last_locally_survives_a_renamed_lightning_internal(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    AzureBlobCheckpointIO(credential=False, account_url=MINE)  # installs the wrappers
    monkeypatch.setattr(_path_wrappers, "_warned", set())
    _rename_in_lightning(monkeypatch, _RESOLVE, "_ModelCheckpoint__resolve_dirpath")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(default_root_dir=tmp_path, callbacks=[ModelCheckpoint(save_last=True)]).fit(TinyModel(), loader())
        resumed = trainer(max_epochs=2, default_root_dir=tmp_path, callbacks=[ModelCheckpoint(save_last=True)])
        resumed.fit(TinyModel(), loader(), ckpt_path="last")
        trainer(max_epochs=3, default_root_dir=tmp_path, callbacks=[ModelCheckpoint(save_last=True)]).fit(
            TinyModel(), loader(), ckpt_path="last"
        )

    assert resumed.ckpt_path == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resumed.global_step == 8
    ours = [w for w in caught if issubclass(w.category, RuntimeWarning) and "azstoragetorch" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert "__resolve_ckpt_dir" in str(ours[0].message)
