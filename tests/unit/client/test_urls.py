import urllib.parse

import pytest
from azure.core.credentials import AzureSasCredential

from azstoragetorch._client import AzStorageTorchBlobClient, BlobUrl, ContainerUrl
from azstoragetorch._client._urls import fsspec_path_to_url
from azstoragetorch.io import BlobIO

AZURE = "https://myaccount.blob.core.windows.net"
SAS = "sv=2021-08-06&ss=b&srt=o&sp=r&se=2030-01-01T00%3A00%3A00Z&sig=abc%2Bdef%3D"


def test_azure_url() -> None:
    url = BlobUrl.parse(f"{AZURE}/container/dir/model.pt")
    assert (url.account_name, url.container_name, url.blob_name) == ("myaccount", "container", "dir/model.pt")
    assert not url.path_style
    assert url.account_url == AZURE
    assert url.container_url == f"{AZURE}/container"
    assert url.request_url() == f"{AZURE}/container/dir/model.pt"


@pytest.mark.parametrize("host", ["127.0.0.1:10000", "localhost:10000", "azurite:10000", "[::1]:10000"])
def test_path_style_hosts_carry_the_account_in_the_path(host: str) -> None:
    url = BlobUrl.parse(f"http://{host}/devstoreaccount1/container/a/b.pt")
    assert url.path_style
    assert (url.account_name, url.container_name, url.blob_name) == ("devstoreaccount1", "container", "a/b.pt")
    assert url.account_url == f"http://{host}/devstoreaccount1"


def test_blob_names_with_spaces_unicode_and_slashes_round_trip() -> None:
    url = BlobUrl.parse(f"{AZURE}/container/runs/épique run/ckpt%20final.pt")
    assert url.blob_name == "runs/épique run/ckpt final.pt"
    assert url.request_url() == f"{AZURE}/container/runs/%C3%A9pique%20run/ckpt%20final.pt"
    assert BlobUrl.parse(url.request_url()) == url


def test_sas_is_kept_verbatim_for_requests_and_hidden_from_display() -> None:
    url = BlobUrl.parse(f"{AZURE}/container/blob?{SAS}")
    assert url.has_sas
    assert url.request_url().endswith("?" + SAS)  # byte-for-byte, so the signature stays valid
    assert "sig" not in url.display_url and "sig" not in repr(url)
    assert url.url_without_query == f"{AZURE}/container/blob"


def test_snapshot_and_version_are_selectors_not_secrets() -> None:
    url = BlobUrl.parse(f"{AZURE}/c/blob?snapshot=2024-01-01T00%3A00%3A00.0000000Z&{SAS}")
    assert url.snapshot == "2024-01-01T00:00:00.0000000Z"
    assert url.display_url == f"{AZURE}/c/blob?snapshot=2024-01-01T00%3A00%3A00.0000000Z"
    assert "snapshot=2024-01-01T00%3A00%3A00.0000000Z" in url.request_url()
    version = BlobUrl.parse(f"{AZURE}/c/blob?versionid=2024-05-05T10%3A00%3A00.1234567Z")
    assert version.version_id == "2024-05-05T10:00:00.1234567Z"
    assert not version.has_sas
    assert version.request_url() == version.display_url


def test_extra_query_comes_first() -> None:
    url = BlobUrl.parse(f"{AZURE}/c/blob?{SAS}")
    assert url.request_url("comp=block", "blockid=x").startswith(f"{AZURE}/c/blob?comp=block&blockid=x&sv=")


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("myaccount.blob.core.windows.net/c/b", "https://"),
        ("ftp://myaccount.blob.core.windows.net/c/b", "https://"),
        ("https:///c/b", "no host"),
        (f"{AZURE}", "no container"),
        (f"{AZURE}/", "no container"),
        (f"{AZURE}/container", "no blob"),
        (f"{AZURE}/container/", "no blob"),
        ("http://127.0.0.1:10000/", "account name"),
        (f"{AZURE}/c/blob#frag", "fragment"),
    ],
)
def test_malformed_urls_raise_value_error_naming_the_problem(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        BlobUrl.parse(url)


def test_error_for_malformed_url_hides_sas() -> None:
    with pytest.raises(ValueError) as info:
        BlobUrl.parse(f"{AZURE}/container?{SAS}")
    assert "sig=" not in str(info.value)


def test_non_string_url_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="str"):
        BlobUrl.parse(b"https://a.blob.core.windows.net/c/b")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "prefix"),
    [
        (f"{AZURE}/container", ""),
        (f"{AZURE}/container/", ""),
        (f"{AZURE}/container/runs/run%201/", "runs/run 1/"),
        ("http://127.0.0.1:10000/devstoreaccount1/container/ckpt", "ckpt"),
    ],
)
def test_container_with_prefix(url: str, prefix: str) -> None:
    container, parsed_prefix = ContainerUrl.parse_with_prefix(url)
    assert container.container_name == "container"
    assert parsed_prefix == prefix


