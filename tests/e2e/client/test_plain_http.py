"""Every public entry point refuses to send a credential over plain http:// to another machine, and
sends nothing at all when it does.

Another machine is a host that is not loopback (``localhost``, 127.0.0.0/8, ::1). Traffic must never
leave this machine, so the host is ``stub.invalid`` (a reserved name that resolves nowhere) and, for
the duration of a test, this process's resolver maps it to a stub server on 127.0.0.1 and counts the
lookups. Each refusal is paired with the same call made anonymously (which plain http allows): that
one does look the name up and reach the stub, which proves that a request of the refused call would
have been seen.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential
from torch.distributed.checkpoint.api import CheckpointException

from azstoragetorch import _cli
from azstoragetorch._client import _pipeline
from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from tests.stub_server import StubServer

HOST = "stub.invalid"
SAS = "sv=2021-08-06&sr=c&sp=rwl&se=2030-01-01T00%3A00%3A00Z&sig=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
KEY = "bm90LXRoZS1kZXZlbG9wbWVudC1rZXk="  # not Azurite's published key, so a real secret
REFUSAL = "Refusing to send .* over plain http://"


class Network:
    """The stub, and how often this process looked ``HOST`` up."""

    def __init__(self, stub: StubServer) -> None:
        self.stub = stub
        self.lookups = 0

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.stub.port}"

    def untouched(self) -> bool:
        return self.lookups == 0 and self.stub.connections == 0


@pytest.fixture
def network(monkeypatch: pytest.MonkeyPatch) -> Iterator[Network]:
    # New connection pools, straight to the socket (no proxy from the environment, which is not loopback).
    monkeypatch.setattr(_pipeline, "_state", _pipeline._ProcessState())
    for name in list(os.environ):
        if name.lower().endswith("_proxy") or name == _cli.ACCOUNT_KEY_VARIABLE:
            monkeypatch.delenv(name)
    # Refuses whatever arrives, so that a call that does reach it fails at once.
    stub = StubServer(b"HTTP/1.1 403 Forbidden\r\nx-ms-error-code: AuthorizationFailure\r\nContent-Length: 0\r\n\r\n")
    seen = Network(stub)
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(host, bytes):
            host = host.decode()
        if isinstance(host, str) and host.rstrip(".").lower() == HOST:
            seen.lookups += 1
            return real_getaddrinfo("127.0.0.1", port, *args, **kwargs)
        return real_getaddrinfo(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    yield seen
    stub.close()


def refused_and_nothing_sent(network: Network, call: Callable[[], object]) -> None:
    with pytest.raises((ValueError, CheckpointException)) as caught:
        call()
    message = str(caught.value)
    assert "Refusing to send" in message and "plain http://" in message, message
    assert "c2VjcmV0" not in message and KEY not in message
    assert network.untouched(), (network.lookups, network.stub.connections)


def anonymous_reaches_the_stub(network: Network, call: Callable[[], object]) -> None:
    with pytest.raises(BaseException):  # noqa: B017 (the stub refuses whatever arrives)
        call()
    assert network.lookups >= 1 and network.stub.connections >= 1


KEYED = AzureNamedKeyCredential("stub", KEY)


# -- datasets ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
@pytest.mark.parametrize("secret", ["sas", "key"])
def test_a_dataset_from_a_container_url_refuses_and_sends_nothing(network: Network, kind: Any, secret: str) -> None:
    url = f"{network.base}/container" + (f"?{SAS}" if secret == "sas" else "")
    credential = KEYED if secret == "key" else None
    refused_and_nothing_sent(network, lambda: kind.from_container_url(url, credential=credential))
    anonymous_reaches_the_stub(
        network, lambda: list(kind.from_container_url(f"{network.base}/container", credential=False))
    )


@pytest.mark.parametrize("kind", [BlobDataset, IterableBlobDataset])
def test_a_dataset_from_blob_urls_refuses_and_sends_nothing(network: Network, kind: Any) -> None:
    urls = [f"{network.base}/container/a", f"{network.base}/container/b"]
    refused_and_nothing_sent(network, lambda: list(kind.from_blob_urls(urls, credential=KEYED)))
    anonymous_reaches_the_stub(network, lambda: list(kind.from_blob_urls(urls, credential=False)))


# -- distributed checkpoints ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
@pytest.mark.parametrize("secret", ["sas", "key"])
def test_a_dcp_save_and_load_refuse_and_send_nothing(network: Network, secret: str) -> None:
    url = f"{network.base}/container/ckpt" + (f"?{SAS}" if secret == "sas" else "")
    credential = KEYED if secret == "key" else None
    state = {"w": torch.zeros(10)}
    refused_and_nothing_sent(
        network, lambda: dcp.save(state, storage_writer=BlobStorageWriter(url, credential=credential))
    )
    refused_and_nothing_sent(
        network, lambda: dcp.load(state, storage_reader=BlobStorageReader(url, credential=credential))
    )
    anonymous = f"{network.base}/container/ckpt"
    anonymous_reaches_the_stub(
        network, lambda: dcp.load(state, storage_reader=BlobStorageReader(anonymous, credential=False))
    )


# -- the command line ----------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    try:
        code = _cli.main(argv)
    except SystemExit as exit_:  # argparse's error(): usage errors and refused URLs
        code = int(exit_.code or 0)
    return code, capsys.readouterr().err


@pytest.mark.parametrize("secret", ["sas", "key"])
@pytest.mark.parametrize("command", ["ls", "cp-down", "cp-up"])
def test_the_cli_refuses_and_sends_nothing(
    network: Network,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Any,
    secret: str,
    command: str,
) -> None:
    query = f"?{SAS}" if secret == "sas" else ""
    if secret == "key":
        monkeypatch.setenv(_cli.ACCOUNT_KEY_VARIABLE, KEY)
    local = tmp_path / "model.pt"
    local.write_bytes(b"weights")
    remote = f"{network.base}/container/run/model.pt"
    argv = {
        "ls": ["ls", f"{network.base}/container/run{query}"],
        "cp-down": ["cp", f"{remote}{query}", str(tmp_path / "down")],
        "cp-up": ["cp", str(local), f"{remote}{query}"],
    }[command]
    code, err = run_cli(argv, capsys)
    assert code != 0 and "Refusing to send" in err and "plain http://" in err, err
    assert "c2VjcmV0" not in err and KEY not in err
    assert network.untouched(), (network.lookups, network.stub.connections)
    assert not (tmp_path / "down").exists()
    code, err = run_cli(["--anonymous", *[arg.split("?")[0] for arg in argv]], capsys)
    assert code != 0 and network.lookups >= 1 and network.stub.connections >= 1, err
