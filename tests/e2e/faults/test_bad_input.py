"""Bad input, table-driven: every case must give its documented error, whose message names the problem.

Malformed URLs, unsupported modes and types, missing containers and blobs, wrong credentials, an expired
SAS, zero-length and huge writes, seeks before 0, and the integrations' own arguments.
"""

from __future__ import annotations

import dataclasses
import datetime
import io
import os
from collections.abc import Callable
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from azure.storage.blob import ContainerSasPermissions, generate_container_sas

from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, BlobDataModule
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.conftest import Container

AZURE = "https://myaccount.blob.core.windows.net"


@dataclasses.dataclass
class Case:
    id: str
    call: Callable[[Env], Any]
    error: type[BaseException] | tuple[type[BaseException], ...]
    message: str  # a regular expression the message must match


@dataclasses.dataclass
class Env:
    azurite: Azurite
    container: Container
    credential: AzureNamedKeyCredential

    def url(self, name: str = "blob") -> str:
        return self.container.blob_url(name)

    def reader(self, name: str = "blob") -> BlobIO:
        return BlobIO(self.url(name), "rb", credential=self.credential)

    def writer(self, name: str = "blob") -> BlobIO:
        return BlobIO(self.url(name), "wb", credential=self.credential)


def write_and_close(env: Env, url: str, data: bytes, **options: Any) -> None:
    with BlobIO(url, "wb", credential=env.credential, **options) as writer:
        writer.write(data)


def expired_sas(env: Env) -> str:
    return generate_container_sas(
        ACCOUNT_NAME,
        env.container.name,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(read=True, list=True),
        start=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=2),
        expiry=datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(hours=1),
    )


