"""The in-memory fake must keep the real client's method signatures, or unit tests pass against a stale API."""

import inspect

import pytest

from azstoragetorch._client._blob_client import AzStorageTorchBlobClient
from tests.unit.fakes import InMemoryBlobClient

FAKED_METHODS = ["stage_block", "commit_block_list", "put_blob"]


@pytest.mark.parametrize("name", FAKED_METHODS)
def test_fake_methods_accept_what_the_real_client_accepts(name: str) -> None:
    real = inspect.signature(getattr(AzStorageTorchBlobClient, name))
    fake = inspect.signature(getattr(InMemoryBlobClient, name))
    describe = lambda signature: [(p.name, p.kind, p.default) for p in signature.parameters.values()]  # noqa: E731
    assert describe(fake) == describe(real)


def test_the_fake_fetch_takes_the_real_clients_arguments_and_no_others() -> None:
    # The fake takes fetch_range_into's signature from the client (signature_of) rather than repeat it.
    real = inspect.signature(AzStorageTorchBlobClient.fetch_range_into).parameters.values()
    fake = inspect.signature(InMemoryBlobClient.fetch_range_into).parameters.values()
    keyword_only = {p.name for p in real if p.kind is inspect.Parameter.KEYWORD_ONLY}
    assert keyword_only == InMemoryBlobClient.FETCH_KEYWORDS
    positional = [(p.name, p.kind) for p in real if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD]
    assert [(p.name, p.kind) for p in fake if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD] == positional
    with pytest.raises(TypeError, match="unexpected keyword arguments: lenght"):
        InMemoryBlobClient(b"x").fetch_range_into(0, memoryview(bytearray(1)), etag=None, lenght=1)
