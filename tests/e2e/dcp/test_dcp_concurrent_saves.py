"""Two or more DCP saves to one checkpoint URL at the same time (two jobs, or a restarted job whose old
ranks still run): at most one of the saves that saw the same checkpoint succeeds, the others raise
``CheckpointConflictError``, and the URL always loads as one complete checkpoint.

Three kinds of test: fixed interleavings, where saves in threads of this process are held at the
writer's named hand-off points (``dcp.start``, ``dcp.commit``, ``dcp.cleanup``) and let go in a
chosen order; seeded random interleavings of several saves, perturbed at those points and at every
commit; and two real jobs (of one and of two ranks) saving at once, round after round. Every outcome
is loaded and compared, tensor by tensor, with what each save saved, and the checkpoint's prefix
must hold exactly ``.metadata`` and the shard files it names.
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import pickle
import random
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError
from torch.distributed.checkpoint.metadata import Metadata

from azstoragetorch._client import AzStorageTorchBlobClient, _schedule
from azstoragetorch.exceptions import CheckpointConflictError
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.dcp import _writer as blob_dcp_writer
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.conftest import Container
from tests.e2e.support import dcp_concurrent_run
from tests.e2e.support._launch import JOB_TIMEOUT_SECONDS, started_job
from tests.e2e.support.fault_proxy import FaultProxy, Reset, SeenRequest

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]
ACCOUNT = (ACCOUNT_NAME, ACCOUNT_KEY)
state = dcp_concurrent_run.state
conflict_in = dcp_concurrent_run.conflict_in


def writer(url: str, credential: Any, **options: Any) -> BlobStorageWriter:
    return BlobStorageWriter(url, credential=credential, thread_count=2, block_size=64 * 1024, **options)


def loaded_as(url: str, credential: Any, candidates: dict[str, dict[str, torch.Tensor]]) -> str:
    """Which of ``candidates`` (by name) the checkpoint at ``url`` loads as, every tensor compared
    whole; fails on a load error or on anything else (a mix)."""
    template = next(iter(candidates.values()))
    loaded = {key: torch.zeros_like(value) for key, value in template.items()}
    dcp.load(loaded, storage_reader=BlobStorageReader(url, credential=credential))
    for name, expected in candidates.items():
        if all(torch.equal(loaded[key], value) for key, value in expected.items()):
            return name
    pytest.fail(f"the checkpoint at {url} loaded as none of {sorted(candidates)}")


def assert_only_what_metadata_names(container: Container, prefix: str, metadata_name: str = ".metadata") -> None:
    """The prefix holds ``metadata_name`` and the shard files it names: none missing, none left over."""
    metadata = pickle.loads(container.download(f"{prefix}/{metadata_name}"))
    assert isinstance(metadata, Metadata)
    named = {metadata_name} | {info.relative_path for info in metadata.storage_data.values()}
    present = {blob.name[len(prefix) + 1 :] for blob in container.client.list_blobs(name_starts_with=prefix + "/")}
    assert present == named, f"missing {named - present}, left over {present - named}"


def etags(container: Container, prefix: str) -> dict[str, str]:
    return {blob.name: blob.etag for blob in container.client.list_blobs(name_starts_with=prefix + "/")}


class Choreography:
    """Holds saves, by the name of the thread that runs them, at the writer's named hand-off points
    until the test lets them go; every other point (and thread) goes on at once."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, str], threading.Event] = {}
        self._arrived: dict[tuple[str, str], threading.Event] = {}
        self.passed: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def hold(self, save: str, point: str) -> None:
        """Hold ``save`` the first time it reaches ``point``."""
        self._held[(save, point)] = threading.Event()
        self._arrived[(save, point)] = threading.Event()

    def wait_until_held(self, save: str, point: str) -> None:
        assert self._arrived[(save, point)].wait(120), f"{save} never reached {point}"

    def release(self, save: str, point: str) -> None:
        self._held[(save, point)].set()

    def pause(self, point: str) -> None:
        key = (threading.current_thread().name, point)
        with self._lock:
            self.passed.append(key)
            held = self._held.get(key)
            arrived = self._arrived.get(key)
        if held is None or arrived is None or arrived.is_set():
            return
        arrived.set()
        assert held.wait(120), f"{key} was never released"


@pytest.fixture
def choreography(monkeypatch: pytest.MonkeyPatch) -> Choreography:
    steps = Choreography()
    monkeypatch.setattr(blob_dcp_writer, "pause", steps.pause)  # the writer's dcp.* hand-off points
    return steps


