#!/usr/bin/env python
"""Where the client's CPU goes: one operation against its own Azurite, with the process's (and its reaped
DataLoader workers') user and system CPU, page faults and context switches, for a sampling profiler to
record.

    .venv/bin/python benchmarks/profile_cpu.py dataset --variant ours_map --workers 2 --count 100
    .venv/bin/python benchmarks/profile_cpu.py save --size-mib 256
    py-spy record --subprocesses -r 200 -f raw -o out.txt -- .venv/bin/python benchmarks/profile_cpu.py ...

``dataset`` reads ``--count`` blobs of ``--size-kib`` through the variant of bench_datasets.py's CPU
comparison; ``handover`` has a DataLoader hand over samples made in memory (``--variant bytes`` or
``tensor``), with no network, so that its transport's own cost shows; ``save`` and ``load`` run ``torch.save`` / ``torch.load`` of bench_checkpoint.py's state dict
through ``BlobIO`` (``--via local`` to a file, ``--via obstore`` to memory and ``obstore.put``).
The operation starts after the blobs are in place and, with ``--wait-for-signal``, only once the process
gets SIGUSR1, so that a profiler attached to it records the operation alone.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.utils.data
from _common import make_state_dict, obstore_store
from azure.storage.blob import BlobServiceClient

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, Azurite

KiB = 1024
MiB = 1024**2


def usage() -> dict[str, float]:
    figures: dict[str, float] = {}
    for who, name in ((resource.RUSAGE_SELF, "self"), (resource.RUSAGE_CHILDREN, "children")):
        u = resource.getrusage(who)
        figures |= {
            f"{name}_user_s": u.ru_utime,
            f"{name}_sys_s": u.ru_stime,
            f"{name}_minflt": u.ru_minflt,
            f"{name}_majflt": u.ru_majflt,
            f"{name}_nvcsw": u.ru_nvcsw,
            f"{name}_nivcsw": u.ru_nivcsw,
        }
    return figures


def delta(before: dict[str, float], after: dict[str, float], per: int) -> dict[str, float]:
    return {key: (after[key] - before[key]) / per for key in before}


def run_dataset(azurite: Azurite, args: argparse.Namespace) -> tuple[int, Any]:
    import bench_datasets as bd

    service = BlobServiceClient(azurite.account_url, credential=azurite.credential)
    spec = bd.DataSetSpec("profile", args.count, args.size_kib * KiB)
    data_set = bd.upload(azurite, service, spec)
    dataset = bd.make_cpu_dataset(args.variant, data_set, azurite)

    def operation() -> None:
        tally = bd.Tally(data_set, args.variant)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=bd.BATCH_SIZE, num_workers=args.workers, collate_fn=bd.keep_list
        )
        bd.iterate(loader, data_set, tally)
        del loader  # the workers exit and are reaped here, so their usage counts in RUSAGE_CHILDREN
        tally.verify()

    return args.count, operation


class _Constant(torch.utils.data.Dataset[Any]):
    """Samples made in memory, no network: what a DataLoader's hand-over of a sample costs by itself."""

    def __init__(self, count: int, size: int, kind: str) -> None:
        self.count, self.size, self.kind = count, size, kind
        self.payload = os.urandom(size)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> Any:
        if self.kind == "bytes":  # a new bytes object per sample, as a GET's body is
            return bytes(bytearray(self.payload))
        tensor = torch.empty(self.size, dtype=torch.uint8)
        tensor.numpy()[:] = memoryview(self.payload)
        return tensor


def run_handover(azurite: Azurite, args: argparse.Namespace) -> tuple[int, Any]:
    dataset = _Constant(args.count, args.size_kib * KiB, args.variant)

    def operation() -> None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=args.workers, collate_fn=list)
        for batch in loader:
            for sample in batch:  # touch every page, as a consumer would
                memoryview(sample.numpy() if isinstance(sample, torch.Tensor) else sample)[::4096].tobytes()
        del loader

    return args.count, operation


def run_checkpoint(azurite: Azurite, args: argparse.Namespace) -> tuple[int, Any]:
    import obstore

    state_dict = make_state_dict(args.size_mib, args.tensor_mib)
    service = BlobServiceClient(azurite.account_url, credential=azurite.credential)
    service.create_container("bench")
    url = azurite.blob_url("bench", "ckpt.pt")
    local = tempfile.mkdtemp(prefix="profile-cpu-")
    path = os.path.join(local, "archive.pt")
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    size = len(buffer.getvalue())
    store = obstore_store(azurite.account_url, "bench", ACCOUNT_KEY)
    if args.command == "load":
        with BlobIO(url, "wb", credential=azurite.credential) as f:
            f.write(buffer.getbuffer())
        with open(path, "wb") as file:
            file.write(buffer.getbuffer())

    def operation() -> None:
        if args.command == "save":
            if args.via == "blobio":
                with BlobIO(url, "wb", credential=azurite.credential) as f:
                    torch.save(state_dict, f)
            elif args.via == "local":
                torch.save(state_dict, path)
            elif args.via == "obstore":
                memory = io.BytesIO()
                torch.save(state_dict, memory)
                obstore.put(store, "ckpt.pt", memory.getbuffer())
            elif args.via == "memory":
                torch.save(state_dict, io.BytesIO())
        else:
            if args.via == "blobio":
                with BlobIO(url, "rb", credential=azurite.credential) as f:
                    torch.load(f)
            elif args.via == "local":
                torch.load(path)

    return size, operation


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("command", choices=("dataset", "handover", "save", "load"))
    parser.add_argument("--variant", default="ours_map", help="a bench_datasets CPU-comparison variant")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--size-kib", type=int, default=4096)
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--tensor-mib", type=int, default=4)
    parser.add_argument("--via", choices=("blobio", "local", "obstore", "memory"), default="blobio")
    parser.add_argument("--repeat", type=int, default=1, help="run the operation this many times")
    parser.add_argument("--wait-for-signal", action="store_true", help="start the operation on SIGUSR1")
    args = parser.parse_args(argv)
    if args.wait_for_signal:
        # Blocked before any thread starts, so that every thread inherits the mask and sigwait gets it.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    with Azurite() as azurite:
        run = {"dataset": run_dataset, "handover": run_handover}.get(args.command, run_checkpoint)
        units, operation = run(azurite, args)
        operation()  # warm-up: imports, connections, first allocations
        if args.wait_for_signal:
            print(f"ready {os.getpid()}", file=sys.stderr, flush=True)
            signal.sigwait({signal.SIGUSR1})
        before, wall = usage(), time.perf_counter()
        for _ in range(args.repeat):
            operation()
        seconds = time.perf_counter() - wall
        after = usage()
    per = units * args.repeat
    figures = delta(before, after, per if args.command in ("dataset", "handover") else 1)
    if args.command not in ("dataset", "handover"):
        gib = per / 1024**3
        figures = {k: v / gib for k, v in figures.items()}
    print(json.dumps({"command": args.command, "args": vars(args), "seconds": seconds, "per": per, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
