"""How many blobs a dataset holds in how little memory, and what forked DataLoader workers pay for it.

Side by side in one run: the datasets' compact store (names in one buffer, properties in arrays,
``Blob`` objects made on access) against one ``Blob`` object per entry, which is how the datasets
held their blobs before (the "objects" rows build exactly that list). Four parts:

1. ``from_blob_urls`` over synthetic URLs (no service): entries per second and bytes per entry.
2. Copy-on-write: 4 forked processes (as DataLoader workers are) each touch every entry once; the
   growth of their unique memory (USS, from ``/proc/<pid>/smaps_rollup``), summed, against one copy.
3. A container listed from Azurite (started here, in memory): the same figures for listed entries.
4. ``IterableBlobDataset`` with 4 DataLoader workers: an epoch in which every worker lists the
   container (what ``from_container_url`` did before it listed once, when created) against
   ``from_container_url``'s listing, which the workers inherit.

Nothing here is a pass/fail test; the targets are printed next to the figures.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import json
import os
import pathlib
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch.utils.data

from azstoragetorch._client import AzStorageTorchBlobClient, AzStorageTorchContainerClient, BlobUrl, ContainerUrl
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import format_machine, machine_info

WORKERS = 4
upload_seconds: list[float] = []


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synthetic_urls(count: int) -> list[str]:
    # Names shaped like ImageNet's: train/<class>/<class>_<n>.JPEG, 1,000 classes.
    return [
        f"https://acct.blob.core.windows.net/imagenet/train/n{index % 1000:08d}/n{index % 1000:08d}_{index}.JPEG"
        for index in range(count)
    ]


def objects_from_urls(urls: Sequence[str]) -> list[Blob]:
    """The representation the datasets used before: one Blob (client, parsed URL) per entry."""
    return [Blob(AzStorageTorchBlobClient(BlobUrl.parse(url), False)) for url in urls]


def objects_from_listing(container_url: str, credential: Any) -> list[Blob]:
    client = AzStorageTorchContainerClient(ContainerUrl.parse(container_url), credential)
    return [Blob(listed.client, listed.properties) for listed in client.list_blobs() if not listed.is_directory]


def timed(build: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU seconds of ``build`` (CPU time moves less than wall time on a loaded machine)."""
    gc.collect()
    start, cpu_start = time.perf_counter(), time.process_time()
    built = build()
    return time.perf_counter() - start, time.process_time() - cpu_start, built


def held_bytes(build: Callable[[], Any]) -> tuple[int, Any]:
    """Bytes still allocated (tracemalloc) once ``build`` returned and garbage was collected."""
    gc.collect()
    tracemalloc.start()
    try:
        built = build()
        gc.collect()
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return held, built


def unique_kib(pid: int | str = "self") -> int:
    """USS: the pages only this process has (private clean + private dirty), in KiB."""
    fields = {}
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                fields[parts[0].rstrip(":")] = int(parts[1])
    return fields["Private_Clean"] + fields["Private_Dirty"]


def copy_on_write_growth(touch: Callable[[], None]) -> list[int]:
    """Fork WORKERS processes at once; each touches every entry; return each one's USS growth (KiB)."""
    children = []
    for _ in range(WORKERS):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            before = unique_kib()
            touch()
            after = unique_kib()
            os.write(write_end, str(after - before).encode())
            os._exit(0)
        os.close(write_end)
        children.append((pid, read_end))
    growth = []
    for pid, read_end in children:
        with os.fdopen(read_end) as pipe:
            growth.append(int(pipe.read() or "-1"))
        os.waitpid(pid, 0)
    return growth


def touch_every(blobs: Sequence[Blob], *, properties: bool, first: int | None = None) -> Callable[[], None]:
    """Make every entry's ``Blob`` and read its name (and size); with ``first``, as many accesses, but
    only to the first ``first`` entries, over and over: the same work, on a sliver of the shared pages."""

    def touch() -> None:
        span = len(blobs) if first is None else min(first, len(blobs))
        for access in range(len(blobs)):
            blob = blobs[access % span]
            blob.blob_name  # noqa: B018  (touching is the point)
            if properties:
                blob.size  # noqa: B018

    return touch


