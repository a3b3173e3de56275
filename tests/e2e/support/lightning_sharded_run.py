"""Train a model sharded with FSDP2 under ``ModelParallelStrategy`` (or FSDP1 under ``FSDPStrategy``),
checkpoints in a container.

Run as ``python -m tests.e2e.support.lightning_sharded_run`` from the repository root; with ``--devices 2``
Lightning starts the second rank by running this same command again (gloo on CPU). Each rank writes
what it saw to ``<out>/rank<N>.json``, and rank 0 the full weights and optimizer state it ended
with to ``<out>/final.pt`` (FSDP2 only). With ``--dump-shards`` each rank also writes the part of the
weights and optimizer state it holds itself, when training starts and when it ends, to
``<out>/loaded-shards<N>.pt`` and ``<out>/final-shards<N>.pt``: no collective, so FSDP1 too.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import warnings
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import AsyncCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from typing_extensions import override

from tests.e2e.support.lightning_helpers import checkpoint_run_parser, emulator_plugin, loader


class ShardedModel(pl.LightningModule):
    """A small regression model whose layers ``configure_model`` shards with FSDP2; Adam, so that a
    resumed run continues only if the optimizer state was restored too."""

    def __init__(self, width: int = 16, val_losses: list[float] | None = None) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(0)
        self.hidden = torch.nn.Linear(4, width)
        self.output = torch.nn.Linear(width, 1)

    def configure_model(self) -> None:
        from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel, fully_shard

        if isinstance(self.trainer.strategy, FSDPStrategy):
            # Wrapped here (Lightning then leaves the wrapping to us) to tell FSDP1 its device is the CPU.
            if not isinstance(self.hidden, FullyShardedDataParallel):
                self.hidden = FullyShardedDataParallel(self.hidden, device_id=torch.device("cpu"), use_orig_params=True)
                self.output = FullyShardedDataParallel(self.output, device_id=torch.device("cpu"), use_orig_params=True)
            return
        if isinstance(self, FSDPModule):  # validate() after fit() configures the model again
            return
        mesh = self.device_mesh["data_parallel"]
        fully_shard(self.hidden, mesh=mesh)
        fully_shard(self.output, mesh=mesh)
        fully_shard(self, mesh=mesh)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(torch.relu(self.hidden(x)))

    def training_step(self, batch: Any, batch_index: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch: Any, batch_index: int) -> None:
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        if self.hparams.val_losses is not None:
            loss = torch.tensor(self.hparams.val_losses[min(self.current_epoch, len(self.hparams.val_losses) - 1)])
        self.log("val_loss", loss, sync_dist=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=0.01)


class PidWriter(pl.Callback):
    """Writes each rank's process id, for a test that kills one rank."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"pid{trainer.global_rank}").write_text(str(os.getpid()))


class StepRecorder(pl.Callback):
    """Appends ``trainer.global_step`` after every training step to ``<out>/steps<rank>``, so that a
    test can see how far training got while it holds an upload."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / f"steps{trainer.global_rank}", "a") as steps:
            steps.write(f"{trainer.global_step}\n")


class LoadedStateWriter(pl.Callback):
    """Writes the full weights, optimizer state, epoch and step that training starts from (those
    restored from ``ckpt_path``) to ``<out>/loaded.pt``, on rank 0."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        state = full_state(pl_module, trainer.optimizers[0])
        state |= {"epoch": trainer.current_epoch, "global_step": trainer.global_step}
        if trainer.global_rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            torch.save(state, self.out / "loaded.pt")


class LocalShardsWriter(pl.Callback):
    """Writes this rank's own part of the weights and optimizer state that training starts from
    (those restored from ``ckpt_path``) to ``<out>/loaded-shards<rank>.pt``."""

    def __init__(self, out: pathlib.Path) -> None:
        self.out = out

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        torch.save(local_shards(pl_module, trainer.optimizers[0]), self.out / f"loaded-shards{trainer.global_rank}.pt")


