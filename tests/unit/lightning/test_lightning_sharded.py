"""Which strategies may save blob checkpoints, and the guards of the Lightning methods wrapped for
sharded checkpoints. No network: every refusal comes at setup, before anything is saved."""

from __future__ import annotations

import pickle
import types
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, ModelParallelStrategy, SingleDeviceStrategy

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, _sharded, _sharded_layout
from azstoragetorch.retry import RetryOptions
from tests.e2e.support.lightning_helpers import TinyModel, loader, trainer

ACCOUNT = "http://127.0.0.1:1/devstoreaccount1"


class LocalSavingStrategy(SingleDeviceStrategy):
    """Saves by local path itself, as DeepSpeedStrategy does: a blob URL would become a folder."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        torch.save(checkpoint, filepath)


class DelegatingStrategy(SingleDeviceStrategy):
    """Overrides saving but hands over to Lightning's, which uses the CheckpointIO plugin."""

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        super().save_checkpoint(checkpoint, filepath, storage_options)


def plugin() -> AzureBlobCheckpointIO:
    return AzureBlobCheckpointIO(credential=False, account_url=ACCOUNT)


def test_a_strategy_that_saves_by_local_path_is_refused_at_setup(tmp_path: Path) -> None:
    strategy = LocalSavingStrategy(device=torch.device("cpu"))
    run = trainer(strategy=strategy, plugins=[plugin()], default_root_dir=tmp_path)

    with pytest.raises(
        RuntimeError,
        match=r"LocalSavingStrategy cannot save checkpoints to Azure Blob Storage.*"
        r"ModelParallelStrategy",
    ):
        run.fit(TinyModel(), loader())

    assert run.global_step == 0
    assert not list(tmp_path.iterdir())


def test_a_strategy_that_hands_saving_to_the_plugin_is_accepted(tmp_path: Path) -> None:
    run = trainer(
        strategy=DelegatingStrategy(device=torch.device("cpu")), plugins=[plugin()], enable_checkpointing=False
    )

    run.fit(TinyModel(), loader())

    assert run.global_step == 4


def test_without_the_plugin_any_strategy_is_left_alone(tmp_path: Path) -> None:
    plugin()  # the wrappers are installed
    run = trainer(strategy=LocalSavingStrategy(device=torch.device("cpu")), enable_checkpointing=False)

    run.fit(TinyModel(), loader())

    assert run.global_step == 4


# -- the guards -----------------------------------------------------------------------------------


def test_every_wrapped_lightning_method_is_where_its_wrapper_expects_it() -> None:
    plugin()
    targets = _sharded.targets()

    assert [_sharded.moved(owner, name, parameters) for owner, name, _, parameters in targets] == [None] * 9
    assert all(ours_in_chain(getattr(owner, name)) for owner, name, _, _ in targets)


def ours_in_chain(method: Any) -> bool:
    """Whether one of the wrappers around ``method`` (the statistics' may wrap ours) is ours."""
    while method is not None:
        if method in _sharded._wrapped:
            return True
        method = getattr(method, "__wrapped__", None)
    return False


def test_a_renamed_parameter_counts_as_moved() -> None:
    class Renamed:
        def save_checkpoint(self, checkpoint: Any, path: Any, storage_options: Any = None) -> None:
            """``filepath`` renamed to ``path``."""

    reason = _sharded.moved(Renamed, "save_checkpoint", ("self", "checkpoint", "filepath", "storage_options"))

    assert reason is not None and "Renamed.save_checkpoint takes" in reason
    assert _sharded.moved(Renamed, "load_checkpoint", ("self",)) == "Renamed.load_checkpoint is missing"


def test_a_moved_method_stops_its_strategy_at_setup(monkeypatch: pytest.MonkeyPatch) -> None:
    plugin()
    monkeypatch.setitem(_sharded._missing, ModelParallelStrategy, "ModelParallelStrategy.save_checkpoint is missing")
    strategy = ModelParallelStrategy()
    strategy.checkpoint_io = plugin()
    other = DDPStrategy()
    other.checkpoint_io = plugin()

    with pytest.raises(RuntimeError, match=r"ModelParallelStrategy.s sharded checkpoints.*save_checkpoint is missing"):
        _sharded.check_strategy(types.SimpleNamespace(strategy=strategy))
    _sharded.check_strategy(types.SimpleNamespace(strategy=other))  # not concerned
    fsdp = FSDPStrategy()
    fsdp.checkpoint_io = plugin()
    _sharded.check_strategy(types.SimpleNamespace(strategy=fsdp))


