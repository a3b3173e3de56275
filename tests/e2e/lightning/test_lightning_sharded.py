"""Sharded Lightning checkpoints in a container: ModelParallelStrategy (FSDP2) and FSDPStrategy (FSDP1)
through the Trainer, and Fabric's, on two CPU ranks (gloo).

Each job runs tests/e2e/support/lightning_sharded_run.py (or fabric_sharded_run.py) in fresh processes
(Lightning starts the second rank), against the module's Azurite: every rank writes its own shards
under ``<name>.ckpt/``, rank 0 its ``meta.pt``; top-k deletes whole prefixes but never the checkpoint
resumed from; resuming from a URL, "best" and "last" (at world size 2 and at 1) restores weights and
optimizer exactly; `azstoragetorch cp` moves a checkpoint to disk, where plain Lightning resumes from it,
and back; a rank killed mid-overwrite leaves the old checkpoint whole; AsyncCheckpointIO
uploads behind training. No job may leave a local folder named after a URL.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any

import pytest
import torch

from azstoragetorch.testing import ACCOUNT_KEY, Azurite
from tests.conftest import Container
from tests.e2e.support._launch import run_job, started_job
from tests.e2e.support.fault_proxy import Delay, FaultProxy, Gather, SeenRequest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


def test_model_parallel_checkpoints_live_in_the_container_and_resume_exactly(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    local_before = url_named_folders()
    dirpath = container.blob_url("run")

    # Two ranks, three epochs; val_loss 3, 1, 2 makes epoch 1 the best, kept with last.ckpt.
    first = run_sharded(azurite, dirpath, tmp_path / "first", max_epochs=3, val_losses="3,1,2", validate_best=True)

    best = f"{dirpath}/epoch=1-step=4.ckpt"
    assert [report["global_step"] for report in first] == [6, 6]
    assert first[0]["best"] == best
    assert first[0]["validated"] == best  # validate(ckpt_path="best") loaded the sharded checkpoint
    assert checkpoint_folders(container) == {"run/epoch=1-step=4.ckpt": 2, "run/last.ckpt": 2}

    # A fresh pair of processes resumes from the best checkpoint's URL and trains epoch 2 again: it
    # ends exactly where the uninterrupted run ended. Its new best would drop the checkpoint it
    # resumed from, which stays.
    second = run_sharded(azurite, dirpath, tmp_path / "second", max_epochs=3, val_losses="3,1,0.5", resume=best)

    assert [report["resumed_from"] for report in second] == [best, best]
    assert [report["global_step"] for report in second] == [6, 6]
    assert same_state(final(tmp_path / "second"), final(tmp_path / "first"))
    assert checkpoint_folders(container) == {
        "run/epoch=1-step=4.ckpt": 2,
        "run/epoch=2-step=6.ckpt": 2,
        "run/last.ckpt": 2,
    }

    # One rank resumes from "last" (the two ranks' shards resharded): the weights and the optimizer
    # state are those saved.
    third = run_sharded(azurite, dirpath, tmp_path / "third", max_epochs=3, resume="last", devices=1)

    assert third[0]["resumed_from"] == f"{dirpath}/last.ckpt"
    assert third[0]["epoch"] == 3
    assert same_state(final(tmp_path / "third"), final(tmp_path / "second"))

    # `azstoragetorch cp` takes last.ckpt to disk, where Lightning alone (no plugin) resumes from it:
    # weights, Adam state, epoch and step are those saved. It trains one more epoch and saves locally.
    local = tmp_path / "copied" / "last.ckpt"
    copy(f"{dirpath}/last.ckpt", str(local))
    assert "azstoragetorch_lightning_meta" in dcp_keys(local)  # an entry Lightning must ignore
    plain = run_sharded(
        azurite,
        str(tmp_path / "plain-run"),
        tmp_path / "plain",
        max_epochs=4,
        resume=str(local),
        devices=1,
        no_plugin=True,
        dump_loaded=True,
    )
    loaded = torch.load(tmp_path / "plain" / "loaded.pt", weights_only=False)
    assert (loaded.pop("epoch"), loaded.pop("global_step")) == (3, 6)
    assert same_state(loaded, final(tmp_path / "second"))
    assert (plain[0]["epoch"], plain[0]["global_step"]) == (4, 10)  # one rank takes every batch: 4 steps

    # And back: the plain Lightning checkpoint (no copy of the trainer state among its shards, only
    # meta.pt) copied up with `azstoragetorch cp` resumes through the plugin from its URL.
    uploaded = container.blob_url("uploaded/last.ckpt")
    assert "azstoragetorch_lightning_meta" not in dcp_keys(tmp_path / "plain-run" / "last.ckpt")
    copy(str(tmp_path / "plain-run" / "last.ckpt"), uploaded)
    back = run_sharded(azurite, container.blob_url("back"), tmp_path / "back", max_epochs=4, resume=uploaded, devices=1)
    assert (back[0]["resumed_from"], back[0]["epoch"], back[0]["global_step"]) == (uploaded, 4, 10)
    assert same_state(final(tmp_path / "back"), final(tmp_path / "plain"))
    assert url_named_folders() == local_before


def test_fsdp_sharded_checkpoints_through_the_trainer(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    dirpath = container.blob_url("fsdp")
    options: dict[str, Any] = {"strategy": "fsdp", "dump_shards": True}

    run_two_epochs(azurite, dirpath, tmp_path / "first", **options)

    assert checkpoint_folders(container) == {"fsdp/epoch=1-step=4.ckpt": 2, "fsdp/last.ckpt": 2}
    resume_third_epoch(azurite, dirpath, tmp_path / "resumed", **options)
    # Each rank starts from exactly the weights and Adam state that it held when last.ckpt was
    # saved, compared shard by shard (FSDP1's state is never gathered on CPU here).
    assert_resumed_local_shards(tmp_path / "first", tmp_path / "resumed")


def test_fsdp_full_state_dicts_stay_single_blobs_written_through_the_plugin(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    local_before = url_named_folders()
    dirpath = container.blob_url("full")
    options: dict[str, Any] = {"strategy": "fsdp", "state_dict": "full", "dump_shards": True}

    run_two_epochs(azurite, dirpath, tmp_path / "first", **options)

    # Rank 0 wrote each checkpoint through the plugin as one blob: no prefix of shards, no meta.pt.
    saved = single_blob_checkpoints(container, "full")
    # It holds the whole weights: each parameter is the two ranks' shards put end to end.
    flattened = {name: tensor.flatten() for name, tensor in saved["state_dict"].items()}
    assert same_state(whole_weights(tmp_path / "first", ranks=2), flattened)

    # Fresh processes resume from it: each rank starts from the shards it held when it was saved.
    resume_third_epoch(azurite, dirpath, tmp_path / "resumed", **options)

    assert_resumed_local_shards(tmp_path / "first", tmp_path / "resumed")
    assert blob_names(container) == {"full/epoch=1-step=4.ckpt", "full/last.ckpt"}
    assert url_named_folders() == local_before


def test_model_parallel_consolidated_checkpoints_are_single_blobs_and_resume_exactly(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    """ModelParallelStrategy(save_distributed_checkpoint=False) saves, as on disk, one file written by
    rank 0 through the CheckpointIO plugin: here, one blob."""
    local_before = url_named_folders()
    dirpath = container.blob_url("consolidated")

    run_two_epochs(azurite, dirpath, tmp_path / "first", state_dict="full")

    saved = single_blob_checkpoints(container, "consolidated")
    assert same_state(saved["state_dict"], final(tmp_path / "first")["weights"])

    resume_third_epoch(azurite, dirpath, tmp_path / "resumed", state_dict="full", dump_loaded=True)

    loaded = torch.load(tmp_path / "resumed" / "loaded.pt", weights_only=False)
    assert (loaded.pop("epoch"), loaded.pop("global_step")) == (2, 4)
    assert same_state(loaded, final(tmp_path / "first"))
    assert blob_names(container) == {"consolidated/epoch=1-step=4.ckpt", "consolidated/last.ckpt"}
    assert url_named_folders() == local_before


def test_async_checkpoint_io_uploads_behind_training_and_resumes_exactly(
    container: Container, azurite: Azurite, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    account_url = proxy.url(azurite.account_url)
    dirpath = proxy.url(container.blob_url("async"))
    out = tmp_path / "first"

    # Rank 0's shard upload of the first last.ckpt (step 2) is held at the proxy (a Gather that never
    # fills is a gate: it holds every matching request until released). A synchronous save would
    # hold the training loop with it; behind training, step 3 is taken while it is still held.
    def first_last_shard(seen: SeenRequest) -> bool:
        return "/async/last.ckpt/__0_" in seen.path and seen.method == "PUT"

    gate = Gather(parties=1_000_000, timeout=600)
    proxy.add_fault(first_last_shard, gate, times=None)
    command = sharded_command(
        account_url, dirpath, out, max_epochs=3, top_k=1, val_losses="3,1,2", async_io=True, record_steps=True
    )
    with started_job(command, cwd=REPOSITORY, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) as job:
        try:
            steps = out / "steps0"

            def reached() -> int:
                return max(map(int, steps.read_text().split()), default=0) if steps.exists() else 0

            def upload_held() -> bool:
                return any(first_last_shard(seen) for seen in proxy.requests)

            # The upload runs in the background, so its first PUT may reach the gate after training
            # has gone on: wait for both, in either order.
            for _ in range(2400):  # a guard against a hang (up to 240 s), not a measurement
                if job.poll() is not None or (reached() >= 3 and upload_held()):
                    break
                time.sleep(0.1)
            assert upload_held(), "the upload of step 2's last.ckpt never reached the proxy"
            assert reached() >= 3, f"training stopped at step {reached()} while the save of step 2 was held"
            # ... and that save is still held: nothing of it committed.
            assert not container.client.get_blob_client("async/last.ckpt/.metadata").exists()
        finally:
            gate.release()
        _, stderr = job.communicate(timeout=900)
    assert job.returncode == 0, stderr[-4000:]
    first = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]

    assert [report["global_step"] for report in first] == [6, 6]
    # Top-k's removals waited for the uploads queued before them: exactly the best and last remain.
    assert checkpoint_folders(container) == {"async/epoch=1-step=4.ckpt": 2, "async/last.ckpt": 2}
    # What was uploaded is the state when each save was asked for (staged), not a later one: resumed
    # from last.ckpt (epoch 1; epoch 2 was no better, so saved nothing), epoch 2 ends where it did.
    resumed = run_sharded(azurite, dirpath, tmp_path / "resumed", max_epochs=3, resume="last", account_url=account_url)
    assert [report["global_step"] for report in resumed] == [6, 6]
    assert same_state(final(tmp_path / "resumed"), final(out))


def test_a_rank_killed_while_overwriting_last_leaves_the_old_checkpoint_whole(
    container: Container, azurite: Azurite, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    account_url = proxy.url(azurite.account_url)
    dirpath = proxy.url(container.blob_url("run"))
    first = run_sharded(azurite, dirpath, tmp_path / "first", max_epochs=1, account_url=account_url)
    assert first[0]["global_step"] == 2

    # The next epoch's last.ckpt: rank 1's shard upload is held at the proxy, and rank 1 is killed
    # there. Rank 0 has already replaced meta.pt by then.
    holding = threading.Event()
    held = Delay(600, hold_request=True, holding=holding)
    proxy.add_fault(lambda seen: "/run/last.ckpt/__1_" in seen.path and seen.method == "PUT", held, times=None)
    command = sharded_command(
        account_url, dirpath, tmp_path / "killed", max_epochs=2, resume="last", top_k=1, write_pids=True
    )
    with subprocess.Popen(
        command,
        cwd=REPOSITORY,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    ) as job:
        try:
            assert holding.wait(300), job.stderr.read()[-4000:] if job.poll() is not None else "no shard upload held"
            os.kill(int((tmp_path / "killed" / "pid1").read_text()), signal.SIGKILL)
            job.wait(300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(job.pid, signal.SIGKILL)
    assert job.returncode != 0
    new_meta = torch.load(io.BytesIO(container.download("run/last.ckpt/meta.pt")), weights_only=False)
    assert new_meta["global_step"] == 4

    # Loaded in fresh processes, last.ckpt is the old checkpoint, whole: its weights, Adam state and
    # trainer state (step 2) together, not the new meta.pt with the old weights.
    resumed = run_sharded(azurite, dirpath, tmp_path / "resumed", max_epochs=1, resume="last", account_url=account_url)

    assert [report["global_step"] for report in resumed] == [2, 2]
    assert same_state(final(tmp_path / "resumed"), final(tmp_path / "first"))


@pytest.mark.parametrize(
    ("strategy", "state_dict"), [("fsdp", "sharded"), ("model_parallel", "sharded"), ("model_parallel", "full")]
)
def test_fabric_saves_and_loads_sharded_checkpoints_by_url(
    strategy: str, state_dict: str, container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    """``state_dict="full"``: ModelParallelStrategy(save_distributed_checkpoint=False) saves one
    consolidated file, as on disk: here, one blob."""
    local_before = url_named_folders()
    url = container.blob_url("fabric/step.ckpt")

    for mode in ("save", "load"):  # each in fresh processes; load starts from other weights
        command = [sys.executable, "-m", "tests.e2e.support.fabric_sharded_run", "--account-url", azurite.account_url]
        command += ["--url", url, "--strategy", strategy, "--mode", mode, "--out", str(tmp_path)]
        command += ["--state-dict", state_dict]
        result = run_job(command, cwd=REPOSITORY)
        assert result.returncode == 0, result.stderr[-4000:]

    if state_dict == "sharded":
        assert checkpoint_folders(container) == {"fabric/step.ckpt": 2}
    else:
        assert blob_names(container) == {"fabric/step.ckpt"}
        assert torch.load(io.BytesIO(container.download("fabric/step.ckpt")), weights_only=False)["step"] == 2
    # The step after loading is the step after saving: same weights, same Adam state.
    saved = json.loads((tmp_path / "save.json").read_text())
    assert json.loads((tmp_path / "load.json").read_text()) == saved
    assert url_named_folders() == local_before


# -- helpers ----------------------------------------------------------------------------------------


def run_two_epochs(azurite: Azurite, dirpath: str, out: pathlib.Path, **options: Any) -> None:
    """Two ranks train two epochs from scratch; val_loss 3, 1 makes epoch 1 (step 4) the best."""
    first = run_sharded(azurite, dirpath, out, max_epochs=2, val_losses="3,1", **options)
    assert [report["global_step"] for report in first] == [4, 4]


def resume_third_epoch(azurite: Azurite, dirpath: str, out: pathlib.Path, **options: Any) -> None:
    """Two fresh ranks resume from ``last.ckpt`` of :func:`run_two_epochs` and train epoch 2 (to step 6)."""
    resumed = run_sharded(azurite, dirpath, out, max_epochs=3, val_losses="3,1,2", resume="last", **options)
    assert [report["resumed_from"] for report in resumed] == [f"{dirpath}/last.ckpt"] * 2
    assert [report["global_step"] for report in resumed] == [6, 6]


def single_blob_checkpoints(container: Container, prefix: str) -> dict[str, Any]:
    """The best and last checkpoints of :func:`run_two_epochs` under ``prefix`` are one blob each
    (nothing else is there); returns last.ckpt, which holds the trainer state of step 4."""
    assert blob_names(container) == {f"{prefix}/epoch=1-step=4.ckpt", f"{prefix}/last.ckpt"}
    saved: dict[str, Any] = torch.load(io.BytesIO(container.download(f"{prefix}/last.ckpt")), weights_only=False)
    assert (saved["epoch"], saved["global_step"]) == (1, 4)
    return saved


def run_sharded(
    azurite: Azurite,
    dirpath: str,
    out: pathlib.Path,
    *,
    account_url: str | None = None,
    devices: int = 2,
    top_k: int = 1,
    **options: Any,
) -> list[dict[str, Any]]:
    """Run tests/e2e/support/lightning_sharded_run.py in new processes (``options`` as for
    :func:`sharded_command`); returns each rank's report."""
    command = sharded_command(account_url or azurite.account_url, dirpath, out, devices=devices, top_k=top_k, **options)
    result = run_job(command, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices)]