class Save:
    """``dcp.save`` of ``state_dict`` with ``storage_writer``, on a thread named ``name``."""

    def __init__(
        self, name: str, state_dict: dict[str, Any], storage_writer: BlobStorageWriter, use_collectives: bool = True
    ) -> None:
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(state_dict, storage_writer, use_collectives), name=name)
        self._thread.start()

    def _run(self, state_dict: dict[str, Any], storage_writer: BlobStorageWriter, use_collectives: bool) -> None:
        try:
            dcp.save(state_dict, storage_writer=storage_writer, use_collectives=use_collectives)
        except BaseException as error:
            self.error = error

    def join(self) -> Save:
        self._thread.join(300)
        assert not self._thread.is_alive(), f"{self._thread.name} did not finish"
        return self


def assert_conflict(save: Save, url: str) -> None:
    assert save.error is not None, "the save that lost succeeded"
    conflict = conflict_in(save.error)
    assert conflict is not None, f"not a CheckpointConflictError: {save.error!r}"
    assert conflict.checkpoint_id == url and url in str(conflict)
    assert isinstance(pickle.loads(pickle.dumps(conflict)), CheckpointConflictError)  # crosses ranks pickled


# -- fixed interleavings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "before",
    ["an old checkpoint", "no checkpoint", "no checkpoint, overwrite=False", "an old checkpoint, without collectives"],
)
def test_of_two_saves_that_saw_the_same_checkpoint_only_the_first_to_commit_succeeds(
    container: Container, account_credential: AzureNamedKeyCredential, choreography: Choreography, before: str
) -> None:
    url = container.blob_url("same")
    candidates = {"A": state(1, 0), "B": state(2, 0)}
    collectives = not before.endswith("without collectives")  # then each rank commits its __<rank>.metadata
    if before.startswith("an old checkpoint"):
        candidates["old"] = state(0, 0)
        dcp.save(candidates["old"], storage_writer=writer(url, account_credential), use_collectives=collectives)
    options = {"overwrite": False} if before.endswith("overwrite=False") else {}
    for save in "AB":
        choreography.hold(save, "dcp.commit")

    a = Save("A", candidates["A"], writer(url, account_credential, **options), collectives)
    b = Save("B", candidates["B"], writer(url, account_credential, **options), collectives)
    choreography.wait_until_held("A", "dcp.commit")
    choreography.wait_until_held("B", "dcp.commit")  # both have written every shard, over the same version
    choreography.release("A", "dcp.commit")
    assert a.join().error is None
    after_a = etags(container, "same")
    choreography.release("B", "dcp.commit")
    b.join()

    assert_conflict(b, url)
    assert etags(container, "same").items() <= after_a.items()  # the loser changed nothing, removed its own
    assert loaded_as(url, account_credential, candidates) == "A"
    assert_only_what_metadata_names(container, "same", ".metadata" if collectives else "__0.metadata")


# A commits over the old checkpoint and is held before it deletes the old shard files; B starts after
# A's commit, saves and commits over A's checkpoint; then A's cleanup runs. It must not take B's
# shard files (which B's .metadata names) for files nobody uses.
LATE_CLEANUP = ("A", "dcp.cleanup", "B", "both succeed")
# B sees the old checkpoint and writes its shard files, then waits at its commit; A saves whole (and
# deletes the old shard files and B's, which no checkpoint uses). B's commit must fail rather than
# install a .metadata whose shard files are gone.
STALE_COMMIT = ("B", "dcp.commit", "A", "B loses")


@pytest.mark.parametrize("scenario", [LATE_CLEANUP, STALE_COMMIT], ids=["late cleanup", "stale commit"])
def test_a_save_held_while_another_saves_whole_never_breaks_the_checkpoint(
    container: Container,
    account_credential: AzureNamedKeyCredential,
    choreography: Choreography,
    scenario: tuple[str, str, str, str],
) -> None:
    held, point, other, outcome = scenario
    url = container.blob_url("held")
    candidates = {"old": state(0, 0), "A": state(1, 0), "B": state(2, 0)}
    dcp.save(candidates["old"], storage_writer=writer(url, account_credential))
    choreography.hold(held, point)

    waiting = Save(held, candidates[held], writer(url, account_credential))
    choreography.wait_until_held(held, point)
    assert Save(other, candidates[other], writer(url, account_credential)).join().error is None
    choreography.release(held, point)
    waiting.join()

    if outcome == "both succeed":
        assert waiting.error is None
    else:
        assert_conflict(waiting, url)
    assert loaded_as(url, account_credential, candidates) == other
    assert_only_what_metadata_names(container, "held")


