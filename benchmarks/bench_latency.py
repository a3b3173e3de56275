#!/usr/bin/env python
"""Benchmark the datasets, BlobIO's torch.load and a DCP load through a proxy that adds latency.

Starts its own in-memory Azurite and, for each ``--delay-ms`` value, a :mod:`latency_proxy` in front of
it that holds every response's first byte for that long (and optionally caps each connection's
bandwidth). Through the proxy it measures, each beside a ceiling with as many requests in flight:

- a data set of small blobs through ``BlobDataset`` and ``IterableBlobDataset`` in a ``DataLoader``
  (batch 32, ``num_workers`` 0 and 2), against ``http.client`` GETs from as many threads as the
  dataset keeps requests in flight;
- ``torch.load`` of one checkpoint through ``BlobIO``, against ranged ``http.client`` GETs from as
  many threads as ``BlobIO``'s ``max_concurrency``, then ``torch.load`` from that memory; with 4 MiB
  tensors (group ``load``, read through the read-ahead window) and with 16 MiB tensors (``load16``,
  read straight into the tensors: the run records how many bytes took that path);
- ``dcp.load`` of a checkpoint saved with ``thread_count=4``, against ranged GETs of the same files;

then the same with the public knobs that set how many requests are in flight (``prefetch``, the
batch size, ``max_concurrency``), to show which default limits each.

    .venv/bin/python benchmarks/bench_latency.py [--delay-ms 2,20] [--rounds 2] [--mbps 0]

Every run is written to benchmarks/results/ (see its README).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import gc
import io
import os
import pathlib
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
import torch.utils.data
from _common import ThreadConnections, format_machine, machine_info, make_state_dict, verify, write_result
from azure.storage.blob import BlobServiceClient
from typing_extensions import override

from azstoragetorch.datasets import BlobDataset, IterableBlobDataset, _batch_ahead
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite

KiB = 1024
MiB = 1024**2
BATCH_SIZE = 32
CONTAINER = "bench"
SMALL_CONTAINER = "small"
X_MS_VERSION = "2024-08-04"
RANGE = 8 * MiB  # BlobIO's and the DCP reader's default block size
# What our defaults keep in flight, for the ceilings: a batch of BlobDataset (fetched together), the
# IterableBlobDataset prefetch, BlobIO's and the DCP reader's max_concurrency; per DataLoader process.
DEFAULT_IN_FLIGHT = {"dataset": 32, "blobio": 8, "dcp": 8}
TARGET = 0.8  # the target at 20 ms: >= 0.8x the ceiling


@dataclasses.dataclass
class Measured:
    seconds: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)


class Proxy:
    """A latency_proxy.py process in front of ``upstream_port``."""

    def __init__(self, upstream_port: int, delay_ms: float, mbps: float | None) -> None:
        script = pathlib.Path(__file__).with_name("latency_proxy.py")
        command = [sys.executable, str(script), "--upstream", f"127.0.0.1:{upstream_port}", "--delay-ms", str(delay_ms)]
        if mbps:
            command += ["--mbps", str(mbps)]
        self._process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        assert self._process.stdout is not None
        line = self._process.stdout.readline().split()
        if len(line) != 2 or line[0] != "listening":
            self._process.kill()
            raise RuntimeError(f"latency proxy did not start: {line!r}")
        self.port = int(line[1])

    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/devstoreaccount1"

    def stop(self) -> None:
        self._process.terminate()
        self._process.wait(timeout=30)


def timed(run: Callable[[], Any]) -> tuple[float, float, Any]:
    gc.collect()
    cpu, wall = time.process_time(), time.perf_counter()
    result = run()
    return time.perf_counter() - wall, time.process_time() - cpu, result


# -- small blobs ------------------------------------------------------------------------------------------


def keep_list(batch: list[Any]) -> list[Any]:
    return batch


def read_dataset(
    account_url: str,
    credential: Any,
    names: list[str],
    kind: str,
    workers: int,
    batch: int,
    prefetch: int | None,
    batchwise: bool = False,
) -> None:
    url = f"{account_url}/{SMALL_CONTAINER}"
    dataset: torch.utils.data.Dataset[Any]
    if kind == "map":
        dataset = BlobDataset.from_container_url(url, credential=credential)
        if batchwise:
            # What BlobDataset does without reading its next batch ahead: each batch fetched when asked
            # for. A private switch, only to measure the read-ahead in the same run.
            dataset.__dict__["_read_ahead"] = _BatchwiseOnly()
    else:
        extra = {"prefetch": prefetch} if prefetch else {}
        dataset = IterableBlobDataset.from_container_url(url, credential=credential, **extra)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, num_workers=workers, collate_fn=keep_list)
    count = sum(len(b) for b in loader)
    if count != len(names):
        raise AssertionError(f"{kind} w{workers}: read {count} samples, expected {len(names)}")


class _BatchwiseOnly(_batch_ahead._BatchReadAhead):
    @override
    def fetch(self, indexes: Any, source: Any, start: Any) -> list[Any]:
        return [start(source[index]) for index in indexes]


def read_small_ceiling(account_url: str, names: list[str], in_flight: int) -> None:
    """Anonymous GETs of every blob from ``in_flight`` threads, each on its own keep-alive connection."""
    with ThreadConnections(f"{account_url}/{SMALL_CONTAINER}") as connections:

        def get(name: str) -> int:
            connection = connections.get()
            connection.request("GET", f"{connections.path}/{name}", headers={"x-ms-version": X_MS_VERSION})
            response = connection.getresponse()
            data = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {name}: HTTP {response.status}")
            return len(data)

        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            total = sum(pool.map(get, names))
    if total != len(names) * 16 * KiB:
        raise AssertionError("ceiling read the wrong number of bytes")


# -- checkpoints ------------------------------------------------------------------------------------------


def ranged_gets(account_url: str, blob: str, size: int, in_flight: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    with ThreadConnections(f"{account_url}/{CONTAINER}") as connections:

        def get(start: int) -> None:
            stop = min(start + RANGE, size)
            connection = connections.get()
            headers = {"x-ms-version": X_MS_VERSION, "x-ms-range": f"bytes={start}-{stop - 1}"}
            connection.request("GET", f"{connections.path}/{blob}", headers=headers)
            response = connection.getresponse()
            got = response.readinto(view[start:stop])
            response.read()
            if response.status != 206 or got != stop - start:
                raise RuntimeError(f"GET {blob} {start}: HTTP {response.status}, {got} bytes")

        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(get, range(0, size, RANGE)))
    view.release()
    return buffer


@dataclasses.dataclass
class Checkpoint:
    """A state dict saved as one blob for the torch.load rows."""

    blob: str
    tensor_mib: int
    state_dict: dict[str, torch.Tensor]
    size: int = 0


def load_blobio(account_url: str, credential: Any, checkpoint: Checkpoint, max_concurrency: int) -> None:
    with BlobIO(
        f"{account_url}/{CONTAINER}/{checkpoint.blob}", "rb", credential=credential, max_concurrency=max_concurrency
    ) as f:
        loaded = torch.load(f)
    verify(loaded, checkpoint.state_dict, "BlobIO load through the proxy")


def load_raw_then_torch(account_url: str, checkpoint: Checkpoint, in_flight: int) -> None:
    buffer = ranged_gets(account_url, checkpoint.blob, checkpoint.size, in_flight)
    loaded = torch.load(io.BytesIO(buffer))
    verify(loaded, checkpoint.state_dict, "raw GETs + torch.load through the proxy")


def direct_bytes(account_url: str, credential: Any, checkpoint: Checkpoint) -> int | None:
    """How many bytes one BlobIO ``torch.load`` of ``checkpoint`` reads straight into its tensors (not
    timed; counted by wrapping the read-ahead window's private direct read, ``None`` if it moved)."""
    from azstoragetorch._reads import _window

    window = getattr(_window, "ReadAheadWindow", None)
    original = getattr(window, "_read_directly", None)
    if window is None or original is None:
        return None
    counted = 0

    def counting(self: Any, offset: int, destination: memoryview, **kwargs: Any) -> None:
        nonlocal counted
        counted += len(destination)
        original(self, offset, destination, **kwargs)

    window._read_directly = counting
    try:
        load_blobio(account_url, credential, checkpoint, DEFAULT_IN_FLIGHT["blobio"])
    finally:
        window._read_directly = original
    return counted


def load_dcp(account_url: str, credential: Any, expected: dict[str, torch.Tensor], max_concurrency: int) -> None:
    target = {name: torch.empty_like(tensor) for name, tensor in expected.items()}
    reader = BlobStorageReader(f"{account_url}/{CONTAINER}/dcp", credential=credential, max_concurrency=max_concurrency)
    dcp.load(target, storage_reader=reader)
    verify(target, expected, "DCP load through the proxy")


def dcp_raw(account_url: str, files: dict[str, int], in_flight: int) -> None:
    """Ranged GETs of every file of the DCP checkpoint, ``in_flight`` at once across the files."""
    with ThreadConnections(f"{account_url}/{CONTAINER}") as connections:
        buffers = {name: bytearray(size) for name, size in files.items()}

        def get(job: tuple[str, int]) -> None:
            name, start = job
            stop = min(start + RANGE, files[name])
            connection = connections.get()
            headers = {"x-ms-version": X_MS_VERSION, "x-ms-range": f"bytes={start}-{stop - 1}"}
            connection.request("GET", f"{connections.path}/{name}", headers=headers)
            response = connection.getresponse()
            data = response.read()
            if response.status not in (200, 206) or len(data) != stop - start:
                raise RuntimeError(f"GET {name}: HTTP {response.status}")
            buffers[name][start:stop] = data

        jobs = [(name, start) for name, size in files.items() for start in range(0, max(size, 1), RANGE)]
        with concurrent.futures.ThreadPoolExecutor(in_flight) as pool:
            list(pool.map(get, jobs))


# -- the run -------------------------------------------------------------------------------------------


def build_cases(
    account_url: str,
    credential: Any,
    names: list[str],
    state_dict: dict[str, torch.Tensor],
    checkpoints: dict[str, Checkpoint],
    dcp_files: dict[str, int],
) -> dict[str, tuple[str, Callable[[], Any], int]]:
    """key -> (group, run, units moved: samples or bytes)."""
    d = DEFAULT_IN_FLIGHT
    samples = len(names)
    cases: dict[str, tuple[str, Callable[[], Any], int]] = {}
    for kind in ("map", "iter"):
        for workers in (0, 2):
            run = lambda k=kind, w=workers: read_dataset(account_url, credential, names, k, w, BATCH_SIZE, None)  # noqa: E731
            cases[f"small/{kind}/w{workers}"] = ("small", run, samples)
    # The knobs: a larger prefetch (iterable), a larger batch (map-style fetches one batch at a time).
    for workers in (0, 2):
        run = lambda w=workers: read_dataset(account_url, credential, names, "iter", w, BATCH_SIZE, 128)  # noqa: E731
        cases[f"small/iter/w{workers}/prefetch128"] = ("small", run, samples)
        run = lambda w=workers: read_dataset(account_url, credential, names, "map", w, 128, None)  # noqa: E731
        cases[f"small/map/w{workers}/batch128"] = ("small", run, samples)
    run = lambda: read_dataset(account_url, credential, names, "map", 0, BATCH_SIZE, None, batchwise=True)  # noqa: E731
    cases["small/map/w0/batchwise"] = ("small", run, samples)
    for in_flight in (d["dataset"], 2 * d["dataset"], 128):
        run = lambda n=in_flight: read_small_ceiling(account_url, names, n)  # noqa: E731
        cases[f"small/ceiling/x{in_flight}"] = ("small", run, samples)
    for group, checkpoint in checkpoints.items():
        for concurrency in (d["blobio"], 16):
            run = lambda c=concurrency, k=checkpoint: load_blobio(account_url, credential, k, c)  # noqa: E731
            cases[f"{group}/blobio/c{concurrency}"] = (group, run, checkpoint.size)
            run = lambda c=concurrency, k=checkpoint: load_raw_then_torch(account_url, k, c)  # noqa: E731
            cases[f"{group}/ceiling/x{concurrency}"] = (group, run, checkpoint.size)
    dcp_size = sum(dcp_files.values())
    for concurrency in (d["dcp"], 16):
        run = lambda c=concurrency: load_dcp(account_url, credential, state_dict, c)  # noqa: E731
        cases[f"dcp/blob/c{concurrency}"] = ("dcp", run, dcp_size)
        run = lambda c=concurrency: dcp_raw(account_url, dcp_files, c)  # noqa: E731
        cases[f"dcp/ceiling/x{concurrency}"] = ("dcp", run, dcp_size)
    return cases


def summarize(cases: dict[str, tuple[str, Callable[[], Any], int]], measured: dict[str, Measured]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, (group, _, units) in cases.items():
        m = measured[key]
        rates = [units / s for s in m.seconds]
        if group != "small":
            rates = [r / MiB for r in rates]
        out[key] = {
            "unit": "samples/s" if group == "small" else "MiB/s",
            "median": statistics.median(rates),
            "low": min(rates),
            "high": max(rates),
            "cpu_s": statistics.median(m.cpu),
            "seconds": m.seconds,
        }
    return out


def ratios_for(figures: dict[str, Any], delay: str) -> dict[str, Any]:
    def value(key: str) -> float:
        return float(figures[f"{delay}/{key}"]["median"])

    pairs = {
        "small map w0 / ceiling x32": ("small/map/w0", "small/ceiling/x32"),
        "small map w0 batchwise (no read-ahead) / ceiling x32": ("small/map/w0/batchwise", "small/ceiling/x32"),
        "small iter w0 / ceiling x32": ("small/iter/w0", "small/ceiling/x32"),
        "small map w2 / ceiling x64": ("small/map/w2", "small/ceiling/x64"),
        "small iter w2 / ceiling x64": ("small/iter/w2", "small/ceiling/x64"),
        "small iter w0 prefetch128 / ceiling x128": ("small/iter/w0/prefetch128", "small/ceiling/x128"),
        "small map w0 batch128 / ceiling x128": ("small/map/w0/batch128", "small/ceiling/x128"),
        "torch.load blobio c8 / raw x8 + load": ("load/blobio/c8", "load/ceiling/x8"),
        "torch.load blobio c16 / raw x16 + load": ("load/blobio/c16", "load/ceiling/x16"),
        "torch.load 16 MiB tensors blobio c8 / raw x8 + load": ("load16/blobio/c8", "load16/ceiling/x8"),
        "torch.load 16 MiB tensors blobio c16 / raw x16 + load": ("load16/blobio/c16", "load16/ceiling/x16"),
        "dcp load c8 / raw x8": ("dcp/blob/c8", "dcp/ceiling/x8"),
        "dcp load c16 / raw x16": ("dcp/blob/c16", "dcp/ceiling/x16"),
    }
    ratios = {
        f"{delay}: {name}": {
            "value": value(a) / value(b),
            "target": f">= {TARGET}",
            "met": value(a) / value(b) >= TARGET,
        }
        for name, (a, b) in pairs.items()
        if f"{delay}/{a}" in figures and f"{delay}/{b}" in figures  # a run of some groups only
    }
    # What reading the next batch ahead gains, measured side by side (no target of its own).
    if f"{delay}/small/map/w0/batchwise" in figures:
        gain = value("small/map/w0") / value("small/map/w0/batchwise")
        ratios[f"{delay}: small map w0 / map w0 batchwise (no read-ahead)"] = {
            "value": gain,
            "target": "-",
            "met": None,
        }
    return ratios


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--delay-ms", default="0,2,20", help="comma-separated delays (default 0,2,20)")
    parser.add_argument("--mbps", type=float, default=0.0, help="cap per connection in 10^6 B/s (default none)")
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds after one warm-up (default 2)")
    parser.add_argument("--small-count", type=int, default=640, help="16 KiB blobs (default 640)")
    parser.add_argument("--size-mib", type=int, default=256, help="checkpoint size for torch.load and DCP (256)")
    parser.add_argument(
        "--only", help="comma-separated groups: small, load (4 MiB tensors), load16 (16 MiB tensors), dcp (default all)"
    )
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    delays = [float(d) for d in args.delay_ms.split(",")]
    groups = set(args.only.split(",")) if args.only else {"small", "load", "load16", "dcp"}

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    info = machine_info()
    state_dict = make_state_dict(args.size_mib, 4)
    # 4 MiB tensors are read through the read-ahead window; 16 MiB ones (at least a block) straight
    # into their storage.
    checkpoints = {"load": Checkpoint("ckpt.pt", 4, state_dict)}
    if "load16" in groups:
        checkpoints["load16"] = Checkpoint("ckpt16.pt", 16, make_state_dict(args.size_mib, 16))
    direct: dict[str, int | None] = {}
    measured: dict[str, Measured] = {}
    all_cases: dict[str, tuple[str, Callable[[], Any], int]] = {}
    with Azurite() as azurite, BlobServiceClient(azurite.account_url, credential=azurite.credential) as service:
        service.create_container(CONTAINER, public_access="container")
        small = service.create_container(SMALL_CONTAINER, public_access="container")
        names = [f"{i:06d}.bin" for i in range(args.small_count)]
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda n: small.upload_blob(n, os.urandom(16 * KiB)), names))
        for group, checkpoint in checkpoints.items():
            with BlobIO(
                f"{azurite.account_url}/{CONTAINER}/{checkpoint.blob}", "wb", credential=azurite.credential
            ) as f:
                torch.save(checkpoint.state_dict, f)
            checkpoint.size = service.get_blob_client(CONTAINER, checkpoint.blob).get_blob_properties().size
            if group in groups:
                direct[checkpoint.blob] = direct_bytes(azurite.account_url, azurite.credential, checkpoint)
        dcp.save(
            state_dict,
            storage_writer=BlobStorageWriter(
                f"{azurite.account_url}/{CONTAINER}/dcp", credential=azurite.credential, thread_count=4
            ),
        )
        dcp_files = {b.name: b.size for b in service.get_container_client(CONTAINER).list_blobs("dcp/")}
        log(
            f"prepared: {len(names)} small blobs, checkpoints {[c.size / MiB for c in checkpoints.values()]} MiB, "
            f"read straight into tensors {direct}, dcp {len(dcp_files)} files"
        )
        for delay in delays:
            proxy = Proxy(azurite.port, delay, args.mbps or None)
            try:
                cases = build_cases(proxy.account_url(), azurite.credential, names, state_dict, checkpoints, dcp_files)
                cases = {k: v for k, v in cases.items() if v[0] in groups}
                keys = list(cases)
                for round_index in range(args.rounds + 1):
                    shift = round_index % len(keys)
                    for key in keys[shift:] + keys[:shift]:
                        group, run, units = cases[key]
                        seconds, cpu, _ = timed(run)
                        rate = units / seconds / (1 if group == "small" else MiB)
                        unit = "samples/s" if group == "small" else "MiB/s"
                        log(f"{delay:>4} ms  round {round_index}  {key:<30} {rate:9.1f} {unit}  cpu {cpu:.2f} s")
                        if round_index:
                            m = measured.setdefault(f"{delay:g}ms/{key}", Measured())
                            m.seconds.append(seconds)
                            m.cpu.append(cpu)
                all_cases.update({f"{delay:g}ms/{k}": v for k, v in cases.items()})
            finally:
                proxy.stop()
    info["loadavg_end"] = os.getloadavg()
    figures = summarize(all_cases, measured)
    ratios: dict[str, Any] = {}
    if figures:
        for delay in delays:
            ratios |= ratios_for(figures, f"{delay:g}ms")
    print(format_machine(info))
    for key, figure in figures.items():
        print(
            f"{key:<38} {figure['median']:9.1f} {figure['unit']:<9} [{figure['low']:.1f}-{figure['high']:.1f}]"
            f"  cpu {figure['cpu_s']:.2f} s"
        )
    print()
    for name, item in ratios.items():
        verdict = "" if item["met"] is None else f": {'met' if item['met'] else 'MISSED'}"
        print(f"{name:<60} {item['value']:5.2f}  target {item['target']}{verdict}")
    config = {
        "delays_ms": delays,
        "mbps_per_connection": args.mbps or None,
        "rounds": args.rounds,
        "small": [args.small_count, 16 * KiB],
        "checkpoint_bytes": {c.blob: c.size for c in checkpoints.values()},
        "checkpoint_tensor_mib": {c.blob: c.tensor_mib for c in checkpoints.values()},
        # Bytes of one BlobIO torch.load (on loopback, before the timed runs) read straight into tensors.
        "direct_read_bytes": direct,
        "dcp_files": dcp_files,
        "batch_size": BATCH_SIZE,
        "default_in_flight": DEFAULT_IN_FLIGHT,
    }
    print(f"\nwrote {write_result('latency', info, figures, ratios, config=config)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
