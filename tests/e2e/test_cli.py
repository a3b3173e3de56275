"""``python -m azstoragetorch`` (ls, verify, cp) run as a subprocess against Azurite."""

from __future__ import annotations

import importlib.metadata
import os
import pathlib
import shutil
import subprocess
import sys
import sysconfig

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch.integrations.dcp import BlobStorageWriter
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY
from tests.conftest import Container

REPOSITORY = pathlib.Path(__file__).resolve().parents[2]


def cli(*args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop("AZURE_STORAGE_KEY", None)
    if key:
        environment["AZURE_STORAGE_KEY"] = ACCOUNT_KEY
    return subprocess.run(
        [sys.executable, "-m", "azstoragetorch", *args], capture_output=True, text=True, env=environment, timeout=240
    )


def save_blob(container: Container, name: str, data: bytes, credential: AzureNamedKeyCredential) -> None:
    with BlobIO(container.blob_url(name), "wb", credential=credential) as f:
        f.write(data)


def state_dict() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"weight": torch.randn(64, 64, generator=generator), "bias": torch.randn(64, generator=generator)}


def save_dcp(container: Container, folder: str, credential: AzureNamedKeyCredential) -> None:
    dcp.save(state_dict(), storage_writer=BlobStorageWriter(container.blob_url(folder), credential=credential))


