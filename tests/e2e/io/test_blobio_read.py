"""BlobIO in read mode against Azurite."""

import io
import os

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceNotFoundError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from azstoragetorch.io import BlobIO
from tests.conftest import Container

BLOCK = 64 * 1024  # small blocks make multi-chunk reads cheap to test


@pytest.mark.parametrize("size", [0, 1, 20, BLOCK - 1, BLOCK, BLOCK + 1, 5 * BLOCK + 3])
def test_read_whole_blob(container: Container, account_credential: AzureNamedKeyCredential, size: int) -> None:
    data = os.urandom(size)
    url = container.upload("blob.bin", data)
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK) as f:
        assert f.read() == data
        assert f.read() == b""
        assert f.tell() == size


def test_empty_blob_reads_as_empty_bytes(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    url = container.upload("empty", b"")
    with BlobIO(url, "rb", credential=account_credential) as f:
        assert f.read() == b""
        assert f.read(10) == b""
        assert f.readline() == b""
        assert f.seek(0, os.SEEK_END) == 0


def test_readinto_readline_readlines_and_iteration(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    lines = [f"line {i} {'x' * (i * 37 % 500)}\n".encode() for i in range(300)] + [b"no newline at end"]
    data = b"".join(lines)
    url = container.upload("text.txt", data)
    with BlobIO(url, "rb", credential=account_credential, block_size=4096) as f:
        assert list(f) == lines
    with BlobIO(url, "rb", credential=account_credential, block_size=4096) as f:
        assert f.readlines() == lines
    with BlobIO(url, "rb", credential=account_credential, block_size=4096) as f:
        assert f.readline(3) == lines[0][:3]
        assert f.readline() == lines[0][3:]
        target = bytearray(10)
        assert f.readinto(target) == 10 and bytes(target) == lines[1][:10]
        f.seek(-5, os.SEEK_END)
        view = memoryview(bytearray(100))
        assert f.readinto(view) == 5 and bytes(view[:5]) == data[-5:]


def test_seek_and_tell(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    data = os.urandom(10_000)
    url = container.upload("blob", data)
    with BlobIO(url, "rb", credential=account_credential, block_size=1024) as f:
        assert f.seek(100) == 100 and f.read(10) == data[100:110]
        assert f.seek(-10, os.SEEK_CUR) == 100
        assert f.seek(-1, os.SEEK_END) == 9_999 and f.read() == data[-1:]
        assert f.seek(50_000) == 50_000 and f.read(5) == b"" and f.tell() == 50_000  # past the end is allowed
        with pytest.raises(ValueError, match="negative"):
            f.seek(-1)
        with pytest.raises(ValueError, match="whence"):
            f.seek(0, 7)
        assert f.tell() == 50_000


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    operations=st.lists(
        st.one_of(
            st.tuples(
                st.just("seek"), st.integers(0, 12_000), st.sampled_from([os.SEEK_SET, os.SEEK_CUR, os.SEEK_END])
            ),
            st.tuples(st.just("read"), st.integers(-1, 5000)),
            st.tuples(st.just("readline"), st.integers(-1, 300)),
            st.tuples(st.just("readinto"), st.integers(0, 5000)),
        ),
        max_size=30,
    )
)
def test_random_operations_match_bytesio(
    container: Container, account_credential: AzureNamedKeyCredential, operations: list[tuple]
) -> None:
    if not container.exists("random.bin"):
        container.upload("random.bin", b"\n".join(os.urandom(n) for n in range(0, 400, 7)) + os.urandom(3000))
    data = container.download("random.bin")
    reference = io.BytesIO(data)
    with BlobIO(
        container.blob_url("random.bin"), "rb", credential=account_credential, block_size=1024, max_concurrency=3
    ) as f:
        for operation, *args in operations:
            if operation == "seek":
                offset, whence = args
                offset = offset if whence == os.SEEK_SET else offset - 6000  # both directions from CUR/END
                if (
                    reference.tell() if whence == os.SEEK_CUR else len(data) if whence == os.SEEK_END else 0
                ) + offset < 0:
                    with pytest.raises(ValueError):
                        f.seek(offset, whence)
                    continue
                assert f.seek(offset, whence) == reference.seek(offset, whence)
            elif operation == "readinto":
                mine, theirs = bytearray(args[0]), bytearray(args[0])
                assert f.readinto(mine) == reference.readinto(theirs)
                assert mine == theirs
            else:
                assert getattr(f, operation)(args[0]) == getattr(reference, operation)(args[0])
            assert f.tell() == reference.tell()


def test_large_blob_streams_with_bounded_memory(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    data = os.urandom(24 * 1024 * 1024)
    url = container.upload("large", data)
    with BlobIO(url, "rb", credential=account_credential, block_size=1024 * 1024, max_concurrency=4) as f:
        pieces = []
        while piece := f.read(300_001):
            pieces.append(piece)
            assert len(f._reader._store) <= 5  # (max_concurrency + 1) chunks of block_size at most
    assert b"".join(pieces) == data


def test_missing_blob_raises_not_found_at_open(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    with pytest.raises(ResourceNotFoundError, match="BlobNotFound") as info:
        BlobIO(container.blob_url("missing.pt"), "rb", credential=account_credential)
    assert container.blob_url("missing.pt") in str(info.value)
    assert info.value.error_code == "BlobNotFound"


def test_missing_container_raises_not_found(azurite, account_credential: AzureNamedKeyCredential) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ResourceNotFoundError, match="ContainerNotFound"):
        BlobIO(azurite.blob_url("no-such-container", "b"), "rb", credential=account_credential)


def test_anonymous_read_of_private_container_is_refused(container: Container) -> None:
    url = container.upload("private", b"secret")
    with pytest.raises((ClientAuthenticationError, ResourceNotFoundError)) as info:
        BlobIO(url, "rb", credential=False)
    assert url in str(info.value)


def test_anonymous_read_of_public_container(public_container: Container) -> None:
    url = public_container.upload("public", b"hello")
    with BlobIO(url, "rb", credential=False) as f:
        assert f.read() == b"hello"


def test_wrong_account_key_is_an_authentication_error(container: Container) -> None:
    url = container.upload("blob", b"x")
    bad_key = AzureNamedKeyCredential("devstoreaccount1", "AAAA" + "B" * 84)
    with pytest.raises(ClientAuthenticationError):
        BlobIO(url, "rb", credential=bad_key)


def test_snapshot_reads_the_snapshot(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    container.upload("versioned", b"first")
    snapshot = container.client.get_blob_client("versioned").create_snapshot()["snapshot"]
    container.upload("versioned", b"second")
    with BlobIO(container.blob_url("versioned") + f"?snapshot={snapshot}", "rb", credential=account_credential) as f:
        assert f.read() == b"first"
        assert "snapshot=" in f.name
    with BlobIO(container.blob_url("versioned"), "rb", credential=account_credential) as f:
        assert f.read() == b"second"


def test_closed_and_unsupported_operations(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    url = container.upload("blob", b"abc")
    f = BlobIO(url, "rb", credential=account_credential)
    assert f.readable() and f.seekable() and not f.writable()
    with pytest.raises(io.UnsupportedOperation):
        f.write(b"x")
    with pytest.raises(io.UnsupportedOperation):
        f.fileno()
    with pytest.raises(OSError):
        f.truncate()
    f.flush()  # no effect in read mode
    f.close()
    f.close()  # closing twice is fine
    assert f.closed
    for operation in (
        f.read,
        f.readline,
        f.tell,
        f.readable,
        f.flush,
        lambda: f.seek(0),
        lambda: f.readinto(bytearray(1)),
    ):
        with pytest.raises(ValueError, match="closed"):
            operation()
