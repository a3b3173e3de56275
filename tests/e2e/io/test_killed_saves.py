"""A process killed (SIGKILL) in the middle of a checkpoint save leaves the previous checkpoint whole.

The saver (``checkpoint_saver_run``) saves with ``torch.save`` into ``BlobIO``, as the Lightning plugin
does, via the fault proxy. The proxy holds one chosen request (a block upload, or the commit
before or after the service saw it) until the saver is killed, so that every kill lands at a known
point of a save, and a seeded random one of the block uploads picks where "during the upload" is.
"""

from __future__ import annotations

import os
import pathlib
import random
import subprocess
import sys
import threading
from collections.abc import Callable

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY
from tests.conftest import Container
from tests.e2e.support import checkpoint_saver_run
from tests.e2e.support.fault_proxy import Delay, FaultProxy, SeenRequest

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


def loaded_version(url: str, credential: AzureNamedKeyCredential) -> int:
    """The version the checkpoint at ``url`` holds, after checking every tensor of it."""
    with BlobIO(url, "rb", credential=credential, verify_checksum=True) as f:
        checkpoint = torch.load(f, weights_only=True)
    expected = checkpoint_saver_run.versioned_checkpoint(checkpoint["version"])
    for name, tensor in expected["state_dict"].items():
        assert torch.equal(checkpoint["state_dict"][name], tensor), f"{name} of version {checkpoint['version']}"
    return int(checkpoint["version"])


def the_nth(operation: str, number: int) -> Callable[[SeenRequest], bool]:
    """Matches the ``number``-th request (from 0) of ``operation`` from now on."""
    seen_so_far = iter(range(number + 1))
    return lambda seen: seen.operation == operation and next(seen_so_far, None) == number


def kill_the_saver_at(
    proxy: FaultProxy, url: str, first_version: int, match: Callable[[SeenRequest], bool], *, before: bool
) -> None:
    """Start a saver and SIGKILL it while the proxy holds the request ``match`` picks."""
    reached = threading.Event()
    proxy.add_fault(match, Delay(600, hold_request=before, holding=reached))  # released when the proxy stops
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "AZSTORAGETORCH_TEST_ACCOUNT_KEY": ACCOUNT_KEY}
    command = [sys.executable, "-m", "tests.e2e.support.checkpoint_saver_run", proxy.url(url), str(first_version)]
    with subprocess.Popen(command, cwd=REPOSITORY, env=environment, stdout=subprocess.PIPE, text=True) as saver:
        try:
            assert reached.wait(120), "the saver never reached the chosen request"
        finally:
            saver.kill()
        saver.wait()


@pytest.mark.parametrize("moment", ["during the block uploads", "commit not yet seen", "commit done"])
def test_a_save_killed_at_any_moment_leaves_the_old_or_the_new_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential, proxy: FaultProxy, moment: str
) -> None:
    seed = random.randrange(2**32)
    print(f"kill seed {seed}")
    url = container.blob_url("model.ckpt")
    with BlobIO(url, "wb", credential=account_credential) as f:
        torch.save(checkpoint_saver_run.versioned_checkpoint(1), f)

    if moment == "during the block uploads":
        match, before = the_nth("PutBlock", random.Random(seed).randrange(12)), False  # a save is 12 blocks
    else:
        match, before = the_nth("PutBlockList", 0), moment == "commit not yet seen"
    kill_the_saver_at(proxy, url, 2, match, before=before)

    assert loaded_version(url, account_credential) == (2 if moment == "commit done" else 1)
