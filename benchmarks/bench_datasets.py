#!/usr/bin/env python
"""Benchmark reading a data set of blobs through azstoragetorch's datasets and their alternatives.

Starts its own in-memory Azurite, uploads two data sets (default 2,000 blobs of 16 KiB and 200 blobs of 4 MiB)
into public-read containers and measures, interleaved in one run, reading every blob once through
``BlobDataset`` and ``IterableBlobDataset`` in a ``DataLoader`` (``num_workers`` 0 and 2), a serial
azure-storage-blob loop, and a "raw ceiling" of plain anonymous HTTP GETs from a thread pool. On the large data
set the datasets also run with the tensor path (a transform returning ``Blob.read_tensor()``) next to the default
``bytes`` sample.

    .venv/bin/python benchmarks/bench_datasets.py [--rounds 3] [--json out.json] [--quick]

See benchmarks/README.md for what the columns mean and how the measurements are taken.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import functools
import gc
import json
import multiprocessing
import os
import pathlib
import resource
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any

import torch
import torch.utils.data
from _common import ThreadConnections, format_machine, machine_info, obstore_store, write_result
from azure.storage.blob import BlobServiceClient, ContainerClient

from azstoragetorch import _cache
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset
from azstoragetorch.testing import Azurite

KiB = 1024
MiB = 1024**2
BATCH_SIZE = 32
WORKER_COUNTS = (0, 2)
RAW_CONCURRENCIES = (4, 8, 16, 32, 64)
UPLOAD_THREADS = 16
X_MS_VERSION = "2024-08-04"
FINGERPRINT_BYTES = 16  # bytes kept from each end of a blob to check that a read returned that blob
# The issues' targets: a dataset in a DataLoader should reach these fractions of the raw ceiling, by data
# set and num_workers. Small blobs: >= 0.9x for both dataset kinds at num_workers 0 and 2 (#14, section 4).
TARGETS = {("small", 0): 0.90, ("small", 2): 0.90, ("large", 0): 0.75, ("large", 2): 0.90}
# Issue #14 section 2, large samples: with num_workers=2 a dataset reaches this fraction of its own figure at
# num_workers=0; the tensor path at num_workers=0 reaches this fraction of the bytes path's.
WORKERS_VS_NONE_TARGET = 0.8
TENSOR_VS_BYTES_TARGET = 1.0
# The data sets on which the datasets also run with the tensor path.
TENSOR_DATA_SETS = ("large",)


class VerificationError(AssertionError):
    """A variant did not read every blob exactly once with the right bytes. Never caught: the run must fail."""


# -- the data sets -------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataSetSpec:
    key: str  # "small" or "large"; also the container's name
    count: int
    blob_size: int

    @property
    def total_bytes(self) -> int:
        return self.count * self.blob_size

    @property
    def description(self) -> str:
        size = f"{self.blob_size // MiB} MiB" if self.blob_size >= MiB else f"{self.blob_size // KiB} KiB"
        return f"{self.count:,} blobs x {size} ({self.total_bytes / MiB:,.1f} MiB)"


@dataclasses.dataclass(frozen=True)
class Fingerprint:
    """A blob's size and first and last bytes: enough to tell random-content blobs apart."""

    size: int
    head: bytes
    tail: bytes


def fingerprint(data: bytes | bytearray | memoryview) -> Fingerprint:
    return Fingerprint(len(data), bytes(data[:FINGERPRINT_BYTES]), bytes(data[-FINGERPRINT_BYTES:]))


@dataclasses.dataclass
class DataSet:
    """An uploaded data set: its container and what every blob must read back as."""

    spec: DataSetSpec
    container_url: str
    names: list[str]  # in name order, as listed
    expected: dict[str, Fingerprint]
    name_by_url: dict[str, str]

    @property
    def key(self) -> str:
        return self.spec.key


def upload(azurite: Azurite, service: BlobServiceClient, spec: DataSetSpec) -> DataSet:
    """Create a public-read container named after the data set and fill it with random blobs from a thread pool."""
    container = service.create_container(spec.key, public_access="container")  # anonymous reads for the raw GETs
    names = [f"{index:06d}.bin" for index in range(spec.count)]

    def put(name: str) -> Fingerprint:
        data = os.urandom(spec.blob_size)
        container.upload_blob(name, data, overwrite=True)
        return fingerprint(data)

    with concurrent.futures.ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        expected = dict(zip(names, pool.map(put, names), strict=True))
    name_by_url = {azurite.blob_url(spec.key, name): name for name in names}
    return DataSet(spec, azurite.container_url(spec.key), names, expected, name_by_url)


class Tally:
    """Counts what a variant read, blob by blob; :meth:`verify` raises unless it is every blob exactly once."""

    def __init__(self, data_set: DataSet, what: str) -> None:
        self._data_set = data_set
        self._what = what
        self._seen: dict[str, int] = {}
        self._wrong: list[str] = []
        self._unexpected: list[str] = []
        self.count = 0

    def add(self, name: str, got: Fingerprint) -> None:
        self.count += 1
        expected = self._data_set.expected.get(name)
        if expected is None:
            self._unexpected.append(name)
            return
        self._seen[name] = self._seen.get(name, 0) + 1
        if got != expected:
            self._wrong.append(f"{name} ({got.size} bytes, expected {expected.size}, or different content)")

    def add_sample(self, sample: dict[str, Any]) -> None:
        """A dataset sample, ``{"url": ..., "data": ...}``; the data is ``bytes`` or a uint8 tensor."""
        url = sample["url"]
        data = sample["data"]
        if isinstance(data, torch.Tensor):
            got = Fingerprint(
                data.numel(), data[:FINGERPRINT_BYTES].numpy().tobytes(), data[-FINGERPRINT_BYTES:].numpy().tobytes()
            )
        else:
            got = fingerprint(data)
        self.add(self._data_set.name_by_url.get(url, url), got)

    def verify(self) -> None:
        missing = [name for name in self._data_set.names if name not in self._seen]
        repeated = [name for name, times in self._seen.items() if times > 1]
        problems = [
            (what, names)
            for what, names in (
                ("missing", missing),
                ("read more than once", repeated),
                ("not in the data set", self._unexpected),
                ("wrong bytes", self._wrong),
            )
            if names
        ]
        if problems:
            detail = "; ".join(f"{len(names)} {what} (e.g. {', '.join(names[:3])})" for what, names in problems)
            raise VerificationError(f"{self._what} on {self._data_set.key}: {detail}")


# -- measuring -----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    seconds: float  # wall clock (perf_counter), everything after the dataset object is constructed
    cpu_self: float  # time.process_time() of this process (all threads, user+system)
    cpu_children: float  # getrusage(RUSAGE_CHILDREN) user+system: terminated, reaped children (DataLoader workers)
    first_batch_seconds: float | None = None  # from the start of the clock to the first batch (DataLoader variants)
    first_batch_samples: int = 0  # the samples in that batch
    last_batch_seconds: float | None = None  # from the start of the clock to the last batch, before workers shut down
    rss_start_mib: float | None = None  # VmRSS of this process when the clock starts (Linux)
    peak_rss_self_mib: float | None = None  # VmHWM of this process, reset before the measurement (Linux)
    peak_rss_workers_mib: float | None = None  # largest VmHWM of the DataLoader workers, read before they exit
    maxrss_self_mib: float = 0.0  # getrusage(RUSAGE_SELF).ru_maxrss after the measurement: run-wide high-water mark
    maxrss_children_mib: float = 0.0  # getrusage(RUSAGE_CHILDREN).ru_maxrss after it: largest reaped child so far
    listing_seconds: float | None = None  # from_container_url, before the clock (dataset variants only)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _maxrss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / KiB  # kilobytes on Linux


