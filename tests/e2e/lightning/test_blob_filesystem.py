"""The fsspec filesystem that Lightning's path handling uses for blob paths, against Azurite."""

from __future__ import annotations

import datetime
import gc

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError
from fsspec.implementations.http import HTTPFileSystem
from lightning.fabric.utilities.cloud_io import _is_dir, get_filesystem

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.integrations.lightning._filesystem import BlobFileSystem
from azstoragetorch.integrations.lightning._paths import BlobPaths
from azstoragetorch.testing import ACCOUNT_NAME, Azurite
from tests.conftest import Container


@pytest.fixture
def fs(azurite: Azurite, account_credential: AzureNamedKeyCredential) -> BlobFileSystem:
    # As in real use, the plugin registers the paths (and installs Lightning's wrappers) first.
    AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url)
    return BlobPaths(azurite.account_url, account_credential).filesystem()


@pytest.fixture
def tree(container: Container) -> Container:
    for name in ("run/a.ckpt", "run/b.ckpt", "run/logs/metrics.csv", "other.txt"):
        container.upload(name, name.encode())
    return container


def test_ls_lists_one_level_with_names_in_the_form_given(fs: BlobFileSystem, tree: Container) -> None:
    entries = fs.ls(tree.blob_url("run"))

    assert [(entry["name"], entry["type"]) for entry in entries] == [
        (tree.blob_url("run/a.ckpt"), "file"),
        (tree.blob_url("run/b.ckpt"), "file"),
        (tree.blob_url("run/logs"), "directory"),
    ]
    assert entries[0]["size"] == len(b"run/a.ckpt")
    assert isinstance(entries[0]["last_modified"], datetime.datetime)
    assert fs.ls(f"az://{tree.name}/run/", detail=False) == [
        f"az://{tree.name}/run/a.ckpt",
        f"az://{tree.name}/run/b.ckpt",
        f"az://{tree.name}/run/logs",
    ]
    assert fs.ls(tree.url, detail=False) == [tree.blob_url("other.txt"), tree.blob_url("run")]


def test_ls_of_a_blob_is_the_blob_and_of_nothing_is_an_error(fs: BlobFileSystem, tree: Container) -> None:
    assert fs.ls(tree.blob_url("run/a.ckpt"), detail=False) == [tree.blob_url("run/a.ckpt")]
    with pytest.raises(FileNotFoundError):
        fs.ls(tree.blob_url("nothing-here"))


def test_info_tells_files_directories_and_missing_paths_apart(
    fs: BlobFileSystem, tree: Container, azurite: Azurite
) -> None:
    assert fs.info(tree.blob_url("run/a.ckpt"))["type"] == "file"
    assert fs.info(tree.blob_url("run"))["type"] == "directory"
    assert fs.info(tree.url)["type"] == "directory"
    assert (fs.isfile(tree.blob_url("run")), fs.isdir(tree.blob_url("run"))) == (False, True)
    assert (fs.exists(tree.blob_url("run/logs")), fs.exists(tree.blob_url("run/log"))) == (True, False)
    for missing in (tree.blob_url("run/c.ckpt"), azurite.container_url("no-such-container")):
        with pytest.raises(FileNotFoundError):
            fs.info(missing)
        assert not fs.exists(missing)


def test_exists_raises_for_a_refused_credential(tree: Container, azurite: Azurite) -> None:
    # fsspec's own exists() answers False to any error: Lightning would then resume from nothing.
    fs = BlobPaths(azurite.account_url, AzureNamedKeyCredential(ACCOUNT_NAME, "d3Jvbmcga2V5")).filesystem()

    for question in (fs.exists, fs.isdir, fs.isfile):
        with pytest.raises(ClientAuthenticationError):
            question(tree.blob_url("run/a.ckpt"))


