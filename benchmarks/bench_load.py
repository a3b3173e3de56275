#!/usr/bin/env python
"""Load: large and many transfers at once, with their peak memory and a check that no byte was lost.

Starts its own Azurite (keeping blobs on disk, since gigabytes would crowd an in-memory emulator) and runs,
each scenario in a worker process of its own so that its peak memory is its own:

- ``dataset``: 20,000 blobs of 1 KiB through ``IterableBlobDataset`` and ``BlobDataset`` with 4 DataLoader
  workers; every sample must come exactly once, with the right bytes;
- ``blobio``: a 2 GiB blob written through ``BlobIO`` in 64 MiB writes and read back (``verify_checksum=True``),
  with the process's peak resident memory, which must stay bounded by the transfer windows, not the size;
- ``writers``: 32 ``BlobIO`` writers at once in threads, 16 MiB each; every blob must read back intact;
- ``dcp``: ``dcp.save`` and ``dcp.load`` of a 1 GiB state dict, compared tensor by tensor.

    .venv/bin/python benchmarks/bench_load.py [--scenario all|dataset|blobio|writers|dcp] [--json out.json]

Every scenario reports "data lost": the number of bytes, blobs or samples that did not come back exactly as
written. It must be 0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import resource
import time
import zlib
from collections import Counter
from collections.abc import Sequence
from typing import Any

from _common import format_machine, machine_info, run_benchmark_worker, worker_connection_string

MiB = 1024**2
GiB = 1024**3
SCENARIOS = ("dataset", "blobio", "writers", "dcp")


def peak_rss_mib() -> float:
    """This process's high-water mark of resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def children_peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def credential() -> Any:
    from azure.core.credentials import AzureNamedKeyCredential

    from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

    return AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)


def container(args: argparse.Namespace, name: str) -> str:
    from azure.storage.blob import BlobServiceClient

    BlobServiceClient.from_connection_string(worker_connection_string()).create_container(name)
    return f"{args.account_url}/{name}"


# -- scenarios (each in a worker process) ------------------------------------------------------------


def scenario_dataset(args: argparse.Namespace) -> dict[str, Any]:
    import torch.utils.data

    from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
    from azstoragetorch.io import BlobIO

    url = container(args, "many")
    count = args.blobs

    def put(index: int) -> None:
        with BlobIO(f"{url}/s/{index:06d}", "wb", credential=credential()) as writer:
            writer.write(index.to_bytes(8, "little") * 128)  # 1 KiB that says which sample it is

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        list(pool.map(put, range(count)))
    upload_seconds = time.perf_counter() - start
    results: dict[str, Any] = {"blobs": count, "upload_seconds": upload_seconds}
    for kind in (IterableBlobDataset, BlobDataset):
        start = time.perf_counter()
        dataset = kind.from_container_url(url, prefix="s/", credential=credential(), transform=sample_id)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=4)
        seen = Counter(int(index) for batch in loader for index in batch)
        seconds = time.perf_counter() - start
        lost = sum(1 for index in range(count) if seen[index] != 1) + sum(1 for index in seen if index >= count)
        results[kind.__name__] = {"seconds": seconds, "samples_per_second": count / seconds, "data_lost": lost}
    results["peak_rss_mib"] = peak_rss_mib()
    results["workers_peak_rss_mib"] = children_peak_rss_mib()
    return results


def sample_id(blob: Any) -> int:
    """The dataset transform: read the blob and check that all of it names the same sample."""
    with blob.reader() as reader:
        data = reader.read()
    index = int.from_bytes(data[:8], "little")
    return index if data == index.to_bytes(8, "little") * 128 else -1