def sharded_command(account_url: str, dirpath: str, out: pathlib.Path, **options: Any) -> list[str]:
    """The command line of tests/e2e/support/lightning_sharded_run.py. Each option is its flag:
    ``max_epochs=3`` is ``--max-epochs 3``, ``async_io=True`` is ``--async-io``; one that is ``None``
    or ``False`` is left out, so the script's default applies."""
    command = [sys.executable, "-m", "tests.e2e.support.lightning_sharded_run", "--account-url", account_url]
    command += ["--dirpath", dirpath, "--out", str(out)]
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            command.append(flag)
        elif value is not None and value is not False:
            command += [flag, str(value)]
    return command


def copy(source: str, destination: str) -> None:
    """``python -m azstoragetorch cp SRC DST`` with the emulator's account key."""
    environment = {**os.environ, "AZURE_STORAGE_KEY": ACCOUNT_KEY}
    command = [sys.executable, "-m", "azstoragetorch", "cp", source, destination, "--no-progress"]
    result = run_job(command, cwd=REPOSITORY, env=environment)
    assert result.returncode == 0, result.stderr[-4000:]


def dcp_keys(folder: pathlib.Path) -> set[str]:
    """The top-level entries of the DCP checkpoint in a local folder."""
    from torch.distributed.checkpoint import FileSystemReader

    return set(FileSystemReader(folder).read_metadata().state_dict_metadata)