def _proc_status_mib(field: str, pid: int | str = "self") -> float | None:
    """A memory figure of /proc/<pid>/status (``VmRSS``, ``VmHWM`` = peak RSS) in MiB, or None where unavailable."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / KiB
    except (OSError, ValueError):
        pass
    return None


def _release_free_memory() -> None:
    """Hand freed heap memory back to the OS (glibc), so that one pass's garbage does not inflate the next one's RSS."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def _reset_peak_rss() -> bool:
    """Reset this process's VmHWM to its current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def live_children_cpu() -> float:
    """User + system seconds of this process's live multiprocessing children (persistent DataLoader workers), all
    their threads, from /proc/<pid>/stat; 0 where that is not readable."""
    total = 0
    for child in multiprocessing.active_children():
        try:
            with open(f"/proc/{child.pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of proc(5))
        except (OSError, ValueError, IndexError):
            pass
    return total / os.sysconf("SC_CLK_TCK")


def workers_peak_rss_mib() -> float | None:
    """The largest VmHWM among this process's live multiprocessing children (the DataLoader's workers)."""
    peaks = [
        _proc_status_mib("VmHWM", child.pid) for child in multiprocessing.active_children() if child.pid is not None
    ]
    return max((peak for peak in peaks if peak is not None), default=None)


class Meter:
    """``with Meter() as m: ...`` then ``m.sample``. Before the clock starts: collects garbage, returns free memory
    to the OS and resets the peak RSS."""

    sample: Sample
    first_batch_seconds: float | None = None
    first_batch_samples = 0
    last_batch_seconds: float | None = None
    peak_rss_workers_mib: float | None = None
    live_workers = False  # persistent workers: their CPU is read from /proc, since they are not reaped in the clock

    def __enter__(self) -> Meter:
        gc.collect()
        _release_free_memory()
        self._rss_start = _proc_status_mib("VmRSS")
        self._rss_reset = _reset_peak_rss()
        self._cpu_children = live_children_cpu() if self.live_workers else _children_cpu()
        self._cpu = time.process_time()
        self.start = time.perf_counter()
        return self

    def mark_batch(self, samples: int) -> None:
        self.last_batch_seconds = time.perf_counter() - self.start
        if self.first_batch_seconds is None:
            self.first_batch_seconds = self.last_batch_seconds
            self.first_batch_samples = samples

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        seconds = time.perf_counter() - self.start
        cpu = time.process_time() - self._cpu
        cpu_children = (live_children_cpu() if self.live_workers else _children_cpu()) - self._cpu_children
        self.sample = Sample(
            seconds,
            cpu,
            cpu_children,
            first_batch_seconds=self.first_batch_seconds,
            first_batch_samples=self.first_batch_samples,
            last_batch_seconds=self.last_batch_seconds,
            rss_start_mib=self._rss_start,
            peak_rss_self_mib=_proc_status_mib("VmHWM") if self._rss_reset else None,
            peak_rss_workers_mib=self.peak_rss_workers_mib,
            maxrss_self_mib=_maxrss_mib(resource.RUSAGE_SELF),
            maxrss_children_mib=_maxrss_mib(resource.RUSAGE_CHILDREN),
        )


# -- variants 1 and 2: the datasets in a DataLoader ----------------------------------------------------


def keep_list(batch: list[Any]) -> list[Any]:
    """The DataLoader's collate_fn: hand the batch over as the list of samples it is."""
    return batch


def read_with_loader(data_set: DataSet, dataset: torch.utils.data.Dataset[Any], num_workers: int, what: str) -> Sample:
    """Iterate a fresh DataLoader to the end, so that its workers exit (and count in RUSAGE_CHILDREN) in the clock."""
    tally = Tally(data_set, what)
    with Meter() as meter:
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=BATCH_SIZE, num_workers=num_workers, collate_fn=keep_list
        )
        iterate(loader, data_set, tally, meter)
        del loader
    tally.verify()
    return meter.sample


def read_second_epoch(data_set: DataSet, dataset: torch.utils.data.Dataset[Any], num_workers: int, what: str) -> Sample:
    """A DataLoader with persistent_workers=True: the first epoch (workers start, connections open) before the
    clock, the second in it; the workers shut down after it. What every epoch after the first costs a training run."""
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=BATCH_SIZE, num_workers=num_workers, collate_fn=keep_list, persistent_workers=True
    )
    first = Tally(data_set, f"{what}, epoch 1")
    iterate(loader, data_set, first)
    first.verify()
    tally = Tally(data_set, f"{what}, epoch 2")
    meter = Meter()
    meter.live_workers = True
    with meter:
        iterate(loader, data_set, tally, meter)
    del loader  # shuts the workers down, outside the clock
    tally.verify()
    return meter.sample


def iterate(
    loader: torch.utils.data.DataLoader[Any], data_set: DataSet, tally: Tally, meter: Meter | None = None
) -> None:
    for batch in loader:
        if meter is not None:
            meter.mark_batch(len(batch))
        for sample in batch:
            tally.add_sample(sample)
        if meter is not None and loader.num_workers and tally.count == data_set.spec.count:
            # Every sample has arrived; the workers exit (unless persistent) when the loop asks for the next batch.
            meter.peak_rss_workers_mib = workers_peak_rss_mib()
        del batch


def tensor_sample(blob: Blob) -> dict[str, Any]:
    """The tensor path: the default sample's shape, with the content as a uint8 tensor received in place."""
    return {"url": blob.url, "data": blob.read_tensor()}


def read_map_style(
    data_set: DataSet, azurite: Azurite, num_workers: int, tensors: bool = False, epoch2: bool = False
) -> Sample:
    start = time.perf_counter()
    dataset: BlobDataset[dict[str, Any]] = BlobDataset.from_container_url(
        data_set.container_url, credential=azurite.credential, transform=tensor_sample if tensors else None
    )
    listing = time.perf_counter() - start  # the map-style dataset lists when it is created: not in the clock
    what = f"BlobDataset{' (tensors)' if tensors else ''} num_workers={num_workers}"
    sample = (read_second_epoch if epoch2 else read_with_loader)(data_set, dataset, num_workers, what)
    return dataclasses.replace(sample, listing_seconds=listing)


def read_iterable(
    data_set: DataSet, azurite: Azurite, num_workers: int, tensors: bool = False, epoch2: bool = False
) -> Sample:
    start = time.perf_counter()
    dataset: IterableBlobDataset[dict[str, Any]] = IterableBlobDataset.from_container_url(
        data_set.container_url, credential=azurite.credential, transform=tensor_sample if tensors else None
    )
    listing = time.perf_counter() - start  # listed once, when created (the workers share it): not in the clock
    what = f"IterableBlobDataset{' (tensors)' if tensors else ''} num_workers={num_workers}"
    sample = (read_second_epoch if epoch2 else read_with_loader)(data_set, dataset, num_workers, what)
    return dataclasses.replace(sample, listing_seconds=listing)


# -- the local cache (cache_dir): epoch 2 against local files, epoch 1 against no cache ---------------------


class LocalFiles(torch.utils.data.Dataset[dict[str, Any]]):
    """The ceiling for a cached epoch: a plain Dataset reading the same samples from local files."""

    def __init__(self, paths: list[str], urls: list[str]) -> None:
        self.paths = paths
        self.urls = urls

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> dict[str, Any]:
        with open(self.paths[index], "rb") as file:
            return {"url": self.urls[index], "data": file.read()}


# Epoch 2: the cache filled beforehand (by one pass with the same URLs), hits trusted to the listing
# or confirmed by a conditional read; epoch 1: a new, empty cache directory every pass.
CACHE_VARIANTS = ("local_files", "epoch2_trusted", "epoch2_confirmed", "epoch1_no_cache", "epoch1_cache")
CACHE_TARGETS = {"epoch2_trusted": ("local_files", 0.9), "epoch1_cache": ("epoch1_no_cache", 0.9)}