def test_container_with_prefix_keeps_the_sas_and_refuses_selectors() -> None:
    container, _ = ContainerUrl.parse_with_prefix(f"{AZURE}/container/dir?{SAS}")
    assert container.has_sas and "sig" not in container.display_url
    with pytest.raises(ValueError, match="snapshot or version"):
        ContainerUrl.parse_with_prefix(f"{AZURE}/container/dir?snapshot=2024-01-01")
    with pytest.raises(ValueError, match="names no container"):
        ContainerUrl.parse_with_prefix(f"{AZURE}/")


# -- fsspec paths: which hosts may receive a credential ---------------------------------------------


@pytest.mark.parametrize(
    ("path", "url"),
    [
        ("abfss://c@acct.dfs.core.windows.net/m.ckpt", "https://acct.blob.core.windows.net/c/m.ckpt"),
        ("abfs://c@acct.blob.core.windows.net/m.ckpt", "https://acct.blob.core.windows.net/c/m.ckpt"),
        ("az://c@acct.dfs.core.chinacloudapi.cn/m.ckpt", "https://acct.blob.core.chinacloudapi.cn/c/m.ckpt"),
        ("az://c@acct.dfs.core.usgovcloudapi.net/m.ckpt", "https://acct.blob.core.usgovcloudapi.net/c/m.ckpt"),
        ("abfss://c@acct.z12.dfs.storage.azure.net/m.ckpt", "https://acct.z12.blob.storage.azure.net/c/m.ckpt"),
        ("abfss://c@ACCT.DFS.Core.Windows.Net/m.ckpt", "https://acct.blob.core.windows.net/c/m.ckpt"),
    ],
)
def test_fsspec_paths_on_azure_endpoints(path: str, url: str) -> None:
    assert fsspec_path_to_url(path, account_url=None) == url


@pytest.mark.parametrize(
    "host",
    [
        "acct.dfs.core.attacker.example",
        "acct.blob.core.attacker.example",
        "acct.dfs.core.windows.net.attacker.example",
        "acct.dfs.core.windows.net.",
        "acct.z12.dfs.storage.azure.net.attacker.example",
        "acct.dfs.storage.azure.net",
        "evil.example",
    ],
)
@pytest.mark.parametrize(
    "account_url", [None, "https://acct.blob.core.windows.net", "http://127.0.0.1:10000/devstoreaccount1"]
)
def test_fsspec_paths_on_other_hosts_are_refused(host: str, account_url: str | None) -> None:
    # A token for Azure Storage must never be sent to a host that merely looks like Azure.
    with pytest.raises(ValueError, match="not an Azure Storage endpoint") as caught:
        fsspec_path_to_url(f"abfss://c@{host}/m.ckpt", account_url=account_url)
    assert "account_url" in str(caught.value)


def test_fsspec_paths_on_a_host_the_user_named_are_accepted() -> None:
    account_url = "https://acct.blob.core.contoso.example"  # Azure Stack or a custom endpoint
    for host in ("acct.dfs.core.contoso.example", "acct.blob.core.contoso.example"):
        url = fsspec_path_to_url(f"abfss://c@{host}/m.ckpt", account_url=account_url)
        assert url == f"{account_url}/c/m.ckpt"
    with pytest.raises(ValueError, match="not an Azure Storage endpoint"):
        fsspec_path_to_url("abfss://c@other.dfs.core.contoso.example/m.ckpt", account_url=account_url)


# -- a SAS token without its signature -----------------------------------------------------------------

INCOMPLETE_SAS = "sv=2021-08-06&sr=b&sp=r&se=2030-01-01T00%3A00%3A00Z"


@pytest.mark.parametrize(
    "url",
    [
        f"{AZURE}/container/blob?{INCOMPLETE_SAS}",
        f"{AZURE}/container/blob?{INCOMPLETE_SAS}&snapshot=2024-01-01T00%3A00%3A00.0000000Z",
        f"{AZURE}/container/blob?si=policy",
    ],
)
def test_a_sas_without_its_signature_is_an_error_not_a_fallback_to_another_credential(url: str) -> None:
    with pytest.raises(ValueError, match=r"incomplete.*sig=") as caught:
        BlobUrl.parse(url)
    assert "blob" in str(caught.value)
    with pytest.raises(ValueError, match="incomplete"):
        ContainerUrl.parse_with_prefix(url.replace("&snapshot=2024-01-01T00%3A00%3A00.0000000Z", ""))


