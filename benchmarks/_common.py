"""What the benchmarks share: the machine description, timing, summary statistics and raw HTTP connections."""

from __future__ import annotations

import dataclasses
import datetime
import gc
import http.client
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse
from types import TracebackType
from typing import Any

import torch

import azstoragetorch
from azstoragetorch.testing import find_azurite_blob

# Worker processes learn the emulator's connection string from their environment rather than their
# command line, so that it shows neither in a process listing nor in the message of a failed command.
CONNECTION_STRING_VARIABLE = "AZSTORAGETORCH_BENCH_CONNECTION_STRING"


def run_benchmark_worker(
    script: str, arguments: list[str], *, connection_string: str, timeout: float, what: str
) -> Any:
    """Run ``script`` (a benchmark, as its own worker) with ``arguments``; return the JSON value it
    printed last."""
    environment = {**os.environ, CONNECTION_STRING_VARIABLE: connection_string}
    command = [sys.executable, script, *arguments]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=environment)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def worker_connection_string() -> str:
    return os.environ[CONNECTION_STRING_VARIABLE]


def _run_text(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError) as error:
        return f"unknown ({type(error).__name__})"


def package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def machine_info(**extra: Any) -> dict[str, Any]:
    """The machine, versions and commit a run measured; ``extra`` entries are added before the load."""
    cpu_model = "unknown"
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = _run_text(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    dirty = _run_text(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"])
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "azstoragetorch": f"{azstoragetorch.__version__} (git {commit}{', uncommitted changes' if dirty else ''})",
        "azure-storage-blob": package_version("azure-storage-blob"),
        "obstore": package_version("obstore"),
        **extra,
        "azurite": _run_text([find_azurite_blob(), "--version"]),
        "node": _run_text(["node", "--version"]),
        "loadavg_start": os.getloadavg(),
    }


def format_machine(info: dict[str, Any]) -> str:
    lines = [f"{key:<19}{value}" for key, value in info.items() if not key.startswith("loadavg")]
    start, end = info["loadavg_start"], info.get("loadavg_end")
    lines.append(f"{'load average':<19}start {start[0]:.2f}" + (f", end {end[0]:.2f}" if end else "") + " (1 min)")
    return "\n".join(lines)


class ThreadConnections:
    """One keep-alive ``http.client`` connection per worker thread, all closed on exit."""

    def __init__(self, url: str) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port
        self.path = parts.path
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []

    def get(self) -> http.client.HTTPConnection:
        connection: http.client.HTTPConnection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = http.client.HTTPConnection(self.host, self.port, timeout=300)
            self._local.connection = connection
            with self._lock:
                self._all.append(connection)
        return connection

    def __enter__(self) -> ThreadConnections:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for connection in self._all:
            connection.close()


# -- timing ------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    seconds: float  # wall-clock time (perf_counter)
    cpu_seconds: float  # user + system CPU time of this process, all threads (process_time)


class Stopwatch:
    """``with Stopwatch() as sw: ...`` then ``sw.sample``; collects garbage first so it is not timed."""

    sample: Sample

    def __enter__(self) -> Stopwatch:
        gc.collect()
        self._cpu = time.process_time()
        self._wall = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        wall = time.perf_counter() - self._wall
        cpu = time.process_time() - self._cpu
        self.sample = Sample(wall, cpu)


# -- summaries ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    median: float
    low: float
    high: float


def stats(values: list[float]) -> Stats:
    return Stats(statistics.median(values), min(values), max(values))


def fmt_range(s: Stats | None, digits: int) -> str:
    if s is None:
        return "n/a"
    return f"{s.median:.{digits}f} [{s.low:.{digits}f}-{s.high:.{digits}f}]"


# The most load CPU that the default CRC-32 check of what is read may add (issue #21: 3 %).
VERIFICATION_CPU_TARGET = 1.03


def format_verification_cost(what: str, verified: list[Sample], unverified: list[Sample]) -> str:
    """The load CPU of the default (verified) reads over that of ``verify_checksum=False``, round by round.

    The two samples of a round ran in the same round (the same emulator, neighbouring moments), so
    their ratio cancels most of what a shared machine changes between rounds.
    """
    ratios = [checked.cpu_seconds / plain.cpu_seconds for checked, plain in zip(verified, unverified, strict=True)]
    summary = stats(ratios)
    met = "met" if summary.median <= VERIFICATION_CPU_TARGET else "MISSED"
    return (
        f"verification cost, {what}: load CPU verified / unverified = {summary.median:.3f} "
        f"[{summary.low:.3f}-{summary.high:.3f}] over {len(ratios)} rounds; "
        f"target <= {VERIFICATION_CPU_TARGET:.2f}: {met}"
    )


# -- the checkpoint ----------------------------------------------------------------------------------


class VerificationError(AssertionError):
    """A load returned something other than what was saved. Never caught: the run must fail."""


def make_state_dict(size_mib: int, tensor_mib: int = 4) -> dict[str, torch.Tensor]:
    """Layers of a float32 weight of ``tensor_mib`` MiB (1024 columns) and a 1024-element bias (4 KiB), plus
    two scalars; about ``size_mib`` MiB in all."""
    generator = torch.Generator().manual_seed(0)
    state_dict: dict[str, torch.Tensor] = {}
    for layer in range(max(1, round(size_mib / tensor_mib))):
        state_dict[f"layers.{layer}.weight"] = torch.randn(tensor_mib * 256, 1024, generator=generator)
        state_dict[f"layers.{layer}.bias"] = torch.randn(1024, generator=generator)
    state_dict["step"] = torch.tensor(12345, dtype=torch.int64)
    state_dict["loss_scale"] = torch.tensor(65536.0)
    return state_dict


def verify(loaded: object, expected: dict[str, torch.Tensor], what: str) -> None:
    if not isinstance(loaded, dict) or loaded.keys() != expected.keys():
        raise VerificationError(f"{what}: loaded object is not a dict with the saved keys")
    for name, tensor in expected.items():
        got = loaded[name]
        same = (
            isinstance(got, torch.Tensor)
            and got.dtype == tensor.dtype
            and got.shape == tensor.shape
            and torch.equal(got, tensor)
        )
        if not same:
            raise VerificationError(f"{what}: tensor {name!r} differs from the saved one")


# -- obstore, a peer client -----------------------------------------------------------------------------


def obstore_store(account_url: str, container: str, account_key: str) -> Any:
    """An ``obstore.store.AzureStore`` on ``container`` of the emulator at ``account_url`` (path-style,
    ``http://127.0.0.1:<port>/devstoreaccount1``), authorized with the account's Shared Key."""
    from obstore.store import AzureStore

    parts = urllib.parse.urlsplit(account_url)
    account = parts.path.strip("/")
    return AzureStore(
        container,
        account_name=account,
        account_key=account_key,
        # The emulator's path-style URLs: the account is the first path segment.
        endpoint=account_url,
        client_options={"allow_http": True, "timeout": "300s"},
    )


# -- recorded results ------------------------------------------------------------------------------------

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"


def write_result(
    benchmark: str,
    info: dict[str, Any],
    figures: Any,
    ratios: dict[str, Any] | None = None,
    *,
    config: dict[str, Any] | None = None,
    notes: list[str] | None = None,
    directory: pathlib.Path | None = None,
) -> pathlib.Path:
    """Record one run as ``<directory>/<benchmark>-<UTC time>-<commit>.json`` and return the path.

    ``info`` is :func:`machine_info` (date, commit, versions, load average at the start; the load
    average at the end is read here unless already there). ``figures`` holds the measured values,
    ``ratios`` each ratio with what it compares and its target.
    """
    info = dict(info)
    info.setdefault("loadavg_end", os.getloadavg())
    repo = pathlib.Path(__file__).resolve().parents[1]
    commit = _run_text(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"])
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    target = (directory or RESULTS_DIR) / f"{benchmark}-{stamp}-{commit}.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": benchmark,
        "date": info.get("date"),
        "commit": commit,
        "command": " ".join([os.path.basename(sys.argv[0]), *sys.argv[1:]]),
        "machine": info,
        "config": config or {},
        "figures": figures,
        "ratios": ratios or {},
        "notes": notes or [],
    }
    target.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return target
