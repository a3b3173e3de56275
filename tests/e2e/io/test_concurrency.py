"""Reads and writes under a perturbed thread schedule, every byte compared.

A quiet machine runs transfer threads in one comfortable order; a loaded training machine does not.
These tests install :mod:`azstoragetorch._client._schedule`'s perturbation, which sleeps a random short
time at every hand-off point (a chunk picked, bytes copied out, a buffer released, a part finished),
and check that nothing the reader sees ever differs from the blob. Each test prints its seeds: set
``AZSTORAGETORCH_FUZZ_SEEDS`` (comma-separated) to replay them.
"""

from __future__ import annotations

import os
import random
import threading

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import HttpResponseError

from azstoragetorch._client import _schedule
from azstoragetorch.io import BlobIO
from tests.conftest import Container
from tests.e2e.support.fault_proxy import Delay, FaultProxy, Respond

MiB = 1024 * 1024


def _seeds(default: list[int]) -> list[int]:
    chosen = os.environ.get("AZSTORAGETORCH_FUZZ_SEEDS")
    return [int(seed) for seed in chosen.split(",")] if chosen else default


def _random_operations(
    reader: BlobIO, expected: bytes, chooser: random.Random, operations: int, *, block_size: int
) -> None:
    """Random seeks, reads and readintos through ``reader``, each result compared with ``expected``."""
    size = len(expected)
    position = 0
    for step in range(operations):
        kind = chooser.random()
        if kind < 0.35:  # a jump anywhere, as torch.load does to the zip directory and back
            position = chooser.randrange(0, size + 1)
            assert reader.seek(position) == position
        elif kind < 0.45:
            position = max(0, position - chooser.randrange(0, 2 * block_size))
            reader.seek(position)
        length = chooser.choice(
            [1, 7, 100, 4096, block_size // 2, block_size - 1, block_size, block_size + 1, 3 * block_size]
        )
        if chooser.random() < 0.5:
            got = reader.read(length)
        else:
            target = bytearray(length)
            got = bytes(target[: reader.readinto(target)])
        want = expected[position : position + length]
        assert got == want, f"step {step}: {length} bytes at {position} differ"
        position += len(want)
        assert reader.tell() == position


@pytest.mark.parametrize(("block_size", "max_concurrency"), [(MiB, 2), (MiB, 4), (2 * MiB, 3)])
def test_random_reads_under_a_perturbed_schedule_return_the_blobs_bytes(
    container: Container, account_credential: AzureNamedKeyCredential, block_size: int, max_concurrency: int
) -> None:
    data = random.Random(block_size + max_concurrency).randbytes(14 * MiB + 12345)
    url = container.upload("fuzz.bin", data)
    for seed in _seeds([11, 23, 37]):
        print(f"perturbation seed {seed}, block_size {block_size}, max_concurrency {max_concurrency}")
        with (
            _schedule.perturbed(seed, max_delay=0.04, probability=0.3) as perturbation,
            BlobIO(
                url, "rb", credential=account_credential, block_size=block_size, max_concurrency=max_concurrency
            ) as reader,
        ):
            _random_operations(reader, data, random.Random(seed), 250, block_size=block_size)
        assert perturbation.counts.get("chunk.copy", 0) > 0  # the perturbation reached the reader


def test_concurrent_readers_and_a_writer_never_see_each_others_buffers(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    """Transfer buffers come from one process-wide pool: two readers and a writer share it."""
    blobs = {name: random.Random(name).randbytes(9 * MiB + 777) for name in ("a.bin", "b.bin")}
    urls = {name: container.upload(name, data) for name, data in blobs.items()}
    written = random.Random(5).randbytes(7 * MiB + 3)
    failures: list[BaseException] = []

    def read(name: str, seed: int) -> None:
        try:
            with BlobIO(urls[name], "rb", credential=account_credential, block_size=MiB, max_concurrency=3) as reader:
                _random_operations(reader, blobs[name], random.Random(seed), 150, block_size=MiB)
        except BaseException as error:
            failures.append(error)

    def write() -> None:
        try:
            with BlobIO(
                container.blob_url("w.bin"), "wb", credential=account_credential, block_size=MiB, max_concurrency=3
            ) as writer:
                for start in range(0, len(written), 300_000):
                    writer.write(written[start : start + 300_000])
        except BaseException as error:
            failures.append(error)

    for seed in _seeds([101, 202]):
        print(f"perturbation seed {seed}")
        with _schedule.perturbed(seed, max_delay=0.01):
            threads = [threading.Thread(target=read, args=(name, seed + i)) for i, name in enumerate(blobs)]
            threads.append(threading.Thread(target=write))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        assert not failures, failures
        assert container.download("w.bin") == written


def test_a_failed_range_of_a_large_read_leaves_the_callers_buffer_alone_afterwards(
    container: Container, account_credential: AzureNamedKeyCredential, proxy: FaultProxy
) -> None:
    """torch.load reads tensors straight into their storage; a failed read must not keep writing there."""
    data = random.Random(3).randbytes(10 * MiB)
    url = proxy.url(container.upload("guard.bin", data))
    with BlobIO(url, "rb", credential=account_credential, block_size=MiB, max_concurrency=4) as reader:
        reader.seek(2 * MiB)  # past the first chunk: what follows is one direct parallel read
        ranges_from = lambda first: lambda seen: bool(seen.byte_range and seen.byte_range[0] == first)  # noqa: E731
        proxy.add_fault(ranges_from(2 * MiB), Respond(403, "AuthorizationPermissionMismatch"), times=None)
        for first in (3 * MiB, 4 * MiB, 5 * MiB):
            proxy.add_fault(ranges_from(first), Delay(0.5), times=None)
        guard = bytearray(8 * MiB)
        with pytest.raises(HttpResponseError):
            reader.readinto(guard)
        seen_when_raised = bytes(guard)
        threading.Event().wait(1.5)  # longer than the delayed ranges take to arrive
        assert bytes(guard) == seen_when_raised
