"""BlobDataset, IterableBlobDataset and Blob against Azurite: listing, reading, loaders, ranks, resuming, errors.

Shared data lives in module-scoped containers, uploaded once: ``data`` (a few small blobs under
``train/`` and ``val/``), ``tensors`` (tensors saved with ``torch.save``) and ``many`` (6,000 tiny
blobs, more than one page of List Blobs). Transforms used by DataLoader workers are top-level
functions so that spawned workers can import them.
"""

from __future__ import annotations

import array
import datetime
import gc
import io
import json
import multiprocessing
import os
import pickle
import re
import signal
import sys
import threading
import traceback
import urllib.parse
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
import requests.adapters
import torch
import torch.multiprocessing
import torch.utils.data
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError, ResourceNotFoundError
from azure.storage.blob import BlobServiceClient, ContainerClient, ContainerSasPermissions, generate_container_sas
from torchdata.stateful_dataloader import StatefulDataLoader

from azstoragetorch._client import _schedule
from azstoragetorch.datasets import Blob, BlobDataset, IterableBlobDataset
from azstoragetorch.exceptions import BlobModifiedDuringReadError
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.conftest import Container, _make_container
from tests.e2e.support import _distributed_worker
from tests.e2e.support.fault_proxy import FaultProxy, Respond

TRAIN = [f"train/{index:02d}.bin" for index in range(12)]
TRAIN_PREFIX = [*TRAIN, "trainx.bin"]  # everything whose name starts with "train"
VAL = ["val/0.bin", "val/1.bin", "val/2.bin"]
DATA = {
    **{name: f"{name} ".encode() * (index + 1) for index, name in enumerate(TRAIN)},
    "trainx.bin": b"next to train/, not in it",
    **{name: f"validation sample {name}".encode() for name in VAL},
}
ALL = sorted(DATA)

MANY = {f"a/{index:04d}": str(index).encode() for index in range(5000)} | {
    f"b/{index:04d}": str(index).encode() for index in range(1000)
}
MANY_NAMES = sorted(MANY)

TENSORS = {f"t/{index}.pt": torch.arange(12.0).reshape(3, 4) + 100 * index for index in range(8)}

UPLOAD_THREADS = 16


# -- transforms (top-level, so spawned DataLoader workers can import them) ---------------------------


class SampleError(Exception):
    """What a user's transform might raise for a bad sample."""


def identity(blob: Blob) -> Blob:
    return blob


def name_only(blob: Blob) -> str:
    return blob.blob_name


def name_and_size(blob: Blob) -> tuple[str, int]:
    return blob.blob_name, blob.size


def name_and_data(blob: Blob) -> tuple[str, bytes]:
    with blob.reader() as reader:
        return blob.blob_name, reader.read()


def name_data_and_worker(blob: Blob) -> tuple[str, bytes, int]:
    worker = torch.utils.data.get_worker_info()
    with blob.reader() as reader:
        return blob.blob_name, reader.read(), worker.id if worker is not None else -1


def load_tensor(blob: Blob) -> torch.Tensor:
    with blob.reader() as reader:
        tensor: torch.Tensor = torch.load(reader)
        return tensor


def fail_on_train_03(blob: Blob) -> str:
    if blob.blob_name == "train/03.bin":
        raise SampleError("cannot decode this sample")
    return blob.blob_name


def as_list(batch: list[Any]) -> list[Any]:
    return batch


# -- helpers --------------------------------------------------------------------------------------


def upload_all(azurite: Azurite, container: Container, blobs: dict[str, bytes]) -> None:
    """Upload many small blobs at once, with the SDK, over a connection pool as large as the thread pool."""
    session = requests.Session()
    session.trust_env = False
    session.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=UPLOAD_THREADS))
    client = ContainerClient(
        azurite.account_url,
        container.name,
        credential={"account_name": ACCOUNT_NAME, "account_key": ACCOUNT_KEY},
        session=session,
    )
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        list(pool.map(lambda item: client.upload_blob(item[0], item[1], overwrite=True), blobs.items()))
    session.close()


def _uploaded_container(
    service_client: BlobServiceClient, azurite: Azurite, blobs: dict[str, bytes]
) -> Iterator[Container]:
    made = _make_container(service_client, azurite, None)
    upload_all(azurite, made, blobs)
    yield made
    made.client.delete_container()