def final(out: pathlib.Path) -> dict[str, Any]:
    loaded: dict[str, Any] = torch.load(out / "final.pt", weights_only=False)
    return loaded


def local_shards(out: pathlib.Path, when: str, rank: int) -> dict[str, Any]:
    """A rank's own weights and optimizer state, written by ``--dump-shards`` when training started
    (``when="loaded"``) or ended (``"final"``)."""
    loaded: dict[str, Any] = torch.load(out / f"{when}-shards{rank}.pt", weights_only=False)
    return loaded


def assert_resumed_local_shards(saved_run: pathlib.Path, resumed_run: pathlib.Path, ranks: int = 2) -> None:
    """Every rank of ``resumed_run`` started from the shards of weights and optimizer state that the
    same rank of ``saved_run`` ended with (and saved last)."""
    for rank in range(ranks):
        saved = local_shards(saved_run, "final", rank)
        assert saved["optimizer"]["state"], f"rank {rank} saved no Adam state: nothing to compare"
        assert same_state(local_shards(resumed_run, "loaded", rank), saved), f"rank {rank} resumed other state"


def whole_weights(out: pathlib.Path, ranks: int) -> dict[str, torch.Tensor]:
    """FSDP1's full weights put together from each rank's final local shards: a parameter's shards are
    consecutive pieces of its flattened values, in rank order."""
    shards = [local_shards(out, "final", rank)["weights"] for rank in range(ranks)]
    weights = {}
    for name in shards[0]:
        pieces = torch.cat([shard[name].flatten() for shard in shards])
        weights[name.replace("_fsdp_wrapped_module.", "")] = pieces
    return weights


