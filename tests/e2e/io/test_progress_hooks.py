"""A progress hook that raises or blocks, at any of its calls, against Azurite.

The rule under test (docs/observability.rst): a hook's last call comes before anything is
committed, so an exception from a hook always means that nothing was committed; and a ``BlobIO``
is closed once ``close()`` returns or raises, whatever its hook did.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.api import CheckpointException

from azstoragetorch._client import _schedule, _stats
from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.io import BlobIO
from tests.conftest import Container

KiB = 1024
BLOCK = 16 * KiB
OLD = b"the good content that was there before"
SIZES = {"one-block": BLOCK // 2, "many-blocks": 6 * BLOCK + 123}


class HookError(Exception):
    """What the hooks under test raise."""


class Hook:
    """Records its calls; raises on call number ``fail_at`` (1-based), on every call once ``armed``,
    or, with ``fail_at_last``, on a writer's last call (the only one that knows the total)."""

    def __init__(self, fail_at: int | None = None, *, fail_at_last: bool = False, delay: float = 0.0) -> None:
        self.fail_at = fail_at
        self.fail_at_last = fail_at_last
        self.delay = delay
        self.armed = False
        self.calls: list[tuple[int, int | None]] = []
        self.active = 0
        self.most_active = 0
        self._lock = threading.Lock()

    def __call__(self, done: int, total: int | None) -> None:
        with self._lock:
            self.calls.append((done, total))
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            number = len(self.calls)
        try:
            if self.delay:
                time.sleep(self.delay)
            if self.armed or number == self.fail_at or (self.fail_at_last and total is not None):
                raise HookError(f"the progress bar broke at call {number}")
        finally:
            with self._lock:
                self.active -= 1


@pytest.fixture(autouse=True)
def every_progress_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_stats, "PROGRESS_INTERVAL_SECONDS", 0.0)  # a call for every piece of progress


def etag(container: Container, name: str) -> str:
    return str(container.client.get_blob_client(name).get_blob_properties().etag)


def assert_unchanged(container: Container, name: str, old_etag: str) -> None:
    assert container.download(name) == OLD
    assert etag(container, name) == old_etag


def assert_released(f: BlobIO) -> None:
    assert f.closed
    if f._reader is not None:
        assert len(f._reader._store) == 0  # every chunk's buffer handed back


# -- writers -------------------------------------------------------------------------------------------


# When the hook raises. A one-block blob's hook has a single call, its last (the blob is sent at close).
CASES = [
    pytest.param(SIZES["one-block"], "final", id="one-block-only-call"),
    pytest.param(SIZES["many-blocks"], "first", id="many-blocks-first-call"),
    pytest.param(SIZES["many-blocks"], "middle", id="many-blocks-middle-call"),
    pytest.param(SIZES["many-blocks"], "final", id="many-blocks-final-call"),
]


@pytest.mark.parametrize(("size", "when"), CASES)
def test_a_writer_whose_hook_raises_commits_nothing_and_is_closed(
    container: Container, account_credential: AzureNamedKeyCredential, size: int, when: str
) -> None:
    url = container.upload("blob", OLD)
    old_etag = etag(container, "blob")
    data = os.urandom(size)
    hook = Hook(1 if when == "first" else 3 if when == "middle" else None, fail_at_last=when == "final")
    f = BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, max_concurrency=2, progress_hook=hook)
    with pytest.raises(FatalBlobIOWriteError) as caught:
        try:
            f.write(data)  # may raise already: the hook is called from the upload threads
        finally:
            f.close()
    assert isinstance(caught.value.underlying_exception, HookError)
    assert f.closed
    f.close()  # again: nothing to do, nothing sent
    with pytest.raises(ValueError, match="closed"):
        f.write(b"more")
    assert_unchanged(container, "blob", old_etag)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_writers_last_call_comes_before_the_commit(
    container: Container, account_credential: AzureNamedKeyCredential, size: int
) -> None:
    url = container.upload("blob", OLD)
    seen_at_last_call: list[bytes] = []

    def hook(done: int, total: int | None) -> None:
        if total is not None:
            seen_at_last_call.append(container.download("blob"))

    data = os.urandom(size)
    with BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, progress_hook=hook) as f:
        f.write(data)
    assert seen_at_last_call == [OLD]  # one last call, and the blob still had its old content then
    assert container.download("blob") == data


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_writers_hook_raising_in_a_with_block_commits_nothing(
    container: Container, account_credential: AzureNamedKeyCredential, size: int
) -> None:
    url = container.upload("blob", OLD)
    old_etag = etag(container, "blob")
    hook = Hook(fail_at_last=True)
    with (
        pytest.raises(FatalBlobIOWriteError),  # from the close at the end of the block
        BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, progress_hook=hook) as f,
    ):
        f.write(os.urandom(size))
    assert f.closed
    assert_unchanged(container, "blob", old_etag)


@pytest.mark.parametrize("size", SIZES.values(), ids=SIZES.keys())
def test_a_writer_survives_a_hook_that_blocks_and_its_last_call_is_the_last(
    container: Container, account_credential: AzureNamedKeyCredential, size: int
) -> None:
    hook = Hook(delay=0.02)
    data = os.urandom(size)
    with BlobIO(
        container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK, progress_hook=hook
    ) as f:
        f.write(data)
    calls_at_close = list(hook.calls)
    time.sleep(0.1)  # any transfer thread still calling would show now
    assert hook.calls == calls_at_close
    assert hook.most_active == 1  # one call at a time
    assert hook.calls[-1] == (size, size)
    assert container.download("blob") == data


