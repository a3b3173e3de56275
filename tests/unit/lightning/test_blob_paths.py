"""Which paths are blob paths for the Lightning integration, and the URLs they become."""

from __future__ import annotations

import pytest

from azstoragetorch._client._urls import fsspec_path_to_url, is_azure_blob_host
from azstoragetorch.integrations.lightning._paths import BlobPaths

EMULATOR = "http://127.0.0.1:10000/devstoreaccount1"


@pytest.mark.parametrize(
    ("host", "is_azure"),
    [
        ("myaccount.blob.core.windows.net", True),
        ("MyAccount.Blob.Core.Windows.Net", True),
        ("myaccount-secondary.blob.core.windows.net", True),
        ("myaccount.blob.core.chinacloudapi.cn", True),
        ("myaccount.blob.core.usgovcloudapi.net", True),
        ("myaccount.z12.blob.storage.azure.net", True),
        ("myaccount.dfs.core.windows.net", False),
        ("blob.core.windows.net.example.com", False),
        ("example.com", False),
        ("127.0.0.1", False),
    ],
)
def test_azure_blob_hosts(host: str, is_azure: bool) -> None:
    assert is_azure_blob_host(host) is is_azure


@pytest.mark.parametrize(
    ("path", "url"),
    [
        ("https://acct.blob.core.windows.net/c/run/last.ckpt", "https://acct.blob.core.windows.net/c/run/last.ckpt"),
        (f"{EMULATOR}/c/run/last.ckpt", f"{EMULATOR}/c/run/last.ckpt"),
        ("az://c/run/epoch=1.ckpt", f"{EMULATOR}/c/run/epoch%3D1.ckpt"),
        ("abfs://c/run", f"{EMULATOR}/c/run"),
    ],
)
def test_blob_paths_become_urls(path: str, url: str) -> None:
    assert BlobPaths(EMULATOR, None).url_for(path) == url


@pytest.mark.parametrize(
    ("account_url", "path", "url"),
    [
        (
            "https://acct.blob.core.windows.net",
            "abfss://c@acct.dfs.core.windows.net/run/x.ckpt",
            "https://acct.blob.core.windows.net/c/run/x.ckpt",
        ),
        (
            "https://gov.blob.core.usgovcloudapi.net",
            "az://c@gov.blob.core.usgovcloudapi.net/x",
            "https://gov.blob.core.usgovcloudapi.net/c/x",
        ),
    ],
)
def test_adlfs_paths_naming_the_account_of_account_url_become_urls(account_url: str, path: str, url: str) -> None:
    assert BlobPaths(account_url, None).url_for(path) == url
    assert BlobPaths(EMULATOR, None).url_for(path) is None  # another account: adlfs's


@pytest.mark.parametrize(
    "path",
    [
        "/tmp/run/last.ckpt",
        "run/last.ckpt",
        "s3://bucket/last.ckpt",
        "https://example.com/last.ckpt",
        "http://127.0.0.1:10001/devstoreaccount1/c/last.ckpt",  # another port
        "http://127.0.0.1:10000/devstoreaccount10/c/last.ckpt",  # another account
        "https://127.0.0.1:10000/devstoreaccount1/c/last.ckpt",  # another scheme
    ],
)
def test_other_paths_are_not_blob_paths(path: str) -> None:
    assert BlobPaths(EMULATOR, None).url_for(path) is None


def test_without_an_account_url_only_azure_endpoints_are_claimed() -> None:
    paths = BlobPaths(None, None)
    assert paths.url_for(f"{EMULATOR}/c/last.ckpt") is None
    assert paths.url_for("https://acct.blob.core.windows.net/c/last.ckpt") is not None


def test_adlfs_paths_are_not_claimed_without_an_account_url(monkeypatch: pytest.MonkeyPatch) -> None:
    # AZURE_STORAGE_ACCOUNT_NAME is adlfs's setting, not the plugin's.
    monkeypatch.setenv("AZURE_STORAGE_ACCOUNT_NAME", "envacct")
    paths = BlobPaths(None, None)

    for path in ("az://c/x", "abfss://c@envacct.dfs.core.windows.net/x"):
        assert paths.url_for(path) is None
        assert "account_url" in paths.refusal(path)


def test_az_paths_without_a_container_are_errors() -> None:
    with pytest.raises(ValueError, match="names no container"):
        BlobPaths(EMULATOR, None).url_for("az:///x")
    with pytest.raises(ValueError, match="names no container"):
        fsspec_path_to_url("az:///x", account_url=EMULATOR)
    with pytest.raises(ValueError, match=r"dfs\.core\.windows\.net"):
        fsspec_path_to_url("abfs://c@example.com/x", account_url=None)


def test_fsspec_names_are_percent_encoded_in_urls() -> None:
    assert fsspec_path_to_url("az://c/a b/100%?#.txt", account_url=EMULATOR) == f"{EMULATOR}/c/a%20b/100%25%3F%23.txt"


def test_a_file_name_joined_after_a_sas_is_refused_but_a_sas_with_slashes_is_not() -> None:
    sas = "se=2030-01-01T00%3A00%3A00Z&sp=rl&sv=2026-10-06&sr=c&sig=U8RH/UhGc8m+EDEAYWs6ndSY%3D"
    paths = BlobPaths(EMULATOR, None)

    assert paths.url_for(f"{EMULATOR}/c/last.ckpt?{sas}") == f"{EMULATOR}/c/last.ckpt?{sas}"
    with pytest.raises(ValueError, match="AzureSasCredential") as error:
        paths.url_for(f"{EMULATOR}/c/run?{sas}/epoch=0-step=4.ckpt")
    assert "sig" not in str(error.value)
