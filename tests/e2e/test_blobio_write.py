"""BlobIO in write mode against Azurite."""

import io
import os

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.io import BlobIO
from tests.conftest import Container

MiB = 1024 * 1024
BLOCK = 256 * 1024


@pytest.mark.parametrize("size", [0, 1, 20, BLOCK - 1, BLOCK, BLOCK + 1, 3 * BLOCK + 5])
def test_write_sizes(container: Container, account_credential: AzureNamedKeyCredential, size: int) -> None:
    data = os.urandom(size)
    with BlobIO(container.blob_url("out.bin"), "wb", credential=account_credential, block_size=BLOCK) as f:
        assert f.write(data) == size
        assert f.tell() == size
    assert container.download("out.bin") == data


@pytest.mark.slow
@pytest.mark.parametrize(("size", "chunk"), [(64 * MiB, 1 * MiB + 7), (96 * MiB, 13 * MiB), (64 * MiB, 64 * MiB)])
def test_large_writes_in_varied_chunks(
    container: Container, account_credential: AzureNamedKeyCredential, size: int, chunk: int
) -> None:
    data = os.urandom(size)
    view = memoryview(data)
    with BlobIO(container.blob_url("large"), "wb", credential=account_credential) as f:
        for start in range(0, size, chunk):
            f.write(view[start : start + chunk])
    assert container.download("large") == data


def test_many_tiny_writes(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    data = os.urandom(50_000)
    with BlobIO(container.blob_url("tiny"), "wb", credential=account_credential, block_size=4096) as f:
        for start in range(0, len(data), 3):
            f.write(data[start : start + 3])
    assert container.download("tiny") == data


def test_write_accepts_bytes_like_and_rejects_others(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    with BlobIO(container.blob_url("types"), "wb", credential=account_credential) as f:
        assert f.write(b"ab") == 2
        assert f.write(bytearray(b"cd")) == 2
        assert f.write(memoryview(b"efgh")[1:3]) == 2
        assert f.write(memoryview(torch.arange(2, dtype=torch.int32).numpy())) == 8  # counts bytes, not items
        for bad in ("text", 3, [1, 2], None):
            with pytest.raises(TypeError, match="bytes"):
                f.write(bad)  # type: ignore[arg-type]
    assert container.download("types") == b"abcdfg" + torch.arange(2, dtype=torch.int32).numpy().tobytes()


def test_overwrite_replaces_content(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    container.upload("blob", b"old" * 100_000)
    with BlobIO(container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK) as f:
        f.write(b"new")
    assert container.download("blob") == b"new"


def test_nothing_is_visible_before_close(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    container.upload("blob", b"old")
    f = BlobIO(container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK)
    f.write(os.urandom(3 * BLOCK))
    f.flush()
    assert container.download("blob") == b"old"
    f.close()
    assert len(container.download("blob")) == 3 * BLOCK


def test_exception_inside_with_block_commits_nothing(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    container.upload("checkpoint.pt", b"good checkpoint")
    with (
        pytest.raises(RuntimeError, match="boom"),
        BlobIO(container.blob_url("checkpoint.pt"), "wb", credential=account_credential, block_size=BLOCK) as f,
    ):
        f.write(os.urandom(2 * BLOCK + 1))
        raise RuntimeError("boom")
    assert f.closed
    assert container.download("checkpoint.pt") == b"good checkpoint"
    with pytest.raises(RuntimeError), BlobIO(container.blob_url("new.pt"), "wb", credential=account_credential) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert not container.exists("new.pt")


def test_unclosed_writer_is_not_committed_when_collected(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    f = BlobIO(container.blob_url("abandoned"), "wb", credential=account_credential)
    f.write(b"data")
    with pytest.warns(ResourceWarning, match="NOT committed"):
        f.__del__()
    assert not container.exists("abandoned")


def test_anonymous_write_to_private_container_is_fatal(container: Container) -> None:
    container.upload("blob", b"old")
    f = BlobIO(container.blob_url("blob"), "wb", credential=False, block_size=BLOCK)
    f.write(os.urandom(3 * BLOCK))  # blocks are staged in the background; the first failure shows up later
    with pytest.raises(FatalBlobIOWriteError) as info:
        f.flush()
    assert "NoAuthenticationInformation" in str(info.value) or "403" in str(info.value) or "404" in str(info.value)
    for operation in (lambda: f.write(b"x"), f.flush, f.close):
        with pytest.raises(FatalBlobIOWriteError):
            operation()
    assert f.closed
    assert container.download("blob") == b"old"


def test_anonymous_small_write_fails_at_close(container: Container) -> None:
    f = BlobIO(container.blob_url("small"), "wb", credential=False)
    f.write(b"abc")
    with pytest.raises(FatalBlobIOWriteError):
        f.close()
    assert not container.exists("small")


def test_write_mode_restrictions(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    f = BlobIO(container.blob_url("w"), "wb", credential=account_credential)
    assert f.writable() and not f.readable() and not f.seekable()
    for operation in (f.read, f.readline, lambda: f.seek(0), lambda: f.readinto(bytearray(1))):
        with pytest.raises(io.UnsupportedOperation):
            operation()
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.write(b"x")
    assert container.download("w") == b""  # zero bytes written creates an empty blob


def test_snapshot_urls_cannot_be_written(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    with pytest.raises(ValueError, match="snapshot"):
        BlobIO(container.blob_url("b") + "?snapshot=2024-01-01T00:00:00.0000000Z", "wb", credential=account_credential)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"mode": "r"}, ValueError),
        ({"mode": "ab"}, ValueError),
        ({"mode": "rb", "max_concurrency": 0}, ValueError),
        ({"mode": "rb", "block_size": -1}, ValueError),
        ({"mode": "rb", "block_size": 5000 * MiB}, ValueError),
        ({"mode": "rb", "credential": "key"}, TypeError),
        ({"mode": "rb", "unknown_option": 1}, TypeError),
    ],
)
def test_bad_arguments(container: Container, kwargs: dict, error: type[Exception]) -> None:
    with pytest.raises(error):
        BlobIO(container.blob_url("b"), **kwargs)


def test_validate_content_uploads(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    for size in (100, 3 * BLOCK + 1):
        data = os.urandom(size)
        with BlobIO(
            container.blob_url("md5"), "wb", credential=account_credential, block_size=BLOCK, validate_content=True
        ) as f:
            f.write(data)
        assert container.download("md5") == data