def corrupt(container: Container, name: str) -> None:
    """Change a blob's bytes but keep its metadata (the CRC-32 recorded for the old bytes)."""
    blob = container.client.get_blob_client(name)
    metadata = blob.get_blob_properties().metadata
    data = bytearray(blob.download_blob().readall())
    data[len(data) // 2] ^= 0xFF
    blob.upload_blob(bytes(data), overwrite=True, metadata=metadata)


def test_ls_lists_checkpoint_files_and_dcp_checkpoints_once_each(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    save_blob(container, "runs/a/last.ckpt", os.urandom(3000), account_credential)
    container.upload("runs/a/epoch=0.ckpt", os.urandom(1000))  # not written by azstoragetorch: no CRC-32
    container.upload("runs/a/notes.txt", b"not a checkpoint")
    save_dcp(container, "runs/dcp/step-10", account_credential)

    result = cli("ls", container.blob_url("runs/"))

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"Checkpoints under {container.url}/runs/:"
    rows = {line.split()[-1]: line.split() for line in lines[2:]}
    assert sorted(rows) == ["runs/a/epoch=0.ckpt", "runs/a/last.ckpt", "runs/dcp/step-10/"]
    assert rows["runs/a/last.ckpt"][0] == "file" and rows["runs/a/last.ckpt"][-2] == "yes"
    assert rows["runs/a/epoch=0.ckpt"][-2] == "no"
    dcp_row = rows["runs/dcp/step-10/"]
    total = sum(b.size for b in container.client.list_blobs(name_starts_with="runs/dcp/step-10/"))
    assert dcp_row[0] == "dcp" and dcp_row[-2] == "yes"
    assert int(dcp_row[3]) == len(list(container.client.list_blobs(name_starts_with="runs/dcp/step-10/")))
    assert total > 1024  # shown in KiB
    assert dcp_row[1] == f"{total / 1024:.1f}"


def test_verify_a_blob(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    save_blob(container, "good.ckpt", os.urandom(50_000), account_credential)
    save_blob(container, "bad.ckpt", os.urandom(50_000), account_credential)
    corrupt(container, "bad.ckpt")
    container.upload("foreign.ckpt", b"written by another tool")

    good = cli("verify", container.blob_url("good.ckpt"))
    bad = cli("verify", container.blob_url("bad.ckpt"))
    foreign = cli("verify", container.blob_url("foreign.ckpt"))

    assert good.returncode == 0 and good.stdout.startswith("OK "), good.stderr
    assert bad.returncode == 1 and bad.stdout.startswith(f"MISMATCH {container.blob_url('bad.ckpt')}")
    assert foreign.returncode == 1 and foreign.stdout.startswith("UNVERIFIED")


def test_verify_every_shard_of_a_dcp_checkpoint(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    save_dcp(container, "dcp", account_credential)
    assert cli("verify", container.blob_url("dcp")).returncode == 0

    shard = next(b.name for b in container.client.list_blobs(name_starts_with="dcp/") if b.name.endswith(".distcp"))
    corrupt(container, shard)
    result = cli("verify", container.blob_url("dcp"))
    assert result.returncode == 1
    assert f"MISMATCH {shard.removeprefix('dcp/')}" in result.stdout.splitlines()
    assert result.stdout.splitlines()[-1].startswith("FAILED")


def test_cp_a_dcp_checkpoint_down_and_up_again(
    container: Container, account_credential: AzureNamedKeyCredential, tmp_path: pathlib.Path
) -> None:
    save_dcp(container, "dcp/step-1", account_credential)
    local = tmp_path / "step-1"

    down = cli("cp", container.blob_url("dcp/step-1"), str(local))
    assert down.returncode == 0, down.stderr
    assert down.stdout.startswith("Copied ")
    loaded = {name: torch.empty_like(tensor) for name, tensor in state_dict().items()}
    dcp.load(loaded, checkpoint_id=str(local))
    assert all(torch.equal(loaded[name], tensor) for name, tensor in state_dict().items())

    up = cli("cp", str(local), container.blob_url("copy/step-1"))
    assert up.returncode == 0, up.stderr
    assert cli("verify", container.blob_url("copy/step-1")).returncode == 0
    originals = {b.name.removeprefix("dcp/"): b.size for b in container.client.list_blobs(name_starts_with="dcp/")}
    copies = {b.name.removeprefix("copy/"): b.size for b in container.client.list_blobs(name_starts_with="copy/")}
    assert copies == originals


def test_cp_a_single_blob_both_ways_with_a_sas_that_never_shows(container: Container, tmp_path: pathlib.Path) -> None:
    data = os.urandom(300_000)
    container.upload("model.ckpt", data)
    sas = container.container_sas(read=True, write=True, create=True, list=True)
    source = f"{container.blob_url('model.ckpt')}?{sas}"

    down = cli("cp", source, str(tmp_path), key=False)
    assert down.returncode == 0, down.stderr
    assert (tmp_path / "model.ckpt").read_bytes() == data
    up = cli("cp", str(tmp_path / "model.ckpt"), f"{container.url}/back/?{sas}", key=False)
    assert up.returncode == 0, up.stderr
    assert container.download("back/model.ckpt") == data
    listed = cli("ls", f"{container.url}?{sas}", key=False)
    assert listed.returncode == 0 and "back/model.ckpt" in listed.stdout
    signature = dict(part.split("=", 1) for part in sas.split("&"))["sig"]
    for result in (down, up, listed):
        assert "sig=" not in result.stdout + result.stderr
        assert signature not in result.stdout + result.stderr


def test_a_missing_blob_is_an_error_without_the_sas(container: Container, tmp_path: pathlib.Path) -> None:
    sas = container.container_sas(read=True, list=True)
    result = cli("cp", f"{container.blob_url('nothing')}?{sas}", str(tmp_path), key=False)
    assert result.returncode == 1
    assert "Nothing to copy" in result.stderr and "sig=" not in result.stderr


@pytest.mark.parametrize(
    "arguments",
    [
        (),
        ("frobnicate", "x"),
        ("ls",),
        ("cp", "a", "b"),
        ("cp", "http://127.0.0.1:1/devstoreaccount1/c/x", "y", "--parallel", "0"),
        ("verify", "not-a-url"),
    ],
    ids=["nothing", "unknown-command", "ls-without-url", "cp-two-local-paths", "cp-bad-parallel", "malformed-url"],
)
def test_bad_arguments_get_the_usage_and_exit_code_2(arguments: tuple[str, ...]) -> None:
    result = cli(*arguments)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: azstoragetorch")


# -- the console script that pyproject.toml declares --------------------------------------------------


def installed_script() -> str:
    """The ``azstoragetorch`` script that installing the package put beside this interpreter."""
    directories = [sysconfig.get_path("scripts"), os.path.dirname(sys.executable)]
    for directory in directories:
        found = shutil.which("azstoragetorch", path=directory)
        if found is not None:
            return found
    pytest.fail(f"No azstoragetorch script in {directories}: install the package (`make setup`, `pip install -e .`).")


def script(*args: str) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY), "AZURE_STORAGE_KEY": ACCOUNT_KEY}
    return subprocess.run([installed_script(), *args], capture_output=True, text=True, env=environment, timeout=240)


def test_the_console_script_is_declared_for_the_cli() -> None:
    (entry,) = importlib.metadata.entry_points(group="console_scripts", name="azstoragetorch")
    assert entry.value == "azstoragetorch._cli:main"


def test_the_installed_console_script_prints_its_usage() -> None:
    result = script("--help")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: azstoragetorch ")
    for command in ("ls", "verify", "cp"):
        assert f"    {command} " in result.stdout


@pytest.mark.parametrize("args", [(), ("frobnicate",), ("ls",)])
def test_the_installed_console_script_refuses_bad_arguments_with_its_usage(args: tuple[str, ...]) -> None:
    result = script(*args)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: azstoragetorch ") and "error:" in result.stderr
    assert result.stdout == ""


def test_the_installed_console_script_runs_a_command(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    save_blob(container, "runs/last.ckpt", os.urandom(2000), account_credential)
    result = script("ls", container.blob_url("runs/"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == f"Checkpoints under {container.url}/runs/:"
    assert "runs/last.ckpt" in result.stdout
