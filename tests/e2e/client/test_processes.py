"""Connections and threads across processes: pickling, fork, spawn and forkserver."""

import multiprocessing
import os
import pickle
import sys
from typing import Any

import pytest
import torch.utils.data
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._client import AzStorageTorchBlobClient, _pipeline
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME
from tests.conftest import Container
from tests.e2e.support._launch import run_job

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


class BlobsDataset(torch.utils.data.Dataset[bytes]):
    """Opens a BlobIO per sample, as a user's own dataset would."""

    def __init__(self, urls: list[str], credential: Any) -> None:
        self.urls = urls
        self.credential = credential

    def __len__(self) -> int:
        return len(self.urls)

    def __getitem__(self, index: int) -> bytes:
        with BlobIO(self.urls[index], "rb", credential=self.credential) as f:
            return f.read()


@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_dataloader_workers_after_use_in_the_main_process(
    container: Container, account_credential: AzureNamedKeyCredential, start_method: str
) -> None:
    expected = {
        container.upload(f"sample-{i}", f"sample {i}".encode() * 1000): f"sample {i}".encode() * 1000 for i in range(12)
    }
    dataset = BlobsDataset(sorted(expected), account_credential)
    assert dataset[0] == expected[dataset.urls[0]]  # the main process now has pooled connections
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=2, multiprocessing_context=multiprocessing.get_context(start_method)
    )
    assert list(loader) == [expected[url] for url in dataset.urls]
    assert dataset[1] == expected[dataset.urls[1]]  # and the main process still works afterwards


def _child_reads(client: AzStorageTorchBlobClient, queue: Any) -> None:
    fresh = not _pipeline._state.transports
    buffer = bytearray(5)
    client.fetch_range_into(0, memoryview(buffer), etag=None)
    queue.put((fresh, bytes(buffer), os.getpid()))


def test_forked_child_opens_its_own_connections(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    url = container.upload("blob", b"hello world")
    client = AzStorageTorchBlobClient.from_url(url, account_credential)
    client.fetch_range_into(0, memoryview(bytearray(3)), etag=None)
    assert _pipeline._state.transports  # the parent has a pool
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_child_reads, args=(client, queue))
    child.start()
    fresh, data, pid = queue.get(timeout=60)
    child.join(60)
    assert child.exitcode == 0
    assert fresh, "the forked child must not inherit the parent's connection pool"
    assert data == b"hello" and pid != os.getpid()


def test_client_pickles_without_connections(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    url = container.upload("blob", b"abc")
    client = AzStorageTorchBlobClient.from_url(url, account_credential)
    client.fetch_range_into(0, memoryview(bytearray(1)), etag=None)
    copy = pickle.loads(pickle.dumps(client))
    assert copy._pipeline is None
    buffer = bytearray(3)
    copy.fetch_range_into(0, memoryview(buffer), etag=None)
    assert buffer == b"abc"


def test_blobio_refuses_to_pickle(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    url = container.upload("blob", b"abc")
    with BlobIO(url, "rb", credential=account_credential) as f, pytest.raises(TypeError, match="URL"):
        pickle.dumps(f)


def test_pooled_connections_are_closed_at_exit_by_the_process_that_opened_them(container: Container) -> None:
    url = container.blob_url("pooled")
    environment = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    environment["PYTHONPATH"] = REPOSITORY
    command = [
        *(sys.executable, "-W", "always::ResourceWarning", "-X", "tracemalloc=8"),
        *("-m", "tests.e2e.support.pooled_exit_run", url, ACCOUNT_NAME, ACCOUNT_KEY),
    ]
    run = run_job(command, cwd=REPOSITORY, env=environment)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "unclosed" not in run.stderr, run.stderr[-4000:]
    assert run.stdout.startswith("pooled ")