def blob_names(container: Container) -> set[str]:
    return {blob.name for blob in container.client.list_blobs()}


def same_state(first: Any, second: Any) -> bool:
    """Equal nested state: every tensor equal, every other value equal."""
    if isinstance(first, torch.Tensor) or isinstance(second, torch.Tensor):
        return isinstance(first, torch.Tensor) and isinstance(second, torch.Tensor) and torch.equal(first, second)
    if isinstance(first, dict) and isinstance(second, dict):
        return first.keys() == second.keys() and all(same_state(first[key], second[key]) for key in first)
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        return len(first) == len(second) and all(same_state(a, b) for a, b in zip(first, second, strict=True))
    return bool(first == second)


def checkpoint_folders(container: Container) -> dict[str, int]:
    """Each sharded checkpoint in the container, with how many ranks' shard files it holds; every one
    must be complete (``.metadata`` and ``meta.pt``) and hold nothing else."""
    folders: dict[str, list[str]] = {}
    for blob in container.client.list_blobs():
        folder, _, name = blob.name.rpartition("/")
        folders.setdefault(folder, []).append(name)
    result = {}
    for folder, names in folders.items():
        shards = [name for name in names if name.endswith(".distcp")]
        assert sorted(set(names) - set(shards)) == [".metadata", "meta.pt"], (folder, names)
        result[folder] = len({name.split("_")[2] for name in shards})
    return result


def url_named_folders() -> set[pathlib.Path]:
    """Local folders named after a URL (``http:``/``https:``), in the repository and the temp directory."""
    found: set[pathlib.Path] = set()
    for root in (REPOSITORY, pathlib.Path(tempfile.gettempdir())):
        found.update(path for path in root.glob("http*:") if path.is_dir())
    return found