# The work control's span: entries a fork touches over and over, doing as many accesses as the real run.
WORK_CONTROL_ENTRIES = 1000


def measure_representations(
    label: str, builders: dict[str, Callable[[], Sequence[Blob]]], count: int, *, properties: bool
) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, build in builders.items():
        log(f"{label}: {name}: building {count:,} entries")
        seconds, cpu_seconds, blobs = timed(build)
        del blobs
        held, blobs = held_bytes(build)
        # What a fork grows by anyway (its stack, the interpreter's own writes): subtracted.
        control = copy_on_write_growth(lambda: None)
        # What a fork grows by doing the same work without reaching most of the entries (the memory the
        # interpreter's allocator takes for the objects made and freed on the way): shown as a second net.
        work_control = copy_on_write_growth(touch_every(blobs, properties=properties, first=WORK_CONTROL_ENTRIES))
        growth = copy_on_write_growth(touch_every(blobs, properties=properties))
        one_copy_kib = held / 1024
        results[name] = {
            "entries": count,
            "seconds": seconds,
            "entries_per_second": count / seconds,
            "cpu_seconds": cpu_seconds,
            "entries_per_cpu_second": count / cpu_seconds,
            "bytes_per_entry": held / count,
            "cow_growth_kib": growth,
            "cow_control_kib": control,
            "cow_growth_of_one_copy": (sum(growth) - sum(control)) / one_copy_kib,
            "cow_work_control_kib": work_control,
            "cow_growth_net_of_work_of_one_copy": (sum(growth) - sum(work_control)) / one_copy_kib,
        }
        log(f"{label}: {name}: {json.dumps(results[name])}")
        del blobs
        gc.collect()
    return results


def blobs_of(dataset: BlobDataset[Any]) -> Sequence[Blob]:
    return dataset._blobs


def synthetic_part(count: int, objects_count: int) -> dict[str, Any]:
    urls = synthetic_urls(count)
    compact = measure_representations(
        "from_blob_urls",
        {"compact": lambda: blobs_of(BlobDataset.from_blob_urls(urls, credential=False))},
        count,
        properties=False,
    )
    old_urls = urls[:objects_count]
    objects = measure_representations(
        "from_blob_urls", {"objects": lambda: objects_from_urls(old_urls)}, objects_count, properties=False
    )
    return {**compact, **objects}


def upload_container(count: int) -> tuple[Any, str]:
    from azure.storage.blob import BlobServiceClient

    from azstoragetorch.testing import Azurite

    azurite = Azurite()
    azurite.__enter__()
    service = BlobServiceClient(azurite.account_url, credential=azurite.credential)
    container = service.create_container("listed")
    names = [f"train/n{index % 1000:08d}/n{index % 1000:08d}_{index}.JPEG" for index in range(count)]
    log(f"uploading {count:,} blobs of 16 bytes to Azurite")
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        for _ in pool.map(lambda name: container.upload_blob(name, b"x" * 16), names, chunksize=64):
            pass
    log(f"uploaded in {time.perf_counter() - start:.0f} s")
    upload_seconds.append(time.perf_counter() - start)
    return azurite, azurite.container_url("listed")


def name_only(blob: Blob) -> str:
    return blob.blob_name


class ListedOnIteration:
    """The blobs of a container, listed each time they are iterated: in every DataLoader worker, as
    ``IterableBlobDataset.from_container_url`` did before it listed when created."""

    def __init__(self, container_url: str, credential: Any) -> None:
        self.container_url = container_url
        self.credential = credential

    def __iter__(self) -> Iterator[Blob]:
        return iter(blobs_of(BlobDataset.from_container_url(self.container_url, credential=self.credential)))


