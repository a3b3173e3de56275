"""Shared fixtures: one Azurite emulator per test module, a fresh container per test."""

from __future__ import annotations

import dataclasses
import datetime
import signal
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import ResourceExistsError
from azure.storage.blob import (
    BlobSasPermissions,
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    generate_blob_sas,
    generate_container_sas,
)

from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.e2e.support.fault_proxy import FaultProxy


@pytest.fixture(scope="module")
def azurite() -> Iterator[Azurite]:
    # One per module, not per session. A session-long emulator twice stopped answering for one to
    # over two minutes on a loaded machine, both times at the same point of the run, after more than
    # ten minutes and gigabytes of deleted test data: most likely Azurite's sweep of deleted blobs'
    # blocks, which runs every ten minutes. A module's emulator rarely lives that long, holds little
    # garbage, and starts in about a second.
    with Azurite() as emulator:
        yield emulator


@pytest.fixture(scope="session")
def https_azurite() -> Iterator[Azurite]:
    """A second emulator that serves HTTPS (and accepts bearer tokens); trust ``ca_bundle`` to use it."""
    with Azurite(oauth=True) as emulator:
        yield emulator


@pytest.fixture(scope="session")
def account_credential() -> AzureNamedKeyCredential:
    return AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)


@pytest.fixture(scope="module")
def service_client(azurite: Azurite) -> BlobServiceClient:
    return BlobServiceClient(azurite.account_url, credential={"account_name": ACCOUNT_NAME, "account_key": ACCOUNT_KEY})


@dataclasses.dataclass
class Container:
    """A container made for one test, with helpers to reach its blobs."""

    name: str
    url: str
    client: ContainerClient

    def blob_url(self, blob_name: str) -> str:
        return f"{self.url}/{blob_name}"

    def upload(self, blob_name: str, data: bytes) -> str:
        self.client.upload_blob(blob_name, data, overwrite=True)
        return self.blob_url(blob_name)

    def download(self, blob_name: str) -> bytes:
        return self.client.download_blob(blob_name).readall()

    def exists(self, blob_name: str) -> bool:
        return self.client.get_blob_client(blob_name).exists()

    def tamper(self, blob_name: str, offset: int | None = None) -> None:
        """Flip one byte of a blob (the middle one by default) behind its back: the metadata, and so
        the CRC-32 azstoragetorch recorded for the old bytes, stays as it was."""
        blob = self.client.get_blob_client(blob_name)
        metadata = blob.get_blob_properties().metadata
        data = bytearray(self.download(blob_name))
        data[len(data) // 2 if offset is None else offset] ^= 0xFF
        blob.upload_blob(bytes(data), overwrite=True, metadata=metadata)

    def blob_sas(self, blob_name: str, **permissions: bool) -> str:
        return generate_blob_sas(
            ACCOUNT_NAME,
            self.name,
            blob_name,
            account_key=ACCOUNT_KEY,
            permission=BlobSasPermissions(**(permissions or {"read": True})),
            expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
        )

    def container_sas(self, **permissions: bool) -> str:
        return generate_container_sas(
            ACCOUNT_NAME,
            self.name,
            account_key=ACCOUNT_KEY,
            permission=ContainerSasPermissions(**(permissions or {"read": True, "list": True})),
            expiry=datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(hours=1),
        )


def _make_container(service_client: BlobServiceClient, azurite: Azurite, public_access: str | None) -> Container:
    name = f"test-{uuid.uuid4().hex[:20]}"
    try:
        client = service_client.create_container(name, public_access=public_access)
    except ResourceExistsError:
        # The name is new, so this is our own request: on a loaded machine its answer can come after
        # the SDK's timeout, and the SDK's retry then finds the container the first attempt made.
        client = service_client.get_container_client(name)
    return Container(name=name, url=azurite.container_url(name), client=client)


@pytest.fixture
def container(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[Container]:
    """A new private container, deleted after the test."""
    made = _make_container(service_client, azurite, None)
    yield made
    made.client.delete_container()


@pytest.fixture
def public_container(service_client: BlobServiceClient, azurite: Azurite) -> Iterator[Container]:
    """A new container whose blobs anyone may read (but not write)."""
    made = _make_container(service_client, azurite, "container")
    yield made
    made.client.delete_container()


@pytest.fixture
def proxy(azurite: Azurite) -> Iterator[FaultProxy]:
    """A :class:`~tests.e2e.support.fault_proxy.FaultProxy` in front of the session's emulator."""
    with FaultProxy(azurite.port) as running:
        yield running


@pytest.fixture
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make retry back-off instant, for tests that exhaust every retry (the SDK's alone wait ~3 s).

    Both the SDK's retry policy and the package sleep through ``time.sleep``; the proxy never does.
    """
    monkeypatch.setattr(time, "sleep", lambda seconds: None)


@pytest.fixture
def stop_workers() -> Iterator[list[Any]]:
    """DataLoaders and loader iterators whose worker processes are shut down when the test ends.

    Left to the garbage collector, a loader kept alive by a failed assertion's traceback shuts its
    workers down later, in some other test, and that can stall it for 5 s per worker.
    """
    loaders: list[Any] = []
    yield loaders
    for loader in loaders:
        for candidate in (loader, getattr(loader, "_iterator", None)):
            if hasattr(candidate, "_shutdown_workers"):
                candidate._shutdown_workers()


@pytest.fixture
def python_ctrl_c() -> Iterator[None]:
    """Python's own Ctrl-C handler for the test, whatever the process inherited: a test run started in
    the background by a non-interactive shell ignores SIGINT, and the signal would then do nothing
    (here, and in the subprocesses the test starts, which inherit it)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)
