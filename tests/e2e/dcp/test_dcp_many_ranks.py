"""What each rank of a distributed checkpoint sends to the storage account, at world sizes 2 and 8.

Real ``torch.distributed`` (gloo, spawned processes) and a small state dict of DTensors sharded over
every rank (``tests/e2e/support/dcp_ranks_run.py``). Each rank talks to the emulator through counting proxies
of its own, one per phase (save, load, save without collectives), so each proxy's requests are one
rank's requests in one phase. A job of many ranks must not send requests that grow with the world
size: each rank's requests follow the files it owns, no rank lists the whole checkpoint to load it,
and each reads ``.metadata`` once.
"""

from __future__ import annotations

import collections
import contextlib
import json
import pathlib
import tempfile
import urllib.parse

import torch.multiprocessing

from azstoragetorch.testing import Azurite
from tests.conftest import Container
from tests.e2e.support import dcp_ranks_run
from tests.e2e.support.fault_proxy import FaultProxy, SeenRequest

Requests = dict[str, list[list[SeenRequest]]]  # phase -> rank -> what the rank sent in that phase


def run_job(world_size: int, azurite: Azurite, container: Container, tmp_path: pathlib.Path) -> Requests:
    """Spawn ``world_size`` ranks that save, load and save again under a prefix of their own."""
    prefix = f"ws{world_size}"
    url = container.blob_url(prefix)
    out_dir = tmp_path / prefix
    out_dir.mkdir()
    with contextlib.ExitStack() as stack:
        proxies = {
            phase: [stack.enter_context(FaultProxy(azurite.port)) for _ in range(world_size)]
            for phase in dcp_ranks_run.PHASES
        }
        urls = {phase: [proxy.url(url) for proxy in ranks] for phase, ranks in proxies.items()}
        urls["save-without-collectives"] = [proxy.url(f"{url}-local") for proxy in proxies["save-without-collectives"]]
        with tempfile.TemporaryDirectory() as store:
            torch.multiprocessing.spawn(
                dcp_ranks_run.rank_main,
                args=(world_size, f"{store}/store", urls, str(out_dir)),
                nprocs=world_size,
            )
        requests = {phase: [proxy.requests for proxy in ranks] for phase, ranks in proxies.items()}
    for rank in range(world_size):
        assert json.loads((out_dir / f"rank{rank}.json").read_text()) == {"same": True}, rank
    return requests


def is_listing(seen: SeenRequest) -> bool:
    return seen.operation == "GET comp=list"


def target(seen: SeenRequest) -> str:
    """The blob a request is for, below the container; for a listing, the prefix it lists."""
    if is_listing(seen):
        return seen.query.get("prefix", "")
    parts = urllib.parse.unquote(seen.path).split("/", 3)  # "", account, container, blob
    return parts[3] if len(parts) > 3 else ""


def describe(seen: SeenRequest) -> str:
    if is_listing(seen):
        return f"List {target(seen)}"
    return f"{seen.operation} {target(seen).split('/', 1)[-1]}"


def own(seen: SeenRequest, rank: int) -> bool:
    """Whether the request is for one of ``rank``'s shard files (or lists only them)."""
    return target(seen).split("/", 1)[-1].startswith(f"__{rank}_")


def test_each_rank_sends_requests_for_its_own_files_only_at_world_size_8(
    azurite: Azurite, container: Container, tmp_path: pathlib.Path
) -> None:
    world_size = 8
    requests = run_job(world_size, azurite, container, tmp_path)
    for phase, ranks in requests.items():  # printed, so that a failure shows what each rank sent
        for rank, seen in enumerate(ranks):
            print(phase, rank, dict(collections.Counter(describe(request) for request in seen)))

    for rank, seen in enumerate(requests["load"]):
        files = dcp_ranks_run.files_of(rank)
        assert [describe(request) for request in seen if not own(request, rank)] == ["GetBlob .metadata"], rank
        own_files = collections.Counter(describe(request) for request in seen if own(request, rank))
        # One ranged GetBlob each, which also pins the file's version: no GetBlobProperties before it.
        assert all(name.startswith("GetBlob ") for name in own_files), (rank, own_files)
        assert sorted(own_files.values()) == [1] * files, rank
        assert len(seen) == 1 + files, rank  # so a rank with two files sends one more than one with one

    for rank, seen in enumerate(requests["save"]):
        others = [describe(request) for request in seen if not own(request, rank)]
        # Only the coordinator reads the version of .metadata (when the save starts), lists the
        # checkpoint, once, to delete unused files, and commits .metadata over that version.
        coordinator = ["GetBlobProperties .metadata", f"List ws{world_size}/", "PutBlob .metadata"]
        assert others == (coordinator if rank == 0 else []), rank
        assert len(seen) == dcp_ranks_run.files_of(rank) + len(others), rank

    for rank, seen in enumerate(requests["save-without-collectives"]):
        others = [describe(request) for request in seen if not own(request, rank)]
        # Each rank reads the version of and commits its own __<rank>.metadata, and lists only its
        # own shard files.
        assert others == [f"GetBlobProperties __{rank}.metadata", f"PutBlob __{rank}.metadata"], rank
        listings = [describe(request) for request in seen if is_listing(request)]
        assert listings == [f"List ws{world_size}-local/__{rank}_"], rank