def local_shards(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The weights and optimizer state this rank holds in memory, copied as they are: DTensors as their
    local tensors, FSDP1's parameters as the views of this rank's flat shard. Nothing is gathered, so
    no collective runs (a full gather of FSDP1's state on CPU is what this avoids)."""
    from torch.distributed.tensor import DTensor

    def local(value: Any) -> Any:
        if isinstance(value, DTensor):
            return value.to_local().detach().clone()
        if isinstance(value, torch.Tensor):
            return value.detach().clone()
        if isinstance(value, dict):
            return {key: local(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(local(item) for item in value)
        return value

    return {
        "weights": {name: local(parameter) for name, parameter in model.named_parameters()},
        "optimizer": local(optimizer.state_dict()),
    }


def full_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The model's and the optimizer's full (gathered) state dicts, on CPU; every rank calls this."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    return {"weights": weights, "optimizer": get_optimizer_state_dict(model, optimizer, options=options)}


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy itself, on CPU: the Trainer refuses the class by exact type without a GPU, not
    its subclasses. Saving and loading are FSDPStrategy's, except that full state dicts are gathered
    without ``offload_to_cpu``: FSDP1 asked to offload parameters that already live on the CPU crashes
    (SIGSEGV) while it copies them, with or without this project."""

    @override
    def lightning_module_state_dict(self) -> dict[str, Any]:
        with _full_state_dicts_without_offload():
            return super().lightning_module_state_dict()

    @override
    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
        with _full_state_dicts_without_offload():
            return super().optimizer_state(optimizer)

    @override
    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        with _full_state_dicts_without_offload():
            return super().load_checkpoint(checkpoint_path, weights_only)


@contextlib.contextmanager
def _full_state_dicts_without_offload() -> Iterator[None]:
    """Lightning's FSDP full state dict settings, but kept where the parameters are (the CPU)."""
    import lightning.fabric.strategies.fsdp as fabric_fsdp
    import lightning.pytorch.strategies.fsdp as trainer_fsdp
    from torch.distributed.fsdp import FullOptimStateDictConfig, FullStateDictConfig, StateDictType
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    def context(module: torch.nn.Module, world_size: int, rank0_only: bool = True) -> Any:
        return FSDP.state_dict_type(
            module=module,
            state_dict_type=StateDictType.FULL_STATE_DICT,
            state_dict_config=FullStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
            optim_state_dict_config=FullOptimStateDictConfig(offload_to_cpu=False, rank0_only=rank0_only),
        )

    originals = [(module, module._get_full_state_dict_context) for module in (fabric_fsdp, trainer_fsdp)]
    for module, _ in originals:
        module._get_full_state_dict_context = context  # type: ignore[assignment]
    try:
        yield
    finally:
        for module, original in originals:
            module._get_full_state_dict_context = original  # type: ignore[assignment]


def main() -> None:
    parser = checkpoint_run_parser(devices=2, resume_help='"last", "best" or a checkpoint URL')
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--val-losses", default=None, help="comma-separated val_loss per epoch")
    parser.add_argument("--async-io", action="store_true")
    parser.add_argument("--validate-best", action="store_true", help='then validate(ckpt_path="best")')
    parser.add_argument("--strategy", choices=["model_parallel", "fsdp"], default="model_parallel")
    parser.add_argument(
        "--state-dict",
        choices=["sharded", "full"],
        default="sharded",
        help='"full": FSDPStrategy(state_dict_type="full") or ModelParallelStrategy(save_distributed_checkpoint=False)',
    )
    parser.add_argument("--write-pids", action="store_true", help="each rank writes <out>/pid<rank> at setup")
    parser.add_argument("--no-plugin", action="store_true", help="plain Lightning: a local dirpath, no plugin")
    parser.add_argument("--record-steps", action="store_true", help="append global_step to <out>/steps<rank>")
    parser.add_argument("--dump-loaded", action="store_true", help="write <out>/loaded.pt when training starts")
    parser.add_argument("--dump-shards", action="store_true", help="write each rank's local shards at start and end")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    plugins: list[Any] = []
    if not args.no_plugin:
        plugin: Any = emulator_plugin(args.account_url)
        plugins.append(AsyncCheckpointIO(plugin) if args.async_io else plugin)
    val_losses = [float(v) for v in args.val_losses.split(",")] if args.val_losses else None
    monitor = {"monitor": "val_loss"} if val_losses else {}
    callbacks: list[pl.Callback] = [PidWriter(pathlib.Path(args.out))] if args.write_pids else []
    callbacks += [LoadedStateWriter(pathlib.Path(args.out))] if args.dump_loaded else []
    callbacks += [StepRecorder(pathlib.Path(args.out))] if args.record_steps else []
    callbacks += [LocalShardsWriter(pathlib.Path(args.out))] if args.dump_shards else []
    sharded = args.state_dict == "sharded"
    checkpoints = ModelCheckpoint(dirpath=args.dirpath, save_last=True, save_top_k=args.top_k, **monitor)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=ModelParallelStrategy(
            data_parallel_size=args.devices, tensor_parallel_size=1, save_distributed_checkpoint=sharded
        )
        if args.strategy == "model_parallel"
        else CPUFSDPStrategy(state_dict_type=args.state_dict),
        max_epochs=args.max_epochs,
        plugins=plugins,
        callbacks=[checkpoints, *callbacks],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    model = ShardedModel(val_losses=val_losses)
    trainer.fit(model, loader(), loader(), ckpt_path=args.resume)
    resumed_from = trainer.ckpt_path

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dump_shards:
        torch.save(local_shards(model, trainer.optimizers[0]), out / f"final-shards{trainer.global_rank}.pt")
    # FSDP1's state is compared shard by shard (--dump-shards): gathering it with cpu_offload on CPU crashes.
    if args.strategy == "model_parallel":
        state = full_state(model, trainer.optimizers[0])
        if trainer.global_rank == 0:  # now: the state dicts share tensors with the optimizer validate() loads into
            torch.save(state, out / "final.pt")
    validated = None
    if args.validate_best:
        trainer.validate(model, loader(), ckpt_path="best", verbose=False)
        validated = trainer.ckpt_path

    report = {
        "rank": trainer.global_rank,
        "world_size": trainer.world_size,
        "global_step": trainer.global_step,
        "epoch": trainer.current_epoch,
        "resumed_from": resumed_from,
        "best": checkpoints.best_model_path,
        "validated": validated,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
