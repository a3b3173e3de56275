"""Train-style data loading from Blob Storage with BlobDataset and IterableBlobDataset, against Azurite.

It needs no Azure account and nothing from the network. The script:

1. starts a local Azurite emulator and uploads 200 small samples (a tensor and a label each, written
   with :func:`torch.save`) under ``train/``, plus a few under ``val/`` that the prefix leaves out;
2. reads them with a map-style :class:`~azstoragetorch.datasets.BlobDataset` whose transform loads
   each blob with :func:`torch.load` through ``Blob.reader()``, in a DataLoader with a batch size of 16
   and two workers;
3. iterates an :class:`~azstoragetorch.datasets.IterableBlobDataset` with ``shuffle=True`` for two
   epochs, calling ``set_epoch`` before each;
4. interrupts an epoch of a torchdata ``StatefulDataLoader`` after a few batches, saves its state,
   and resumes with a new loader over a new dataset.

Every step checks that each sample arrives exactly once; any mismatch exits with status 1. It ends
with ``datasets example OK``. Run it from the repository root:
``.venv/bin/python examples/datasets_example.py``.

The transforms are module-level functions so that they also pickle into DataLoader workers started
with ``spawn`` or ``forkserver``.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, NoReturn

import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite

CONTAINER = "datasets"
TRAIN_SAMPLES = 200
VAL_SAMPLES = 10
FEATURES = 8
BATCH_SIZE = 16
WORKERS = 2
SEED = 1234
BATCHES_BEFORE_INTERRUPTION = 5


def load_sample(blob: Blob) -> tuple[torch.Tensor, int]:
    """The transform: one blob holds ``{"x": <tensor>, "label": <int>}`` written by ``torch.save``."""
    with blob.reader() as f:
        record = torch.load(f)
    return record["x"], record["label"]


def blob_size(blob: Blob) -> int:
    """A transform that reads nothing: a listed blob already knows its size."""
    return blob.size


def fail(message: str) -> NoReturn:
    raise SystemExit(f"datasets example FAILED: {message}")


def check_exactly_once(labels: list[int], what: str) -> None:
    if sorted(labels) != list(range(TRAIN_SAMPLES)):
        missing = sorted(set(range(TRAIN_SAMPLES)) - set(labels))
        fail(f"{what}: expected each of the {TRAIN_SAMPLES} samples once, got {len(labels)} (missing {missing[:10]}).")


def labels_of(batches: list[Any]) -> list[int]:
    return [int(label) for _, labels in batches for label in labels]


def upload_samples(container_url: str, credential: AzureNamedKeyCredential) -> None:
    generator = torch.Generator().manual_seed(0)
    for split, count in (("train", TRAIN_SAMPLES), ("val", VAL_SAMPLES)):
        for label in range(count):
            record = {"x": torch.randn(FEATURES, generator=generator), "label": label}
            with BlobIO(f"{container_url}/{split}/sample-{label:04d}.pt", "wb", credential=credential) as f:
                torch.save(record, f)


def map_style(container_url: str, credential: AzureNamedKeyCredential) -> None:
    # One listing request (the container holds far fewer than 5,000 blobs), made right here.
    dataset = BlobDataset.from_container_url(
        container_url, prefix="train/", credential=credential, transform=load_sample
    )
    if len(dataset) != TRAIN_SAMPLES:
        fail(f"BlobDataset listed {len(dataset)} blobs under train/, expected {TRAIN_SAMPLES}.")

    sizes = BlobDataset.from_container_url(container_url, prefix="train/", credential=credential, transform=blob_size)
    total_bytes = sum(sizes[index] for index in range(len(sizes)))

    loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=WORKERS, shuffle=True)
    batches = list(loader)
    expected_batches = -(-TRAIN_SAMPLES // BATCH_SIZE)
    if len(batches) != expected_batches:
        fail(f"the DataLoader over BlobDataset gave {len(batches)} batches, expected {expected_batches}.")
    features, labels = batches[0]
    if features.shape != (BATCH_SIZE, FEATURES) or labels.shape != (BATCH_SIZE,):
        fail(f"unexpected batch shapes {tuple(features.shape)} and {tuple(labels.shape)}.")
    check_exactly_once(labels_of(batches), "BlobDataset")
    print(
        f"BlobDataset: {len(dataset)} blobs ({total_bytes:,} bytes, sizes from the listing), "
        f"{len(batches)} batches of up to {BATCH_SIZE} from {WORKERS} workers, each sample once"
    )


def iterable_dataset(container_url: str, credential: AzureNamedKeyCredential) -> IterableBlobDataset[Any]:
    # Nothing is listed yet: each DataLoader worker lists the container when it starts iterating.
    return IterableBlobDataset.from_container_url(
        container_url, prefix="train/", credential=credential, transform=load_sample, shuffle=True, seed=SEED
    )


def iterable_style(container_url: str, credential: AzureNamedKeyCredential) -> list[int]:
    """Two shuffled epochs; returns the order of epoch 0."""
    dataset = iterable_dataset(container_url, credential)
    loader = DataLoader(dataset, batch_size=BATCH_SIZE, num_workers=WORKERS)
    orders: list[list[int]] = []
    for epoch in range(2):
        dataset.set_epoch(epoch)  # before creating the epoch's iterator, which starts the workers
        orders.append(labels_of(list(loader)))
        check_exactly_once(orders[-1], f"IterableBlobDataset epoch {epoch}")
    if orders[0] == orders[1]:
        fail("epochs 0 and 1 came in the same order; set_epoch should change it.")
    dataset.set_epoch(0)
    if labels_of(list(loader)) != orders[0]:
        fail("epoch 0 repeated with the same seed came in a different order.")
    print(
        f"IterableBlobDataset: 2 shuffled epochs of {TRAIN_SAMPLES}, each sample once per epoch; "
        f"epoch 0 starts {orders[0][:5]}, epoch 1 starts {orders[1][:5]}; epoch 0 repeats exactly"
    )
    return orders[0]


def resume_mid_epoch(container_url: str, credential: AzureNamedKeyCredential, uninterrupted: list[int]) -> None:
    loader = StatefulDataLoader(iterable_dataset(container_url, credential), batch_size=BATCH_SIZE, num_workers=WORKERS)
    before: list[Any] = []
    for batch in loader:
        before.append(batch)
        if len(before) == BATCHES_BEFORE_INTERRUPTION:
            break
    state = loader.state_dict()  # what a training loop saves with its checkpoint
    del loader  # the "crash": its workers go away

    resumed = StatefulDataLoader(
        iterable_dataset(container_url, credential), batch_size=BATCH_SIZE, num_workers=WORKERS
    )
    resumed.load_state_dict(state)
    after = list(resumed)

    order = labels_of(before) + labels_of(after)
    check_exactly_once(order, "StatefulDataLoader resume")
    if order != uninterrupted:
        fail("the interrupted and resumed epoch differs from the same epoch run without interruption.")
    print(
        f"StatefulDataLoader: {len(labels_of(before))} samples before the interruption, "
        f"{len(labels_of(after))} after resuming; none repeated or skipped, same order as without interruption"
    )


def main() -> None:
    # torchdata 0.11 calls a torch function that recent torch releases deprecate; the warning is noise here.
    warnings.filterwarnings("ignore", message="'set_vital' is deprecated", category=UserWarning)
    started = time.perf_counter()
    with Azurite() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container(CONTAINER)
        container_url = azurite.container_url(CONTAINER)
        upload_samples(container_url, azurite.credential)
        print(f"Uploaded {TRAIN_SAMPLES} samples under train/ and {VAL_SAMPLES} under val/ to {container_url}")

        map_style(container_url, azurite.credential)
        uninterrupted = iterable_style(container_url, azurite.credential)
        resume_mid_epoch(container_url, azurite.credential, uninterrupted)
    print(f"Finished in {time.perf_counter() - started:.1f} s")
    print("datasets example OK")


if __name__ == "__main__":
    main()