def scenario_blobio(args: argparse.Namespace) -> dict[str, Any]:
    from azstoragetorch.io import BlobIO

    url = container(args, "big") + "/two-gib.bin"
    chunk = bytearray(os.urandom(64 * MiB))
    baseline = peak_rss_mib()
    written_crc = 0
    start = time.perf_counter()
    with BlobIO(url, "wb", credential=credential()) as writer:
        for index in range(args.size_gib * GiB // len(chunk)):
            chunk[:8] = index.to_bytes(8, "little")  # every 64 MiB differs
            writer.write(chunk)
            written_crc = zlib.crc32(chunk, written_crc)
    write_seconds = time.perf_counter() - start
    write_peak = peak_rss_mib()
    size = args.size_gib * GiB

    read_crc = 0
    start = time.perf_counter()
    with BlobIO(url, "rb", credential=credential(), verify_checksum=True) as reader:
        while piece := reader.read(64 * MiB):
            read_crc = zlib.crc32(piece, read_crc)
    read_seconds = time.perf_counter() - start
    return {
        "size_gib": args.size_gib,
        "write_mib_per_second": size / MiB / write_seconds,
        "read_mib_per_second": size / MiB / read_seconds,
        "baseline_peak_rss_mib": baseline,
        "write_peak_rss_mib": write_peak,
        "read_peak_rss_mib": peak_rss_mib(),
        "window_mib": (8 + 1) * 8,  # (max_concurrency + 1) * block_size with the defaults
        "data_lost": 0 if read_crc == written_crc else size,
    }


def scenario_writers(args: argparse.Namespace) -> dict[str, Any]:
    from azstoragetorch.io import BlobIO

    url = container(args, "writers")
    size = 16 * MiB
    # Each writer repeats a 3 MiB piece of its own (writes that do not line up with blocks), made
    # before the baseline so that the growth of the peak is what the writers held, not the test data.
    pieces = [bytes([index]) * 3 * MiB for index in range(args.writers)]
    baseline = peak_rss_mib()

    def write(index: int) -> int:
        crc = 0
        with BlobIO(f"{url}/w{index:02d}", "wb", credential=credential()) as writer:
            for start in range(0, size, 3 * MiB):
                piece = memoryview(pieces[index])[: min(3 * MiB, size - start)]
                writer.write(piece)
                crc = zlib.crc32(piece, crc)
        return crc

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.writers) as pool:
        crcs = list(pool.map(write, range(args.writers)))
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    lost = 0
    for index, crc in enumerate(crcs):
        with BlobIO(f"{url}/w{index:02d}", "rb", credential=credential(), verify_checksum=True) as reader:
            lost += 0 if zlib.crc32(reader.read()) == crc else 1
    return {
        "writers": args.writers,
        "mib_each": size // MiB,
        "mib_per_second": args.writers * size / MiB / seconds,
        "baseline_peak_rss_mib": baseline,
        "peak_rss_mib": peak,
        "data_lost": lost,
    }


def scenario_dcp(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed.checkpoint as dcp

    from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter

    url = container(args, "dcp") + "/one-gib"
    generator = torch.Generator().manual_seed(0)
    state = {f"layer{index}": torch.randn(1024, 1024, generator=generator) for index in range(256)}  # 1 GiB
    size = sum(tensor.numel() * 4 for tensor in state.values())
    target = {name: torch.zeros_like(tensor) for name, tensor in state.items()}  # touched: resident now
    baseline = peak_rss_mib()
    start = time.perf_counter()
    dcp.save(state, storage_writer=BlobStorageWriter(url, credential=credential(), thread_count=4))
    save_seconds = time.perf_counter() - start
    save_peak = peak_rss_mib()
    start = time.perf_counter()
    dcp.load(target, storage_reader=BlobStorageReader(url, credential=credential(), verify_checksum=True))
    load_seconds = time.perf_counter() - start
    lost = sum(1 for name, tensor in state.items() if not torch.equal(target[name], tensor))
    return {
        "size_gib": size / GiB,
        "save_mib_per_second": size / MiB / save_seconds,
        "load_mib_per_second": size / MiB / load_seconds,
        "baseline_peak_rss_mib": baseline,
        "save_peak_rss_mib": save_peak,
        "load_peak_rss_mib": peak_rss_mib(),
        "data_lost": lost,
    }


# -- the coordinator ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, scenario: str) -> dict[str, Any]:
    from azstoragetorch.testing import Azurite

    arguments = ["--worker", scenario, "--blobs", str(args.blobs), "--size-gib", str(args.size_gib)]
    arguments += ["--writers", str(args.writers)]
    with Azurite(in_memory=False) as azurite:
        arguments += ["--account-url", azurite.account_url]
        report: dict[str, Any] = run_benchmark_worker(
            __file__, arguments, connection_string=azurite.connection_string, timeout=3600, what=scenario
        )
    return report


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=("all", *SCENARIOS), default="all")
    parser.add_argument("--blobs", type=int, default=20_000, help="blobs in the dataset scenario")
    parser.add_argument("--size-gib", type=int, default=2, help="size of the BlobIO scenario's blob")
    parser.add_argument("--writers", type=int, default=32, help="concurrent writers")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--account-url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        work = {
            "dataset": scenario_dataset,
            "blobio": scenario_blobio,
            "writers": scenario_writers,
            "dcp": scenario_dcp,
        }
        print(json.dumps(work[args.worker](args)))
        return 0
    info = machine_info()
    print(format_machine(info), flush=True)
    results = {}
    for scenario in SCENARIOS if args.scenario == "all" else (args.scenario,):
        print(f"\n{scenario} ...", flush=True)
        results[scenario] = run(args, scenario)
        print(json.dumps(results[scenario], indent=2), flush=True)
    info["loadavg_end"] = os.getloadavg()
    lost = sum(
        value.get("data_lost", 0)
        for result in results.values()
        for value in [result, *result.values()]
        if isinstance(value, dict)
    )
    print(f"\ndata lost over all scenarios: {lost}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": info, "results": results}, out, indent=2)
    return 1 if lost else 0


if __name__ == "__main__":
    raise SystemExit(main())
