"""The in-memory fake must keep the real client's method signatures, or unit tests pass against a stale API."""

import inspect

import pytest

from azstoragetorch._client._blob_client import AzStorageTorchBlobClient
from tests.unit.fakes import InMemoryBlobClient

FAKED_METHODS = ["fetch_range_into", "stage_block", "commit_block_list", "put_blob"]


@pytest.mark.parametrize("name", FAKED_METHODS)
def test_fake_methods_accept_what_the_real_client_accepts(name: str) -> None:
    real = inspect.signature(getattr(AzStorageTorchBlobClient, name))
    fake = inspect.signature(getattr(InMemoryBlobClient, name))
    describe = lambda signature: [(p.name, p.kind, p.default) for p in signature.parameters.values()]  # noqa: E731
    assert describe(fake) == describe(real)
