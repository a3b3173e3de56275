"""The helper that runs the suite's multi-process jobs: a job that overruns is killed with every
process it started, and its output is reported."""

from __future__ import annotations

import pathlib
import sys
import time

import pytest

from tests.e2e.support._launch import run_job

# Starts a grandchild that records its pid and would outlive its parent, then hangs.
HANGING_JOB = """
import pathlib, subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(3600)"])
pathlib.Path(sys.argv[1]).write_text(str(child.pid))
print("started", file=sys.stderr, flush=True)
time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    try:
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_an_overrunning_job_is_killed_with_the_processes_it_started(tmp_path: pathlib.Path) -> None:
    pid_file = tmp_path / "grandchild.pid"
    with pytest.raises(AssertionError, match=r"did not finish within 5 s(.|\n)*started"):
        run_job([sys.executable, "-c", HANGING_JOB, str(pid_file)], timeout=5)
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 60  # SIGKILL is delivered at once; this only bounds the wait for it
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)


def test_a_finished_job_returns_its_status_and_output() -> None:
    result = run_job([sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"])
    assert (result.returncode, result.stdout, result.stderr) == (3, "out\n", "err\n")