@pytest.fixture(scope="module")
def data(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[Container]:
    yield from _uploaded_container(service_client, azurite, DATA)


@pytest.fixture(scope="module")
def many(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[Container]:
    yield from _uploaded_container(service_client, azurite, MANY)


@pytest.fixture(scope="module")
def tensors(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[Container]:
    saved = {}
    for name, tensor in TENSORS.items():
        buffer = io.BytesIO()
        torch.save(tensor, buffer)
        saved[name] = buffer.getvalue()
    yield from _uploaded_container(service_client, azurite, saved)


def items(dataset: BlobDataset[Any] | IterableBlobDataset[Any]) -> list[Any]:
    """All samples, in the dataset's order, without a DataLoader."""
    if isinstance(dataset, BlobDataset):
        return [dataset[index] for index in range(len(dataset))]
    return list(dataset)


def is_subsequence(part: list[Any], whole: list[Any]) -> bool:
    remaining = iter(whole)
    return all(any(item == candidate for candidate in remaining) for item in part)


def error_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error))


def signature(sas: str) -> str:
    return urllib.parse.parse_qs(sas)["sig"][0]


def assert_hides(text: str, sas: str) -> None:
    secret = signature(sas)
    assert secret not in text and urllib.parse.quote(secret, safe="") not in text and "sig=" not in text, text


# -- listing ----------------------------------------------------------------------------------------


def test_map_dataset_lists_the_container_in_name_order_and_reads_every_blob(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    dataset = BlobDataset.from_container_url(data.url, credential=account_credential)
    assert len(dataset) == len(ALL)
    assert items(dataset) == [{"url": data.blob_url(name), "data": DATA[name]} for name in ALL]
    assert dataset[-1] == {"url": data.blob_url(ALL[-1]), "data": DATA[ALL[-1]]}
    for index in (len(ALL), len(ALL) + 1, 10**6):
        with pytest.raises(IndexError):
            dataset[index]


def test_iterable_dataset_lists_once_when_created_and_yields_every_blob_in_order(
    data: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = IterableBlobDataset.from_container_url(proxy.url(data.url), credential=account_credential)
        assert [seen.operation for seen in proxy.requests] == ["GET comp=list"]
        samples = list(dataset)
        assert list(dataset) == samples  # a second epoch: the same listing, not listed again
        assert [seen.operation for seen in proxy.requests].count("GET comp=list") == 1
    assert samples == [{"url": proxy.url(data.blob_url(name)), "data": DATA[name]} for name in ALL]


class _SetsEventOnFirstSample:
    """A transform that tells the test, through a fork-shared Event, that its worker has started
    yielding samples (and so has whatever listing it deals from)."""

    def __init__(self, event: Any) -> None:
        self.event = event

    def __call__(self, blob: Blob) -> str:
        self.event.set()
        return blob.blob_name


def test_workers_deal_from_one_listing_when_the_container_changes_during_the_epoch(
    container: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite, stop_workers: list[Any]
) -> None:
    # Worker 1 writes a blob that sorts first once worker 0 has started yielding (so after any
    # listing worker 0 made), then starts its own share. Had each worker listed for itself, worker 1
    # would deal from a list one longer and shifted by one: blobs repeated, others never seen.
    names = [f"{index:03d}.bin" for index in range(12)]
    for name in names:
        container.upload(name, name.encode())
    worker_0_started = multiprocessing.get_context("fork").Event()
    new_blob_url = container.blob_url("000-new.bin")  # "-" sorts before "."

    def write_a_blob_from_worker_1(worker_id: int) -> None:
        if worker_id == 1:
            assert worker_0_started.wait(timeout=300), "worker 0 yielded nothing"
            with BlobIO(new_blob_url, "wb", credential=account_credential) as file:
                file.write(b"new")

    with FaultProxy(azurite.port) as proxy:
        dataset = IterableBlobDataset.from_container_url(
            proxy.url(container.url), credential=account_credential, transform=_SetsEventOnFirstSample(worker_0_started)
        )
        loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=None,
            num_workers=2,
            worker_init_fn=write_a_blob_from_worker_1,
            multiprocessing_context="fork",
        )
        stop_workers.append(loader)
        seen = list(loader)
        assert container.exists("000-new.bin")  # the change did happen during the epoch
        assert sorted(seen) == names  # each listed blob once
        assert [request.operation for request in proxy.requests].count("GET comp=list") == 1


@pytest.mark.parametrize(
    ("prefix", "expected"),
    [("train/", TRAIN), ("train", TRAIN_PREFIX), ("val/", VAL), ("val/1", ["val/1.bin"]), ("nothing/", []), ("", ALL)],
)
@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_prefix_selects_the_blobs_whose_names_start_with_it(
    data: Container,
    account_credential: AzureNamedKeyCredential,
    kind: type[BlobDataset[Any]],
    prefix: str,
    expected: list[str],
) -> None:
    dataset = kind.from_container_url(data.url, prefix=prefix, credential=account_credential, transform=name_only)
    assert items(dataset) == expected


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_an_empty_container_is_an_empty_dataset(
    container: Container, account_credential: AzureNamedKeyCredential, kind: type[BlobDataset[Any]]
) -> None:
    dataset = kind.from_container_url(container.url, credential=account_credential)
    assert items(dataset) == []
    if kind is BlobDataset:
        assert len(dataset) == 0
    assert list(torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)) == []


def test_listing_follows_every_page(
    many: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = BlobDataset.from_container_url(
            proxy.url(many.url), credential=account_credential, transform=name_and_size
        )
        listings = list(proxy.requests)
        # Sizes come with the listing: reading them sends nothing.
        assert items(dataset) == [(name, len(MANY[name])) for name in MANY_NAMES]
        assert proxy.requests == listings
    assert len(dataset) == 6000
    assert [seen.operation for seen in listings] == ["GET comp=list", "GET comp=list"]
    assert "marker" not in listings[0].query
    assert listings[1].query["marker"]


@pytest.mark.parametrize(("prefix", "count"), [("a/", 5000), ("b/", 1000), ("a/49", 100), ("a/4999", 1)])
def test_prefix_listing_of_a_large_container(
    many: Container, account_credential: AzureNamedKeyCredential, prefix: str, count: int
) -> None:
    # "a/" is exactly one full page: the listing must neither stop early nor repeat it.
    dataset = BlobDataset.from_container_url(
        many.url, prefix=prefix, credential=account_credential, transform=name_only
    )
    expected = [name for name in MANY_NAMES if name.startswith(prefix)]
    assert len(expected) == count
    assert items(dataset) == expected


def test_iterable_over_6000_blobs_with_two_workers_sees_each_once(
    many: Container, account_credential: AzureNamedKeyCredential, stop_workers: list[Any]
) -> None:
    dataset = IterableBlobDataset.from_container_url(many.url, credential=account_credential, transform=name_only)
    loader = torch.utils.data.DataLoader(dataset, batch_size=500, num_workers=2, collate_fn=as_list)
    stop_workers.append(loader)
    seen = [name for batch in loader for name in batch]
    assert len(seen) == 6000
    assert Counter(seen) == Counter(MANY_NAMES)


# -- Blob -------------------------------------------------------------------------------------------


def describe(blob: Blob) -> tuple[str, str, str, int, str, datetime.datetime | None]:
    return blob.url, blob.blob_name, blob.container_name, blob.size, blob.etag, blob.last_modified


def test_listed_blobs_know_size_etag_and_last_modified_without_a_request(
    data: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = BlobDataset.from_container_url(
            proxy.url(data.url), prefix="val/", credential=account_credential, transform=describe
        )
        described = items(dataset) + items(dataset)
        assert [seen.operation for seen in proxy.requests] == ["GET comp=list"]
    for (url, name, container_name, size, etag, last_modified), expected_name in zip(described, VAL + VAL, strict=True):
        properties = data.client.get_blob_client(name).get_blob_properties()
        assert (url, name, container_name) == (proxy.url(data.blob_url(expected_name)), expected_name, data.name)
        assert size == properties.size == len(DATA[name])
        assert last_modified == properties.last_modified
        assert etag == properties.etag  # quoted, as in the ETag header


def test_named_blobs_fetch_their_properties_once(
    data: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite
) -> None:
    with FaultProxy(azurite.port) as proxy:
        dataset = BlobDataset.from_blob_urls(
            [proxy.url(data.blob_url(name)) for name in VAL], credential=account_credential, transform=describe
        )
        described = items(dataset) + items(dataset)
        assert [seen.operation for seen in proxy.requests] == ["GetBlobProperties"] * 3
    for (url, name, container_name, size, etag, last_modified), expected_name in zip(described, VAL + VAL, strict=True):
        properties = data.client.get_blob_client(name).get_blob_properties()
        assert (url, name, container_name) == (proxy.url(data.blob_url(expected_name)), expected_name, data.name)
        assert (size, etag, last_modified) == (properties.size, properties.etag, properties.last_modified)


def etag_and_reader_etag(blob: Blob) -> tuple[str, str]:
    with blob.reader() as reader:
        return blob.etag, reader.properties.etag


def test_a_blob_has_one_etag_however_the_dataset_was_made(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    listed = BlobDataset.from_container_url(
        data.url, prefix="val/", credential=account_credential, transform=etag_and_reader_etag
    )
    named = BlobDataset.from_blob_urls(
        [data.blob_url(name) for name in VAL], credential=account_credential, transform=etag_and_reader_etag
    )
    for (listed_etag, listed_reader_etag), (named_etag, named_reader_etag) in zip(
        items(listed), items(named), strict=True
    ):
        assert named_etag == named_reader_etag == listed_reader_etag
        assert listed_etag == named_etag


SPECIAL_NAMES = [
    "a b.txt",
    "dir/x#y.bin",
    "q?u.bin",
    "pct%41.bin",
    "plus+x",
    "é/ü.bin",
    "tilde~x",
    "amp&er=sand",
    "semi;colon",
    "deep/er/and/deeper",
]


def url_name_and_data(blob: Blob) -> tuple[str, str, bytes]:
    with blob.reader() as reader:
        return blob.url, blob.blob_name, reader.read()


def test_blob_names_that_need_escaping(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    for name in SPECIAL_NAMES:
        container.client.upload_blob(name, name.encode())
    listed = items(
        BlobDataset.from_container_url(container.url, credential=account_credential, transform=url_name_and_data)
    )
    assert sorted(name for _, name, _ in listed) == sorted(SPECIAL_NAMES)
    for url, name, content in listed:
        assert content == name.encode()
        assert "?" not in url and "#" not in url and " " not in url
        assert urllib.parse.unquote(url) == f"{container.url}/{name}"
    # The URLs a dataset hands out open the same blobs again, with a credential or with a SAS.
    named = items(
        IterableBlobDataset.from_blob_urls(
            [url for url, _, _ in listed], credential=account_credential, transform=url_name_and_data
        )
    )
    assert named == listed
    sas = container.container_sas()
    listed_with_sas = items(
        IterableBlobDataset.from_container_url(f"{container.url}?{sas}", transform=url_name_and_data)
    )
    assert listed_with_sas == listed


def test_readers_work_many_times_also_after_other_epochs_and_in_other_processes(
    data: Container, account_credential: AzureNamedKeyCredential, stop_workers: list[Any]
) -> None:
    dataset = BlobDataset.from_container_url(data.url, prefix="val/", credential=account_credential, transform=identity)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=2)
    stop_workers.append(loader)
    epochs = [list(loader) for _ in range(2)]  # Blob objects made in the workers, sent back
    iterable = IterableBlobDataset.from_container_url(
        data.url, prefix="val/", credential=account_credential, transform=identity
    )
    epochs += [list(iterable) for _ in range(2)]
    epochs.append(items(dataset))
    for blobs in epochs:
        assert [blob.blob_name for blob in blobs] == VAL
        for blob in blobs:
            for _ in range(2):
                with blob.reader() as reader:
                    assert reader.read() == DATA[blob.blob_name]
            with blob.reader() as reader:
                reader.seek(3)
                assert reader.read(4) == DATA[blob.blob_name][3:7]


MiB = 1024 * 1024
# Around the default sample's single-request size (8 MiB), past which it reads in parallel parts.
DEFAULT_SAMPLE_SIZES = [0, 1, 8 * MiB - 1, 8 * MiB, 8 * MiB + 1, 2 * 8 * MiB + 12345]


def test_the_default_sample_is_the_whole_blob_whatever_its_size(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    generator = torch.Generator().manual_seed(0)
    blobs = {
        f"size-{size:09d}": torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()
        for size in DEFAULT_SAMPLE_SIZES
    }
    for name, content in blobs.items():
        container.upload(name, content)
    expected = [{"url": container.blob_url(name), "data": blobs[name]} for name in sorted(blobs)]
    assert items(BlobDataset.from_container_url(container.url, credential=account_credential)) == expected
    named = IterableBlobDataset.from_blob_urls(
        [container.blob_url(name) for name in sorted(blobs)], credential=account_credential
    )
    assert items(named) == expected


# -- the tensor path: Blob.read_tensor and Blob.readinto --------------------------------------------


def random_bytes(size: int, seed: int) -> bytes:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (size,), dtype=torch.uint8, generator=generator).numpy().tobytes()


def tensor_sample(blob: Blob) -> dict[str, Any]:
    tensor = blob.read_tensor()
    # In a worker, received into shared memory already, so that sending it to the main process copies nothing.
    return {"url": blob.url, "data": tensor, "shared_when_read": tensor.is_shared()}


def as_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.numpy().tobytes()


def test_read_tensor_and_readinto_give_the_blobs_bytes_whatever_the_size(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    """Sizes around the single-request limit (8 MiB), past which the rest arrives in parallel parts."""
    blobs = {f"size-{size:09d}": random_bytes(size, size) for size in DEFAULT_SAMPLE_SIZES}
    for name, content in blobs.items():
        container.upload(name, content)
    listed = BlobDataset.from_container_url(container.url, credential=account_credential, transform=identity)
    named = BlobDataset.from_blob_urls(
        [container.blob_url(name) for name in sorted(blobs)], credential=account_credential, transform=identity
    )
    seed = 1414
    print(f"perturbation seed {seed}")
    with _schedule.perturbed(seed, max_delay=0.01) as perturbation:
        for dataset in (listed, named):
            for blob, name in zip(items(dataset), sorted(blobs), strict=True):
                content = blobs[name]
                tensor = blob.read_tensor()
                assert tensor.dtype == torch.uint8 and tensor.shape == (len(content),) and tensor.is_contiguous()
                assert as_bytes(tensor) == content, name
                into_tensor = torch.full((len(content),), 7, dtype=torch.uint8)
                into_bytearray = bytearray(len(content))
                backing = bytearray(len(content))
                for buffer in (into_tensor, into_bytearray, memoryview(backing)):
                    assert blob.readinto(buffer) == len(content)
                assert as_bytes(into_tensor) == content, name
                assert into_bytearray == content and backing == content, name
    assert perturbation.counts.get("part.finish", 0) > 0  # the parts of the large blobs were perturbed


def test_readinto_fills_tensors_of_any_shape_and_other_buffers(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    content = random_bytes(2 * 3 * 4 * 1000, 5)
    blob = BlobDataset.from_blob_urls(
        container.upload("image.raw", content), credential=account_credential, transform=identity
    )[0]
    image = torch.empty((1000, 4, 6), dtype=torch.uint8)
    assert blob.readinto(image) == len(content)
    assert as_bytes(image) == content
    floats = array.array("f", bytes(len(content)))  # raw bytes, as io.RawIOBase.readinto fills them
    assert blob.readinto(floats) == len(content)
    assert floats.tobytes() == content
    as_float32 = torch.empty(len(content) // 4, dtype=torch.float32)
    blob.readinto(as_float32.view(torch.uint8))
    assert as_bytes(as_float32.view(torch.uint8)) == content
    # Random bytes include NaNs, which never compare equal: compare the same bits as integers.
    assert torch.equal(blob.read_tensor().view(torch.int32), as_float32.view(torch.int32))


BAD_BUFFERS: list[tuple[str, Any, type[Exception], str]] = [
    ("str", "not a buffer", TypeError, "not str"),
    ("bytes", bytes(100), TypeError, "read-only"),
    ("float32 tensor", torch.zeros(25, dtype=torch.float32), TypeError, "torch.float32"),
    ("non-contiguous tensor", torch.zeros(200, dtype=torch.uint8)[::2], ValueError, "non-contiguous"),
    ("transposed tensor", torch.zeros((10, 10), dtype=torch.uint8).t(), ValueError, "non-contiguous"),
    ("meta tensor", torch.empty(100, dtype=torch.uint8, device="meta"), ValueError, "meta"),
    ("non-contiguous memoryview", memoryview(bytearray(200))[::2], ValueError, "non-contiguous"),
]


@pytest.mark.parametrize(("what", "buffer", "error", "says"), BAD_BUFFERS, ids=[case[0] for case in BAD_BUFFERS])
def test_readinto_refuses_unusable_buffers_before_any_request(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    what: str,
    buffer: Any,
    error: type[Exception],
    says: str,
) -> None:
    url = container.upload("hundred.bin", bytes(range(100)))
    blob = BlobDataset.from_blob_urls(proxy.url(url), credential=account_credential, transform=identity)[0]
    with pytest.raises(error, match=says):
        blob.readinto(buffer)
    assert proxy.count("GetBlob") == 0


@pytest.mark.parametrize("size", [0, 99, 101, 8 * MiB + 1])
def test_readinto_refuses_a_buffer_of_another_size_and_leaves_it_untouched(
    container: Container, account_credential: AzureNamedKeyCredential, size: int
) -> None:
    content = random_bytes(8 * MiB + 100 if size > MiB else 100, size)
    blob = BlobDataset.from_blob_urls(
        container.upload("blob.bin", content), credential=account_credential, transform=identity
    )[0]
    buffer = torch.full((size,), 0xAB, dtype=torch.uint8)
    with pytest.raises(ValueError, match=f"has {len(content)} bytes, the buffer holds {size}"):
        blob.readinto(buffer)
    assert bool((buffer == 0xAB).all())
    assert as_bytes(blob.read_tensor()) == content  # the abandoned response left no broken connection behind
    empty = BlobDataset.from_blob_urls(
        container.upload("empty.bin", b""), credential=account_credential, transform=identity
    )[0]
    with pytest.raises(ValueError, match=f"has 0 bytes, the buffer holds {max(size, 1)}"):
        empty.readinto(bytearray(max(size, 1)))


@pytest.mark.parametrize("new_size", [20 * MiB + 5, 20 * MiB + 7, 9 * MiB], ids=["same-size", "larger", "smaller"])
@pytest.mark.parametrize("method", ["read_tensor", "readinto"])
def test_a_blob_replaced_while_it_is_read_raises_and_is_never_mixed(
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
    method: str,
    new_size: int,
) -> None:
    old = random_bytes(20 * MiB + 5, 1)
    url = container.upload("blob.bin", old)
    blob = BlobDataset.from_blob_urls(proxy.url(url), credential=account_credential, transform=identity)[0]
    replaced = threading.Event()

    def replace_before_the_second_part(seen: Any) -> bool:
        # Runs in the proxy before it forwards the request: the first part has been answered with
        # the old blob's ETag, the later parts meet the new blob.
        byte_range = seen.byte_range
        if seen.operation == "GetBlob" and byte_range and byte_range[0] > 0 and not replaced.is_set():
            container.upload("blob.bin", random_bytes(new_size, 2))
            replaced.set()
        return False

    proxy.add_fault(replace_before_the_second_part, Respond(500))
    with pytest.raises(BlobModifiedDuringReadError) as caught:
        if method == "read_tensor":
            blob.read_tensor()
        else:
            blob.readinto(torch.empty(len(old), dtype=torch.uint8))
    assert replaced.is_set() and caught.value.blob_url == proxy.url(url)


def test_readinto_refuses_a_size_from_a_listing_that_is_out_of_date(
    container: Container, account_credential: AzureNamedKeyCredential
) -> None:
    container.upload("blob.bin", b"old content")
    blob = BlobDataset.from_container_url(container.url, credential=account_credential, transform=identity)[0]
    container.upload("blob.bin", b"the new, longer content")
    buffer = torch.zeros(blob.size, dtype=torch.uint8)  # the listed size
    with pytest.raises(ValueError, match="has 23 bytes, the buffer holds 11"):
        blob.readinto(buffer)
    assert as_bytes(blob.read_tensor()) == b"the new, longer content"  # as the default sample reads it


TENSOR_SIZES = [0, 1, 3 * MiB + 17, 4 * MiB, 8 * MiB + 1, 777, 4 * MiB, 2 * MiB + 3, 12345, 4 * MiB - 1]


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_tensors_from_dataloader_workers_arrive_intact_through_shared_memory(
    container: Container, account_credential: AzureNamedKeyCredential, kind: str, stop_workers: list[Any]
) -> None:
    blobs = {f"t/{index:02d}.bin": random_bytes(size, index) for index, size in enumerate(TENSOR_SIZES)}
    for name, content in blobs.items():
        container.upload(name, content)
    if kind == "map":
        dataset: Any = BlobDataset.from_container_url(
            container.url, credential=account_credential, transform=tensor_sample
        )
    else:
        dataset = IterableBlobDataset.from_container_url(
            container.url, credential=account_credential, transform=tensor_sample
        )
    seed = 2718
    print(f"perturbation seed {seed}")
    with _schedule.perturbed(seed, max_delay=0.01):  # forked workers inherit it
        loader = torch.utils.data.DataLoader(dataset, batch_size=3, num_workers=2, collate_fn=as_list)
        stop_workers.append(loader)
        samples = [sample for batch in loader for sample in batch]
    expected = {container.blob_url(name): content for name, content in blobs.items()}
    assert sorted(sample["url"] for sample in samples) == sorted(expected)
    for sample in samples:
        tensor = sample["data"]
        assert tensor.dtype == torch.uint8
        assert as_bytes(tensor) == expected[sample["url"]], sample["url"]
        if tensor.numel():
            assert tensor.is_shared()  # sent as shared memory, not pickled through the worker's pipe
            assert sample["shared_when_read"]


def die_on_07(blob: Blob) -> dict[str, Any]:
    tensor = blob.read_tensor()
    if blob.blob_name.endswith("07.bin"):
        os.kill(os.getpid(), signal.SIGKILL)  # a worker killed with a sample received and not yet sent
    return {"url": blob.url, "data": tensor}


def shut_down(loader: torch.utils.data.DataLoader[Any], stop_workers: list[Any]) -> None:
    """Stop the loader's workers and drop it, with the pipes and queues it holds."""
    for candidate in (loader, getattr(loader, "_iterator", None)):
        if hasattr(candidate, "_shutdown_workers"):
            candidate._shutdown_workers()
    stop_workers.remove(loader)
    loader._iterator = None
    gc.collect()


def open_fds() -> int:
    """This process's descriptors of shared memory (multiprocessing's own pipes and helpers come and go)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (listdir's own descriptor)
            continue
        count += target.startswith(("/memfd:", "/dev/shm/"))
    return count


def segment_of(tensor: torch.Tensor) -> tuple[int, int]:
    fd, _ = tensor.untyped_storage()._share_fd_cpu_()
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="counts descriptors in /proc/self/fd")


@linux_only
@pytest.mark.parametrize("start_method", ["fork", "spawn", "forkserver"])
def test_samples_kept_by_the_main_process_stay_intact_while_workers_reuse_memory(
    container: Container, account_credential: AzureNamedKeyCredential, start_method: str, stop_workers: list[Any]
) -> None:
    # Sizes in no order, of one power of two (the pool's size classes).
    blobs = {f"r/{index:02d}.bin": random_bytes(40_000 + (index * 7919) % 25_000, index) for index in range(60)}
    for name, content in blobs.items():
        container.upload(name, content)
    dataset = BlobDataset.from_container_url(container.url, credential=account_credential, transform=tensor_sample)
    expected = {container.blob_url(name): content for name, content in blobs.items()}
    before = open_fds()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=2,
        num_workers=2,
        collate_fn=as_list,
        multiprocessing_context=multiprocessing.get_context(start_method),
    )
    stop_workers.append(loader)
    kept: list[dict[str, Any]] = []
    segments: set[tuple[int, int]] = set()
    for index, sample in enumerate(sample for batch in loader for sample in batch):
        segments.add(segment_of(sample["data"]))
        assert as_bytes(sample["data"]) == expected[sample["url"]], sample["url"]
        if index % 3 == 0:
            kept.append(sample)  # held to the end, while the workers go on receiving other samples
        del sample
    assert len(kept) == 20
    # Fewer segments than samples: memory the main process let go of was received into again...
    assert len(segments) < len(blobs)
    # ...and never memory it still held.
    assert [one["url"] for one in kept if as_bytes(one["data"]) != expected[one["url"]]] == []
    shut_down(loader, stop_workers)
    assert open_fds() == before + len(kept)  # one descriptor per tensor kept...
    del kept
    assert open_fds() == before  # ...and none for those let go of


@linux_only
def test_a_worker_killed_with_a_sample_in_shared_memory_leaves_no_descriptor_behind(
    container: Container, account_credential: AzureNamedKeyCredential, stop_workers: list[Any]
) -> None:
    blobs = {f"k/{index:02d}.bin": random_bytes(100_000, index) for index in range(12)}
    for name, content in blobs.items():
        container.upload(name, content)
    dataset = BlobDataset.from_container_url(container.url, credential=account_credential, transform=die_on_07)
    before = open_fds()
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, num_workers=2, collate_fn=as_list)
    stop_workers.append(loader)
    got: list[Any] = []
    message = ""
    try:
        got.extend(sample for batch in loader for sample in batch)
    except RuntimeError as error:
        message = str(error)  # not the error itself: its traceback holds the loader's frames and samples
    assert re.search("DataLoader worker .* exited unexpectedly|killed by signal", message), message
    expected = {container.blob_url(name): content for name, content in blobs.items()}
    # What arrived before the worker died is whole.
    assert [one["url"] for one in got if as_bytes(one["data"]) != expected[one["url"]]] == []
    del got
    shut_down(loader, stop_workers)
    assert open_fds() == before


# -- SAS, anonymous access, snapshots and versions --------------------------------------------------


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_container_sas_lists_and_reads_and_never_shows(data: Container, kind: type[BlobDataset[Any]]) -> None:
    sas = data.container_sas()
    dataset = kind.from_container_url(f"{data.url}?{sas}", prefix="val/", transform=identity)
    blobs = items(dataset)
    assert [blob.url for blob in blobs] == [data.blob_url(name) for name in VAL]
    for blob in blobs:
        assert_hides(repr(blob), sas)
        with blob.reader() as reader:
            assert reader.read() == DATA[blob.blob_name]
    default = kind.from_container_url(f"{data.url}?{sas}", prefix="val/")
    assert items(default) == [{"url": data.blob_url(name), "data": DATA[name]} for name in VAL]


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_blob_sas_urls(data: Container, kind: type[BlobDataset[Any]]) -> None:
    urls = [f"{data.blob_url(name)}?{data.blob_sas(name)}" for name in VAL]
    dataset = kind.from_blob_urls(urls)
    assert items(dataset) == [{"url": data.blob_url(name), "data": DATA[name]} for name in VAL]
    single = kind.from_blob_urls(urls[1])
    assert items(single) == [{"url": data.blob_url(VAL[1]), "data": DATA[VAL[1]]}]


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_anonymous_access_to_a_public_container(public_container: Container, kind: type[BlobDataset[Any]]) -> None:
    for name in VAL:
        public_container.upload(name, DATA[name])
    dataset = kind.from_container_url(public_container.url, credential=False)
    assert items(dataset) == [{"url": public_container.blob_url(name), "data": DATA[name]} for name in VAL]


def url_size_and_data(blob: Blob) -> tuple[str, int, bytes]:
    with blob.reader() as reader:
        return blob.url, blob.size, reader.read()


def test_snapshot_and_version_urls_read_what_they_select_and_show_no_query(
    container: Container, account_credential: AzureNamedKeyCredential, azurite: Azurite
) -> None:
    client = container.client.get_blob_client("model.pt")
    client.upload_blob(b"old")
    snapshot = client.create_snapshot()["snapshot"]
    client.upload_blob(b"newer", overwrite=True)
    version = "2024-05-06T07:08:09.1234567Z"
    with FaultProxy(azurite.port) as proxy:
        base = proxy.url(container.blob_url("model.pt"))
        urls = [
            f"{base}?snapshot={urllib.parse.quote(snapshot)}",
            f"{base}?versionid={urllib.parse.quote(version)}",
            base,
        ]
        described = items(BlobDataset.from_blob_urls(urls, credential=account_credential, transform=url_size_and_data))
        default = items(IterableBlobDataset.from_blob_urls(urls[0], credential=account_credential))
        requests_seen = proxy.requests
    assert described[0] == (base, 3, b"old")
    assert described[2] == (base, 5, b"newer")
    assert described[1][0] == base
    assert default == [{"url": base, "data": b"old"}]
    # Azurite ignores version ids, so what matters is that every request for that blob names the version.
    versioned = [seen for seen in requests_seen if "versionid" in seen.query]
    assert {seen.operation for seen in versioned} == {"GetBlobProperties", "GetBlob"}
    assert all(seen.query["versionid"] == version for seen in versioned)
    snapshots = [seen for seen in requests_seen if "snapshot" in seen.query]
    assert snapshots and all(seen.query["snapshot"] == snapshot for seen in snapshots)


# -- bad input --------------------------------------------------------------------------------------


def container_sas_for(name: str, **permissions: bool) -> str:
    return generate_container_sas(
        ACCOUNT_NAME,
        name,
        account_key=ACCOUNT_KEY,
        permission=ContainerSasPermissions(**permissions),
        expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
    )


LISTING_FAILURES = ["missing-container", "missing-container-with-sas", "sas-without-list", "anonymous", "wrong-key"]


def listing_failure(
    case: str, data: Container, azurite: Azurite, account_credential: AzureNamedKeyCredential
) -> tuple[str, Any, type[HttpResponseError], str, str | None]:
    """(URL to pass, credential, error expected, URL the error must name, SAS it must not show)."""
    missing = azurite.container_url(f"missing-{uuid.uuid4().hex[:12]}")
    if case == "missing-container":
        return missing, account_credential, ResourceNotFoundError, missing, None
    if case == "missing-container-with-sas":
        sas = container_sas_for(missing.rsplit("/", 1)[1], read=True, list=True)
        return f"{missing}?{sas}", None, ResourceNotFoundError, missing, sas
    if case == "sas-without-list":
        sas = container_sas_for(data.name, read=True)
        return f"{data.url}?{sas}", None, ClientAuthenticationError, data.url, sas
    if case == "anonymous":  # Azure answers 404, Azurite 403: either way an HTTP error naming the container
        return data.url, False, HttpResponseError, data.url, None
    wrong = AzureNamedKeyCredential(ACCOUNT_NAME, "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk=")
    return data.url, wrong, ClientAuthenticationError, data.url, None


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
@pytest.mark.parametrize("case", LISTING_FAILURES)
def test_listing_failures_raise_at_creation_naming_the_container_but_not_its_sas(
    case: str,
    kind: type[BlobDataset[Any]],
    data: Container,
    azurite: Azurite,
    account_credential: AzureNamedKeyCredential,
) -> None:
    # Both classes list when created, so the error reaches the caller's process before any
    # DataLoader worker exists (rather than being re-raised from a worker).
    url, credential, expected, shown, sas = listing_failure(case, data, azurite, account_credential)
    with pytest.raises(expected) as failure:
        kind.from_container_url(url, credential=credential)
    text = error_text(failure.value)
    assert shown in text, text
    if sas is not None:
        assert_hides(text, sas)


@pytest.mark.parametrize("how", ["map-index", "map-batch", "map-workers", "iterable", "iterable-workers"])
def test_a_transform_error_keeps_its_type_and_names_the_blob(
    how: str, data: Container, stop_workers: list[Any]
) -> None:
    sas = data.container_sas()
    url = f"{data.url}?{sas}"
    if how.startswith("map"):
        dataset: Any = BlobDataset.from_container_url(url, prefix="train/", transform=fail_on_train_03)
        assert dataset[2] == "train/02.bin"
    else:
        dataset = IterableBlobDataset.from_container_url(url, prefix="train/", transform=fail_on_train_03)
    with pytest.raises(SampleError) as failure:
        if how == "map-index":
            dataset[3]
        else:
            workers = 2 if how.endswith("workers") else 0
            loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=workers, collate_fn=as_list)
            iterator = iter(loader)
            stop_workers.append(iterator)
            for _ in iterator:
                pass
    assert type(failure.value) is SampleError
    text = error_text(failure.value)
    assert "cannot decode this sample" in text
    assert data.blob_url("train/03.bin") in text, text
    assert data.blob_url("train/02.bin") not in text
    assert_hides(text, sas)


# -- DataLoader -------------------------------------------------------------------------------------


def test_a_dataloader_batch_fetches_its_blobs_concurrently(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    barrier = threading.Barrier(4)

    def together(blob: Blob) -> tuple[str, bytes]:
        barrier.wait(timeout=120)  # raises BrokenBarrierError unless the four samples are fetched at once
        return name_and_data(blob)

    dataset = BlobDataset.from_container_url(
        data.url, prefix="train/", credential=account_credential, transform=together
    )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=as_list)
    batches = list(loader)
    assert batches == [[(name, DATA[name]) for name in TRAIN[start : start + 4]] for start in (0, 4, 8)]


def test_a_plain_dataloader_fetches_the_next_batch_while_this_one_is_used(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    fetched = {name: threading.Event() for name in TRAIN_PREFIX}

    def record(blob: Blob) -> tuple[str, bytes]:
        sample = name_and_data(blob)
        fetched[blob.blob_name].set()
        return sample

    dataset = BlobDataset.from_container_url(data.url, prefix="train", credential=account_credential, transform=record)
    loader = torch.utils.data.DataLoader(dataset, batch_size=3, collate_fn=as_list)
    samples = []
    seed = 3141
    print(f"perturbation seed {seed}")
    with _schedule.perturbed(seed, max_delay=0.01):
        for number, batch in enumerate(loader):
            samples += batch
            following = (number + 1) * 3
            if number >= 1 and following < len(TRAIN_PREFIX):  # two batches in order tell the next one
                assert fetched[TRAIN_PREFIX[following]].wait(30), "the next batch was not fetched ahead"
    assert samples == [(name, DATA[name]) for name in TRAIN_PREFIX]


def test_iterable_prefetch_is_bounded_and_yields_in_order(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most
    barrier = threading.Barrier(3)
    calls = []

    def fetch(blob: Blob) -> tuple[str, bytes]:
        with lock:
            in_flight[0] += 1
            in_flight[1] = max(in_flight)
            calls.append(blob.blob_name)
            first_three = len(calls) <= 3
        try:
            if first_three:
                barrier.wait(timeout=120)  # a hang guard: a starved machine may take long to start three
            return name_and_data(blob)
        finally:
            with lock:
                in_flight[0] -= 1

    dataset = IterableBlobDataset.from_container_url(
        data.url, prefix="train", credential=account_credential, transform=fetch, prefetch=3
    )
    assert list(dataset) == [(name, DATA[name]) for name in TRAIN_PREFIX]
    assert in_flight[1] == 3


DATALOADER_CASES = [
    ("fork", 0),
    ("fork", 2),
    ("spawn", 2),
    ("forkserver", 2),
    ("fork", 4),
    ("forkserver", 4),
]


@pytest.mark.parametrize(("start_method", "num_workers"), DATALOADER_CASES[:-1])
def test_map_dataset_with_dataloader_workers_after_use_in_the_main_process(
    data: Container, account_credential: AzureNamedKeyCredential, start_method: str, num_workers: int
) -> None:
    dataset = BlobDataset.from_container_url(
        data.url, prefix="train", credential=account_credential, transform=name_data_and_worker
    )
    assert dataset[0] == (TRAIN_PREFIX[0], DATA[TRAIN_PREFIX[0]], -1)  # pools and threads now exist here
    context = multiprocessing.get_context(start_method) if num_workers else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=3, num_workers=num_workers, multiprocessing_context=context, collate_fn=as_list
    )
    samples = [sample for batch in loader for sample in batch]
    assert [(name, content) for name, content, _ in samples] == [(name, DATA[name]) for name in TRAIN_PREFIX]
    assert {worker for _, _, worker in samples} == (set(range(num_workers)) if num_workers else {-1})
    assert dataset[1] == (TRAIN_PREFIX[1], DATA[TRAIN_PREFIX[1]], -1)  # and the main process still works


@pytest.mark.parametrize(("start_method", "num_workers"), [*DATALOADER_CASES, ("spawn", 4)])
def test_iterable_dataset_with_dataloader_workers_after_use_in_the_main_process(
    data: Container, account_credential: AzureNamedKeyCredential, start_method: str, num_workers: int
) -> None:
    dataset = IterableBlobDataset.from_container_url(
        data.url, prefix="train", credential=account_credential, transform=name_data_and_worker
    )
    assert list(dataset) == [(name, DATA[name], -1) for name in TRAIN_PREFIX]  # listed and read here first
    context = multiprocessing.get_context(start_method) if num_workers else None
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, num_workers=num_workers, multiprocessing_context=context
    )
    samples = [tuple(sample) for sample in loader]
    assert Counter((name, content) for name, content, _ in samples) == Counter(
        (name, DATA[name]) for name in TRAIN_PREFIX
    )
    shards: dict[int, list[str]] = {}
    for name, _, worker in samples:
        shards.setdefault(worker, []).append(name)
    assert set(shards) == (set(range(num_workers)) if num_workers else {-1})
    sizes = [len(shard) for shard in shards.values()]
    assert max(sizes) - min(sizes) <= 1
    assert all(is_subsequence(shard, TRAIN_PREFIX) for shard in shards.values())  # each in listing order
    assert list(dataset) == [(name, DATA[name], -1) for name in TRAIN_PREFIX]  # the main process still works


@pytest.mark.parametrize("kind", ["map", "iterable"])
def test_transforms_that_load_tensors_batch_into_tensors(
    tensors: Container, account_credential: AzureNamedKeyCredential, kind: str, stop_workers: list[Any]
) -> None:
    names = sorted(TENSORS)
    if kind == "map":
        dataset: Any = BlobDataset.from_container_url(tensors.url, credential=account_credential, transform=load_tensor)
    else:
        dataset = IterableBlobDataset.from_container_url(
            tensors.url, credential=account_credential, transform=load_tensor
        )
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, num_workers=2)
    stop_workers.append(loader)
    batches = list(loader)
    assert [batch.shape for batch in batches] == [torch.Size([4, 3, 4])] * 2
    assert all(batch.dtype == torch.float32 for batch in batches)
    rows = [row for batch in batches for row in batch]
    if kind == "map":
        assert all(torch.equal(row, TENSORS[name]) for row, name in zip(rows, names, strict=True))
    else:
        remaining = [TENSORS[name] for name in names]
        for row in rows:  # each tensor exactly once, in whatever order the workers interleave
            match = next(index for index, tensor in enumerate(remaining) if torch.equal(row, tensor))
            remaining.pop(match)
        assert remaining == []


# -- shuffling --------------------------------------------------------------------------------------


def test_shuffle_is_a_deterministic_permutation_per_seed_and_epoch(
    data: Container, account_credential: AzureNamedKeyCredential
) -> None:
    def order(seed: int, epoch: int | None) -> list[str]:
        dataset = IterableBlobDataset.from_container_url(
            data.url, credential=account_credential, transform=name_only, shuffle=True, seed=seed
        )
        if epoch is not None:
            dataset.set_epoch(epoch)
        return list(dataset)

    epoch0 = order(seed=42, epoch=None)
    assert sorted(epoch0) == ALL
    assert epoch0 != ALL
    assert order(seed=42, epoch=0) == epoch0
    epoch1 = order(seed=42, epoch=1)
    assert sorted(epoch1) == ALL and epoch1 != epoch0
    assert order(seed=42, epoch=1) == epoch1
    assert order(seed=43, epoch=0) != epoch0
    unshuffled = IterableBlobDataset.from_container_url(data.url, credential=account_credential, transform=name_only)
    unshuffled.set_epoch(5)
    assert list(unshuffled) == ALL


# -- resuming ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("num_workers", "stop_after", "shuffle"), [(0, 1, False), (0, 4, True), (2, 1, True), (2, 3, False), (2, 5, True)]
)
def test_stateful_dataloader_resumes_mid_epoch(
    data: Container,
    account_credential: AzureNamedKeyCredential,
    stop_workers: list[Any],
    num_workers: int,
    stop_after: int,
    shuffle: bool,
) -> None:
    def dataset(epoch: int | None) -> IterableBlobDataset[tuple[str, bytes]]:
        made = IterableBlobDataset.from_container_url(
            data.url, prefix="train", credential=account_credential, transform=name_and_data, shuffle=shuffle, seed=21
        )
        if epoch is not None:
            made.set_epoch(epoch)
        return made

    def loader(of: IterableBlobDataset[tuple[str, bytes]]) -> StatefulDataLoader:
        made = StatefulDataLoader(of, batch_size=2, num_workers=num_workers, collate_fn=as_list)
        stop_workers.append(made)
        return made

    uninterrupted = [sample for batch in loader(dataset(1)) for sample in batch]
    assert sorted(uninterrupted) == [(name, DATA[name]) for name in TRAIN_PREFIX]

    interrupted = loader(dataset(1))
    iterator = iter(interrupted)
    first = [sample for _ in range(stop_after) for sample in next(iterator)]
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))  # as if saved in a checkpoint

    resumed = loader(dataset(None))  # a new process: the epoch comes back from the state
    resumed.load_state_dict(state)
    rest = [sample for batch in resumed for sample in batch]
    assert len(first) == 2 * stop_after
    assert first + rest == uninterrupted  # nothing repeated, nothing skipped, same order
    assert sorted(sample for batch in resumed for sample in batch) == sorted(uninterrupted)  # next epoch whole


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stateful_dataloader_resumes_a_shuffled_map_dataset(
    data: Container, account_credential: AzureNamedKeyCredential, stop_workers: list[Any], num_workers: int
) -> None:
    dataset = BlobDataset.from_container_url(data.url, credential=account_credential, transform=name_and_data)

    def loader() -> StatefulDataLoader:
        made = StatefulDataLoader(
            dataset,
            batch_size=3,
            shuffle=True,
            generator=torch.Generator().manual_seed(8),
            num_workers=num_workers,
            collate_fn=as_list,
        )
        stop_workers.append(made)
        return made

    uninterrupted = [sample for batch in loader() for sample in batch]
    assert sorted(uninterrupted) == [(name, DATA[name]) for name in ALL]
    assert [name for name, _ in uninterrupted] != ALL  # shuffled

    interrupted = loader()
    iterator = iter(interrupted)
    first = [sample for _ in range(2) for sample in next(iterator)]
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    resumed = loader()
    resumed.load_state_dict(state)
    assert first + [sample for batch in resumed for sample in batch] == uninterrupted


# -- torch.distributed ------------------------------------------------------------------------------


# Spawned workers have no process group: they shard by the rank recorded when the rank pickled the
# dataset for them. One epoch (not the first, so set_epoch must reach them) keeps that case quick.
@pytest.mark.parametrize(("worker_start_method", "epochs"), [("fork", [0, 1]), ("spawn", [1])])
def test_two_ranks_with_two_workers_see_every_blob_once_per_epoch(
    data: Container,
    account_credential: AzureNamedKeyCredential,
    tmp_path: Any,
    worker_start_method: str,
    epochs: list[int],
) -> None:
    # Made here, before any process group exists, and pickled to the ranks.
    dataset = IterableBlobDataset.from_container_url(
        data.url,
        prefix="train",
        credential=account_credential,
        transform=_distributed_worker.name_worker_and_data,
        shuffle=True,
        seed=5,
    )
    torch.multiprocessing.spawn(
        _distributed_worker.rank_main,
        args=(2, str(tmp_path / "store"), dataset, 2, worker_start_method, epochs, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    orders = []
    for epoch in epochs:
        shards: dict[tuple[int, int], list[str]] = {}
        for rank, result in enumerate(results):
            for name, worker, content in result[str(epoch)]:
                assert content.encode() == DATA[name]
                shards.setdefault((rank, worker), []).append(name)
        assert set(shards) == {(0, 0), (0, 1), (1, 0), (1, 1)}
        seen = [name for shard in shards.values() for name in shard]
        assert Counter(seen) == Counter(TRAIN_PREFIX), f"epoch {epoch}: {shards}"
        sizes = [len(shard) for shard in shards.values()]
        assert max(sizes) - min(sizes) <= 1
        # Every rank drew the same permutation: each shard follows the epoch's single-process order.
        single = IterableBlobDataset.from_container_url(
            data.url, prefix="train", credential=account_credential, transform=name_only, shuffle=True, seed=5
        )
        single.set_epoch(epoch)
        order = list(single)
        assert all(is_subsequence(shard, order) for shard in shards.values()), (shards, order)
        orders.append(order)
    assert len(set(map(tuple, orders))) == len(epochs)  # a new order every epoch