def cache_comparison(
    data_sets: Sequence[DataSet], azurite: Azurite, rounds: int, log: Callable[[str], None]
) -> dict[str, dict[str, list[float]]]:
    """MiB/s per data set and variant (DataLoader num_workers=0 and 2), every pass verified."""
    results: dict[str, dict[str, list[float]]] = {}
    scratch = pathlib.Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        for data_set in data_sets:
            url = data_set.container_url
            local = scratch / f"{data_set.key}-local"
            local.mkdir()
            warm = scratch / f"{data_set.key}-warm"
            filler = BlobDataset.from_container_url(url, credential=azurite.credential, cache_dir=warm)
            urls = list(data_set.name_by_url)
            for index in range(len(filler)):  # the local copies and the warm cache, from one read
                sample = filler[index]
                (local / data_set.name_by_url[sample["url"]]).write_bytes(sample["data"])
            _cache.flush()  # stored in the background: on disk before any worker is forked
            paths = [str(local / data_set.name_by_url[u]) for u in urls]

            def make(
                variant: str,
                round_index: int,
                url: str = url,
                warm: pathlib.Path = warm,
                paths: list[str] = paths,
                urls: list[str] = urls,
                key: str = data_set.key,
            ) -> torch.utils.data.Dataset[Any]:
                if variant == "local_files":
                    return LocalFiles(paths, urls)
                if variant.startswith("epoch2"):
                    return BlobDataset.from_container_url(
                        url,
                        credential=azurite.credential,
                        cache_dir=warm,
                        cache_trust_listing=variant == "epoch2_trusted",
                    )
                cold = scratch / f"{key}-cold-{round_index}" if variant == "epoch1_cache" else None
                return BlobDataset.from_container_url(url, credential=azurite.credential, cache_dir=cold)

            cases = [(variant, workers) for variant in CACHE_VARIANTS for workers in WORKER_COUNTS]
            for round_index in range(rounds + 1):
                for variant, workers in rotate(cases, round_index):  # type: ignore[arg-type]
                    dataset = make(variant, round_index)
                    sample = read_with_loader(data_set, dataset, workers, f"{variant} num_workers={workers}")
                    # The stores still pending in this process (W = 0) count in the pass; a worker
                    # finishes its own before it exits, within the clock.
                    start = time.perf_counter()
                    _cache.flush()
                    seconds = sample.seconds + time.perf_counter() - start
                    shutil.rmtree(scratch / f"{data_set.key}-cold-{round_index}", ignore_errors=True)
                    mibps = data_set.spec.total_bytes / MiB / seconds
                    if round_index:
                        results.setdefault(data_set.key, {}).setdefault(f"{variant}_w{workers}", []).append(mibps)
                    log(f"cache {round_index or 'warm-up'}  {data_set.key}/{variant} w{workers}  {mibps:8.1f} MiB/s")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return results


def format_cache(results: dict[str, dict[str, list[float]]]) -> str:
    lines = ["Local cache (cache_dir=): MiB/s, median [low-high]; ratio of medians", ""]
    for key, variants in results.items():
        lines.append(f"{key}:")
        for workers in WORKER_COUNTS:
            for variant in CACHE_VARIANTS:
                values = variants[f"{variant}_w{workers}"]
                line = (
                    f"  w{workers} {variant:<18}{statistics.median(values):9.1f} [{min(values):.1f}-{max(values):.1f}]"
                )
                against = {"epoch2_confirmed": "local_files", **{k: v[0] for k, v in CACHE_TARGETS.items()}}
                if variant in against:
                    base = statistics.median(variants[f"{against[variant]}_w{workers}"])
                    ratio = statistics.median(values) / base
                    target = CACHE_TARGETS.get(variant)
                    verdict = (
                        f" (target >= {target[1]:.2f}: {'met' if ratio >= target[1] else 'MISSED'})" if target else ""
                    )
                    line += f"   {ratio:.2f}x {against[variant]}{verdict}"
                lines.append(line)
    return "\n".join(lines)


# -- variant 3: the serial azure-storage-blob loop -----------------------------------------------------


def read_sdk_serial(data_set: DataSet, container: ContainerClient) -> Sample:
    """``download_blob(name).readall()`` one blob after the other, the names known in advance."""
    tally = Tally(data_set, "SDK serial loop")
    with Meter() as meter:
        for name in data_set.names:
            data = container.download_blob(name).readall()
            tally.add(name, fingerprint(data))
            del data
    tally.verify()
    return meter.sample


# -- variant 4: raw HTTP ceiling -----------------------------------------------------------------------


def read_raw(data_set: DataSet, concurrency: int) -> Sample:
    """Anonymous whole-blob GETs (public container) from a pool of ``concurrency`` threads; no SDK, no torch."""
    tally = Tally(data_set, f"raw GET x{concurrency}")
    with Meter() as meter, ThreadConnections(data_set.container_url) as connections:

        def get(name: str) -> tuple[str, Fingerprint]:
            return name, fingerprint(_raw_get(connections, name))

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for name, got in pool.map(get, data_set.names):
                tally.add(name, got)
    tally.verify()
    return meter.sample


def _raw_get(connections: ThreadConnections, name: str, headers: dict[str, str] | None = None) -> bytes:
    """One ``http.client`` GET of blob ``name`` on this thread's keep-alive connection: anonymous, or
    with ``headers`` (pre-signed ones)."""
    connection = connections.get()
    connection.request("GET", f"{connections.path}/{name}", headers=headers or {"x-ms-version": X_MS_VERSION})
    response = connection.getresponse()
    data = response.read()
    if response.status not in (200, 206):
        raise RuntimeError(f"raw GET {name}: HTTP {response.status} {data[:300]!r}")
    return data


def presigned_headers(data_set: DataSet, azurite: Azurite) -> dict[str, dict[str, str]]:
    """For each blob, the headers of the request a dataset sends for its default sample (API version,
    User-Agent, client request ID, the ranged GET of the first 8 MiB, date, Shared Key signature),
    made by the product's own policies, before the clock."""
    from azure.core.pipeline import PipelineContext, PipelineRequest
    from azure.core.pipeline.transport import HttpRequest

    from azstoragetorch._client._credentials import SharedKeyPolicy
    from azstoragetorch._client._pipeline import _RequestHeadersPolicy
    from azstoragetorch.datasets import READ_ALL_BLOCK_SIZE

    tagging, signing = _RequestHeadersPolicy(), SharedKeyPolicy(azurite.credential)
    signed = {}
    for name in data_set.names:
        request = HttpRequest(
            "GET",
            f"{data_set.container_url}/{name}",
            headers={"x-ms-range": f"bytes=0-{READ_ALL_BLOCK_SIZE - 1}"},
        )
        pipeline_request = PipelineRequest(request, PipelineContext(None))
        tagging.on_request(pipeline_request)
        signing.on_request(pipeline_request)
        signed[name] = dict(request.headers)
    return signed


def read_raw_presigned(data_set: DataSet, azurite: Azurite, concurrency: int) -> Sample:
    """As :func:`read_raw`, but each GET carries the headers and Shared Key signature that the datasets'
    requests carry, computed before the clock: the service does what it does for a dataset's request, the
    client only what it does for an anonymous one."""
    headers = presigned_headers(data_set, azurite)
    tally = Tally(data_set, f"raw pre-signed GET x{concurrency}")
    with Meter() as meter, ThreadConnections(data_set.container_url) as connections:

        def get(name: str) -> tuple[str, Fingerprint]:
            return name, fingerprint(_raw_get(connections, name, headers[name]))

        with concurrent.futures.ThreadPoolExecutor(concurrency) as pool:
            for name, got in pool.map(get, data_set.names):
                tally.add(name, got)
    tally.verify()
    return meter.sample


