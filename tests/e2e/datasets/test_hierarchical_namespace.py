"""Accounts with a hierarchical namespace (ADLS Gen2), whose directories the Blob API lists as
zero-length blobs with the metadata ``hdi_isfolder=true``.

Azurite has no hierarchical namespace, but it stores and lists metadata, so a directory is made the
way such an account shows it: a zero-length blob with that metadata, next to the files in it. Every
path that lists must take it for a directory, never for data.
"""

from __future__ import annotations

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.integrations.lightning import BlobDataModule
from azstoragetorch.integrations.lightning._paths import BlobPaths
from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy

FILES = ("data/a.bin", "data/sub/b.bin", "data/sub/deeper/c.bin")
DIRECTORIES = ("data", "data/sub", "data/sub/deeper", "data/empty")


@pytest.fixture
def hns(container: Container) -> Container:
    """A container laid out as an account with a hierarchical namespace lists it."""
    for name in FILES:
        container.upload(name, name.encode())
    for name in DIRECTORIES:  # Metadata names are case-insensitive: the service may return either case.
        key = "HDI_ISFOLDER" if name == "data/empty" else "hdi_isfolder"
        container.client.upload_blob(name, b"", metadata={key: "true"}, overwrite=True)
    container.upload("data/zero.bin", b"")  # an empty file is still a file
    return container


def test_datasets_skip_directories(hns: Container, account_credential: AzureNamedKeyCredential) -> None:
    files = [hns.blob_url(name) for name in sorted([*FILES, "data/zero.bin"])]

    mapped = BlobDataset.from_container_url(hns.url, credential=account_credential)
    streamed = IterableBlobDataset.from_container_url(hns.url, prefix="data/", credential=account_credential)
    module = BlobDataModule(
        train=hns.blob_url("data"), credential=account_credential, shuffle=False, batch_size=100, collate_fn=list
    )
    module.setup("fit")

    assert [mapped[index]["url"] for index in range(len(mapped))] == files
    assert [sample["url"] for sample in streamed] == files
    assert [sample["url"] for batch in module.train_dataloader() for sample in batch] == files


def test_info_and_ls_report_directories(
    hns: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential
) -> None:
    fs = BlobPaths(azurite.account_url, account_credential).filesystem()

    for name in DIRECTORIES:
        assert fs.info(hns.blob_url(name))["type"] == "directory", name
        assert (fs.isdir(hns.blob_url(name)), fs.isfile(hns.blob_url(name))) == (True, False)
    assert fs.info(hns.blob_url("data/zero.bin"))["type"] == "file"
    assert [(entry["name"], entry["type"]) for entry in fs.ls(hns.url)] == [(hns.blob_url("data"), "directory")]
    assert [(entry["name"], entry["type"]) for entry in fs.ls(hns.blob_url("data"))] == [
        (hns.blob_url("data/a.bin"), "file"),
        (hns.blob_url("data/zero.bin"), "file"),
        (hns.blob_url("data/empty"), "directory"),
        (hns.blob_url("data/sub"), "directory"),
    ]
    assert fs.ls(hns.blob_url("data/empty")) == []
    assert sorted(fs.find(hns.url)) == [hns.blob_url(name) for name in sorted([*FILES, "data/zero.bin"])]


def test_rm_recursive_deletes_children_before_their_directory(
    hns: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential
) -> None:
    # A hierarchical namespace refuses to delete a directory that still has entries.
    with FaultProxy(azurite.port) as proxy:
        fs = BlobPaths(proxy.url(azurite.account_url), account_credential).filesystem()
        fs.rm(proxy.url(hns.blob_url("data")), recursive=True)
        deleted = [seen.path.split(f"/{hns.name}/", 1)[1] for seen in proxy.requests if seen.method == "DELETE"]

    assert sorted(deleted) == sorted([*FILES, *DIRECTORIES, "data/zero.bin"])
    for directory in DIRECTORIES:
        children = [name for name in deleted if name.startswith(f"{directory}/")]
        assert all(deleted.index(child) < deleted.index(directory) for child in children), deleted
    assert list(hns.client.list_blobs()) == []
