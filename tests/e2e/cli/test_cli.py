"""``python -m azstoragetorch`` (ls, verify, cp) run as a subprocess against Azurite."""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import pathlib
import platform
import random
import shutil
import signal
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._client import _schedule
from azstoragetorch.integrations.dcp import BlobStorageWriter
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY
from tests.conftest import Container
from tests.e2e.support.fault_proxy import Delay, FaultProxy, SeenRequest

REPOSITORY = pathlib.Path(__file__).resolve().parents[3]


def cli_environment(key: bool = True) -> dict[str, str]:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    environment.pop("AZURE_STORAGE_KEY", None)
    if key:
        environment["AZURE_STORAGE_KEY"] = ACCOUNT_KEY
    return environment


def cli(*args: str, key: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "azstoragetorch", *args],
        capture_output=True,
        text=True,
        env=cli_environment(key),
        timeout=240,
    )


def start_cli(*args: str, environment: dict[str, str] | None = None) -> subprocess.Popen[str]:
    """The CLI started in a subprocess, with its standard output and error piped to the test."""
    return subprocess.Popen(
        [sys.executable, "-m", "azstoragetorch", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment or cli_environment(),
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


def test_cp_a_blob_to_a_path_ending_in_a_slash_puts_it_in_that_new_folder(
    container: Container, tmp_path: pathlib.Path
) -> None:
    container.upload("runs/model.ckpt", b"a checkpoint")

    result = cli("cp", "--no-progress", container.blob_url("runs/model.ckpt"), f"{tmp_path / 'new'}/")

    assert result.returncode == 0, result.stderr
    assert files_under(tmp_path) == {"new/model.ckpt": b"a checkpoint"}


def test_a_missing_blob_is_an_error_without_the_sas(container: Container, tmp_path: pathlib.Path) -> None:
    sas = container.container_sas(read=True, list=True)
    result = cli("cp", f"{container.blob_url('nothing')}?{sas}", str(tmp_path), key=False)
    assert result.returncode == 1
    assert "Nothing to copy" in result.stderr and "sig=" not in result.stderr


# -- ls and verify: what a prefix means, a damaged .metadata -------------------------------------------


def test_ls_of_a_prefix_without_a_slash_is_that_folder_or_that_blob(container: Container) -> None:
    for name in ("runs/run-1/a.ckpt", "runs/run-10/b.ckpt", "runs/run-1-old/c.ckpt", "runs/run-1.ckpt"):
        container.upload(name, b"checkpoint")

    folder = cli("ls", container.blob_url("runs/run-1"))
    blob = cli("ls", container.blob_url("runs/run-1.ckpt"))

    assert folder.returncode == 0, folder.stderr
    assert [line.split()[-1] for line in folder.stdout.splitlines()[2:]] == ["runs/run-1/a.ckpt"]
    assert blob.returncode == 0, blob.stderr
    assert [line.split()[-1] for line in blob.stdout.splitlines()[2:]] == ["runs/run-1.ckpt"]


def test_ls_shows_control_characters_in_blob_names_escaped(container: Container) -> None:
    container.upload("runs/evil\nfile    1 B      1 2026-01-01 00:00:00  yes     runs/fake.ckpt", b"x")
    # \x1b and other C0 controls cannot pass through the emulator's XML listing; Azure encodes them.
    container.upload("runs/\tright-to-left\u202etxt.ckpt", b"x")

    result = cli("ls", container.blob_url("runs/"))

    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()[2:]
    assert [row.split(maxsplit=7)[-1] for row in rows] == [
        "runs/\\tright-to-left\\u202etxt.ckpt",
        "runs/evil\\nfile    1 B      1 2026-01-01 00:00:00  yes     runs/fake.ckpt",
    ]
    assert "\t" not in result.stdout and "\u202e" not in result.stdout


@pytest.mark.parametrize("damage", ["bytes-changed-behind-the-crc", "replaced-by-another-tool"])
def test_verify_reports_a_damaged_dcp_metadata_as_a_mismatch(
    container: Container, account_credential: AzureNamedKeyCredential, damage: str
) -> None:
    save_dcp(container, "dcp", account_credential)
    if damage == "bytes-changed-behind-the-crc":
        corrupt(container, "dcp/.metadata")
    else:
        container.upload("dcp/.metadata", b"\x80\x04 not a pickle")

    result = cli("verify", container.blob_url("dcp"))

    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stderr == ""
    lines = result.stdout.splitlines()
    assert lines[0] == "MISMATCH .metadata"
    assert lines[-1].startswith(f"FAILED {container.blob_url('dcp')}: .metadata is damaged")


# -- cp: every local path stays inside the destination ------------------------------------------------


def files_under(folder: pathlib.Path) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() or path.is_symlink()
    }


def test_cp_refuses_blob_names_that_lead_outside_the_destination_and_copies_the_rest(
    container: Container, tmp_path: pathlib.Path
) -> None:
    outside = tmp_path / "outside"
    hostile = [
        f"ck/{outside}/file",  # "ck//tmp/...": the destination joined with an absolute path
        "ck/dir/",  # a trailing slash: an empty file name
        "ck/a\nb",  # a control character
        "ck/\uff0e\uff0e/\uff0e\uff0e/escape",  # fullwidth "..", which NFKC makes ".."
        "ck/caf\u00e9.pt",  # the same name in NFC ...
        "ck/cafe\u0301.pt",  # ... and NFD
        "ck/Model.pt",  # one file on a case-insensitive disk
        "ck/model.pt",
        "ck/x",  # a file that is also a folder of the next blob
        "ck/x/y",
    ]
    for name in hostile:
        container.upload(name, b"hostile " + name.encode())
    container.upload("ck/good.pt", b"good")
    container.upload("ck/sub/also.pt", b"also good")
    destination = tmp_path / "copy"

    result = cli("cp", "--no-progress", container.blob_url("ck"), str(destination))

    assert result.returncode == 1, result.stderr
    assert not outside.exists()
    assert files_under(tmp_path) == {"copy/good.pt": b"good", "copy/sub/also.pt": b"also good"}
    refusals = [line for line in result.stderr.splitlines() if line.startswith("azstoragetorch: refused blob ")]
    assert len(refusals) == len(hostile), result.stderr
    for name in hostile:
        assert any(repr(name) in line for line in refusals), name
    assert result.stdout.startswith("Copied 2 files, ") and "refused 10" in result.stdout


def test_cp_never_follows_a_symlink_planted_in_the_destination(container: Container, tmp_path: pathlib.Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.pt").write_bytes(b"not yours")
    destination = tmp_path / "copy"
    destination.mkdir()
    (destination / "linked").symlink_to(outside, target_is_directory=True)  # a folder that leads out
    (destination / "nested").mkdir()
    (destination / "nested" / "deeper").symlink_to(outside, target_is_directory=True)
    (destination / "good.pt").symlink_to(outside / "target.pt")  # a file name that leads out
    container.upload("ck/linked/target.pt", b"through a link")
    container.upload("ck/linked/new.pt", b"through a link")
    container.upload("ck/nested/deeper/target.pt", b"through a deeper link")
    container.upload("ck/good.pt", b"good")

    result = cli("cp", "--no-progress", container.blob_url("ck"), str(destination))

    assert result.returncode == 1
    assert files_under(outside) == {"target.pt": b"not yours"}
    assert not (destination / "good.pt").is_symlink()  # the link itself was replaced, not its target
    assert (destination / "good.pt").read_bytes() == b"good"
    refusals = [line for line in result.stderr.splitlines() if line.startswith("azstoragetorch: refused blob ")]
    assert sorted(refusals) == sorted(
        f"azstoragetorch: refused blob {name!r}: {level!r} on its local path is a symbolic link or not a folder; "
        "nothing was written for it"
        for name, level in [
            ("ck/linked/target.pt", "linked"),
            ("ck/linked/new.pt", "linked"),
            ("ck/nested/deeper/target.pt", "deeper"),
        ]
    )


# -- cp uploads: only what is inside SRC, only as it was --------------------------------------------


def blob_names(container: Container, prefix: str) -> dict[str, bytes]:
    return {
        blob.name.removeprefix(prefix): container.download(blob.name)
        for blob in container.client.list_blobs(name_starts_with=prefix)
    }


def folder_with(folder: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    """``folder``, made with ``files`` (name relative to it -> content) in it."""
    for name, data in files.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return folder


def upload_refusing(
    container: Container, source: pathlib.Path, refused: int
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """``cp SRC <container>/up/``, which must fail having refused ``refused`` files, one line each."""
    result = cli("cp", "--no-progress", str(source), container.blob_url("up/"))
    assert result.returncode == 1, result.stderr
    refusals = [line for line in result.stderr.splitlines() if line.startswith("azstoragetorch: refused file ")]
    assert len(refusals) == refused, result.stderr
    return result, refusals


def test_cp_uploads_regular_files_and_links_to_them_inside_the_folder_only(
    container: Container, tmp_path: pathlib.Path
) -> None:
    outside = folder_with(tmp_path / "outside", {"id_rsa": b"a private key"})
    source = folder_with(tmp_path / "ck", {"epoch=3.ckpt": b"a checkpoint", "sub/b.pt": b"b", "empty.pt": b""})
    (source / "last.ckpt").symlink_to("epoch=3.ckpt")  # Lightning's save_last="link"
    hostile = {
        "key.pt": lambda path: path.symlink_to(outside / "id_rsa"),  # a file elsewhere
        "escape.pt": lambda path: path.symlink_to("../outside/id_rsa"),
        "folder": lambda path: path.symlink_to(outside, target_is_directory=True),
        "subfolder": lambda path: path.symlink_to("sub", target_is_directory=True),
        "dangling.pt": lambda path: path.symlink_to("nowhere"),
        "fifo": os.mkfifo,  # opening it would wait for a writer forever
    }
    for name, make in hostile.items():
        make(source / name)

    result, refusals = upload_refusing(container, source, len(hostile))

    assert blob_names(container, "up/") == {
        "epoch=3.ckpt": b"a checkpoint",
        "empty.pt": b"",
        "last.ckpt": b"a checkpoint",
        "sub/b.pt": b"b",
    }
    for name in hostile:
        assert any(repr(str(source / name)) in line for line in refusals), name
    assert result.stdout.startswith("Copied 4 files, ") and "refused 6" in result.stdout


def test_cp_refuses_to_upload_files_whose_names_make_no_blob_it_would_download(
    container: Container, tmp_path: pathlib.Path
) -> None:
    hostile = [os.fsdecode(b"latin-1 \xe9t\xe9.pt"), "back\\slash.pt", "new\nline.pt", "\uff0e\uff0e"]
    source = folder_with(tmp_path / "ck", {"good.pt": b"good", **dict.fromkeys(hostile, b"hostile")})

    _, refusals = upload_refusing(container, source, len(hostile))

    assert blob_names(container, "up/") == {"good.pt": b"good"}
    assert any("not valid UTF-8" in line for line in refusals)


def test_cp_commits_nothing_for_a_file_that_changes_while_it_is_uploaded(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path
) -> None:
    container.upload("ck/last.ckpt", b"the previous checkpoint")
    source = tmp_path / "last.ckpt"
    source.write_bytes(os.urandom(96 * 1024 * 1024))  # more than the upload holds in memory
    holding = threading.Event()
    # Every block waits five seconds: the file is rewritten (as a training job saving it again
    # would) while most of it has not been read yet.
    proxy.add_fault(From("PutBlock", 1), Delay(5, hold_request=True, holding=holding), times=None)
    process = start_cli("cp", "--no-progress", str(source), proxy.url(container.blob_url("ck/")))
    try:
        assert holding.wait(120), "the upload never began"
        with source.open("r+b") as file:
            file.write(b"the new checkpoint begins here")
        _, stderr = process.communicate(timeout=180)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 1, stderr
    assert f"{source} changed while it was being uploaded; nothing was committed" in stderr
    assert container.download("ck/last.ckpt") == b"the previous checkpoint"
    assert proxy.count("PutBlockList") == 0


def test_cp_arguments_with_a_sas_are_refused_without_showing_it(container: Container) -> None:
    url = f"{container.blob_url('ck/')}?sv=2024-01-01&sig=ASecretSignature"

    for result in (cli("cp", "model.pt", url, "extra"), cli("cp", "--parallel", url, "model.pt")):
        assert result.returncode == 2
        assert result.stderr.startswith("usage: azstoragetorch")
        assert "ASecretSignature" not in result.stderr, result.stderr


def test_ls_into_a_reader_that_stops_early_ends_quietly(container: Container) -> None:
    for number in range(50):
        container.upload(f"runs/epoch={number}.ckpt", b"checkpoint")
    process = start_cli("ls", container.blob_url("runs/"))
    assert process.stdout is not None
    process.stdout.close()  # `azstoragetorch ls URL | head -0`
    _, stderr = process.communicate(timeout=120)

    assert stderr == ""
    assert process.returncode == 1


# -- cp: Ctrl-C and a full disk -------------------------------------------------------------------------


class From:
    """Matches requests of one operation from the ``first``-th on (1-based); the earlier ones pass."""

    def __init__(self, operation: str, first: int) -> None:
        self.operation, self.first, self.seen = operation, first, 0

    def __call__(self, request: SeenRequest) -> bool:
        if request.operation != self.operation:
            return False
        self.seen += 1
        return self.seen >= self.first


# Set to replay a run of the Ctrl-C tests: the seed drives both the perturbation hook in the CLI and
# the moment the signal is sent, and each test prints the one it drew.
SEED_VARIABLE = "AZSTORAGETORCH_TEST_CTRL_C_SEED"
# Far longer than a stopped copy takes even on a loaded machine, far shorter than a held request.
EXIT_TIMEOUT_SECONDS = 120


def wait_for_exit(process: subprocess.Popen[str], timeout: float) -> str:
    """The standard error of ``process`` once it has exited; if it is still running after ``timeout``
    seconds, fail with the Python stacks of all its threads (``faulthandler``, which the CLI runs with
    from :func:`start_stoppable_cli`), so the failure says where it waits, not only that it did."""
    try:
        return process.communicate(timeout=timeout)[1] or ""
    except subprocess.TimeoutExpired:
        pass
    process.send_signal(signal.SIGABRT)  # faulthandler writes every thread's stack, then it dies
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        stderr = "(no stack dump: the process did not die on SIGABRT either)"
    pytest.fail(f"the CLI had not exited {timeout} s after the signal; where it was:\n{stderr}", pytrace=False)


def start_stoppable_cli(seed: int, *args: str) -> subprocess.Popen[str]:
    """The CLI with the perturbation hook on (``seed``) and with faulthandler, for :func:`wait_for_exit`."""
    environment = {**cli_environment(), _schedule.ENVIRONMENT_VARIABLE: str(seed), "PYTHONFAULTHANDLER": "1"}
    return start_cli(*args, environment=environment)


# tgkill(2), which Python does not wrap, by machine: the only way to choose the thread of another
# process that a signal goes to.
TGKILL_SYSCALL = {"x86_64": 234, "aarch64": 131}


def signal_a_thread(pid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to the newest thread of process ``pid`` that is not its main thread, as the
    kernel may do with a signal sent to the process; Python's handler still runs in the main thread,
    but only once that thread runs Python code again."""
    threads = sorted(int(task) for task in os.listdir(f"/proc/{pid}/task") if int(task) != pid)
    assert threads, "the CLI has no thread besides its main thread"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(TGKILL_SYSCALL[platform.machine()], pid, threads[-1], int(signum)) != 0:
        raise OSError(ctypes.get_errno(), "tgkill failed")


def interrupt_mid_transfer(
    proxy: FaultProxy,
    operation: str,
    first_held: int,
    *args: str,
    stderr_closed: bool = False,
    stop_signal: signal.Signals = signal.SIGINT,
    to_a_transfer_thread: bool = False,
) -> tuple[int, str, float]:
    """Run the CLI through ``proxy``, holding every ``operation`` request from the ``first_held``-th on
    (for ten minutes: far longer than the test may take), and send SIGINT, as Ctrl-C does, at a random
    moment once one is held. The CLI runs with the perturbation hook on, with the same printed seed
    (:data:`SEED_VARIABLE` replays one). With ``stderr_closed``, nobody reads its standard error any
    more by then (``2>&1 | less``, quit); ``stop_signal`` is sent instead of SIGINT if given; with
    ``to_a_transfer_thread`` it is sent to one of the CLI's other threads, not to the process.
    Returns the exit code, standard error and seconds from SIGINT to exit."""
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # see python_ctrl_c
    seed = int(os.environ.get(SEED_VARIABLE) or random.randrange(1 << 30))
    print(f"seed {seed}: holding {operation} requests from number {first_held} on")
    holding = threading.Event()
    proxy.add_fault(From(operation, first_held), Delay(600, hold_request=True, holding=holding), times=None)
    # The perturbation hook on: shaken hand-offs, too.
    process = start_stoppable_cli(seed, *args)
    try:
        assert holding.wait(120), "the transfer never reached the held request"
        time.sleep(random.Random(seed).uniform(0, 0.5))
        assert process.poll() is None
        if stderr_closed:
            assert process.stderr is not None
            process.stderr.close()
            process.stderr = None
        if to_a_transfer_thread:
            signal_a_thread(process.pid, stop_signal)
        else:
            process.send_signal(stop_signal)
        interrupted = time.perf_counter()
        # Without the fix the copy waits out the held request: ten minutes.
        stderr = wait_for_exit(process, EXIT_TIMEOUT_SECONDS)
        seconds = time.perf_counter() - interrupted
    finally:
        process.kill()
        process.wait()
    print(f"exit {process.returncode} {seconds:.2f} s after SIGINT")
    return process.returncode, stderr, seconds


@pytest.mark.parametrize("first_held", [1, 2, 3, 5])
def test_ctrl_c_during_an_upload_stops_it_and_commits_nothing(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None, first_held: int
) -> None:
    container.upload("ck/model.pt", b"the previous checkpoint")
    etag = container.client.get_blob_client("ck/model.pt").get_blob_properties().etag
    source = tmp_path / "model.pt"
    source.write_bytes(os.urandom(48 * 1024 * 1024))  # six blocks of 8 MiB

    code, stderr, _ = interrupt_mid_transfer(
        proxy, "PutBlock", first_held, "cp", "--no-progress", str(source), proxy.url(container.blob_url("ck/"))
    )

    assert code == 130, stderr
    assert stderr.splitlines()[-1] == "azstoragetorch: interrupted"
    assert container.download("ck/model.pt") == b"the previous checkpoint"
    assert container.client.get_blob_client("ck/model.pt").get_blob_properties().etag == etag
    assert proxy.count("PutBlockList") == 0 and proxy.count("PutBlob") == 0


@pytest.mark.skipif(
    platform.machine() not in TGKILL_SYSCALL or not os.path.isdir("/proc/self/task"),
    reason="sends a signal to one thread of another process: Linux on x86_64 or aarch64",
)
@pytest.mark.parametrize("operation", ["PutBlock", "GetBlob"])
def test_ctrl_c_that_a_transfer_thread_receives_stops_the_copy(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None, operation: str
) -> None:
    # The main thread's wait is not interrupted then, as with a Ctrl-C that comes just before it
    # begins to wait, which a loaded machine makes likely; the copy must stop all the same.
    container.upload("ck/model.pt", b"the previous checkpoint")
    source = tmp_path / "model.pt"
    source.write_bytes(os.urandom(24 * 1024 * 1024))
    destination = tmp_path / "copy"
    if operation == "PutBlock":
        args = (str(source), proxy.url(container.blob_url("ck/")))
    else:
        container.upload("ck/model.pt", os.urandom(24 * 1024 * 1024))
        args = (proxy.url(container.blob_url("ck/model.pt")), str(destination / "model.pt"))

    code, stderr, _ = interrupt_mid_transfer(
        proxy, operation, 2, "cp", "--no-progress", *args, to_a_transfer_thread=True
    )

    assert code == 130, stderr
    assert stderr.splitlines()[-1] == "azstoragetorch: interrupted"
    assert proxy.count("PutBlockList") == 0 and proxy.count("PutBlob") == 0
    if operation == "PutBlock":
        assert container.download("ck/model.pt") == b"the previous checkpoint"
    else:
        assert files_under(tmp_path) == {"model.pt": source.read_bytes()}  # nothing in copy/, not even a .partial


@pytest.mark.parametrize("first_held", [2, 3, 4])
def test_ctrl_c_during_a_download_stops_it_and_leaves_no_file(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None, first_held: int
) -> None:
    container.upload("ck/model.pt", os.urandom(48 * 1024 * 1024))
    container.upload("ck/small.pt", b"x")  # a folder of two: one may finish, the other must not show
    destination = tmp_path / "copy"

    code, stderr, _ = interrupt_mid_transfer(
        proxy, "GetBlob", first_held, "cp", "--no-progress", proxy.url(container.blob_url("ck")), str(destination)
    )

    assert code == 130, stderr
    assert stderr.splitlines()[-1] == "azstoragetorch: interrupted"
    assert files_under(destination) in ({}, {"small.pt": b"x"})  # no model.pt, whole or partial


def test_sigterm_stops_a_copy_as_ctrl_c_does_and_leaves_no_partial_file(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None
) -> None:
    container.upload("ck/model.pt", os.urandom(48 * 1024 * 1024))
    container.upload("ck/small.pt", b"x")
    destination = tmp_path / "copy"

    code, stderr, _ = interrupt_mid_transfer(
        proxy,
        "GetBlob",
        3,
        "cp",
        "--no-progress",
        proxy.url(container.blob_url("ck")),
        str(destination),
        stop_signal=signal.SIGTERM,
    )

    assert code == 128 + signal.SIGTERM, stderr
    assert stderr.splitlines()[-1] == "azstoragetorch: terminated"
    assert files_under(destination) in ({}, {"small.pt": b"x"})  # no .partial file either


def test_two_copies_into_one_folder_at_once_leave_each_file_whole(container: Container, tmp_path: pathlib.Path) -> None:
    contents = {source: {name: os.urandom(9 * 1024 * 1024) for name in ("a.pt", "b/c.pt")} for source in "xy"}
    for source, files in contents.items():
        for name, data in files.items():
            container.upload(f"{source}/{name}", data)
    destination = tmp_path / "copy"

    processes = [start_cli("cp", "--no-progress", container.blob_url(source), str(destination)) for source in "xy"]
    results = [process.communicate(timeout=240) for process in processes]

    assert [process.returncode for process in processes] == [0, 0], results
    copied = files_under(destination)
    assert sorted(copied) == ["a.pt", "b/c.pt"]  # no .partial file left
    for name, data in copied.items():
        assert data in (contents["x"][name], contents["y"][name]), name


def test_a_dcp_checkpoint_downloaded_over_an_older_one_is_never_a_mix_of_both(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None
) -> None:
    # torch's own FileSystemWriter gives the shard files of every save the same names.
    old = {".metadata": b"old metadata", "__0_0.distcp": b"old small shard", "__1_0.distcp": b"old large shard"}
    destination = tmp_path / "ck"
    destination.mkdir()
    for name, data in old.items():
        (destination / name).write_bytes(data)
    container.upload("ck/.metadata", b"new metadata")
    container.upload("ck/__0_0.distcp", b"new small shard")
    container.upload("ck/__1_0.distcp", os.urandom(24 * 1024 * 1024))
    holding = threading.Event()
    proxy.add_fault(
        lambda request: request.operation == "GetBlob" and request.path.endswith("__1_0.distcp"),
        Delay(600, hold_request=True, holding=holding),
        times=None,
    )
    process = start_cli(
        "cp",
        "--no-progress",
        proxy.url(container.blob_url("ck")),
        str(destination),
        environment={**cli_environment(), "PYTHONFAULTHANDLER": "1"},  # for wait_for_exit
    )
    try:
        assert holding.wait(120), "the large shard was never requested"
        deadline = time.monotonic() + 60
        while (destination / "__0_0.distcp").read_bytes() != b"new small shard":  # one shard replaced
            assert time.monotonic() < deadline, "the small shard was never copied"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stderr = wait_for_exit(process, EXIT_TIMEOUT_SECONDS)
    finally:
        process.kill()
        process.wait()

    assert process.returncode == 130, stderr
    # Not the old .metadata over a new shard: no checkpoint at all until a copy completes.
    assert files_under(destination) == {"__0_0.distcp": b"new small shard", "__1_0.distcp": b"old large shard"}


def test_ctrl_c_stops_the_copy_even_when_nobody_reads_its_standard_error_any_more(
    container: Container, proxy: FaultProxy, tmp_path: pathlib.Path, python_ctrl_c: None
) -> None:
    container.upload("ck/model.pt", b"the previous checkpoint")
    source = tmp_path / "model.pt"
    source.write_bytes(os.urandom(24 * 1024 * 1024))

    code, _, _ = interrupt_mid_transfer(
        proxy, "PutBlock", 1, "cp", str(source), proxy.url(container.blob_url("ck/")), stderr_closed=True
    )

    assert code == 130
    assert container.download("ck/model.pt") == b"the previous checkpoint"


def test_cp_does_not_need_anyone_to_read_its_progress_bar(container: Container, tmp_path: pathlib.Path) -> None:
    data = os.urandom(24 * 1024 * 1024)
    container.upload("ck/model.pt", data)
    process = start_cli("cp", container.blob_url("ck/model.pt"), str(tmp_path))
    assert process.stderr is not None
    process.stderr.close()  # `azstoragetorch cp ... 2>&1 | less`, quit at once
    process.stderr = None
    stdout, _ = process.communicate(timeout=120)

    assert process.returncode == 0
    assert stdout.startswith("Copied 1 file, ")
    assert (tmp_path / "model.pt").read_bytes() == data


def cp_with_a_file_size_limit(limit: int, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI in a process that may write no file beyond ``limit`` bytes: its writes past it fail with
    EFBIG, as they would with ENOSPC on a full disk (SIGXFSZ, which would kill it instead, is ignored)."""
    program = (
        "import resource, runpy, signal, sys; "
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); "
        "sys.argv[0] = 'azstoragetorch'; "
        "runpy.run_module('azstoragetorch', run_name='__main__')"
    )
    return subprocess.run(
        [sys.executable, "-c", program, *args], capture_output=True, text=True, env=cli_environment(), timeout=240
    )


def test_cp_to_a_disk_that_takes_no_more_names_the_file_and_removes_the_partial_file(
    container: Container, tmp_path: pathlib.Path
) -> None:
    container.upload("ck/model.pt", os.urandom(3 * 1024 * 1024))
    destination = tmp_path / "copy"

    result = cp_with_a_file_size_limit(1024 * 1024, "cp", "--no-progress", container.blob_url("ck"), str(destination))

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"azstoragetorch: error: [Errno 27] cannot write {destination / 'model.pt'}: File too large;"
    ), result.stderr
    assert "Traceback" not in result.stderr
    assert files_under(destination) == {}


@pytest.fixture
def small_disk(tmp_path: pathlib.Path) -> Iterator[pathlib.Path]:
    """A 1 MiB tmpfs, where mounting one is allowed (root, and no container forbidding it)."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_cp_to_a_full_disk_names_the_file_and_removes_the_partial_file(
    container: Container, small_disk: pathlib.Path
) -> None:
    container.upload("ck/model.pt", os.urandom(3 * 1024 * 1024))

    result = cli("cp", "--no-progress", container.blob_url("ck"), str(small_disk))

    assert result.returncode == 1
    assert result.stderr.startswith(
        f"azstoragetorch: error: [Errno 28] cannot write {small_disk / 'model.pt'}: No space left on device;"
    ), result.stderr
    assert os.listdir(small_disk) == []


@pytest.mark.parametrize(
    "arguments",
    [
        (),
        ("frobnicate", "x"),
        ("ls",),
        ("cp", "a", "b"),
        ("cp", "http://127.0.0.1:1/devstoreaccount1/c/x", "y", "--parallel", "0"),
        ("cp", "http://127.0.0.1:1/devstoreaccount1/c/x", "y", "--parallel", "100000"),
        ("verify", "not-a-url"),
    ],
    ids=[
        "nothing",
        "unknown-command",
        "ls-without-url",
        "cp-two-local-paths",
        "cp-bad-parallel",
        "cp-huge-parallel",
        "malformed-url",
    ],
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
