"""Running a test's helper script (a Lightning or DCP job that starts ranks of its own) to completion.

The script runs in a process group of its own. If it is still running after ``timeout`` (a guard
against a hang, generous enough for a machine whose cores are all busy, not a measurement), the
whole group is killed, ranks that the script started included: a rank left behind would keep its
connections to the test's proxy or emulator open and stall the test session that owns them.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator, Sequence
from typing import Any

# A job here takes 10-60 s on a quiet 2-core machine; fully loaded, several times that.
JOB_TIMEOUT_SECONDS = 900


def run_job(
    command: Sequence[str], *, timeout: float = JOB_TIMEOUT_SECONDS, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command, capture_output=True, text=True, **kwargs)`` in a new process group,
    all of which is killed once the command ends or times out."""
    with subprocess.Popen(
        list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, **kwargs
    ) as process:
        try:
            stdout, stderr = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            stdout, stderr = process.communicate()
            raise AssertionError(
                f"{' '.join(command[:4])} ... did not finish within {timeout:.0f} s; its process group was killed. "
                f"stderr ends with:\n{stderr[-4000:]}"
            ) from None
        finally:
            _kill_group(process.pid)  # stragglers of a job that ended (normally or not)
    return subprocess.CompletedProcess(list(command), process.returncode, stdout, stderr)


@contextlib.contextmanager
def started_job(command: Sequence[str], **kwargs: Any) -> Iterator[subprocess.Popen[str]]:
    """``subprocess.Popen(command, text=True, **kwargs)`` in a new process group, for a test that talks
    to the job while it runs. When the ``with`` block ends the job may run for up to
    ``JOB_TIMEOUT_SECONDS`` more (at once if the block raised); then all of its group is killed."""
    with subprocess.Popen(list(command), text=True, start_new_session=True, **kwargs) as process:
        try:
            yield process
        except BaseException:
            _kill_group(process.pid)
            raise
        try:
            process.wait(timeout=JOB_TIMEOUT_SECONDS)
        finally:
            _kill_group(process.pid)


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
