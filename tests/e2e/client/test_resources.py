"""Connections under load: a batch of samples fetched at once reuses its connections.

Every connection the pool cannot keep is closed after its request, and on Azure each new one costs
a TLS handshake. The sample threads of a dataset and the transfer threads share one pool per host,
which must hold a connection for each of them.
"""

from __future__ import annotations

import pytest
from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch import datasets
from azstoragetorch._client import _pipeline
from azstoragetorch.datasets import BlobDataset
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy, Gather


@pytest.fixture
def fresh_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connection pools made in this test, so that none is left over from an earlier one."""
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())


def test_a_batch_as_large_as_the_sample_threads_keeps_every_connection(
    fresh_pools: None,
    proxy: FaultProxy,
    container: Container,
    account_credential: AzureNamedKeyCredential,
) -> None:
    threads = datasets.MAX_SAMPLE_THREADS
    names = [f"sample-{index:03}" for index in range(threads)]
    for name in names:
        container.upload(name, name.encode())
    dataset = BlobDataset.from_blob_urls(
        [proxy.url(container.blob_url(name)) for name in names], credential=account_credential
    )
    opened = []
    for batch in range(2):
        # Hold the requests until as many are in flight as there are sample threads: that many
        # connections are in use at once, whatever the machine's speed. The timeout only guards
        # against a hang: on a starved machine 128 new connections can take minutes to arrive.
        together = Gather(threads, timeout=600)
        proxy.add_fault(lambda seen: seen.operation == "GetBlob", together, times=threads)
        connections_before = proxy.connections_accepted
        samples = dataset.__getitems__(list(range(len(names))))
        assert together.opened.is_set(), f"batch {batch}"
        assert [sample["data"] for sample in samples] == [name.encode() for name in names]
        opened.append(proxy.connections_accepted - connections_before)  # counted where they arrive
    # The second batch reuses every connection of the first. A pool that kept fewer, or closed a
    # connection after its request, would open that many again.
    assert opened == [threads, 0], f"connections opened per batch of {threads} requests at once: {opened}"
