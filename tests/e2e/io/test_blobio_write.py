"""BlobIO in write mode against Azurite."""

import io
import os
import signal
import threading
from typing import Any

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._client import BlockUploader, _schedule
from azstoragetorch.exceptions import BlobWriteConflictError, FatalBlobIOWriteError
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


# -- two writers, one blob ---------------------------------------------------------------------


@pytest.mark.parametrize("loser_staged", ["all", "some"], ids=["loser-staged-all", "loser-still-staging"])
def test_two_writers_on_one_blob_the_first_commit_wins_and_the_other_is_told(
    container: Container, loser_staged: str
) -> None:
    # Committing a block list discards every block staged for the blob that it does not name, so
    # the writer that commits second finds (some of) its own blocks gone. It must say so, not
    # report a cryptic 400 InvalidBlockList, and the blob must be the first writer's whole content.
    container.upload("checkpoint.pt", b"previous checkpoint")
    url = f"{container.blob_url('checkpoint.pt')}?{container.blob_sas('checkpoint.pt', read=True, write=True)}"
    winner_data, loser_data = os.urandom(3 * BLOCK + 1), os.urandom(4 * BLOCK + 2)
    winner = BlobIO(url, "wb", block_size=BLOCK)
    loser = BlobIO(url, "wb", block_size=BLOCK)
    half = 2 * BLOCK if loser_staged == "some" else len(loser_data)
    loser.write(loser_data[:half])
    loser.flush()  # staged: all of its blocks, or the first two
    winner.write(winner_data)
    winner.close()  # the other writer commits first
    loser.write(loser_data[half:])  # blocks staged after that commit survive, but the first ones are gone

    with pytest.raises(BlobWriteConflictError) as caught:
        loser.close()

    assert isinstance(caught.value, FatalBlobIOWriteError)  # `except FatalBlobIOWriteError` still catches it
    message = str(caught.value)
    assert "another writer" in message and container.blob_url("checkpoint.pt") in message
    assert "sig=" not in message and "?" not in message
    assert caught.value.blob_url == container.blob_url("checkpoint.pt")
    assert getattr(caught.value.underlying_exception, "error_code", None) == "InvalidBlockList"
    assert loser.closed
    assert container.download("checkpoint.pt") == winner_data


@pytest.mark.parametrize("seed", [11, 12, 13, 14])
def test_racing_writers_leave_one_writers_complete_blob(
    container: Container, account_credential: AzureNamedKeyCredential, seed: int
) -> None:
    # Two real writers in two threads, both multi-block, committing at the same moment: exactly one
    # wins, the other is told that it lost, and the blob is the winner's data, whole.
    print(f"perturbation seed {seed}")
    url = container.blob_url("raced.pt")
    data = [os.urandom(5 * BLOCK + 1), os.urandom(6 * BLOCK + 2)]
    all_staged = threading.Barrier(2, timeout=120)  # a guard against a hang, not a timing assertion
    outcomes: list[Any] = [None, None]

    def save(index: int) -> None:
        try:
            with BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=2) as f:
                f.write(data[index])
                f.flush()
                all_staged.wait()
        except BaseException as error:
            outcomes[index] = error
        else:
            outcomes[index] = "committed"

    with _schedule.perturbed(seed):
        threads = [threading.Thread(target=save, args=(index,)) for index in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    assert sorted(map(str, outcomes)).count("committed") == 1, outcomes
    winner = outcomes.index("committed")
    assert isinstance(outcomes[1 - winner], BlobWriteConflictError), outcomes
    assert container.download("raced.pt") == data[winner]


# -- Ctrl-C -------------------------------------------------------------------------------------


@pytest.fixture
def interrupted_overwrite(container: Container, monkeypatch: pytest.MonkeyPatch, python_ctrl_c: None) -> str:
    """The URL of a blob that holds ``b"previous checkpoint"``; the test's first large write into a
    blob stops half-way with a real SIGINT, as Ctrl-C would."""
    container.upload("checkpoint.pt", b"previous checkpoint")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # see python_ctrl_c
    real_write = BlockUploader.write
    interrupted = False

    def write(self: BlockUploader, data: memoryview) -> None:
        nonlocal interrupted
        if interrupted or len(data) < 4 * BLOCK:
            real_write(self, data)
            return
        interrupted = True
        real_write(self, data[: len(data) // 2])  # blocks are staged by now
        signal.raise_signal(signal.SIGINT)  # the default handler raises KeyboardInterrupt right here
        real_write(self, data[len(data) // 2 :])

    monkeypatch.setattr(BlockUploader, "write", write)
    return container.blob_url("checkpoint.pt")


def test_ctrl_c_inside_torch_save_shows_keyboard_interrupt_and_commits_nothing(
    container: Container, account_credential: AzureNamedKeyCredential, interrupted_overwrite: str
) -> None:
    with (
        pytest.raises(KeyboardInterrupt) as caught,
        BlobIO(interrupted_overwrite, "wb", credential=account_credential, block_size=BLOCK) as f,
    ):
        torch.save({"step": 7, "weights": torch.randn(20 * BLOCK // 4)}, f)
    assert type(caught.value) is KeyboardInterrupt
    assert isinstance(caught.value.__context__, RuntimeError)  # torch's failed clean-up, kept but not shown last
    assert f.closed
    assert container.download("checkpoint.pt") == b"previous checkpoint"


def test_ctrl_c_inside_torch_save_without_a_with_block_commits_nothing(
    container: Container, account_credential: AzureNamedKeyCredential, interrupted_overwrite: str
) -> None:
    # Without a with block the caller may still call close(), for example in a finally clause:
    # the interrupted write left a torn archive behind, which must not become the blob.
    f = BlobIO(interrupted_overwrite, "wb", credential=account_credential, block_size=BLOCK)
    with pytest.raises((KeyboardInterrupt, RuntimeError)):  # torch's clean-up error hides the interrupt here
        torch.save({"step": 7, "weights": torch.randn(20 * BLOCK // 4)}, f)
    with pytest.raises(FatalBlobIOWriteError, match="KeyboardInterrupt"):
        f.close()
    assert f.closed
    assert container.download("checkpoint.pt") == b"previous checkpoint"


class _InterruptWhenPickled:
    def __reduce__(self) -> Any:
        raise KeyboardInterrupt


def test_ctrl_c_in_torch_code_between_writes_commits_nothing(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    container.upload("checkpoint.pt", b"previous checkpoint")
    with (
        pytest.raises(KeyboardInterrupt),
        BlobIO(container.blob_url("checkpoint.pt"), "wb", credential=account_credential, block_size=BLOCK) as f,
    ):
        torch.save({"weights": torch.randn(20 * BLOCK // 4), "then": _InterruptWhenPickled()}, f)
    assert container.download("checkpoint.pt") == b"previous checkpoint"


def test_an_interrupt_before_the_with_block_is_not_brought_back(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # Saving an emergency checkpoint on Ctrl-C is common; an error inside that save is the one to see.
    try:
        raise KeyboardInterrupt
    except KeyboardInterrupt:
        with (
            pytest.raises(RuntimeError, match="pickling failed"),
            BlobIO(container.blob_url("emergency.pt"), "wb", credential=account_credential) as f,
        ):
            f.write(b"partial")
            raise RuntimeError("pickling failed")  # noqa: B904 (its __context__ is the interrupt, as in real code)
    assert not container.exists("emergency.pt")