def test_modified_is_the_blobs_last_modified_time(fs: BlobFileSystem, tree: Container) -> None:
    expected = tree.client.get_blob_client("run/a.ckpt").get_blob_properties().last_modified
    assert fs.modified(tree.blob_url("run/a.ckpt")) == expected
    with pytest.raises(IsADirectoryError):
        fs.modified(tree.blob_url("run"))


def test_rm_deletes_blobs_and_prefixes(fs: BlobFileSystem, tree: Container) -> None:
    fs.rm_file(tree.blob_url("run/a.ckpt"))
    with pytest.raises(FileNotFoundError):
        fs.rm_file(tree.blob_url("run/a.ckpt"))
    with pytest.raises(IsADirectoryError):
        fs.rm(tree.blob_url("run"))

    fs.rm(tree.blob_url("run"), recursive=True)

    assert [blob.name for blob in tree.client.list_blobs()] == ["other.txt"]


def test_directories_need_no_creating(fs: BlobFileSystem, container: Container) -> None:
    fs.makedirs(container.blob_url("new/dir"), exist_ok=True)
    fs.mkdir(container.blob_url("new/dir2"))

    assert list(container.client.list_blobs()) == []
    assert _is_dir(fs, container.blob_url("new/dir"))  # Lightning may write there (object storage)
    assert not _is_dir(fs, container.blob_url("new/dir"), strict=True)


def test_open_reads_writes_and_appends(fs: BlobFileSystem, container: Container) -> None:
    with fs.open(container.blob_url("log.csv"), "w", newline="") as text:
        text.write("step,loss\n")
    with fs.open(container.blob_url("log.csv"), "a") as text:
        text.write("1,0.5\n")

    with fs.open(container.blob_url("log.csv"), "rb") as binary:
        assert binary.read() == b"step,loss\n1,0.5\n"
    assert fs.cat_file(container.blob_url("log.csv")) == b"step,loss\n1,0.5\n"
    with pytest.raises(FileNotFoundError):
        fs.open(container.blob_url("missing.csv"), "rb")
    with pytest.raises(ValueError, match="Unsupported mode"):
        fs.open(container.blob_url("log.csv"), "r+b")


def test_a_failed_text_write_commits_nothing(fs: BlobFileSystem, container: Container) -> None:
    container.upload("config.yaml", b"old: true\n")

    with pytest.raises(RuntimeError), fs.open(container.blob_url("config.yaml"), "w") as text:
        text.write("new: half written")
        raise RuntimeError("serializer failed")

    assert container.download("config.yaml") == b"old: true\n"


def test_an_unclosed_text_writer_commits_nothing_when_collected(fs: BlobFileSystem, container: Container) -> None:
    # A TextIOWrapper's finalizer closes its buffer, and closing a BlobIO commits; text mode must
    # behave like binary mode instead: warn, and leave the blob as it was.
    container.upload("config.yaml", b"old: true\n")
    text = fs.open(container.blob_url("config.yaml"), "w")
    text.write("new: half written")

    with pytest.warns(ResourceWarning, match="NOT committed"):
        del text
        gc.collect()

    assert container.download("config.yaml") == b"old: true\n"


def test_names_that_need_escaping_round_trip(fs: BlobFileSystem, container: Container) -> None:
    container.upload("dir/100% sure?#1.txt", b"x")

    [name] = fs.ls(container.blob_url("dir"), detail=False)

    assert name == container.blob_url("dir/100%25 sure%3F%231.txt")
    assert fs.cat_file(name) == b"x"


def test_lightning_gets_this_filesystem_only_for_claimed_paths(azurite: Azurite, container: Container) -> None:
    AzureBlobCheckpointIO(credential=azurite.credential, account_url=azurite.account_url)

    assert isinstance(get_filesystem(container.blob_url("run")), BlobFileSystem)
    assert isinstance(get_filesystem(f"az://{container.name}/run"), BlobFileSystem)
    assert isinstance(get_filesystem("https://example.com/files/model.ckpt"), HTTPFileSystem)
    assert get_filesystem("/tmp/checkpoints").protocol[0] == "file"