# -- client CPU per request (small data set) -----------------------------------------------------------


def read_signed_serial(data_set: DataSet, azurite: Azurite) -> Sample:
    """``dataset[i]`` for every blob, one after the other in this thread: one signed GET each, so the process
    CPU per blob is the client's CPU per signed request (dataset indexing included)."""
    dataset: BlobDataset[dict[str, Any]] = BlobDataset.from_container_url(
        data_set.container_url, credential=azurite.credential
    )
    tally = Tally(data_set, "signed serial")
    with Meter() as meter:
        for index in range(len(dataset)):
            tally.add_sample(dataset[index])
    tally.verify()
    return meter.sample


def read_raw_serial(data_set: DataSet) -> Sample:
    """Anonymous ``http.client`` GETs one after the other on one keep-alive connection: a bare request's CPU."""
    tally = Tally(data_set, "raw serial")
    with Meter() as meter, ThreadConnections(data_set.container_url) as connections:
        for name in data_set.names:
            tally.add(name, fingerprint(_raw_get(connections, name)))
    tally.verify()
    return meter.sample


# -- client CPU per sample: ours beside http.client and obstore in the same DataLoader -----------------


class _PerProcess:
    """One client object per process: a forked DataLoader worker must not share its parent's sockets (or
    obstore's runtime), so each process makes its own on first use."""

    def __init__(self, make: Callable[[], Any]) -> None:
        self._make = make
        self._pid = -1
        self._value: Any = None

    def get(self) -> Any:
        if self._pid != os.getpid():
            self._value = self._make()
            self._pid = os.getpid()
        return self._value

    def __getstate__(self) -> dict[str, Any]:
        return {"_make": self._make, "_pid": -1, "_value": None}


class HttpClientDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """The ceiling a user could write: an anonymous ``http.client`` GET per sample on a keep-alive connection;
    the sample is ``bytes`` or, with ``tensors``, a uint8 tensor the body is read into."""

    def __init__(self, data_set: DataSet, tensors: bool = False) -> None:
        self.names = data_set.names
        self.urls = [f"{data_set.container_url}/{name}" for name in data_set.names]
        self.size = data_set.spec.blob_size
        self.tensors = tensors
        self._connections = _PerProcess(functools.partial(ThreadConnections, data_set.container_url))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        connections: ThreadConnections = self._connections.get()
        if not self.tensors:
            return {"url": self.urls[index], "data": _raw_get(connections, self.names[index])}
        connection = connections.get()
        connection.request("GET", f"{connections.path}/{self.names[index]}", headers={"x-ms-version": X_MS_VERSION})
        response = connection.getresponse()
        tensor = torch.empty(self.size, dtype=torch.uint8)
        view = memoryview(tensor.numpy())
        got = 0
        while got < self.size:
            count = response.readinto(view[got:])
            if not count:
                break
            got += count
        response.read()
        if response.status != 200 or got != self.size:
            raise RuntimeError(f"http.client GET {self.names[index]}: HTTP {response.status}, {got} bytes")
        return {"url": self.urls[index], "data": tensor}


class ObstoreDataset(torch.utils.data.Dataset[dict[str, Any]]):
    """obstore's ``get(...).bytes()`` per sample. In the main process the sample keeps obstore's ``Bytes``
    (no copy); a worker must hand over something picklable, so there it is copied to ``bytes``."""

    def __init__(self, data_set: DataSet, account_url: str, account_key: str) -> None:
        self.names = data_set.names
        self.urls = [f"{data_set.container_url}/{name}" for name in data_set.names]
        self._store = _PerProcess(functools.partial(obstore_store, account_url, data_set.key, account_key))

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        import obstore

        data: Any = obstore.get(self._store.get(), self.names[index]).bytes()
        if torch.utils.data.get_worker_info() is not None:
            data = bytes(data)
        return {"url": self.urls[index], "data": memoryview(data) if not isinstance(data, bytes) else data}


# Cases of the comparison: (data set, label, workers, how to make the dataset).
CPU_CASES: tuple[tuple[str, str, int], ...] = (
    ("small", "ours_map", 0),
    ("small", "ours_iter", 0),
    ("small", "http_client", 0),
    ("small", "obstore", 0),
    *(
        (data_set, variant, workers)
        for workers in (0, 2)
        for data_set, variant in (
            ("large", "ours_map"),
            ("large", "ours_map_tensor"),
            ("large", "http_client"),
            ("large", "http_client_tensor"),
            *((("large", "obstore"),) if workers == 0 else ()),
        )
    ),
    # What starting two workers costs (a pass over two samples), to give the marginal cost per sample.
    ("large", "ours_map_startup", 2),
)
CPU_LABELS = {
    "ours_map": "BlobDataset (default bytes sample)",
    "ours_iter": "IterableBlobDataset (default bytes sample)",
    "ours_map_tensor": "BlobDataset, read_tensor sample",
    "http_client": "http.client GET per sample (bytes)",
    "http_client_tensor": "http.client GET per sample, readinto a uint8 tensor",
    "obstore": "obstore get().bytes() per sample",
    "ours_map_startup": "BlobDataset, a pass over 2 samples (worker start-up)",
}
# obstore is left out of the forked-worker cases: once it has been used in the parent, a forked
# worker's first request did not complete here (its runtime's threads are not forked with it).


def make_cpu_dataset(variant: str, data_set: DataSet, azurite: Azurite) -> torch.utils.data.Dataset[Any]:
    if variant in ("ours_map", "ours_map_tensor", "ours_map_startup"):
        transform = tensor_sample if variant == "ours_map_tensor" else None
        return BlobDataset.from_container_url(
            data_set.container_url, credential=azurite.credential, transform=transform
        )
    if variant == "ours_iter":
        return IterableBlobDataset.from_container_url(data_set.container_url, credential=azurite.credential)
    if variant.startswith("http_client"):
        return HttpClientDataset(data_set, tensors=variant.endswith("tensor"))
    if variant == "obstore":
        return ObstoreDataset(data_set, azurite.account_url, azurite.credential.named_key.key)
    raise ValueError(f"unknown variant {variant!r}")


