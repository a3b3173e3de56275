#!/usr/bin/env python
"""What transfer statistics cost: the checkpoint and small-blob dataset workloads, with statistics on and off.

Starts its own in-memory Azurite and runs, interleaved round by round (on, off, off, on, ...):

- a checkpoint save (``torch.save`` into ``BlobIO``) and load (``torch.load`` from ``BlobIO``), as in
  bench_checkpoint.py's "azstoragetorch BlobIO" rows;
- a read of every blob of a small-blob data set (default 2,000 x 16 KiB) through ``BlobDataset`` in a
  ``DataLoader`` (``num_workers=0``, so all client CPU is this process's), as in bench_datasets.py.

"Off" replaces the counting (the pipeline's StatsPolicy, the byte, retry and blocked-time counters)
with no-ops in this process; "on" is the library as shipped. Reported: wall-clock throughput and
client CPU per GiB (``time.process_time``), median of the rounds, and the ratio on/off.

    .venv/bin/python benchmarks/bench_stats.py [--size-mib 256] [--blobs 2000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import os
import statistics
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.utils.data
from _common import Sample, Stopwatch, format_machine, machine_info, make_state_dict, verify
from azure.storage.blob import BlobServiceClient

from azstoragetorch._client import _stats
from azstoragetorch.datasets import BlobDataset
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite

KiB, MiB, GiB = 1024, 1024**2, 1024**3


@contextlib.contextmanager
def statistics_off() -> Iterator[None]:
    """Counting replaced by no-ops: what the library would cost without statistics."""
    saved = (_stats.StatsPolicy.send, _stats.add_bytes, _stats.add_retry, _stats.Recorder.add_blocked)

    def send(self: Any, request: Any) -> Any:
        request.context.options.pop(_stats.OPTION, None)
        return self.next.send(request)

    _stats.StatsPolicy.send = send  # type: ignore[method-assign]
    _stats.add_bytes = lambda recorder, count: None  # type: ignore[assignment]
    _stats.add_retry = lambda recorder, reason: None  # type: ignore[assignment]
    _stats.Recorder.add_blocked = lambda self, seconds: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        (_stats.StatsPolicy.send, _stats.add_bytes, _stats.add_retry, _stats.Recorder.add_blocked) = saved  # type: ignore[method-assign,assignment]


def save(url: str, credential: Any, state_dict: dict[str, torch.Tensor]) -> Sample:
    with Stopwatch() as watch, BlobIO(url, "wb", credential=credential) as f:
        torch.save(state_dict, f)
    return watch.sample


def load(url: str, credential: Any, state_dict: dict[str, torch.Tensor]) -> Sample:
    with Stopwatch() as watch, BlobIO(url, "rb", credential=credential) as f:
        loaded = torch.load(f)
    verify(loaded, state_dict, "load")
    return watch.sample


def read_dataset(container_url: str, count: int) -> Sample:
    dataset = BlobDataset.from_container_url(container_url, credential=False)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=0, collate_fn=lambda batch: batch)
    seen = 0
    with Stopwatch() as watch:
        for batch in loader:
            seen += len(batch)
    if seen != count:
        raise AssertionError(f"the dataset read {seen} blobs, not {count}")
    return watch.sample


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--blobs", type=int, default=2000)
    parser.add_argument("--blob-kib", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    state_dict = make_state_dict(args.size_mib)
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    checkpoint_bytes = len(buffer.getvalue())
    dataset_bytes = args.blobs * args.blob_kib * KiB
    info = machine_info()
    with Azurite() as azurite:
        credential = azurite.credential
        service = BlobServiceClient.from_connection_string(azurite.connection_string)
        service.create_container("checkpoints")
        small = service.create_container("small", public_access="container")
        payload = os.urandom(args.blob_kib * KiB)
        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            list(pool.map(lambda i: small.upload_blob(f"b{i:06d}", payload), range(args.blobs)))
        url = azurite.container_url("checkpoints") + "/model.pt"
        workloads: dict[str, tuple[Callable[[], Sample], int]] = {
            "checkpoint save": (lambda: save(url, credential, state_dict), checkpoint_bytes),
            "checkpoint load": (lambda: load(url, credential, state_dict), checkpoint_bytes),
            "small-blob dataset": (lambda: read_dataset(azurite.container_url("small"), args.blobs), dataset_bytes),
        }
        samples: dict[tuple[str, bool], list[Sample]] = {}
        for round_index in range(args.rounds + 1):  # round 0 warms up
            order = (True, False) if round_index % 2 else (False, True)
            for name, (run, _) in workloads.items():
                for on in order:
                    with contextlib.nullcontext() if on else statistics_off():
                        sample = run()
                    if round_index:
                        samples.setdefault((name, on), []).append(sample)
                    print(f"round {round_index} {name} stats {'on' if on else 'off'}: {sample}", file=sys.stderr)
    info["loadavg_end"] = os.getloadavg()
    print(format_machine(info))
    print()
    print(f"{'workload':<20}{'stats':<7}{'MiB/s':>10}{'CPU s/GiB':>11}   {'on/off MiB/s':>13}{'on/off CPU':>12}")
    for name, (_, size) in workloads.items():
        medians = {}
        for on in (True, False):
            taken = samples[(name, on)]
            rate = statistics.median(size / MiB / sample.seconds for sample in taken)
            cpu = statistics.median(sample.cpu_seconds / (size / GiB) for sample in taken)
            medians[on] = (rate, cpu)
        for on in (False, True):
            rate, cpu = medians[on]
            ratios = (
                f"{medians[True][0] / medians[False][0]:>13.3f}{medians[True][1] / medians[False][1]:>12.3f}"
                if on
                else ""
            )
            print(f"{name:<20}{'on' if on else 'off':<7}{rate:>10.1f}{cpu:>11.2f}   {ratios}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