def epoch_seconds(dataset: IterableBlobDataset[Any]) -> tuple[float, int]:
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS)
    start = time.perf_counter()
    seen = sum(1 for _ in loader)
    return time.perf_counter() - start, seen


def listed_part(count: int) -> dict[str, Any]:
    azurite, container_url = upload_container(count)
    try:
        credential = azurite.credential
        results = measure_representations(
            "from_container_url",
            {
                "compact": lambda: blobs_of(BlobDataset.from_container_url(container_url, credential=credential)),
                "objects": lambda: objects_from_listing(container_url, credential),
            },
            count,
            properties=True,
        )
        log("IterableBlobDataset, 4 workers: every worker lists (as before listing moved to creation)")
        each_lists = IterableBlobDataset(ListedOnIteration(container_url, credential), transform=name_only)
        each_seconds, each_seen = epoch_seconds(each_lists)
        log("IterableBlobDataset, 4 workers: from_container_url lists once, the workers inherit it")
        list_start = time.perf_counter()
        listed_once = IterableBlobDataset.from_container_url(container_url, credential=credential, transform=name_only)
        list_seconds = time.perf_counter() - list_start
        once_seconds, once_seen = epoch_seconds(listed_once)
        results["upload_seconds"] = upload_seconds[-1]
        results["iterable_workers"] = {
            "every_worker_lists_seconds": each_seconds,
            "list_once_seconds": list_seconds,
            "inherited_epoch_seconds": once_seconds,
            "samples": [each_seen, once_seen],
        }
        return results
    finally:
        azurite.__exit__(None, None, None)


def report(results: dict[str, Any]) -> None:
    print(format_machine(results["machine"]))
    for part in ("from_blob_urls", "from_container_url"):
        if part not in results:
            continue
        print(f"\n{part}:")
        print(
            f"  {'store':8} {'entries':>10} {'entries/s':>11} {'per CPU s':>11} {'B/entry':>8} {'4 forks touch all: USS growth (net)':>58}"
        )
        for name in ("compact", "objects"):
            row = results[part][name]
            net = (sum(row["cow_growth_kib"]) - sum(row["cow_control_kib"])) / 1024
            growth = (
                f"{net:.1f} MiB = {100 * row['cow_growth_of_one_copy']:.1f}% of a copy "
                f"({100 * row['cow_growth_net_of_work_of_one_copy']:.1f}% net of the work)"
            )
            print(
                f"  {name:8} {row['entries']:>10,} {row['entries_per_second']:>11,.0f} {row['entries_per_cpu_second']:>11,.0f} "
                f"{row['bytes_per_entry']:>8.0f} {growth:>58}"
            )
    if "from_container_url" in results:
        it = results["from_container_url"]["iterable_workers"]
        print(
            f"\nIterableBlobDataset, {WORKERS} workers, one epoch of names: every worker lists "
            f"{it['every_worker_lists_seconds']:.1f} s; from_container_url lists once {it['list_once_seconds']:.1f} s + "
            f"epoch with the inherited listing {it['inherited_epoch_seconds']:.1f} s (samples {it['samples']})"
        )
    print(
        "\ntargets: <= 100 B/entry at 1 M entries; >= 1 M entries/s from a URL list; "
        "4 forked workers touching every entry grow by <= 10% of one copy"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--count", type=int, default=1_000_000, help="synthetic URLs (default 1,000,000)")
    parser.add_argument(
        "--objects-count", type=int, default=200_000, help="entries for the one-object-per-blob rows (default 200,000)"
    )
    parser.add_argument(
        "--listed", type=int, default=100_000, help="blobs to upload and list (default 100,000; 0: skip)"
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 50,000 URLs, 5,000 listed blobs")
    parser.add_argument("--json", type=pathlib.Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.quick:
        args.count, args.objects_count, args.listed = 50_000, 50_000, 5_000
    results: dict[str, Any] = {"machine": machine_info()}
    results["from_blob_urls"] = synthetic_part(args.count, min(args.objects_count, args.count))
    if args.listed:
        results["from_container_url"] = listed_part(args.listed)
    report(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