def cpu_per_sample_comparison(
    azurite: Azurite, service: BlobServiceClient, small: int, large: int, rounds: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Client CPU per sample (this process plus its reaped DataLoader workers) and samples/s, per case;
    a fresh DataLoader (persistent_workers off) per pass, so its workers exit and are reaped in the clock."""
    data_sets = {
        spec.key: upload(azurite, service, spec)
        for spec in (DataSetSpec("small", small, 16 * KiB), DataSetSpec("large", large, 4 * MiB))
    }
    results: dict[str, dict[str, Any]] = {}
    cases = [(data_sets[key], variant, workers) for key, variant, workers in CPU_CASES]
    for round_index in range(rounds + 1):
        for data_set, variant, workers in rotate_list(cases, round_index):
            dataset = make_cpu_dataset(variant, data_set, azurite)  # listing (ours) outside the clock
            if variant.endswith("_startup"):
                sample = read_startup(dataset, workers)
            else:
                sample = read_with_loader(data_set, dataset, workers, f"{variant} num_workers={workers}")
            del dataset
            gc.collect()
            key = f"{data_set.key}/{variant}/w{workers}"
            count = STARTUP_SAMPLES if variant.endswith("_startup") else data_set.spec.count
            cpu_ms = 1000 * (sample.cpu_self + sample.cpu_children) / count
            log(
                f"{'warm-up' if round_index == 0 else f'round {round_index}/{rounds}':>11}  {key:<32}"
                f" {count / sample.seconds:7.1f} samples/s  {cpu_ms:6.2f} ms CPU/sample"
                f" (self {sample.cpu_self:.2f} s, workers {sample.cpu_children:.2f} s)"
            )
            if round_index:
                entry = results.setdefault(
                    key, {"data_set": data_set.key, "variant": variant, "workers": workers, "samples": []}
                )
                entry["samples"].append(
                    {"seconds": sample.seconds, "cpu_self": sample.cpu_self, "cpu_workers": sample.cpu_children}
                )
    for entry in results.values():
        count = STARTUP_SAMPLES if entry["variant"].endswith("_startup") else data_sets[entry["data_set"]].spec.count
        entry["count"] = count
        entry["samples_per_s"] = statistics.median(count / s["seconds"] for s in entry["samples"])
        entry["cpu_ms_per_sample"] = statistics.median(
            1000 * (s["cpu_self"] + s["cpu_workers"]) / count for s in entry["samples"]
        )
        entry["cpu_ms_per_sample_range"] = [
            min(1000 * (s["cpu_self"] + s["cpu_workers"]) / count for s in entry["samples"]),
            max(1000 * (s["cpu_self"] + s["cpu_workers"]) / count for s in entry["samples"]),
        ]
    return results


STARTUP_SAMPLES = 2


def read_startup(dataset: torch.utils.data.Dataset[Any], workers: int) -> Sample:
    """A DataLoader pass over the first two samples only: the workers' start and exit, and little else."""
    subset = torch.utils.data.Subset(dataset, list(range(STARTUP_SAMPLES)))
    with Meter() as meter:
        loader = torch.utils.data.DataLoader(subset, batch_size=1, num_workers=workers, collate_fn=keep_list)
        count = sum(len(batch) for batch in loader)
        del loader
    if count != STARTUP_SAMPLES:
        raise VerificationError(f"start-up pass read {count} samples")
    return meter.sample


def rotate_list(items: Sequence[Any], by: int) -> list[Any]:
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def cpu_ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The issue's targets on CPU per sample: small ours <= obstore at workers 0; large at two workers <= 1.25x
    the same variant in-process."""

    def cpu(key: str) -> float | None:
        entry = results.get(key)
        return entry["cpu_ms_per_sample"] if entry else None

    ratios: dict[str, dict[str, Any]] = {}

    def ratio(name: str, over: str, under: str, target: float) -> None:
        top, bottom = cpu(over), cpu(under)
        value = top / bottom if top is not None and bottom else None
        ratios[name] = {
            "value": value,
            "compares": f"{over} / {under} (CPU ms per sample)",
            "target": f"<= {target}",
            "met": value is not None and value <= target,
        }

    ratio("small ours_map vs obstore, w0", "small/ours_map/w0", "small/obstore/w0", 1.0)
    ratio("small ours_iter vs obstore, w0", "small/ours_iter/w0", "small/obstore/w0", 1.0)
    ratio("small ours_map vs http.client, w0", "small/ours_map/w0", "small/http_client/w0", 1.0)
    for variant in ("ours_map", "ours_map_tensor", "http_client", "http_client_tensor"):
        ratio(f"large {variant}, w2 vs w0", f"large/{variant}/w2", f"large/{variant}/w0", 1.25)
    startup = results.get("large/ours_map_startup/w2")
    if startup is not None:
        start_ms = startup["cpu_ms_per_sample"] * STARTUP_SAMPLES
        for variant in ("ours_map", "ours_map_tensor", "http_client", "http_client_tensor"):
            w2, w0 = results.get(f"large/{variant}/w2"), results.get(f"large/{variant}/w0")
            if w2 is None or w0 is None:
                continue
            marginal = (w2["cpu_ms_per_sample"] * w2["count"] - start_ms) / (w2["count"] - STARTUP_SAMPLES)
            w2["cpu_ms_per_sample_marginal"] = marginal
            value = marginal / w0["cpu_ms_per_sample"]
            ratios[f"large {variant}, w2 marginal vs w0"] = {
                "value": value,
                "compares": f"(large/{variant}/w2 CPU - start-up CPU) per further sample / w0 per sample",
                "target": "<= 1.25",
                "met": value <= 1.25,
            }
    return ratios


def format_cpu_per_sample(results: dict[str, dict[str, Any]], ratios: dict[str, dict[str, Any]]) -> str:
    lines = [
        "Client CPU per sample (this process + reaped DataLoader workers), batch 32, fresh DataLoader per pass",
        f"{'data set':<7} {'variant':<54} {'W':>2} {'samples/s':>10} {'CPU ms/sample':>22}",
    ]
    for entry in results.values():
        low, high = entry["cpu_ms_per_sample_range"]
        lines.append(
            f"{entry['data_set']:<7} {CPU_LABELS[entry['variant']]:<54} {entry['workers']:>2}"
            f" {entry['samples_per_s']:>10.1f} {entry['cpu_ms_per_sample']:>8.2f} [{low:.2f}-{high:.2f}]"
        )
    lines.append("")
    for name, item in ratios.items():
        value = item["value"]
        shown = f"{value:.2f}" if value is not None else "n/a"
        lines.append(f"{name:<40} {shown:>6}  target {item['target']}: {'met' if item['met'] else 'MISSED'}")
    return "\n".join(lines)


# -- cases and the round-robin schedule ----------------------------------------------------------------


VARIANT_LABELS = {
    "map_w0": "BlobDataset, num_workers=0",
    "map_w2": "BlobDataset, num_workers=2",
    "iter_w0": "IterableBlobDataset, num_workers=0",
    "iter_w2": "IterableBlobDataset, num_workers=2",
    "map_tensor_w0": "BlobDataset, read_tensor, num_workers=0",
    "map_tensor_w2": "BlobDataset, read_tensor, num_workers=2",
    "iter_tensor_w0": "IterableBlobDataset, read_tensor, num_workers=0",
    "iter_tensor_w2": "IterableBlobDataset, read_tensor, num_workers=2",
    "map_tensor_w2_epoch2": "BlobDataset, read_tensor, num_workers=2, persistent, epoch 2",
    "iter_tensor_w2_epoch2": "IterableBlobDataset, read_tensor, num_workers=2, persistent, epoch 2",
    "sdk_serial": "SDK serial download_blob().readall()",
    "raw_get": "raw: http.client GET x c",
    "raw_presigned": "raw: pre-signed GET x c",
    "signed_serial": "signed serial: dataset[i] in a loop",
    "raw_serial": "raw serial: http.client GET in a loop",
}
# Client CPU per signed request (small blobs, one request at a time), the target (#14).
SIGNED_REQUEST_TARGET_MS = 0.35
DATASET_VARIANTS = {"map_w0": ("map", 0), "map_w2": ("map", 2), "iter_w0": ("iter", 0), "iter_w2": ("iter", 2)}
TENSOR_VARIANTS = {
    "map_tensor_w0": ("map", 0),
    "map_tensor_w2": ("map", 2),
    "iter_tensor_w0": ("iter", 0),
    "iter_tensor_w2": ("iter", 2),
}
KIND_LABELS = {"map": "BlobDataset", "iter": "IterableBlobDataset"}


@dataclasses.dataclass
class Case:
    key: str  # unique, e.g. "small/raw_get_c16"
    data_set: DataSet
    variant: str  # row in the table; the raw concurrencies share one, the best is shown
    run: Callable[[], Sample]
    concurrency: int | None = None
    samples: list[Sample] = dataclasses.field(default_factory=list)
    warmup: Sample | None = None


def build_cases(data_sets: Sequence[DataSet], azurite: Azurite, sdk: BlobServiceClient) -> list[Case]:
    def case(data_set: DataSet, variant: str, run: Callable[[], Sample], concurrency: int | None = None) -> Case:
        key = f"{data_set.key}/{variant}" + (f"_c{concurrency}" if concurrency else "")
        return Case(key, data_set, variant, run, concurrency)

    cases: list[Case] = []
    for data_set in data_sets:
        for workers in WORKER_COUNTS:
            cases.append(
                case(data_set, f"map_w{workers}", functools.partial(read_map_style, data_set, azurite, workers))
            )
            cases.append(
                case(data_set, f"iter_w{workers}", functools.partial(read_iterable, data_set, azurite, workers))
            )
            if data_set.key in TENSOR_DATA_SETS:
                for kind, read in (("map", read_map_style), ("iter", read_iterable)):
                    run = functools.partial(read, data_set, azurite, workers, tensors=True)
                    cases.append(case(data_set, f"{kind}_tensor_w{workers}", run))
                    if workers:
                        run = functools.partial(read, data_set, azurite, workers, tensors=True, epoch2=True)
                        cases.append(case(data_set, f"{kind}_tensor_w{workers}_epoch2", run))
        container = sdk.get_container_client(data_set.key)
        cases.append(case(data_set, "sdk_serial", functools.partial(read_sdk_serial, data_set, container)))
        for concurrency in RAW_CONCURRENCIES:
            cases.append(case(data_set, "raw_get", functools.partial(read_raw, data_set, concurrency), concurrency))
        if data_set.spec.blob_size <= 64 * KiB:
            for concurrency in RAW_CONCURRENCIES:
                run = functools.partial(read_raw_presigned, data_set, azurite, concurrency)
                cases.append(case(data_set, "raw_presigned", run, concurrency))
            cases.append(case(data_set, "signed_serial", functools.partial(read_signed_serial, data_set, azurite)))
            cases.append(case(data_set, "raw_serial", functools.partial(read_raw_serial, data_set)))
    return cases


def rotate(items: Sequence[Case], by: int) -> list[Case]:
    shift = by % len(items) if items else 0
    return [*items[shift:], *items[:shift]]


def run_rounds(data_sets: Sequence[DataSet], cases: list[Case], rounds: int, log: Callable[[str], None]) -> None:
    """Round 0 warms up every case; rounds 1..n are measured. Each round reads each data set with every case,
    in an order rotated by one position per round."""
    for round_index in range(rounds + 1):
        name = "warm-up" if round_index == 0 else f"round {round_index}/{rounds}"
        for data_set in data_sets:
            for case in rotate([c for c in cases if c.data_set is data_set], round_index):
                try:
                    sample = case.run()
                finally:
                    gc.collect()
                if round_index == 0:
                    case.warmup = sample
                else:
                    case.samples.append(sample)
                spec = data_set.spec
                log(
                    f"{name:>11}  {case.key:<18} {sample.seconds:7.3f} s  {spec.count / sample.seconds:8.0f} samples/s"
                    f"  {spec.total_bytes / MiB / sample.seconds:7.1f} MiB/s  cpu {sample.cpu_self:6.2f} s"
                    f" + workers {sample.cpu_children:5.2f} s"
                )


# -- summary -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Stats:
    median: float
    low: float
    high: float


def stats(values: Iterable[float | None]) -> Stats | None:
    present = [v for v in values if v is not None]
    return Stats(statistics.median(present), min(present), max(present)) if present else None


@dataclasses.dataclass
class Row:
    data_set: str
    variant: str
    label: str
    concurrency: int | None = None
    samples_per_s: Stats | None = None
    mibps: Stats | None = None  # 2^20 bytes per wall second
    first_batch_s: Stats | None = None
    steady_per_s: Stats | None = None  # samples/s from the first batch to the last (start-up and shut-down left out)
    cpu_self_s: Stats | None = None
    cpu_workers_s: Stats | None = None
    # Peak RSS (and for this process its growth over the RSS when the clock started); largest over the rounds.
    peak_rss_self_mib: float | None = None
    rss_growth_self_mib: float | None = None
    peak_rss_workers_mib: float | None = None
    ratios: dict[str, float | None] = dataclasses.field(default_factory=dict)


def case_row(case: Case) -> Row:
    spec = case.data_set.spec
    s = case.samples

    def largest(values: Iterable[float | None]) -> float | None:
        return max((v for v in values if v is not None), default=None)

    def growth(sample: Sample) -> float | None:
        if sample.peak_rss_self_mib is None or sample.rss_start_mib is None:
            return None
        return sample.peak_rss_self_mib - sample.rss_start_mib

    return Row(
        data_set=spec.key,
        variant=case.variant,
        label=VARIANT_LABELS[case.variant],
        concurrency=case.concurrency,
        samples_per_s=stats(spec.count / x.seconds for x in s),
        mibps=stats(spec.total_bytes / MiB / x.seconds for x in s),
        first_batch_s=stats(x.first_batch_seconds for x in s),
        steady_per_s=stats(steady_rate(spec.count, x) for x in s),
        cpu_self_s=stats(x.cpu_self for x in s),
        cpu_workers_s=stats(x.cpu_children for x in s),
        peak_rss_self_mib=largest(x.peak_rss_self_mib for x in s),
        peak_rss_workers_mib=largest(x.peak_rss_workers_mib for x in s),
        rss_growth_self_mib=largest(growth(x) for x in s),
    )


def steady_rate(count: int, sample: Sample) -> float | None:
    """Samples after the first batch over the seconds from the first batch to the last: the loader's rate once its
    workers are up, without start-up (before the first batch) and shut-down (after the last)."""
    first, last = sample.first_batch_seconds, sample.last_batch_seconds
    if first is None or last is None or last <= first:
        return None
    return (count - sample.first_batch_samples) / (last - first)


def summarize(data_sets: Sequence[DataSet], cases: list[Case]) -> list[Row]:
    result: list[Row] = []
    for data_set in data_sets:
        rows: dict[str, Row] = {}
        for case in cases:
            if case.data_set is not data_set or not case.samples:
                continue
            row = case_row(case)
            best = rows.get(case.variant)
            assert row.samples_per_s is not None
            if best is None or best.samples_per_s is None or row.samples_per_s.median > best.samples_per_s.median:
                rows[case.variant] = row  # raw: keep the best concurrency
        add_ratios(list(rows.values()))
        result.extend(rows.values())
    return result


def add_ratios(rows: list[Row]) -> None:
    speeds = {r.variant: r.samples_per_s.median for r in rows if r.samples_per_s is not None}
    for row in rows:
        if row.samples_per_s is None:
            continue
        here = row.samples_per_s.median
        row.ratios["vs_raw"] = here / speeds["raw_get"] if "raw_get" in speeds else None
        row.ratios["vs_sdk"] = here / speeds["sdk_serial"] if "sdk_serial" in speeds else None
        row.ratios["vs_presigned"] = here / speeds["raw_presigned"] if "raw_presigned" in speeds else None


@dataclasses.dataclass
class Target:
    data_set: str
    kind: str  # "map" or "iter"
    num_workers: int
    threshold: float
    ratio: float | None
    ratio_presigned: float | None = None  # shown beside it: over the pre-signed ceiling (small blobs)

    @property
    def met(self) -> bool:
        return self.ratio is not None and self.ratio >= self.threshold


def check_targets(rows: list[Row]) -> list[Target]:
    targets = []
    for row in rows:
        if row.variant in DATASET_VARIANTS:
            kind, workers = DATASET_VARIANTS[row.variant]
            threshold = TARGETS[(row.data_set, workers)]
            targets.append(
                Target(row.data_set, kind, workers, threshold, row.ratios.get("vs_raw"), row.ratios.get("vs_presigned"))
            )
    return targets


@dataclasses.dataclass
class RatioTarget:
    """A target that compares two rows of one data set (medians of samples/s): ``variant`` over ``baseline``."""

    data_set: str
    label: str
    variant: str
    baseline: str
    threshold: float | None  # None: shown for information only
    ratio: float | None

    @property
    def met(self) -> bool:
        return self.threshold is None or (self.ratio is not None and self.ratio >= self.threshold)


def check_large_sample_targets(rows: list[Row]) -> list[RatioTarget]:
    """Issue #14 section 2, on the data sets read with both paths."""
    speeds = {(r.data_set, r.variant): r.samples_per_s.median for r in rows if r.samples_per_s is not None}

    def target(data_set: str, label: str, variant: str, baseline: str, threshold: float | None) -> RatioTarget:
        over, under = speeds.get((data_set, variant)), speeds.get((data_set, baseline))
        ratio = over / under if over is not None and under else None
        return RatioTarget(data_set, label, variant, baseline, threshold, ratio)

    targets = []
    for data_set in TENSOR_DATA_SETS:
        for kind, name in KIND_LABELS.items():
            # The tensor path is judged on what a training run sees every epoch after the first (persistent
            # workers); its whole pass, which also pays for starting and stopping the workers, is shown beside it.
            label = f"{name}, read_tensor: num_workers=2 epoch 2 (persistent) / 0"
            variant, baseline = f"{kind}_tensor_w2_epoch2", f"{kind}_tensor_w0"
            targets.append(target(data_set, label, variant, baseline, WORKERS_VS_NONE_TARGET))
            label = f"{name}, read_tensor: num_workers=2 / 0, whole pass"
            targets.append(target(data_set, label, f"{kind}_tensor_w2", baseline, None))
            label = f"{name}, bytes: num_workers=2 / 0, whole pass"
            targets.append(target(data_set, label, f"{kind}_w2", f"{kind}_w0", WORKERS_VS_NONE_TARGET))
            for workers, threshold in ((0, TENSOR_VS_BYTES_TARGET), (2, None)):
                label = f"{name}, num_workers={workers}: read_tensor / bytes"
                targets.append(target(data_set, label, f"{kind}_tensor_w{workers}", f"{kind}_w{workers}", threshold))
    return targets


# -- report --------------------------------------------------------------------------------------------


def fmt_range(s: Stats | None, digits: int) -> str:
    if s is None:
        return "-"
    return f"{s.median:.{digits}f} [{s.low:.{digits}f}-{s.high:.{digits}f}]"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def fmt_rss(peak: float | None, growth: float | None = None) -> str:
    if peak is None:
        return "-"
    return f"{peak:.0f}" + ("" if growth is None else f" (+{max(growth, 0.0):.0f})")


def format_table(data_set: DataSet, rows: list[Row], cases: list[Case], rounds: int) -> str:
    spec = data_set.spec
    lines = [
        f"{spec.key.upper()}: {spec.description}, every blob read once per pass; median [min-max] of {rounds} rounds"
    ]
    header = [
        "variant",
        "samples/s",
        "MiB/s",
        "1st batch s",
        "steady samples/s",
        "CPU s self",
        "CPU s workers",
        "RSS MiB self",
        "RSS MiB workers",
        "vs raw",
        "vs pre-signed",
        "vs SDK",
    ]
    table = [header]
    for row in rows:
        label = row.label + (f" (c={row.concurrency})" if row.concurrency else "")
        table.append(
            [
                label,
                fmt_range(row.samples_per_s, 0),
                fmt_range(row.mibps, 1),
                fmt_range(row.first_batch_s, 2),
                fmt_range(row.steady_per_s, 0),
                fmt_range(row.cpu_self_s, 2),
                fmt_range(row.cpu_workers_s, 2) if "_w2" in row.variant else "-",
                fmt_rss(row.peak_rss_self_mib, row.rss_growth_self_mib),
                fmt_rss(row.peak_rss_workers_mib),
                fmt_ratio(row.ratios.get("vs_raw")),
                fmt_ratio(row.ratios.get("vs_presigned")),
                fmt_ratio(row.ratios.get("vs_sdk")),
            ]
        )
    widths = [max(len(line[i]) for line in table) + 3 for i in range(len(header))]
    for index, cells in enumerate(table):
        lines.append("".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("-" * (sum(widths) - 3))
    listing = stats(
        s.listing_seconds
        for c in cases
        if c.data_set is data_set and c.variant.startswith(("map", "iter"))
        for s in c.samples
        if s.listing_seconds is not None
    )
    lines.append(
        f"listing (from_container_url, when the dataset is created, before the clock): {fmt_range(listing, 3)} s"
    )
    for variant, what in (("raw_get", "raw ceiling"), ("raw_presigned", "pre-signed raw")):
        parts = []
        for case in cases:
            if case.data_set is data_set and case.variant == variant and case.samples:
                parts.append(f"c={case.concurrency}: {fmt_range(case_row(case).samples_per_s, 0)}")
        if parts:
            lines.append(f"{what} by concurrency (samples/s): " + "   ".join(parts))
    per_request = {
        case.variant: stats(1000 * s.cpu_self / len(data_set.names) for s in case.samples)
        for case in cases
        if case.data_set is data_set and case.variant in ("signed_serial", "raw_serial") and case.samples
    }
    if per_request:
        signed = per_request.get("signed_serial")
        verdict = "" if signed is None else (" pass" if signed.median <= SIGNED_REQUEST_TARGET_MS else " MISS")
        lines.append(
            f"client CPU ms per request, serial: signed {fmt_range(signed, 3)}, bare anonymous GET "
            f"{fmt_range(per_request.get('raw_serial'), 3)} (target signed <= {SIGNED_REQUEST_TARGET_MS} ms:{verdict})"
        )
    return "\n".join(lines)


def format_targets(targets: list[Target]) -> str:
    lines = ["Targets (dataset samples/s over the raw ceiling's, medians):"]
    for t in targets:
        verdict = "pass" if t.met else "MISS"
        label = f"{t.data_set:<6} {KIND_LABELS[t.kind]:<20} num_workers={t.num_workers}"
        presigned = "" if t.ratio_presigned is None else f"; {fmt_ratio(t.ratio_presigned)} of pre-signed raw"
        lines.append(f"  {verdict}  {label}  {fmt_ratio(t.ratio):>6} of raw (target >= {t.threshold:.2f}){presigned}")
    met = sum(t.met for t in targets)
    lines.append(f"  {met} of {len(targets)} targets met")
    return "\n".join(lines)


def format_large_sample_targets(targets: list[RatioTarget]) -> str:
    lines = ["Large samples through workers (issue #14 section 2; samples/s medians of the same run):"]
    for t in targets:
        verdict = "info" if t.threshold is None else ("pass" if t.met else "MISS")
        goal = "" if t.threshold is None else f" (target >= {t.threshold:.2f})"
        lines.append(f"  {verdict}  {t.data_set:<6} {t.label:<68} {fmt_ratio(t.ratio):>6}{goal}")
    scored = [t for t in targets if t.threshold is not None]
    lines.append(f"  {sum(t.met for t in scored)} of {len(scored)} targets met")
    return "\n".join(lines)


def format_high_water(cases: list[Case], children_before_mib: float) -> str:
    # Taken from the samples rather than now: Azurite has exited (and been reaped) since the last one.
    children_mib = max((s.maxrss_children_mib for c in cases for s in c.samples), default=children_before_mib)
    return (
        "getrusage ru_maxrss (high-water marks over the whole run, not per variant): this process "
        f"{_maxrss_mib(resource.RUSAGE_SELF):.0f} MiB; largest reaped child {children_mib:.0f} MiB "
        f"(before the first pass: {children_before_mib:.0f} MiB, from the git and azurite --version runs)"
    )


NOTES = """\
Each pass reads every blob of the data set once; verified after every pass (each blob exactly once, right size,
  right first and last 16 bytes), a mismatch stops the run.
samples/s = blobs / wall seconds; MiB/s = blob bytes / 2^20 / wall seconds. The clock starts after the dataset
  object is constructed and covers DataLoader creation, worker start-up and shut-down. Both datasets list the
  container once, when they are constructed (the workers share that listing): shown separately. The SDK loop
  and the raw GETs get the blob names before the clock.
1st batch s = from the start of the clock to the first batch in the main process. steady samples/s = samples after
  the first batch / seconds from the first batch to the last: the rate once workers are up, without start-up and
  shut-down. "persistent, epoch 2" rows: DataLoader(persistent_workers=True), the first epoch before the clock, the
  second in it (no worker start-up or shut-down, connections open; IterableBlobDataset keeps its listing); their
  CPU s workers is the workers' utime+stime from /proc/<pid>/stat over the epoch.
CPU s self = time.process_time() of this process per pass (all threads, user+system). CPU s workers =
  getrusage(RUSAGE_CHILDREN) user+system delta per pass: DataLoader workers, counted once they have exited and
  been reaped (each pass uses a fresh DataLoader, so they have). Azurite is a separate process, in neither.
RSS MiB self: peak (+growth over the RSS when the clock started) of this process: VmHWM, reset before each pass
  (/proc/self/clear_refs, after gc and malloc_trim). RSS MiB workers: largest VmHWM of the DataLoader workers, read
  when the last sample arrived (forked, they share the parent's pages). Both the largest over the measured rounds.
vs raw / vs SDK: samples/s over the best raw row's / the SDK serial loop's (medians). Dataset variants sign every
  request with the account key (HMAC); the raw GETs are anonymous.
vs pre-signed (small blobs): over the best "raw: pre-signed GET" row: http.client GETs carrying the very headers a
  dataset's request carries (client request ID, User-Agent, x-ms-range, x-ms-date, Shared Key signature), made by
  the product's own policies before the clock. The emulator then does the same work per request as for a dataset
  (checking a signature costs it CPU), while the client does no more than for an anonymous GET."""


# -- main ----------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, help="measured rounds after one warm-up (default 3; 1 with --quick)")
    parser.add_argument("--json", type=pathlib.Path, help="also write all samples and the summary here")
    parser.add_argument("--quick", action="store_true", help="smoke run: 500 small and 50 large blobs, 1 round")
    parser.add_argument("--quiet", action="store_true", help="no per-measurement progress on stderr")
    parser.add_argument(
        "--only", choices=("small", "large"), help="run one data set only (the tensor path runs on large)"
    )
    parser.add_argument("--cache-only", action="store_true", help="only the local cache comparison (cache_dir=)")
    parser.add_argument(
        "--cpu-per-sample",
        action="store_true",
        help="only the client CPU per sample of ours, http.client and obstore (written to benchmarks/results/)",
    )
    parser.add_argument("--small-count", type=int, default=1000, help="16 KiB blobs for --cpu-per-sample (1000)")
    parser.add_argument("--large-count", type=int, default=100, help="4 MiB blobs for --cpu-per-sample (100)")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        parser.error("--rounds must be positive")
    return args


def data_set_specs(quick: bool) -> list[DataSetSpec]:
    return [
        DataSetSpec("small", 500 if quick else 2000, 16 * KiB),
        DataSetSpec("large", 50 if quick else 200, 4 * MiB),
    ]


def to_json(
    info: dict[str, Any],
    args: argparse.Namespace,
    data_sets: Sequence[DataSet],
    cases: list[Case],
    rows: list[Row],
    targets: list[Target],
    large_sample_targets: list[RatioTarget],
) -> dict[str, Any]:
    return {
        "machine": info,
        "config": {
            "rounds": args.rounds,
            "quick": args.quick,
            "only": args.only,
            "data_sets": [dataclasses.asdict(d.spec) for d in data_sets],
            "batch_size": BATCH_SIZE,
            "worker_counts": WORKER_COUNTS,
            "raw_concurrencies": RAW_CONCURRENCIES,
            "units": {
                "mibps": "2^20 bytes per wall second",
                "cpu": "seconds per pass over the data set",
                "rss": "MiB (2^20 bytes)",
            },
        },
        "summary": [dataclasses.asdict(row) for row in rows],
        "targets": [{**dataclasses.asdict(t), "met": t.met} for t in targets],
        "large_sample_targets": [{**dataclasses.asdict(t), "met": t.met} for t in large_sample_targets],
        "cases": [
            {
                "key": c.key,
                "data_set": c.data_set.key,
                "variant": c.variant,
                "concurrency": c.concurrency,
                "warmup": dataclasses.asdict(c.warmup) if c.warmup else None,
                "samples": [dataclasses.asdict(s) for s in c.samples],
            }
            for c in cases
        ],
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        if not args.quiet:
            print(message, file=sys.stderr, flush=True)

    info = machine_info(**{"start method": multiprocessing.get_start_method()})
    children_before_mib = _maxrss_mib(resource.RUSAGE_CHILDREN)
    if args.cpu_per_sample:
        rounds = 2 if args.rounds == 3 and not args.quick else args.rounds
        with Azurite() as azurite, BlobServiceClient(azurite.account_url, credential=azurite.credential) as service:
            results = cpu_per_sample_comparison(azurite, service, args.small_count, args.large_count, rounds, log)
        info["loadavg_end"] = os.getloadavg()
        ratios = cpu_ratios(results)
        print(format_machine(info))
        print(format_cpu_per_sample(results, ratios))
        config = {"rounds": rounds, "small": [args.small_count, 16 * KiB], "large": [args.large_count, 4 * MiB]}
        config["batch_size"] = BATCH_SIZE
        print(f"\nwrote {write_result('datasets-cpu-per-sample', info, results, ratios, config=config)}")
        return 0
    with Azurite() as azurite, BlobServiceClient(azurite.account_url, credential=azurite.credential) as service:
        data_sets = []
        for spec in data_set_specs(args.quick):
            if args.only and spec.key != args.only:
                continue
            start = time.perf_counter()
            data_sets.append(upload(azurite, service, spec))
            log(f"uploaded {spec.key}: {spec.description} in {time.perf_counter() - start:.1f} s")
        cases = [] if args.cache_only else build_cases(data_sets, azurite, service)
        run_rounds(data_sets, cases, args.rounds, log)
        cache_results = cache_comparison(data_sets, azurite, args.rounds, log)
    info["loadavg_end"] = os.getloadavg()
    if args.cache_only:
        print(format_machine(info))
        print(f"{'data sets':<19}" + "; ".join(f"{d.key}: {d.spec.description}" for d in data_sets))
        print(format_cache(cache_results))
        if args.json:
            args.json.write_text(json.dumps({"machine": info, "cache": cache_results}, indent=2) + "\n")
        return 0
    rows = summarize(data_sets, cases)
    targets = check_targets(rows)
    large_sample_targets = check_large_sample_targets(rows) if any(d.key in TENSOR_DATA_SETS for d in data_sets) else []

    print(format_machine(info))
    print(f"{'data sets':<19}" + "; ".join(f"{d.key}: {d.spec.description}" for d in data_sets))
    print(f"{'DataLoader':<19}batch_size={BATCH_SIZE}, collate_fn=list passthrough, fresh DataLoader per pass")
    print()
    for data_set in data_sets:
        print(format_table(data_set, [r for r in rows if r.data_set == data_set.key], cases, args.rounds))
        print()
    print(format_targets(targets))
    print()
    if large_sample_targets:
        print(format_large_sample_targets(large_sample_targets))
        print()
    print(format_high_water(cases, children_before_mib))
    print()
    print(NOTES)
    print()
    print(format_cache(cache_results))
    if args.json:
        report = to_json(info, args, data_sets, cases, rows, targets, large_sample_targets) | {"cache": cache_results}
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