def test_a_moved_fabric_method_stops_the_plugin_from_being_created(monkeypatch: pytest.MonkeyPatch) -> None:
    from lightning.fabric.strategies.fsdp import FSDPStrategy as FabricFSDPStrategy

    monkeypatch.setattr(_sharded, "install", _sharded.install.__wrapped__)  # runs again
    monkeypatch.setattr(_sharded, "_wrapped", set())
    monkeypatch.setattr(
        _sharded, "targets", lambda: [(FabricFSDPStrategy, "save_checkpoint", lambda f: f, ("self", "path", "moved"))]
    )

    with pytest.raises(RuntimeError, match=r"sharded checkpoints in Blob Storage .*FSDPStrategy.save_checkpoint takes"):
        plugin()


# -- the plugin's settings reach the reader ---------------------------------------------------------


@pytest.mark.parametrize(("verify_checksum", "verifies"), [(None, True), (True, True), (False, False)])
def test_sharded_loads_verify_the_recorded_crc_unless_the_plugin_turns_it_off(
    verify_checksum: bool | None, verifies: bool
) -> None:
    """The plugin's default (None) checks every shard file read whole, as BlobStorageReader does;
    only verify_checksum=False turns the check off for sharded loads too."""
    strategy = types.SimpleNamespace(
        checkpoint_io=AzureBlobCheckpointIO(credential=False, account_url=ACCOUNT, verify_checksum=verify_checksum)
    )

    found = _sharded_layout.target(strategy, f"{ACCOUNT}/container/run/last.ckpt")

    assert found is not None
    assert found.reader().fs.verify_checksum is verifies


# -- consolidated checkpoints of the sharded strategies ---------------------------------------------


@pytest.mark.parametrize(
    "make_strategy",
    [lambda: ModelParallelStrategy(save_distributed_checkpoint=False), lambda: FSDPStrategy(state_dict_type="full")],
    ids=["model_parallel_consolidated", "fsdp_full"],
)
def test_a_consolidated_checkpoint_goes_to_the_plugin_as_one_file_by_its_url(
    make_strategy: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """As on disk, where Lightning hands such a checkpoint to the CheckpointIO: the plugin gets the
    URL itself (never a ``Path`` of it), and any sharded checkpoint of that name is removed."""
    monkeypatch.chdir(tmp_path)  # where a Path of the URL would become a folder
    checkpoint_io = plugin()
    saved: list[tuple[Any, Any]] = []
    removed: list[str] = []
    monkeypatch.setattr(
        checkpoint_io, "save_checkpoint", lambda checkpoint, path, **_: saved.append((checkpoint, path))
    )
    monkeypatch.setattr(_sharded, "remove_tree", lambda where: removed.append(where.url))
    strategy = make_strategy()
    strategy.checkpoint_io = checkpoint_io
    url = f"{ACCOUNT}/container/run/last.ckpt"
    checkpoint = {"state_dict": {"weight": torch.ones(2)}, "optimizer_states": [{"state": {}}], "epoch": 1}

    strategy.save_checkpoint(checkpoint, url)

    assert saved == [(checkpoint, url)]
    assert removed == [url]
    assert not list(tmp_path.iterdir())


def test_the_sharded_writer_and_reader_carry_the_plugin_settings_and_pickle() -> None:
    """They are built from the plugin's checked options, not its keywords, and still pickle as the
    public constructor's do (dcp.async_save's process checkpointer sends the writer to another process)."""
    retry = RetryOptions(retry_total=3)
    plugin = AzureBlobCheckpointIO(
        credential=False,
        account_url=ACCOUNT,
        max_concurrency=3,
        block_size=1024 * 1024,
        validate_content=True,
        retry=retry,
        progress_hook=print,
    )
    found = _sharded_layout.target(types.SimpleNamespace(checkpoint_io=plugin), f"{ACCOUNT}/container/run/last.ckpt")
    assert found is not None

    for made in (found.writer(), found.reader()):
        copy = pickle.loads(pickle.dumps(made))
        assert type(copy) is type(made) and copy.checkpoint_id == f"{ACCOUNT}/container/run/last.ckpt"
        files = copy.fs
        assert (files.max_concurrency, files.block_size, files.validate_content) == (3, 1024 * 1024, True)
        assert files.retry == retry and files.credential is False
        assert files.progress_hook is None  # the plugin reports whole checkpoints, not DCP's shard files