def test_an_incomplete_sas_credential_is_an_error() -> None:
    with pytest.raises(ValueError, match=r"AzureSasCredential.*incomplete.*sig="):
        AzStorageTorchBlobClient.from_url(f"{AZURE}/container/blob", AzureSasCredential(INCOMPLETE_SAS))
    AzStorageTorchBlobClient.from_url(f"{AZURE}/container/blob", AzureSasCredential(f"?{INCOMPLETE_SAS}&sig=x"))


def test_other_query_parameters_are_not_taken_for_an_incomplete_sas() -> None:
    assert not BlobUrl.parse(f"{AZURE}/container/blob?timeout=30").has_sas


# -- dot segments --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/../b.pt", "../b.pt", "a/..", "./c.pt", "a/./c.pt", "a/%2E%2E/b.pt", "%2e/c.pt"])
def test_blob_names_with_dot_segments_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        BlobUrl.parse(f"{AZURE}/container/{name}")
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        ContainerUrl.parse(f"{AZURE}/container").blob_url(urllib.parse.unquote(name))
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        ContainerUrl.parse_with_prefix(f"{AZURE}/container/{name}/")


@pytest.mark.parametrize("name", ["a..b.pt", "...", ".hidden", "a./b", "v1.0/model.pt"])
def test_dots_that_are_not_whole_segments_are_kept(name: str) -> None:
    assert BlobUrl.parse(f"{AZURE}/container/{name}").blob_name == name


# -- path-style URLs without their account -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "interpretation"),
    [
        ("http://127.0.0.1:10000/container/model.pt", "no blob (read as account 'container', container 'model.pt')"),
        ("http://127.0.0.1:10000/model.pt", "no container (read as account 'model.pt')"),
        ("http://azurite:10000/container/run/", "no blob (read as account 'container', container 'run')"),
    ],
)
def test_a_path_style_url_without_its_account_says_the_account_may_be_missing(url: str, interpretation: str) -> None:
    with pytest.raises(ValueError) as caught:
        BlobUrl.parse(url)
    message = str(caught.value)
    assert interpretation in message and "the account name is missing" in message
    assert "<account>/<container>/<blob>" in message


def test_a_path_style_container_url_without_its_account_says_so() -> None:
    with pytest.raises(ValueError, match=r"no container \(read as account 'container'\).*account name is missing"):
        ContainerUrl.parse("http://127.0.0.1:10000/container")


# -- a URL that names no blob, with the account right ------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:10000/devstoreaccount1/container",
        "http://127.0.0.1:10000/devstoreaccount1/container/",
        "http://localhost:10000/devstoreaccount1/container",
        "http://azurite:10000/devstoreaccount1/container/",
        f"http://127.0.0.1:10000/devstoreaccount1/container?{SAS}",
        f"{AZURE}/container",
        f"{AZURE}/container/",
        f"{AZURE}/container?{SAS}",
    ],
)
def test_a_container_url_given_for_a_blob_says_that_it_names_no_blob(url: str) -> None:
    with pytest.raises(ValueError) as caught:
        BlobIO(url, "rb", credential=False)  # refused before any request
    message = str(caught.value)
    assert "names a container but no blob" in message
    assert "account name is missing" not in message  # the account is right
    assert "sig=" not in message


@pytest.mark.parametrize("url", ["http://127.0.0.1:10000/devstoreaccount1", "http://127.0.0.1:10000/devstoreaccount1/"])
def test_an_emulator_account_url_says_that_it_names_no_container(url: str) -> None:
    for parse in (BlobUrl.parse, ContainerUrl.parse):
        with pytest.raises(ValueError, match=r"names no container \(account 'devstoreaccount1'\)") as caught:
            parse(url)
        assert "account name is missing" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "https://user:hunter2@myaccount.blob.core.windows.net/container/b.pt",
        "https://hunter2@myaccount.blob.core.windows.net/container/b.pt",
        "http://user:hunter2@127.0.0.1:10000/devstoreaccount1/container/b.pt",
    ],
)
def test_a_user_name_or_password_in_the_url_is_refused_without_showing_it(url: str) -> None:
    for parse in (BlobUrl.parse, ContainerUrl.parse_with_prefix):
        with pytest.raises(ValueError, match="user name or password before its host") as caught:
            parse(url)
        assert "hunter2" not in str(caught.value)
