"""What torch's own DCP tests check on FileSystemWriter, checked on BlobStorageWriter/BlobStorageReader.

ShardedTensor and DTensor resharding, Stateful objects, no_dist, entries that are bytes or Python
objects, sharded and plain tensors loaded into one another, overwrite, and one rank's writer
failing: at world sizes 1 and 2 (gloo, spawned processes) and thread_count 1 and 4. The scenarios
live in tests/e2e/support/dcp_behaviours_run.py. To keep the suite short (starting ranks costs seconds), one
spawned run per world size goes through all of them at both thread counts, each under a prefix of
its own; each scenario and thread count is a test of its own here, reporting what that run found.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
import time
import traceback
from collections.abc import Iterator
from typing import Any

import pytest
import torch.multiprocessing
from azure.storage.blob import BlobServiceClient

from azstoragetorch.testing import Azurite
from tests.conftest import _make_container
from tests.e2e.support import dcp_behaviours_run

# The first test of each world size carries that world size's whole run in its setup.
pytestmark = pytest.mark.timeout(600)

WORLD_SIZES = [1, 2]
THREAD_COUNTS = [1, 4]


@pytest.fixture(scope="module")
def run_container(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[str]:
    """A container for every run (each configuration under a prefix of its own)."""
    made = _make_container(service_client, azurite, None)  # as the container fixture makes one
    yield made.url
    made.client.delete_container()


@pytest.fixture(scope="module", params=WORLD_SIZES, ids=lambda world_size: f"world{world_size}")
def run(request: pytest.FixtureRequest, run_container: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One spawned run of every scenario at every thread count, at one world size: each rank's
    report, and how the run ended (a traceback if it did not end well)."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"world{world_size}")
    began = time.monotonic()
    ended = None
    try:
        with tempfile.TemporaryDirectory() as store:
            torch.multiprocessing.spawn(
                dcp_behaviours_run.rank_main,
                args=(world_size, f"{store}/store", run_container, THREAD_COUNTS, str(out_dir)),
                nprocs=world_size,
            )
    except Exception:
        ended = traceback.format_exc()
    reports = {}
    for rank in range(world_size):
        report = pathlib.Path(out_dir, f"rank{rank}.json")
        reports[rank] = json.loads(report.read_text()) if report.exists() else {}
    took = "; ".join(
        f"{threads}: " + ", ".join(f"{name} {found['seconds']} s" for name, found in scenarios.items())
        for threads, scenarios in reports[0].items()
    )
    print(f"world size {world_size}: {time.monotonic() - began:.1f} s in all; rank 0 took {took}")
    return {"reports": reports, "ended": ended}


@pytest.mark.parametrize("scenario", list(dcp_behaviours_run.SCENARIOS))
@pytest.mark.parametrize("thread_count", THREAD_COUNTS, ids=lambda count: f"threads{count}")
def test_torch_dcp_behaviour(run: dict[str, Any], thread_count: int, scenario: str) -> None:
    problems = []
    for rank, report in run["reports"].items():
        found = report.get(f"threads{thread_count}", {}).get(scenario)
        if found is None:
            problems.append(f"rank {rank}: the scenario did not run to its end; the run ended with:\n{run['ended']}")
            continue
        if found["error"]:
            problems.append(f"rank {rank}: raised\n{found['error']}")
        problems += [f"rank {rank}: {failure}" for failure in found["failures"]]
        if found["checks"] == 0:
            problems.append(f"rank {rank}: compared nothing")
    assert not problems, f"{scenario} at thread_count={thread_count}:\n" + "\n".join(problems)