CASES = [
    # -- malformed URLs --------------------------------------------------------------------------
    Case("url-not-a-url", lambda env: BlobIO("model.pt", "rb"), ValueError, r"must start with https://"),
    Case("url-ftp", lambda env: BlobIO("ftp://host/a/c/b", "rb"), ValueError, r"must start with https://"),
    Case("url-no-container", lambda env: BlobIO(f"{AZURE}/", "rb"), ValueError, r"names no container"),
    Case("url-container-only", lambda env: BlobIO(f"{AZURE}/c", "rb"), ValueError, r"names a container but no blob"),
    Case("url-fragment", lambda env: BlobIO(f"{AZURE}/c/a#b", "rb"), ValueError, r"'#' fragment"),
    Case("url-emulator-no-account", lambda env: BlobIO("http://127.0.0.1:10000/", "rb"), ValueError, r"account name"),
    Case("url-not-a-string", lambda env: BlobIO(42, "rb"), TypeError, r"must be a str, not int"),  # type: ignore[arg-type]
    Case(
        "url-snapshot-written",
        lambda env: BlobIO(f"{AZURE}/c/b?snapshot=2024-01-01", "wb"),
        ValueError,
        r"snapshot or version",
    ),
    # -- modes and types -------------------------------------------------------------------------
    Case("mode-r", lambda env: BlobIO(env.url(), "r"), ValueError, r"Unsupported mode 'r'"),  # type: ignore[arg-type]
    Case("mode-append", lambda env: BlobIO(env.url(), "ab"), ValueError, r"Unsupported mode 'ab'"),  # type: ignore[arg-type]
    Case("mode-plus", lambda env: BlobIO(env.url(), "rb+"), ValueError, r"Unsupported mode"),  # type: ignore[arg-type]
    Case(
        "credential-string",
        lambda env: BlobIO(env.url(), "rb", credential="key"),
        TypeError,
        r"AzureNamedKeyCredential",
    ),  # type: ignore[arg-type]
    Case(
        "max-concurrency-0",
        lambda env: BlobIO(env.url(), "wb", max_concurrency=0),
        ValueError,
        r"max_concurrency must be a positive int",
    ),
    Case(
        "max-concurrency-bool",
        lambda env: BlobIO(env.url(), "wb", max_concurrency=True),
        ValueError,
        r"max_concurrency",
    ),
    Case(
        "block-size-too-big",
        lambda env: BlobIO(env.url(), "wb", block_size=5000 * 2**20),
        ValueError,
        r"at most .* \(4000 MiB\)",
    ),
    Case(
        "unknown-keyword",
        lambda env: BlobIO(env.url(), "wb", blocksize=5),
        TypeError,
        r"unexpected keyword arguments: blocksize",
    ),  # type: ignore[call-arg]
    Case("write-a-str", lambda env: env.writer().write("text"), TypeError, r"write\(\) takes bytes"),  # type: ignore[arg-type]
    Case("seek-a-float", lambda env: env.reader().seek(1.5), TypeError, r"offset must be an int"),  # type: ignore[arg-type]
    Case("seek-bad-whence", lambda env: env.reader().seek(0, 7), ValueError, r"Invalid whence"),
    Case(
        "read-a-writer",
        lambda env: env.writer().read(),
        io.UnsupportedOperation,
        r"needs a BlobIO opened with mode 'rb'",
    ),
    Case(
        "write-a-reader",
        lambda env: env.reader().write(b"x"),
        io.UnsupportedOperation,
        r"needs a BlobIO opened with mode 'wb'",
    ),
    Case("seek-a-writer", lambda env: env.writer().seek(0), io.UnsupportedOperation, r"mode 'rb'"),
    Case("fileno", lambda env: env.reader().fileno(), io.UnsupportedOperation, r"no file descriptor"),
    Case("closed", lambda env: (reader := env.reader(), reader.close(), reader.read()), ValueError, r"closed BlobIO"),
    # -- seeks before 0 --------------------------------------------------------------------------
    Case("seek-negative", lambda env: env.reader().seek(-1), ValueError, r"negative position -1"),
    Case("seek-back-past-start", lambda env: env.reader().seek(-10, os.SEEK_CUR), ValueError, r"negative position -10"),
    Case(
        "seek-before-start-from-end",
        lambda env: env.reader().seek(-1000, os.SEEK_END),
        ValueError,
        r"negative position",
    ),
    # -- missing containers and blobs -----------------------------------------------------------
    Case(
        "read-missing-blob",
        lambda env: env.reader("missing"),
        ResourceNotFoundError,
        r"BlobNotFound.*Check the blob name",
    ),
    Case(
        "read-missing-container",
        lambda env: BlobIO(env.azurite.blob_url("no-such-container", "b"), "rb", credential=env.credential),
        ResourceNotFoundError,
        r"ContainerNotFound",
    ),
    Case(
        "write-missing-container",
        lambda env: write_and_close(env, env.azurite.blob_url("no-such-container", "b"), b"x"),
        FatalBlobIOWriteError,
        r"ContainerNotFound.*Open a new BlobIO|nothing|none of the data",
    ),
    Case(
        "list-missing-container",
        lambda env: BlobDataset.from_container_url(
            env.azurite.container_url("no-such-container"), credential=env.credential
        ),
        ResourceNotFoundError,
        r"Could not list the blobs of .*no-such-container",
    ),
    # -- wrong credentials and an expired SAS --------------------------------------------------
    Case(
        "wrong-account-key",
        lambda env: BlobIO(env.url(), "rb", credential=AzureNamedKeyCredential(ACCOUNT_NAME, "d3Jvbmcga2V5")),
        ClientAuthenticationError,
        r"HTTP 403",
    ),
    Case(
        "account-key-not-base64",
        lambda env: BlobIO(env.url(), "rb", credential=AzureNamedKeyCredential(ACCOUNT_NAME, "not base64!")),
        ValueError,
        r"not valid base64",
    ),
    Case(
        "expired-sas",
        lambda env: BlobIO(f"{env.url()}?{expired_sas(env)}", "rb"),
        ClientAuthenticationError,
        r"HTTP 403.*(AuthenticationFailed|AuthorizationFailure).*SAS token expired at",
    ),
    Case(
        "anonymous-on-a-private-container",
        lambda env: BlobIO(env.url(), "rb", credential=False),
        (ResourceNotFoundError, ClientAuthenticationError),  # Azure says 404, Azurite 403
        r"The request was anonymous \(credential=False, no SAS token\)",
    ),
    # -- datasets -------------------------------------------------------------------------------
    Case(
        "dataset-prefix-type",
        lambda env: BlobDataset.from_container_url(env.container.url, prefix=3),
        TypeError,
        r"prefix must be a str",
    ),  # type: ignore[arg-type]
    Case(
        "dataset-path-after-container",
        lambda env: BlobDataset.from_container_url(f"{AZURE}/c/d"),
        ValueError,
        r"path after the container",
    ),
    Case("dataset-blob-url-without-blob", lambda env: BlobDataset.from_blob_urls(f"{AZURE}/c"), ValueError, r"no blob"),
    Case(
        "dataset-prefetch-0",
        lambda env: IterableBlobDataset.from_blob_urls([], prefetch=0),
        ValueError,
        r"prefetch must be an int from 1 to 128",
    ),
    Case(
        "dataset-index-out-of-range",
        lambda env: BlobDataset.from_blob_urls([env.url()], credential=env.credential)[5],
        IndexError,
        r"index",
    ),
    # -- integrations ---------------------------------------------------------------------------
    Case(
        "plugin-local-path",
        lambda env: AzureBlobCheckpointIO(credential=False).save_checkpoint({}, "/tmp/x.ckpt"),
        ValueError,
        r"cannot use '/tmp/x\.ckpt'.*blob\.core\.windows\.net",
    ),
    Case(
        "plugin-account-url",
        lambda env: AzureBlobCheckpointIO(account_url="ftp://x"),
        ValueError,
        r"account_url .* must be an http\(s\) URL",
    ),
    Case(
        "plugin-storage-options",
        lambda env: AzureBlobCheckpointIO(credential=False).save_checkpoint(
            {}, f"{AZURE}/c/x.ckpt", storage_options={"tier": "cool"}
        ),
        TypeError,
        r"'tier'.*supported keys",
    ),
    Case("dcp-not-a-prefix", lambda env: BlobStorageWriter("s3://bucket/ckpt"), ValueError, r"not a blob prefix URL"),
    Case(
        "dcp-thread-count",
        lambda env: BlobStorageWriter(f"{AZURE}/c/ckpt", thread_count=0),
        ValueError,
        r"thread_count must be a positive int",
    ),
    Case(
        "dcp-reader-block-size",
        lambda env: BlobStorageReader(f"{AZURE}/c/ckpt", block_size=-1),
        ValueError,
        r"block_size",
    ),
    Case("datamodule-no-split", lambda env: BlobDataModule().setup("fit"), ValueError, r"no split to load"),
    Case("datamodule-split-type", lambda env: BlobDataModule(train=7), TypeError, r"train split must be"),  # type: ignore[arg-type]
]


