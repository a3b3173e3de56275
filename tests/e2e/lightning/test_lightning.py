"""AzureBlobCheckpointIO with a real Trainer against Azurite.

ModelCheckpoint's whole flow with a blob directory (top-k deletions checked by listing the
container, with Lightning's local rules for the checkpoint resumed from and checkpoints outside
dirpath, save_last, every_n_train_steps), resuming from "last" in a fresh process and from a URL,
load_from_checkpoint, default_root_dir, az:// paths, AsyncCheckpointIO (removals ordered after
queued saves), DDP with two processes, and what the user sees for failed uploads and bad input.
"""

from __future__ import annotations

import errno
import io
import json
import pathlib
import pickle
import sys
import threading
import time
from typing import Any

import pytest
import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, ResourceExistsError
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.plugins import AsyncCheckpointIO

from azstoragetorch.exceptions import FatalBlobIOWriteError
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.testing import ACCOUNT_NAME, Azurite
from tests.conftest import Container
from tests.e2e.support._launch import run_job
from tests.e2e.support.fault_proxy import Delay, FaultProxy, Respond, SeenRequest
from tests.e2e.support.lightning_helpers import TinyModel, loader, same_weights, trainer

# Lightning advises about the tiny data sets and the absence of DataLoader workers; not our concern.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]
STEPS_PER_EPOCH = 4  # loader(): 32 samples in batches of 8


@pytest.fixture
def plugin(azurite: Azurite, account_credential: AzureNamedKeyCredential) -> AzureBlobCheckpointIO:
    return AzureBlobCheckpointIO(credential=account_credential, account_url=azurite.account_url)


def proxied_plugin(proxy: FaultProxy, azurite: Azurite, **options: Any) -> AzureBlobCheckpointIO:
    return AzureBlobCheckpointIO(credential=azurite.credential, account_url=proxy.url(azurite.account_url), **options)


def names(container: Container, prefix: str = "") -> list[str]:
    return sorted(blob.name for blob in container.client.list_blobs(name_starts_with=prefix))


def puts_of(path_suffix: str) -> Any:
    return lambda seen: seen.operation == "PutBlob" and seen.path.endswith(path_suffix)


# -- ModelCheckpoint with a blob directory ---------------------------------------------------------


