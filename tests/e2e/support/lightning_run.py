"""Train TinyModel with checkpoints in a container, in a process of its own.

Run as ``python -m tests.e2e.support.lightning_run`` from the repository root. With ``--devices 2`` it uses
``strategy="ddp"``: Lightning starts the second rank by running this same command again. Each rank
writes what it saw to ``<out>/rank<N>.json``.
"""

from __future__ import annotations

import json
import pathlib
import warnings

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from tests.e2e.support.lightning_helpers import TinyModel, checkpoint_run_parser, emulator_plugin, loader, trainer


def main() -> None:
    args = checkpoint_run_parser(devices=1, resume_help='"last" or a checkpoint URL').parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.manual_seed(0)

    plugin = emulator_plugin(args.account_url)
    checkpoints = ModelCheckpoint(dirpath=args.dirpath, save_last=True, save_top_k=-1, every_n_epochs=1)
    extra = {"strategy": "ddp", "devices": args.devices} if args.devices > 1 else {}
    run = trainer(max_epochs=args.max_epochs, plugins=[plugin], callbacks=[checkpoints], **extra)
    model = TinyModel()
    run.fit(model, loader(), loader(), ckpt_path=args.resume)

    report = {
        "rank": run.global_rank,
        "world_size": run.world_size,
        "global_step": run.global_step,
        "resumed_from": run.ckpt_path,
        "weights_sum": float(sum(parameter.detach().sum() for parameter in model.parameters())),
    }
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{run.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