def test_a_closed_writer_never_commits_again(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    data = os.urandom(BLOCK // 2)
    f = BlobIO(container.blob_url("blob"), "wb", credential=account_credential, block_size=BLOCK)
    f.write(data)
    f.close()
    committed = etag(container, "blob")
    f.close()
    assert f._writes is not None
    with pytest.raises(RuntimeError, match="was committed already; nothing was sent"):
        f._writes.uploader.commit()  # the guard holds below BlobIO as well
    assert container.download("blob") == data and etag(container, "blob") == committed


# -- readers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "when"), CASES)
def test_a_reader_whose_hook_raises_raises_it_and_is_closed(
    container: Container, account_credential: AzureNamedKeyCredential, size: int, when: str
) -> None:
    data = os.urandom(size)
    url = container.upload("blob", data)
    hook = Hook(1 if when == "first" else 3 if when == "middle" else None)
    f = BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, max_concurrency=2, progress_hook=hook)
    with pytest.raises(HookError):
        assert f.read() == data
        hook.armed = True
        f.close()
    if when == "final":
        assert f.closed
    else:
        f.close()  # the read raised; the reader is still open until closed
    assert_released(f)
    f.close()
    with pytest.raises(ValueError, match="closed"):
        f.read()


@pytest.fixture(params=SIZES.values(), ids=SIZES.keys())
def blob_to_read(container: Container, request: pytest.FixtureRequest) -> tuple[str, bytes]:
    """A blob of random bytes of each size in SIZES: its URL and its bytes."""
    data = os.urandom(request.param)
    return container.upload("blob", data), data


def test_a_reader_in_a_with_block_whose_last_call_raises_releases_its_buffers(
    account_credential: AzureNamedKeyCredential, blob_to_read: tuple[str, bytes]
) -> None:
    url, data = blob_to_read
    hook = Hook()
    with (
        pytest.raises(HookError),
        BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, progress_hook=hook) as f,
    ):
        assert f.read(10) == data[:10]
        hook.armed = True
    assert_released(f)


def test_a_reader_survives_a_hook_that_blocks(
    account_credential: AzureNamedKeyCredential, blob_to_read: tuple[str, bytes]
) -> None:
    url, data = blob_to_read
    size = len(data)
    hook = Hook(delay=0.02)
    with BlobIO(url, "rb", credential=account_credential, block_size=BLOCK, progress_hook=hook) as f:
        assert f.read() == data
    calls_at_close = list(hook.calls)
    time.sleep(0.1)
    assert hook.calls == calls_at_close and hook.most_active == 1
    assert hook.calls[-1] == (size, size)
    assert_released(f)


# -- randomized: a hook raising at a random call, under a perturbed schedule -----------------------------


@pytest.fixture
def seeds() -> Iterator[list[int]]:
    chosen = [random.randrange(1 << 30) for _ in range(6)]
    print(f"seeds: {chosen}")  # a failure replays with these
    yield chosen


def test_a_hook_raising_at_a_random_call_never_leaves_a_torn_or_second_commit(
    container: Container, account_credential: AzureNamedKeyCredential, seeds: list[int]
) -> None:
    for seed in seeds:
        chooser = random.Random(seed)
        name = f"blob-{seed}"
        url = container.upload(name, OLD)
        old_etag = etag(container, name)
        data = os.urandom(chooser.randrange(1, 8 * BLOCK))
        hook = Hook(chooser.randrange(1, 12))
        with _schedule.perturbed(seed, max_delay=0.003):
            f = BlobIO(url, "wb", credential=account_credential, block_size=BLOCK, progress_hook=hook)
            try:
                with f:
                    for start in range(0, len(data), 5000):
                        f.write(data[start : start + 5000])
                failed = False
            except FatalBlobIOWriteError as error:
                assert isinstance(error.underlying_exception, HookError), seed
                failed = True
            f.close()
        assert f.closed, seed
        time.sleep(0.05)  # nothing may commit after close() has returned or raised
        if failed:
            assert_unchanged(container, name, old_etag)
        else:
            assert len(hook.calls) < hook.fail_at, seed  # type: ignore[operator]
            assert container.download(name) == data, seed


# -- DCP: the save's last call comes before its .metadata ------------------------------------------------


def state(value: float) -> dict[str, torch.Tensor]:
    return {"w": torch.full((3000,), value), "b": torch.full((10,), value)}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_a_dcp_save_whose_last_hook_call_raises_leaves_the_old_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.blob_url("ckpt")
    dcp.save(state(1.0), storage_writer=BlobStorageWriter(url, credential=account_credential))

    def hook(done: int, total: int | None) -> None:
        if total is not None:  # the save's last call
            raise HookError("the progress bar broke at the end")

    with pytest.raises(CheckpointException) as caught:
        dcp.save(state(2.0), storage_writer=BlobStorageWriter(url, credential=account_credential, progress_hook=hook))
    assert "the progress bar broke at the end" in str(caught.value)
    loaded = state(0.0)
    dcp.load(loaded, storage_reader=BlobStorageReader(url, credential=account_credential))
    assert torch.equal(loaded["w"], state(1.0)["w"]) and torch.equal(loaded["b"], state(1.0)["b"])