def test_trainer_save_checkpoint_round_trips(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    model = TinyModel()
    run = trainer(plugins=[plugin], enable_checkpointing=False)
    run.fit(model, loader())
    url = container.blob_url("manual/model.ckpt")

    run.save_checkpoint(url)

    loaded = plugin.load_checkpoint(url)
    assert loaded["global_step"] == run.global_step == STEPS_PER_EPOCH
    assert same_weights(loaded["state_dict"], model.state_dict())
    on_disk = torch.load(io.BytesIO(container.download("manual/model.ckpt")), weights_only=False)
    assert same_weights(on_disk["state_dict"], model.state_dict())


def test_save_top_k_deletes_the_checkpoints_it_drops(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # val_loss by epoch: 5, 3, 4, 1, 2, so the best two are epochs 3 and 4, and epochs 0, 1 and 2
    # were each saved while they were in the top two and deleted when they fell out of it.
    model = TinyModel(val_losses=[5.0, 3.0, 4.0, 1.0, 2.0])
    checkpoints = ModelCheckpoint(
        dirpath=container.blob_url("run"), filename="{epoch}", monitor="val_loss", mode="min", save_top_k=2
    )
    trainer(max_epochs=5, plugins=[plugin], callbacks=[checkpoints]).fit(model, loader(), loader())

    assert names(container) == ["run/epoch=3.ckpt", "run/epoch=4.ckpt"]
    assert checkpoints.best_model_path == container.blob_url("run/epoch=3.ckpt")


def test_save_last_and_every_n_train_steps(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    checkpoints = ModelCheckpoint(
        dirpath=container.blob_url("steps"), filename="{step}", every_n_train_steps=3, save_top_k=-1, save_last=True
    )
    trainer(max_epochs=2, plugins=[plugin], callbacks=[checkpoints]).fit(TinyModel(), loader())

    assert names(container) == ["steps/last.ckpt", "steps/step=3.ckpt", "steps/step=6.ckpt"]
    assert plugin.load_checkpoint(container.blob_url("steps/last.ckpt"))["global_step"] == 6


def test_fit_resumes_from_last_in_a_fresh_process(
    container: Container, azurite: Azurite, tmp_path: pathlib.Path
) -> None:
    dirpath = container.blob_url("fresh")
    first = run_script(azurite.account_url, dirpath, tmp_path / "first", max_epochs=2)
    assert first[0]["global_step"] == 2 * STEPS_PER_EPOCH

    second = run_script(azurite.account_url, dirpath, tmp_path / "second", max_epochs=3, resume="last")

    assert second[0]["resumed_from"] == f"{dirpath}/last.ckpt"
    assert second[0]["global_step"] == 3 * STEPS_PER_EPOCH  # continued, not started over


def test_fit_resumes_from_a_blob_url(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("run"), save_top_k=1)
    trainer(plugins=[plugin], callbacks=[checkpoints]).fit(TinyModel(), loader())
    resumed = trainer(max_epochs=2, plugins=[plugin], callbacks=[ModelCheckpoint(dirpath=container.blob_url("run"))])

    resumed.fit(TinyModel(), loader(), ckpt_path=checkpoints.best_model_path)

    assert resumed.ckpt_path == container.blob_url("run/epoch=0-step=4.ckpt")
    assert resumed.global_step == 2 * STEPS_PER_EPOCH


def test_load_from_checkpoint_reads_each_blob(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # Two checkpoints with the same file name: Lightning alone would fetch http(s) paths with
    # torch.hub, which caches by file name and would return the first for both.
    trained = {}
    for run_name, width in (("a", 5), ("b", 7)):
        model = TinyModel(width=width)
        checkpoints = ModelCheckpoint(dirpath=container.blob_url(run_name), save_last=True, save_top_k=0)
        trainer(plugins=[plugin], callbacks=[checkpoints]).fit(model, loader())
        trained[run_name] = model

    for run_name, model in trained.items():
        loaded = TinyModel.load_from_checkpoint(container.blob_url(f"{run_name}/last.ckpt"))
        assert loaded.hparams.width == model.hparams.width
        assert same_weights(loaded.state_dict(), model.state_dict())


def test_default_root_dir_holds_logs_and_checkpoints(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    root = container.blob_url("root")
    for _ in range(2):
        trainer(default_root_dir=root, logger=CSVLogger(root), plugins=[plugin]).fit(TinyModel(), loader(), loader())

    assert names(container) == [
        "root/lightning_logs/version_0/checkpoints/epoch=0-step=4.ckpt",
        "root/lightning_logs/version_0/hparams.yaml",
        "root/lightning_logs/version_0/metrics.csv",
        "root/lightning_logs/version_1/checkpoints/epoch=0-step=4.ckpt",  # the logger found version_0
        "root/lightning_logs/version_1/hparams.yaml",
        "root/lightning_logs/version_1/metrics.csv",
    ]
    assert b"val_loss" in container.download("root/lightning_logs/version_1/metrics.csv")


def test_default_root_dir_resumes_from_last(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # Without a dirpath, ModelCheckpoint lists default_root_dir before setup() with the *local*
    # filesystem in Lightning 2.6; "last" is still found in the container.
    root = container.blob_url("root")
    trainer(default_root_dir=root, plugins=[plugin], callbacks=[ModelCheckpoint(save_last=True)]).fit(
        TinyModel(), loader()
    )
    resumed = trainer(
        max_epochs=2, default_root_dir=root, plugins=[plugin], callbacks=[ModelCheckpoint(save_last=True)]
    )

    resumed.fit(TinyModel(), loader(), ckpt_path="last")

    assert resumed.ckpt_path == f"{root}/checkpoints/last.ckpt"
    assert resumed.global_step == 2 * STEPS_PER_EPOCH


def test_az_paths_use_the_account_url(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    dirpath = f"az://{container.name}/azrun"
    checkpoints = ModelCheckpoint(dirpath=dirpath, save_last=True)
    model = TinyModel(width=6)
    trainer(plugins=[plugin], callbacks=[checkpoints]).fit(model, loader())
    assert names(container) == ["azrun/epoch=0-step=4.ckpt", "azrun/last.ckpt"]

    resumed = trainer(max_epochs=2, plugins=[plugin], callbacks=[ModelCheckpoint(dirpath=dirpath, save_last=True)])
    resumed.fit(TinyModel(width=6), loader(), ckpt_path="last")
    assert resumed.ckpt_path == f"{dirpath}/last.ckpt"
    assert resumed.global_step == 2 * STEPS_PER_EPOCH
    assert names(container) == ["azrun/epoch=1-step=8.ckpt", "azrun/last.ckpt"]
    assert TinyModel.load_from_checkpoint(f"{dirpath}/last.ckpt").hparams.width == 6


@pytest.mark.parametrize(
    ("monitor", "az_dirpath"),
    [(None, False), ("val_loss", False), (None, True)],
    ids=["no-monitor", "monitor", "az-dirpath-https-resume"],
)
def test_resuming_in_place_keeps_the_checkpoint_resumed_from(
    container: Container, plugin: AzureBlobCheckpointIO, monitor: str | None, az_dirpath: bool
) -> None:
    # Lightning keeps the checkpoint a run resumed from when top-k drops it, as on a local disk;
    # later checkpoints that fall out of the top k are deleted as usual. The resumed-from path is
    # recognised in either form (az:// or https://).
    dirpath = f"az://{container.name}/run" if az_dirpath else container.blob_url("run")
    model = TinyModel(val_losses=[3.0, 2.0, 1.0])  # every epoch is the new best

    def fit(max_epochs: int, ckpt_path: str | None) -> ModelCheckpoint:
        checkpoints = ModelCheckpoint(dirpath=dirpath, monitor=monitor, save_top_k=1)
        trainer(max_epochs=max_epochs, plugins=[plugin], callbacks=[checkpoints]).fit(
            model, loader(), loader(), ckpt_path=ckpt_path
        )
        return checkpoints

    assert fit(1, None).best_model_path == f"{dirpath}/epoch=0-step=4.ckpt"

    fit(3, container.blob_url("run/epoch=0-step=4.ckpt"))

    assert names(container) == ["run/epoch=0-step=4.ckpt", "run/epoch=2-step=12.ckpt"]


def test_a_checkpoint_outside_dirpath_is_never_deleted(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # Resuming into a new dirpath restores best_model_path, which names the first run's best
    # checkpoint; save_top_k=1 then drops it from the new run's top k, but it is not the new run's.
    first = ModelCheckpoint(dirpath=container.blob_url("run-1"), save_top_k=1, save_last=True)
    trainer(plugins=[plugin], callbacks=[first]).fit(TinyModel(), loader())
    assert first.best_model_path == container.blob_url("run-1/epoch=0-step=4.ckpt")

    second = ModelCheckpoint(dirpath=container.blob_url("run-2"), save_top_k=1)
    trainer(max_epochs=3, plugins=[plugin], callbacks=[second]).fit(
        TinyModel(), loader(), ckpt_path=container.blob_url("run-1/last.ckpt")
    )

    assert names(container) == ["run-1/epoch=0-step=4.ckpt", "run-1/last.ckpt", "run-2/epoch=2-step=12.ckpt"]


# -- AsyncCheckpointIO ------------------------------------------------------------------------------


def test_async_checkpoint_io_keeps_exactly_top_k(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    # Every save takes 0.3 s, far longer than a training step, so each checkpoint is dropped by
    # save_top_k while it is still uploading. The removal must wait for that upload; otherwise the
    # upload would commit after the delete and leave a checkpoint that top-k no longer tracks.
    proxy.add_fault(lambda seen: seen.operation == "PutBlob", Delay(0.3, hold_request=True), times=None)
    plugin = AsyncCheckpointIO(proxied_plugin(proxy, azurite))
    checkpoints = ModelCheckpoint(
        dirpath=proxy.url(container.blob_url("async")), filename="{step}", every_n_train_steps=1, save_top_k=1
    )
    trainer(max_epochs=2, plugins=[plugin], callbacks=[checkpoints]).fit(TinyModel(), loader())

    assert names(container) == ["async/step=8.ckpt"]
    assert proxy.count("PutBlob") == 2 * STEPS_PER_EPOCH  # every step's checkpoint was written


class HoldSecondSave(Callback):
    """Holds the second checkpoint of a run (epoch 0's ``last.ckpt``) in AsyncCheckpointIO's thread
    until training ends, and starts epoch 1 only once it is held: every later save then waits in
    the queue while ``save_top_k`` removes, however the threads are scheduled."""

    def __init__(self) -> None:
        self.saves = 0
        self.held = HeldWhilePickled()

    def on_save_checkpoint(self, trainer: Any, pl_module: Any, checkpoint: dict[str, Any]) -> None:
        self.saves += 1
        if self.saves == 2:
            checkpoint["held"] = self.held

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        if trainer.current_epoch == 1:
            assert self.held.reached.wait(timeout=120), "the second save never started"

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self.held.release.set()


class HeldWhilePickled:
    """Blocks ``torch.save`` while it pickles this object, until ``release`` is set."""

    def __init__(self) -> None:
        self.reached = threading.Event()
        self.release = threading.Event()

    def __reduce__(self) -> tuple[Any, ...]:
        self.reached.set()
        assert self.release.wait(timeout=120), "the held save was never released"
        return (str, ("released",))


def test_async_removal_is_not_undone_by_a_queued_save(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # From epoch 1 on, each epoch's checkpoint is still queued (not uploading) when the next epoch's
    # save_top_k removes it. The removal must take effect after that save, not before it.
    hold = HoldSecondSave()
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("async"), save_top_k=1, save_last=True)

    trainer(max_epochs=4, plugins=[AsyncCheckpointIO(plugin)], callbacks=[hold, checkpoints]).fit(TinyModel(), loader())

    assert names(container) == ["async/epoch=3-step=16.ckpt", "async/last.ckpt"]
    assert hold.saves == 8


def test_a_queued_removal_that_fails_is_raised_from_teardown(
    container: Container, plugin: AzureBlobCheckpointIO
) -> None:
    container.upload("run/kept.ckpt", b"checkpoint")
    container.client.get_blob_client("run/kept.ckpt").create_snapshot()
    async_io = AsyncCheckpointIO(plugin)
    async_io.save_checkpoint({"weights": torch.ones(4)}, container.blob_url("run/new.ckpt"))

    async_io.remove_checkpoint(container.blob_url("run/kept.ckpt"))  # queued behind the save

    with pytest.raises(ResourceExistsError, match="SnapshotsPresent"):
        async_io.teardown()
    assert names(container) == ["run/kept.ckpt", "run/new.ckpt"]


def test_async_removal_falls_back_to_removing_at_once_if_lightning_changed(
    container: Container, plugin: AzureBlobCheckpointIO
) -> None:
    container.upload("old.ckpt", b"checkpoint")
    async_io = AsyncCheckpointIO(plugin)
    del async_io._executor  # as if a later Lightning kept its queue elsewhere

    with pytest.warns(RuntimeWarning, match="no AsyncCheckpointIO._executor"):
        async_io.remove_checkpoint(container.blob_url("old.ckpt"))

    assert not container.exists("old.ckpt")


def test_remove_waits_for_a_save_of_the_same_blob(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    proxy.add_fault(lambda seen: seen.operation == "PutBlob", Delay(1.0, hold_request=True))
    plugin = proxied_plugin(proxy, azurite)
    url = proxy.url(container.blob_url("slow.ckpt"))
    saver = threading.Thread(target=plugin.save_checkpoint, args=({"weights": torch.ones(4)}, url))
    saver.start()
    deadline = time.monotonic() + 30
    while not proxy.count("PutBlob") and time.monotonic() < deadline:
        time.sleep(0.01)

    plugin.remove_checkpoint(url)  # the upload is in flight right now

    saver.join()
    assert not container.exists("slow.ckpt")


def test_a_pickled_plugin_works_in_its_new_home(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # ddp_spawn sends the plugin to every spawned process by pickling it.
    copy = pickle.loads(pickle.dumps(plugin))

    copy.save_checkpoint({"weights": torch.arange(4)}, container.blob_url("pickled.ckpt"))

    assert torch.equal(plugin.load_checkpoint(container.blob_url("pickled.ckpt"))["weights"], torch.arange(4))
    assert repr(copy) == repr(plugin)


# -- failures -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("asynchronous", [False, True], ids=["sync", "async"])
@pytest.mark.usefixtures("no_backoff")
def test_failed_upload_reaches_the_trainer_and_keeps_the_previous_checkpoint(
    container: Container, azurite: Azurite, proxy: FaultProxy, asynchronous: bool
) -> None:
    dirpath = proxy.url(container.blob_url("run"))

    def fit(max_epochs: int, ckpt_path: str | None) -> None:
        plugin: Any = proxied_plugin(proxy, azurite)
        checkpoints = ModelCheckpoint(dirpath=dirpath, save_last=True, save_top_k=-1)
        plugins = [AsyncCheckpointIO(plugin) if asynchronous else plugin]
        trainer(max_epochs=max_epochs, plugins=plugins, callbacks=[checkpoints]).fit(
            TinyModel(), loader(), ckpt_path=ckpt_path
        )

    fit(1, None)
    before = {name: container.download(name) for name in names(container)}
    proxy.add_fault(lambda seen: seen.operation == "PutBlob", Respond(503, "ServerBusy"), times=None)

    with pytest.raises(FatalBlobIOWriteError, match="ServerBusy"):
        fit(2, "last")

    assert {name: container.download(name) for name in names(container)} == before
    assert plugin_loads(container.blob_url("run/last.ckpt"), azurite)["global_step"] == STEPS_PER_EPOCH


def test_wrong_credential_is_an_error_not_a_fresh_start(container: Container, azurite: Azurite) -> None:
    wrong_key = AzureNamedKeyCredential(ACCOUNT_NAME, "d3Jvbmcga2V5")  # valid base64, wrong key
    plugin = AzureBlobCheckpointIO(credential=wrong_key, account_url=azurite.account_url)
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("run"), save_last=True)

    with pytest.raises(ClientAuthenticationError):
        trainer(plugins=[plugin], callbacks=[checkpoints]).fit(TinyModel(), loader(), ckpt_path="last")


def test_a_checkpoint_with_snapshots_is_not_deleted(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    container.upload("run/kept.ckpt", b"checkpoint")
    container.client.get_blob_client("run/kept.ckpt").create_snapshot()

    with pytest.raises(ResourceExistsError, match="SnapshotsPresent"):
        plugin.remove_checkpoint(container.blob_url("run/kept.ckpt"))

    assert container.exists("run/kept.ckpt")


# -- bad input ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        "checkpoints/model.ckpt",
        "/tmp/model.ckpt",
        "s3://bucket/model.ckpt",
        "https://example.com/checkpoints/model.ckpt",
        "az://",
    ],
)
def test_paths_that_are_not_blob_paths_are_rejected(plugin: AzureBlobCheckpointIO, path: str) -> None:
    for call in (
        lambda: plugin.save_checkpoint({}, path),
        lambda: plugin.load_checkpoint(path),
        lambda: plugin.remove_checkpoint(path),
    ):
        with pytest.raises(ValueError, match=r"blob\.core\.windows\.net|names no container"):
            call()


def test_a_container_url_is_not_a_checkpoint_path(plugin: AzureBlobCheckpointIO, container: Container) -> None:
    with pytest.raises(ValueError, match="names a container but no blob"):
        plugin.save_checkpoint({}, container.url)


def test_az_path_without_account_url_says_to_pass_one() -> None:
    plugin = AzureBlobCheckpointIO(credential=False)

    for path in ("az://container/model.ckpt", "abfss://container@acct.dfs.core.windows.net/model.ckpt"):
        with pytest.raises(ValueError, match="account_url"):
            plugin.save_checkpoint({}, path)


def test_missing_checkpoint_is_file_not_found_without_the_sas(
    container: Container, azurite: Azurite, plugin: AzureBlobCheckpointIO
) -> None:
    missing_blob = f"{container.blob_url('nope.ckpt')}?{container.container_sas()}"

    with pytest.raises(FileNotFoundError, match="No such blob") as error:
        AzureBlobCheckpointIO(account_url=azurite.account_url).load_checkpoint(missing_blob)
    with pytest.raises(FileNotFoundError, match="No such container"):
        plugin.load_checkpoint(azurite.blob_url("no-such-container", "model.ckpt"))

    assert container.blob_url("nope.ckpt") in str(error.value)
    assert error.value.errno == errno.ENOENT and error.value.filename == container.blob_url("nope.ckpt")
    assert "sig=" not in str(error.value)


def test_fit_from_a_missing_checkpoint_is_file_not_found(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.ckpt"):
        trainer(plugins=[plugin]).fit(TinyModel(), loader(), ckpt_path=container.blob_url("nope.ckpt"))


def test_sas_in_a_directory_url_is_rejected(container: Container, plugin: AzureBlobCheckpointIO) -> None:
    # What ModelCheckpoint makes of dirpath=<URL with a SAS>: the file name lands in the query string.
    joined = f"{container.blob_url('run')}?{container.container_sas(read=True, write=True)}/epoch=0.ckpt"

    with pytest.raises(ValueError, match="AzureSasCredential") as error:
        plugin.save_checkpoint({}, joined)

    assert "sig=" not in str(error.value)
    assert names(container) == []


def test_storage_options_tune_one_save(container: Container, azurite: Azurite, proxy: FaultProxy) -> None:
    plugin = proxied_plugin(proxy, azurite)
    run = trainer(plugins=[plugin], enable_checkpointing=False)
    model = TinyModel(width=1024)  # about 20 KiB of weights
    run.fit(model, loader())
    url = proxy.url(container.blob_url("tuned.ckpt"))

    run.save_checkpoint(url, storage_options={"block_size": 4096, "max_concurrency": 2})

    assert proxy.count("PutBlock") >= 5 and proxy.count("PutBlockList") == 1
    assert same_weights(plugin.load_checkpoint(url)["state_dict"], model.state_dict())


@pytest.mark.parametrize(
    ("storage_options", "error", "message"),
    [
        ({"overwrite": True}, TypeError, "'overwrite'.*supported keys: block_size, max_concurrency"),
        ("fast", TypeError, "must be a dict"),
        ({"block_size": 0}, ValueError, "block_size must be a positive int"),
    ],
)
def test_unsupported_storage_options_are_rejected(
    container: Container, plugin: AzureBlobCheckpointIO, storage_options: Any, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        plugin.save_checkpoint({"a": 1}, container.blob_url("x.ckpt"), storage_options=storage_options)
    assert names(container) == []


def test_import_without_lightning_says_how_to_install() -> None:
    code = "import sys; sys.modules['lightning'] = None; import azstoragetorch.integrations.lightning"
    result = run_job([sys.executable, "-c", code], cwd=REPOSITORY)

    assert result.returncode != 0
    assert 'pip install "azstoragetorch[lightning]"' in result.stderr


# -- DDP --------------------------------------------------------------------------------------------


def test_ddp_rank_zero_writes_and_every_rank_resumes(
    container: Container, azurite: Azurite, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    account_url = proxy.url(azurite.account_url)
    dirpath = proxy.url(container.blob_url("ddp"))
    steps_per_epoch = STEPS_PER_EPOCH // 2  # the DistributedSampler gives each rank half the batches

    first = run_script(account_url, dirpath, tmp_path / "first", max_epochs=2, devices=2)

    assert [report["world_size"] for report in first] == [2, 2]
    assert [report["global_step"] for report in first] == [2 * steps_per_epoch] * 2
    # One checkpoint per epoch plus last.ckpt each time, each written once: by rank 0 alone.
    assert proxy.count("PutBlob") == 4
    assert names(container) == ["ddp/epoch=0-step=2.ckpt", "ddp/epoch=1-step=4.ckpt", "ddp/last.ckpt"]

    reads_before = len(reads_of(proxy, "/ddp/last.ckpt"))
    second = run_script(account_url, dirpath, tmp_path / "second", max_epochs=3, devices=2, resume="last")

    assert [report["resumed_from"] for report in second] == [f"{dirpath}/last.ckpt"] * 2
    assert [report["global_step"] for report in second] == [3 * steps_per_epoch] * 2
    assert second[0]["weights_sum"] == second[1]["weights_sum"]
    assert len(reads_of(proxy, "/ddp/last.ckpt")) - reads_before >= 2  # each rank read it itself


# -- helpers ----------------------------------------------------------------------------------------


def run_script(
    account_url: str, dirpath: str, out: pathlib.Path, *, max_epochs: int, devices: int = 1, resume: str | None = None
) -> list[dict[str, Any]]:
    """Run tests/e2e/support/lightning_run.py in new processes; returns each rank's report, by rank."""
    command = [sys.executable, "-m", "tests.e2e.support.lightning_run", "--account-url", account_url]
    command += ["--dirpath", dirpath, "--max-epochs", str(max_epochs), "--devices", str(devices), "--out", str(out)]
    if resume:
        command += ["--resume", resume]
    result = run_job(command, cwd=REPOSITORY)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(devices)]


def reads_of(proxy: FaultProxy, path_suffix: str) -> list[SeenRequest]:
    return [seen for seen in proxy.requests if seen.operation == "GetBlob" and seen.path.endswith(path_suffix)]


def plugin_loads(url: str, azurite: Azurite) -> Any:
    return AzureBlobCheckpointIO(credential=azurite.credential, account_url=azurite.account_url).load_checkpoint(url)
