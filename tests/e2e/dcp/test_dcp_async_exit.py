"""``dcp.async_save`` followed by a normal interpreter exit, with both of torch's checkpointer types.

The script (``tests/e2e/support/dcp_async_exit_run.py``) starts an asynchronous save over an existing
checkpoint and exits without waiting for it, its uploads slowed at the proxy so that the save is
still under way when the main thread ends. The save must be finished before the process exits, or
fail loudly on standard error; the old checkpoint loads whole in the meantime and if the save fails.
"""

from __future__ import annotations

import os
import pathlib
import pickle
import sys

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from tests.conftest import Container
from tests.e2e.support import dcp_concurrent_run
from tests.e2e.support._launch import run_job
from tests.e2e.support.fault_proxy import Delay, FaultProxy, Respond, SeenRequest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


def loads_as_version(url: str, credential: AzureNamedKeyCredential, version: int) -> bool:
    """Whether the checkpoint at ``url`` is ``version``'s state, every tensor compared whole."""
    expected = dcp_concurrent_run.state(version, 0)
    loaded = {key: torch.zeros_like(value) for key, value in expected.items()}
    dcp.load(loaded, storage_reader=BlobStorageReader(url, credential=credential))
    return all(torch.equal(loaded[key], value) for key, value in expected.items())


def files_under(container: Container, prefix: str) -> set[str]:
    return {blob.name[len(prefix) + 1 :] for blob in container.client.list_blobs(name_starts_with=prefix + "/")}


def named_by_metadata(container: Container, prefix: str) -> set[str]:
    metadata = pickle.loads(container.download(f"{prefix}/.metadata"))
    return {".metadata"} | {info.relative_path for info in metadata.storage_data.values()}


def saved_version_1(container: Container, credential: AzureNamedKeyCredential, prefix: str) -> str:
    """The URL of a checkpoint of version 1 saved under ``prefix``."""
    url = container.blob_url(prefix)
    dcp.save(dcp_concurrent_run.state(1, 0), storage_writer=BlobStorageWriter(url, credential=credential))
    return url


def is_block_upload(seen: SeenRequest) -> bool:
    return seen.operation == "PutBlock"


def exit_during_async_save(checkpointer: str, url: str) -> tuple[int, str, str]:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    command = [sys.executable, "-m", "tests.e2e.support.dcp_async_exit_run", checkpointer, url, "2"]
    run = run_job(command, cwd=REPOSITORY, env=environment)
    return run.returncode, run.stdout, run.stderr


@pytest.mark.parametrize("checkpointer", ["thread", "process"])
def test_an_async_save_still_running_at_exit_is_finished_before_the_process_exits(
    container: Container, account_credential: AzureNamedKeyCredential, proxy: FaultProxy, checkpointer: str
) -> None:
    url = saved_version_1(container, account_credential, "exit")
    proxy.add_fault(is_block_upload, Delay(0.2), times=None)  # the save outlives the main thread

    returncode, stdout, stderr = exit_during_async_save(checkpointer, proxy.url(url))

    assert returncode == 0, stderr[-3000:]
    assert stdout == "returned\n"
    assert loads_as_version(url, account_credential, 2)
    assert files_under(container, "exit") == named_by_metadata(container, "exit")  # the old shard files are gone


@pytest.mark.parametrize("checkpointer", ["thread", "process"])
def test_an_async_save_that_fails_at_exit_says_so_and_leaves_the_old_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential, proxy: FaultProxy, checkpointer: str
) -> None:
    url = saved_version_1(container, account_credential, "failing")
    before = files_under(container, "failing")
    proxy.add_fault(is_block_upload, Delay(0.2), times=4)
    proxy.add_fault(lambda seen: seen.operation == "PutBlockList", Respond(403, "AuthorizationFailure"), times=None)

    returncode, stdout, stderr = exit_during_async_save(checkpointer, proxy.url(url))

    assert stdout == "returned\n"
    # The exit code is the interpreter's, which a failure on a thread at exit cannot change: the
    # error on standard error is what tells.
    assert returncode == 0
    if checkpointer == "thread":
        assert f"The checkpoint save to {proxy.url(url)} failed while the interpreter was exiting" in stderr, stderr
    else:  # torch's saving process, which is not exiting, logs the failure itself
        assert "Checkpoint save failed" in stderr, stderr
    assert "AuthorizationFailure" in stderr and proxy.url(url) in stderr
    assert loads_as_version(url, account_credential, 1)
    assert files_under(container, "failing") == before
