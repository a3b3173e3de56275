"""Fit IdRecorder from a BlobDataModule with ``strategy="ddp"`` on 2 CPU processes, in processes of their own.

Run as ``python -m tests.e2e.support.lightning_data_run`` from the repository root; Lightning starts the second rank by
running the same command again. Each rank writes the ids it trained on, per epoch, to ``<out>/rank<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import warnings

from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.integrations.lightning import BlobDataModule, BlobSplit
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME
from tests.e2e.support.lightning_helpers import IdRecorder, trainer


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--train", required=True)
    parser.add_argument("--iterable", action="store_true")
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)

    data = BlobDataModule(
        train=BlobSplit(args.train, iterable=args.iterable),
        transform="tests.e2e.support.lightning_helpers.decode_id",
        batch_size=4,
        num_workers=args.num_workers,
        credential=AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY),
        seed=11,
    )
    model = IdRecorder()
    run = trainer(max_epochs=args.epochs, strategy="ddp", devices=2, enable_checkpointing=False)
    run.fit(model, datamodule=data)

    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {"seen": {str(epoch): ids for epoch, ids in model.seen.items()}, "steps": run.global_step}
    (out / f"rank{run.global_rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main()
