#!/usr/bin/env python
"""Benchmark ``torch.distributed.checkpoint`` save and load through BlobStorageWriter/Reader and the alternatives.

Starts its own in-memory Azurite and measures, interleaved in one run, ``dcp.save`` and ``dcp.load`` of a
state dict (default ~256 MiB) in one process with ``thread_count`` 1, 4 and 8 through:

- ``blob``: azstoragetorch's ``BlobStorageWriter`` / ``BlobStorageReader`` (whose loads check every shard file
  against its recorded CRC-32, the default);
- ``blob-unverified``: ``blob`` loaded with ``BlobStorageReader(verify_checksum=False)``, for the cost of that check;
- ``fsspec``: torch's ``FsspecWriter`` / ``FsspecReader`` over adlfs (``abfs://``), torch's own way to Azure;
- ``local``: torch's ``FileSystemWriter`` / ``FileSystemReader`` on the local disk;
- ``blob-zstd`` and ``local-zstd``: ``blob`` and ``local`` with torch's ``ZStandard`` extension
  (``_extensions=[ZStandard()]``; the readers' default registry undoes it).

Each case runs in a worker process of its own, so that no variant inherits another's heap (whether a large
allocation reuses freed memory or faults in fresh pages depends on what ran before it) or threads: it saves
once untimed and once timed, then loads once untimed and once timed into the same tensors, as a resumed job
loads into tensors that already exist. Every load is checked tensor by tensor against what was saved.

    .venv/bin/python benchmarks/bench_dcp.py [--size-mib 256] [--rounds 3] [--variants blob,fsspec] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from _common import (
    Sample,
    Stopwatch,
    VerificationError,
    fmt_range,
    format_machine,
    format_verification_cost,
    machine_info,
    make_state_dict,
    package_version,
    run_benchmark_worker,
    stats,
    verify,
    worker_connection_string,
)
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint._extension import ZStandard
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite

MiB = 1024**2
GiB = 1024**3
CONTAINER = "bench"
THREAD_COUNTS = (1, 4, 8)
VARIANTS = {
    "blob": "BlobStorageWriter/Reader",
    "blob-unverified": "BlobStorageReader verify_checksum=False",
    "fsspec": "FsspecWriter/Reader + adlfs",
    "local": "FileSystemWriter/Reader, local disk",
    "blob-zstd": "BlobStorageWriter/Reader + ZStandard",
    "local-zstd": "FileSystemWriter/Reader + ZStandard, disk",
}


class Run:
    """The clients of one round (a fresh Azurite) and where each variant keeps its checkpoints."""

    def __init__(self, azurite: Any, local_root: str, *, create_container: bool = True) -> None:
        self.azurite = azurite
        self.local_root = local_root
        if create_container:
            BlobServiceClient.from_connection_string(azurite.connection_string).create_container(CONTAINER)

    def writer(self, variant: str, threads: int, suffix: str = "") -> Any:
        location = self.location(variant, threads) + suffix
        extensions = [ZStandard()] if variant.endswith("-zstd") else None
        if variant.startswith("blob"):
            return BlobStorageWriter(
                location,
                credential=self.azurite.credential,
                thread_count=threads,
                overwrite=True,
                _extensions=extensions,
            )
        if variant == "fsspec":
            connection = self.azurite.connection_string
            return FsspecWriter(location, thread_count=threads, overwrite=True, connection_string=connection)
        return FileSystemWriter(location, thread_count=threads, overwrite=True, _extensions=extensions)

    def reader(self, variant: str, threads: int, suffix: str = "") -> Any:
        location = self.location(variant, threads) + suffix
        if variant.startswith("blob"):
            verify_checksum = variant != "blob-unverified"
            return BlobStorageReader(location, credential=self.azurite.credential, verify_checksum=verify_checksum)
        if variant == "fsspec":
            return FsspecReader(location, connection_string=self.azurite.connection_string)
        return FileSystemReader(location)

    def location(self, variant: str, threads: int) -> str:
        name = f"{variant}-t{threads}"
        if variant.startswith("blob"):
            return self.azurite.blob_url(CONTAINER, name)
        if variant == "fsspec":
            return f"abfs://{CONTAINER}/{name}"
        return os.path.join(self.local_root, name)

    def size(self, variant: str, threads: int) -> int:
        """The checkpoint's bytes: all its files."""
        if variant.startswith("local"):
            folder = self.location(variant, threads)
            return sum(os.path.getsize(os.path.join(folder, name)) for name in os.listdir(folder))
        service = BlobServiceClient.from_connection_string(self.azurite.connection_string)
        container = service.get_container_client(CONTAINER)
        return sum(blob.size for blob in container.list_blobs(name_starts_with=f"{variant}-t{threads}/"))


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One case in this process: a warm-up save and load, then the timed save and load."""
    azurite = _AzuriteAt(args.account_url, worker_connection_string())
    run = Run(azurite, args.local_dir, create_container=False)
    state_dict = make_state_dict(args.size_mib)
    target = {name: torch.empty_like(tensor) for name, tensor in state_dict.items()}
    variant, threads = args.variant, args.threads
    dcp.save(state_dict, storage_writer=run.writer(variant, threads, suffix="-warm-up"))
    with Stopwatch() as saving:
        dcp.save(state_dict, storage_writer=run.writer(variant, threads))
    dcp.load(target, storage_reader=run.reader(variant, threads, suffix="-warm-up"))
    reader = run.reader(variant, threads)
    with Stopwatch() as loading:
        dcp.load(target, storage_reader=reader)
    verify(target, state_dict, f"{variant} t={threads} load")
    if variant in ("blob", "blob-unverified"):  # the row measures what it says
        checked = getattr(reader, "stats", None)
        if checked is None or (checked.verified_blobs == threads) != (variant == "blob"):
            raise VerificationError(f"{variant} t={threads}: {threads} shard files, load stats {checked}")
    stored = run.size(variant, threads)
    return {
        "save": saving.sample.__dict__,
        "load": loading.sample.__dict__,
        # Compressed checkpoints are measured against the bytes of the state dict they hold, so
        # that their CPU per GiB compares with the uncompressed variants'.
        "bytes": sum(tensor.nbytes for tensor in state_dict.values()) if variant.endswith("-zstd") else stored,
        "stored_bytes": stored,
    }


def measure(args: argparse.Namespace, log: Callable[[str], None]) -> dict[Any, Any]:
    """Each round: a fresh Azurite (it frees overwritten blobs only every few minutes), then every case once,
    in an order rotated by one per round."""
    cases = [(variant, threads) for variant in args.variants for threads in THREAD_COUNTS]
    samples: dict[tuple[str, str, int], list[Sample]] = {}
    sizes: dict[tuple[str, int], int] = {}
    stored: dict[tuple[str, int], int] = {}
    for round_index in range(1, args.rounds + 1):
        order = cases[round_index % len(cases) :] + cases[: round_index % len(cases)]
        local_root = tempfile.mkdtemp(prefix="bench-dcp-")
        try:
            with Azurite() as azurite:
                Run(azurite, local_root)  # creates the container
                for variant, threads in order:
                    report = run_worker(args, azurite, local_root, variant, threads)
                    sizes[(variant, threads)] = report["bytes"]
                    stored[(variant, threads)] = report["stored_bytes"]
                    for direction in ("save", "load"):
                        sample = Sample(**report[direction])
                        samples.setdefault((direction, variant, threads), []).append(sample)
                        log(
                            f"round {round_index}/{args.rounds}  {direction} {variant:<6} t={threads}  "
                            f"{sample.seconds:7.3f} s  {report['bytes'] / MiB / sample.seconds:8.1f} MiB/s  "
                            f"cpu {sample.cpu_seconds:6.3f} s"
                        )
        finally:
            shutil.rmtree(local_root, ignore_errors=True)
    return {"samples": samples, "sizes": sizes, "stored": stored}


def run_worker(args: argparse.Namespace, azurite: Azurite, local_root: str, variant: str, threads: int) -> Any:
    arguments = ["--worker", "--variant", variant, "--threads", str(threads), "--size-mib", str(args.size_mib)]
    arguments += ["--account-url", azurite.account_url, "--local-dir", local_root]
    what = f"worker for {variant} t={threads}"
    return run_benchmark_worker(
        __file__, arguments, connection_string=azurite.connection_string, timeout=1800, what=what
    )


class _AzuriteAt:
    """What Run needs of an Azurite started by the coordinating process."""

    def __init__(self, account_url: str, connection_string: str) -> None:
        self.account_url = account_url
        self.connection_string = connection_string
        self.credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)

    def blob_url(self, container: str, blob: str) -> str:
        return f"{self.account_url}/{container}/{blob}"


def summarize(measured: dict[Any, Any]) -> dict[tuple[str, str, int], dict[str, Any]]:
    rows = {}
    for (direction, variant, threads), runs in measured["samples"].items():
        size = measured["sizes"][(variant, threads)]
        rows[(direction, variant, threads)] = {
            "mibps": stats([size / MiB / run.seconds for run in runs]),
            "cpu_per_gib": stats([run.cpu_seconds / (size / GiB) for run in runs]),
        }
    return rows


def report(rows: dict[tuple[str, str, int], dict[str, Any]], size: int, rounds: int, variants: list[str]) -> str:
    lines = []
    for direction in ("save", "load"):
        lines.append(
            f"{direction.upper()}: dcp.{direction} of a {size / MiB:.1f} MiB checkpoint, one process; "
            f"median [min-max] of {rounds} rounds"
        )
        lines.append(f"{'variant':<38} {'threads':>7} {'MiB/s':>24} {'CPU s/GiB':>20}")
        for variant in variants:
            label = VARIANTS[variant]
            for threads in THREAD_COUNTS:
                row = rows[(direction, variant, threads)]
                mibps, cpu = fmt_range(row["mibps"], 1), fmt_range(row["cpu_per_gib"], 2)
                lines.append(f"{label:<38} {threads:>7} {mibps:>24} {cpu:>20}")
        lines.append("")
    speed_target = {"save": 1.3, "load": 4.0}
    for direction in ("save", "load"):
        for threads in THREAD_COUNTS:
            if "blob" not in variants or "fsspec" not in variants:
                break
            ours, theirs = rows[(direction, "blob", threads)], rows[(direction, "fsspec", threads)]
            speed = ours["mibps"].median / theirs["mibps"].median
            cpu = ours["cpu_per_gib"].median / theirs["cpu_per_gib"].median
            met_speed = "met" if speed >= speed_target[direction] else "MISSED"
            met_cpu = "met" if cpu <= 0.5 else "MISSED"
            lines.append(
                f"target {direction} t={threads}: >= {speed_target[direction]}x fsspec MiB/s: {speed:.2f}x {met_speed};"
                f"  <= 0.5x its CPU/GiB: {cpu:.2f}x {met_cpu}"
            )
    for direction in ("save", "load"):
        for threads in THREAD_COUNTS:
            if "blob-zstd" not in variants or "local-zstd" not in variants:
                break
            ours = rows[(direction, "blob-zstd", threads)]["cpu_per_gib"].median
            local = rows[(direction, "local-zstd", threads)]["cpu_per_gib"].median
            met = "met" if ours <= local + 0.5 else "MISSED"
            lines.append(
                f"target {direction} t={threads} with ZStandard: CPU/GiB <= local disk's + 0.5: "
                f"{ours:.2f} vs {local:.2f} + 0.5 {met}"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mib", type=int, default=256, help="size of the state dict (default 256)")
    parser.add_argument("--rounds", type=int, default=3, help="measured rounds after one warm-up round")
    parser.add_argument(
        "--variants",
        type=lambda value: value.split(","),
        default=list(VARIANTS),
        help=f"comma-separated subset of {','.join(VARIANTS)} (default: all)",
    )
    parser.add_argument("--json", help="also write the results to this file")
    # Internal: the worker processes.
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--account-url", help=argparse.SUPPRESS)
    parser.add_argument("--local-dir", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    unknown = [variant for variant in args.variants if variant not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(VARIANTS)}")
    warnings.filterwarnings("ignore")  # torch: "no process group, saving in a single process"
    if args.worker:
        print(json.dumps(worker(args)))
        return 0
    info = machine_info(adlfs=package_version("adlfs"))
    print(format_machine(info), flush=True)
    measured = measure(args, lambda line: print(line, flush=True))
    info["loadavg_end"] = os.getloadavg()
    rows = summarize(measured)
    size = measured["sizes"][(args.variants[0], 1)]
    print("\n" + report(rows, size, args.rounds, args.variants))
    for (variant, threads), stored in measured["stored"].items():
        if variant.endswith("-zstd"):
            print(
                f"{variant} t={threads}: {stored / MiB:.1f} MiB stored for {measured['sizes'][(variant, threads)] / MiB:.1f} MiB of tensors"
            )
    for threads in THREAD_COUNTS:
        if "blob" in args.variants and "blob-unverified" in args.variants:
            verified = measured["samples"][("load", "blob", threads)]
            unverified = measured["samples"][("load", "blob-unverified", threads)]
            print(format_verification_cost(f"dcp.load t={threads}", verified, unverified))
    print(f"\nload average: start {info['loadavg_start'][0]:.2f}, end {info['loadavg_end'][0]:.2f} (1 min)")
    if args.json:
        with open(args.json, "w") as out:
            serial = {"/".join(map(str, key)): {k: v.__dict__ for k, v in row.items()} for key, row in rows.items()}
            json.dump({"machine": info, "rows": serial}, out, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