@pytest.fixture
def env(azurite: Azurite, container: Container, account_credential: AzureNamedKeyCredential) -> Env:
    container.upload("blob", b"0123456789" * 10)
    return Env(azurite, container, account_credential)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
@pytest.mark.usefixtures("no_backoff")
def test_bad_input_gives_its_documented_error(env: Env, case: Case) -> None:
    with pytest.raises(case.error, match=case.message):
        case.call(env)


def test_a_zero_length_write_makes_an_empty_blob(env: Env) -> None:
    with env.writer("empty") as writer:
        assert writer.write(b"") == 0
    assert env.container.download("empty") == b""
    with env.reader("empty") as reader:
        assert (reader.read(), reader.read(10), reader.readline()) == (b"", b"", b"")


def test_one_huge_write_is_split_into_blocks(env: Env) -> None:
    data = os.urandom(48 * 2**20)  # one write() call, 12 blocks of 4 MiB
    write_and_close(env, env.url("huge"), data, block_size=4 * 2**20)
    assert env.container.download("huge") == data


def test_reading_past_the_end_is_empty_not_an_error(env: Env) -> None:
    with env.reader() as reader:
        assert reader.seek(10_000) == 10_000
        assert reader.read() == b""


# -- dot segments never reach another blob -------------------------------------------------------------


@pytest.mark.parametrize("name", ["a/../b.pt", "a/%2E%2E/b.pt", "a/%2e./b.pt", "./b.pt", "a/./b.pt"])
@pytest.mark.parametrize("authorization", ["container-sas", "account-key"])
def test_a_blob_name_with_dot_segments_is_refused_and_no_other_blob_is_touched(
    env: Env, name: str, authorization: str
) -> None:
    env.container.upload("b.pt", b"the other blob")
    if authorization == "container-sas":
        sas = env.container.container_sas(read=True, write=True, create=True)
        url, credential = f"{env.container.url}/{name}?{sas}", None
    else:
        url, credential = f"{env.container.url}/{name}", env.credential
    with (
        pytest.raises(ValueError, match=r"'\.' or '\.\.'") as caught,
        BlobIO(url, "wb", credential=credential) as writer,
    ):
        writer.write(b"meant for another name")
    assert "sig=" not in str(caught.value)
    with pytest.raises(ValueError, match=r"'\.' or '\.\.'"):
        BlobIO(url, "rb", credential=credential)
    assert env.container.download("b.pt") == b"the other blob"
    assert sorted(blob.name for blob in env.container.client.list_blobs()) == ["b.pt", "blob"]
