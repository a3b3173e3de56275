"""The examples run as documented: each starts its own Azurite and checks its own results."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("script", "last_line"),
    [
        ("demo.py", "demo OK"),
        (
            "lightning_cli.py fit --config examples/lightning_cli_config.yaml --trainer.max_epochs=1",
            "lightning CLI example OK",
        ),
        ("save_and_load.py", "Saved and loaded"),
        ("datasets_example.py", "datasets example OK"),
        ("dcp_checkpoint.py", "dcp example OK"),
        ("lightning_sharded.py", "lightning sharded example OK"),
        (
            "lightning_checkpointing.py",
            "4. With AsyncCheckpointIO: epoch=0-step=8.ckpt, epoch=1-step=16.ckpt, last.ckpt",
        ),
    ],
)
def test_example_runs_against_azurite(script: str, last_line: str) -> None:
    environment = {name: value for name, value in os.environ.items() if name != "AZSTORAGETORCH_CONTAINER_URL"}
    result = subprocess.run(
        [sys.executable, str(REPOSITORY / "examples" / script.split()[0]), *script.split()[1:]],
        cwd=REPOSITORY,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,  # a guard against a hang; a starved machine runs an example for minutes
    )

    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.strip().splitlines()[-1].startswith(last_line)