def test_a_commit_whose_answer_was_lost_and_retried_counts_as_committed(
    container: Container, azurite: Azurite, proxy: FaultProxy
) -> None:
    # The service commits .metadata but the answer never arrives; the retry then finds the blob
    # changed (412 or 409). That change is this save's own commit: the save succeeds and keeps its files.
    url = proxy.url(container.blob_url("retried"))
    candidates = {"old": state(0, 0), "new": state(1, 0)}
    dcp.save(candidates["old"], storage_writer=writer(url, azurite.credential))

    def metadata_put(seen: SeenRequest) -> bool:
        return seen.method == "PUT" and seen.path.endswith("/.metadata")

    lost = proxy.add_fault(metadata_put, Reset(after_body_bytes=None))
    dcp.save(candidates["new"], storage_writer=writer(url, azurite.credential))

    assert lost.hits == 1 and sum(metadata_put(seen) for seen in proxy.requests) >= 3  # two saves, one retry
    assert loaded_as(url, azurite.credential, candidates) == "new"
    assert_only_what_metadata_names(container, "retried")


def test_the_emulator_honours_the_commit_conditions(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # Every test above relies on Azurite refusing a stale If-Match and an If-None-Match: * over an
    # existing blob; were either header dropped or ignored, the tests above would test nothing.
    client = AzStorageTorchBlobClient.from_url(container.blob_url("cond/.metadata"), account_credential)
    first = client.put_blob(b"first", validate_content=False, if_none_match="*")
    assert first and first == client.get_properties().etag
    with pytest.raises((ResourceExistsError, ResourceModifiedError)):
        client.put_blob(b"again", validate_content=False, if_none_match="*")
    second = client.put_blob(b"second", validate_content=False, if_match=first)
    assert second != first and second == client.get_properties().etag
    with pytest.raises(ResourceModifiedError):
        client.put_blob(b"stale", validate_content=False, if_match=first)
    assert container.download("cond/.metadata") == b"second"


def test_a_save_without_collectives_keeps_the_shard_files_of_a_checkpoint_saved_with_them(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    # A save without collectives commits __<rank>.metadata and used to delete every other
    # __<rank>_*.distcp as unused, including those that the .metadata of an earlier save with
    # collectives names. DCP loads that .metadata first, so the URL then loaded as nothing.
    url = container.blob_url("modes")
    candidates = {"old": state(0, 0), "new": state(1, 0)}
    dcp.save(candidates["old"], storage_writer=writer(url, account_credential))
    dcp.save(candidates["new"], storage_writer=writer(url, account_credential), use_collectives=False)
    assert loaded_as(url, account_credential, candidates) == "old"  # torch prefers the global .metadata
    named = pickle.loads(container.download("modes/.metadata")).storage_data.values()
    assert all(container.exists(f"modes/{info.relative_path}") for info in named)


# -- seeded random interleavings -------------------------------------------------------------------------

POINTS = frozenset({"dcp.start", "dcp.commit", "dcp.cleanup", "commit", "part.finish"})


def save_when_all_start(
    started: threading.Barrier, lag: float, name: str, state_dict: dict[str, Any], url: str, results: dict[str, Any]
) -> None:
    """Save ``state_dict`` ``lag`` seconds after every save is ready; ``results[name]`` is what it
    raised, or ``None``."""
    storage_writer = writer(url, AzureNamedKeyCredential(*ACCOUNT))
    started.wait(60)
    threading.Event().wait(lag)
    try:
        dcp.save(state_dict, storage_writer=storage_writer)
        results[name] = None
    except BaseException as error:
        results[name] = error


@pytest.mark.parametrize("saves", [2, 3])
def test_saves_at_the_same_time_under_random_schedules_leave_one_complete_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential, saves: int, seed: int
) -> None:
    chance = random.Random(seed)
    outcomes = []
    for round_ in range(4):
        prefix = f"random-{round_}"
        url = container.blob_url(prefix)
        candidates = {f"save{n}": state(n + 1, round_) for n in range(saves)}
        if round_ % 2:
            candidates["old"] = state(0, round_)
            dcp.save(candidates["old"], storage_writer=writer(url, account_credential))
        # Some saves start together, others once an earlier one may have committed (a save takes ~1 s).
        lags = {f"save{n}": chance.choice([0.0, chance.uniform(0, 1.5)]) for n in range(saves)}
        started = threading.Barrier(saves)
        results: dict[str, BaseException | None] = {}
        # Long enough sleeps that one save's commit and cleanup fall anywhere within another's.
        with _schedule.perturbed(chance.randrange(2**32), max_delay=0.15, only=POINTS):
            threads = [
                threading.Thread(target=save_when_all_start, args=(started, lag, name, candidates[name], url, results))
                for name, lag in lags.items()
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(300)
        assert len(results) == saves, f"round {round_}: a save did not finish"
        succeeded = sorted(name for name, error in results.items() if error is None)
        for name, error in results.items():
            if error is not None:
                assert conflict_in(error) is not None, f"round {round_}, {name}: {error!r}"
        assert succeeded, f"round {round_}: no save succeeded"
        loaded = loaded_as(url, account_credential, candidates)
        assert loaded in succeeded, f"round {round_}: loads as {loaded}, which did not succeed"
        assert_only_what_metadata_names(container, prefix)
        outcomes.append(f"{len(succeeded)} of {saves} succeeded")
    print("; ".join(outcomes))


# -- real jobs -----------------------------------------------------------------------------------------


def wait_for(paths: list[pathlib.Path], jobs: list[subprocess.Popen[str]]) -> None:
    deadline = time.monotonic() + JOB_TIMEOUT_SECONDS
    while not all(path.exists() for path in paths):
        assert all(job.poll() is None for job in jobs), "a job exited early (its stderr is in the test's tmp_path)"
        assert time.monotonic() < deadline, f"still waiting for {[path.name for path in paths if not path.exists()]}"
        time.sleep(0.02)


@pytest.mark.parametrize("world_size", [1, 2])
def test_two_jobs_saving_to_one_url_at_once_leave_one_complete_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path, world_size: int
) -> None:
    # Each job saves with its own state in every round; the test starts the two jobs' saves of a round
    # together, once every rank of both is ready. With two ranks per job only rank 0 commits, and
    # the other rank learns of a conflict through DCP.
    url = container.blob_url("jobs")
    rounds = 3 if world_size == 1 else 2
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    ranks = [(job, rank) for job in (1, 2) for rank in range(world_size)]
    script = [sys.executable, "-m", "tests.e2e.support.dcp_concurrent_run"]
    outcomes = []
    with contextlib.ExitStack() as stack:
        jobs = [
            stack.enter_context(
                started_job(
                    [*script, url, str(job), str(world_size), str(rounds), str(tmp_path)],
                    cwd=REPOSITORY,
                    env=environment,
                    stderr=stack.enter_context(open(tmp_path / f"job{job}.stderr", "w")),
                )
            )
            for job in (1, 2)
        ]
        for round_ in range(rounds):
            wait_for([tmp_path / f"job{job}-rank{rank}-ready-{round_}" for job, rank in ranks], jobs)
            (tmp_path / f"go-{round_}").write_text("")
            wait_for([tmp_path / f"job{job}-rank{rank}-done-{round_}" for job, rank in ranks], jobs)
            results = {key: (tmp_path / f"job{key[0]}-rank{key[1]}-done-{round_}").read_text() for key in ranks}
            conflict = f"conflict Nothing was saved: another save committed the checkpoint {url} "
            for key, outcome in results.items():
                assert outcome == "saved" or outcome.startswith(conflict), (key, outcome)
            succeeded = sorted({job for (job, _), outcome in results.items() if outcome == "saved"})
            for job in succeeded:  # a job succeeds or fails as a whole, on every rank
                assert all(results[(job, rank)] == "saved" for rank in range(world_size)), results
            assert succeeded, f"round {round_}: neither job succeeded"
            loaded = loaded_as(url, account_credential, {f"job{job}": state(job, round_) for job in (1, 2)})
            assert loaded in {f"job{job}" for job in succeeded}, (round_, loaded, results)
            assert_only_what_metadata_names(container, "jobs")
            outcomes.append(
                f"round {round_}: {'+'.join(f'job{job}' for job in succeeded)} succeeded, loads as {loaded}"
            )
    assert [job.returncode for job in jobs] == [0, 0]
    print("; ".join(outcomes))
