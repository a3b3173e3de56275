"""Save or load a sharded checkpoint with Fabric (FSDP or ModelParallel, two CPU ranks, gloo).

Run as ``python -m tests.e2e.support.fabric_sharded_run`` from the repository root; Fabric starts the second
rank by running this same command again. ``save`` trains two steps, saves to ``--url`` and trains one
more; ``load`` starts from other weights, loads ``--url`` and trains that one step. Rank 0 writes the
model's output after the last step to ``<out>/<mode>.json``: equal outputs mean equal weights and
optimizer state (Adam) at the checkpoint.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings
from typing import Any

import torch
from azure.core.credentials import AzureNamedKeyCredential
from lightning.fabric import Fabric
from lightning.fabric.strategies import FSDPStrategy, ModelParallelStrategy

from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME


class CPUFSDPStrategy(FSDPStrategy):
    """FSDPStrategy on CPU, where FSDP1 runs with gloo: Fabric refuses the class itself by exact type on
    CPU, and FSDP1 needs to be told its device is the CPU. Saving and loading are FSDPStrategy's."""

    def setup_module(self, module: torch.nn.Module) -> torch.nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(module, device_id=torch.device("cpu"), use_orig_params=True)


def shard(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, mesh=mesh["data_parallel"])
    fully_shard(model, mesh=mesh["data_parallel"])
    return model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--account-url", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--strategy", choices=["fsdp", "model_parallel"], required=True)
    parser.add_argument("--mode", choices=["save", "load"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument(
        "--state-dict",
        choices=["sharded", "full"],
        default="sharded",
        help='"full": state_dict_type="full" (FSDP) or save_distributed_checkpoint=False (ModelParallel)',
    )
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    # Fabric's sharded strategies take no CheckpointIO plugin: one made in the process claims its account's URLs.
    AzureBlobCheckpointIO(credential=AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY), account_url=args.account_url)
    strategy: Any = (
        CPUFSDPStrategy(state_dict_type=args.state_dict)
        if args.strategy == "fsdp"
        else ModelParallelStrategy(
            parallelize_fn=shard,
            data_parallel_size=2,
            tensor_parallel_size=1,
            save_distributed_checkpoint=args.state_dict == "sharded",
        )
    )
    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()

    torch.manual_seed(0 if args.mode == "save" else 1)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    model = fabric.setup_module(model)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=0.01))
    generator = torch.Generator().manual_seed(fabric.global_rank)
    x = torch.randn(8, 4, generator=generator)
    y = x.sum(dim=1, keepdim=True)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()

    if args.mode == "save":
        step()
        step()
        fabric.save(args.url, {"model": model, "optimizer": optimizer, "step": 2})
    else:
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
        remainder = fabric.load(args.url, state)
        assert state["step"] == 2 and remainder == {}, (state["step"], remainder)
    step()
    with torch.no_grad():
        output = model(torch.ones(2, 4)).flatten().tolist()
    if fabric.global_rank == 0:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.mode}.json").write_text(json.dumps(output))
    # Every rank leaves together and takes its process group down before the interpreter does:
    # a gloo group left to the interpreter's exit can abort the process ("terminate called
    # without an active exception") while another rank is still closing its connections.
    fabric.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
