"""Every public path, driven with SAS tokens and with the account key at DEBUG logging: neither the SAS
signature nor the key may appear in any log record, warning, exception message, traceback text or repr.

Successes and failures are both driven, since failures are where URLs end up in messages.
"""

from __future__ import annotations

import logging
import traceback
import urllib.parse
import warnings
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from azstoragetorch.datasets import BlobDataset, IterableBlobDataset
from azstoragetorch.integrations.dcp import BlobStorageReader, BlobStorageWriter
from azstoragetorch.integrations.lightning import AzureBlobCheckpointIO, BlobDataModule, BlobSplit
from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite
from tests.conftest import Container
from tests.e2e.support.fault_proxy import FaultProxy, Respond
from tests.e2e.support.lightning_helpers import TinyModel, loader, trainer

pytestmark = [
    pytest.mark.filterwarnings("ignore::UserWarning"),
    pytest.mark.usefixtures("no_backoff"),
]


class Witness:
    """Everything a user could see: exception texts (with their tracebacks and chains) and reprs."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    def error(self, call: Callable[[], Any]) -> BaseException:
        try:
            call()
        except BaseException as error:  # DCP's CheckpointException is a BaseException
            self.texts.append("".join(traceback.format_exception(error)) + repr(error) + str(error))
            return error
        raise AssertionError("expected an error")

    def shows(self, *objects: Any) -> None:
        self.texts += [repr(item) + str(item) for item in objects]


def everything_logged(caplog: pytest.LogCaptureFixture, caught: list[warnings.WarningMessage]) -> str:
    records = []
    for record in caplog.records:
        records.append(record.getMessage())
        if record.exc_info:
            records.append("".join(traceback.format_exception(*record.exc_info)))
    return "\n".join(records + [str(warning.message) for warning in caught])


def drive_every_path(
    witness: Witness,
    container: Container,
    azurite: Azurite,
    proxy: FaultProxy,
    *,
    query: str,
    credential: Any,
    plugin_credential: Any,
) -> None:
    """Use every public path once successfully and once failing; ``query`` goes on every URL."""

    def url(name: str) -> str:
        return f"{container.blob_url(name)}{'?' if query else ''}{query}"

    def proxied(name: str) -> str:
        return proxy.url(url(name))

    folder = f"{container.url}/data{'?' if query else ''}{query}"
    missing_container = f"{azurite.container_url('no-such-container')}{'?' if query else ''}{query}"

    # BlobIO: write, read (with both checks), and failures both ways.
    with BlobIO(url("data/a"), "wb", credential=credential, block_size=1024) as writer:
        writer.write(b"a" * 5000)
        witness.shows(writer)
    with BlobIO(url("data/a"), "rb", credential=credential, validate_content=True, verify_checksum=True) as reader:
        assert reader.read() == b"a" * 5000
        witness.shows(reader, reader.name)
    with BlobIO(url("data/b"), "wb", credential=credential) as writer:
        writer.write(b"b" * 100)
    witness.error(lambda: BlobIO(url("data/missing"), "rb", credential=credential))
    proxy.add_fault(lambda seen: seen.operation == "PutBlob", Respond(503, "ServerBusy"), times=None)

    def failing_write() -> None:
        with BlobIO(proxied("data/c"), "wb", credential=credential) as failing:
            failing.write(b"c")

    witness.error(failing_write)
    proxy._faults.clear()

    # Datasets, with and without DataLoader workers, and a container that cannot be listed.
    for kind in (BlobDataset, IterableBlobDataset):
        dataset = kind.from_container_url(folder.replace("/data", ""), prefix="data/", credential=credential)
        samples = list(DataLoader(dataset, batch_size=None))
        assert sorted(sample["url"] for sample in samples) == [
            container.blob_url("data/a"),
            container.blob_url("data/b"),
        ]
        witness.shows(dataset, *(sample["url"] for sample in samples))
        by_url = kind.from_blob_urls([url("data/a"), url("data/missing")], credential=credential)
        witness.error(lambda by_url=by_url: list(DataLoader(by_url, batch_size=None, num_workers=2)))
    blob = BlobDataset.from_blob_urls(url("data/a"), credential=credential)._blobs[0]
    witness.shows(blob, blob.url, blob.blob_name)
    witness.error(lambda: BlobDataset.from_container_url(missing_container, credential=credential))
    witness.error(lambda: list(IterableBlobDataset.from_container_url(missing_container, credential=credential)))

    # Lightning: the plugin directly, a Trainer with ModelCheckpoint, load_from_checkpoint, the data module.
    plugin = AzureBlobCheckpointIO(credential=plugin_credential, account_url=azurite.account_url)
    plugin.save_checkpoint({"w": torch.ones(3)}, url("ckpt/direct.ckpt"))  # a SAS on a file URL is fine
    assert torch.equal(plugin.load_checkpoint(url("ckpt/direct.ckpt"))["w"], torch.ones(3))
    witness.error(lambda: plugin.load_checkpoint(url("ckpt/missing.ckpt")))
    witness.error(lambda: plugin.save_checkpoint({}, f"{container.blob_url('ckpt')}?{query or 'sig=x'}/joined.ckpt"))
    checkpoints = ModelCheckpoint(dirpath=container.blob_url("ckpt/run"), save_last=True)
    trainer(plugins=[plugin], callbacks=[checkpoints]).fit(TinyModel(), loader())
    TinyModel.load_from_checkpoint(checkpoints.last_model_path)
    plugin.remove_checkpoint(url("ckpt/direct.ckpt"))
    witness.shows(plugin, checkpoints.last_model_path)
    data = BlobDataModule(train=BlobSplit(folder, iterable=True), val=folder, credential=credential, batch_size=2)
    data.setup("fit")
    assert len(list(data.train_dataloader())) == 1
    witness.shows(data.splits, data.state_dict())
    witness.error(lambda: BlobDataModule(train=missing_container, credential=credential).setup("fit"))

    # DCP: save, load, and a checkpoint that is not there.
    state = {"w": torch.arange(10.0)}
    writer_ = BlobStorageWriter(url("dcp"), credential=credential)
    dcp.save(state, storage_writer=writer_)
    target = {"w": torch.zeros(10)}
    reader_ = BlobStorageReader(url("dcp"), credential=credential, verify_checksum=True)
    dcp.load(target, storage_reader=reader_)
    assert torch.equal(target["w"], state["w"])
    witness.shows(writer_.checkpoint_id, reader_.checkpoint_id, writer_, reader_)
    witness.error(
        lambda: dcp.load({"w": torch.zeros(10)}, storage_reader=BlobStorageReader(url("none"), credential=credential))
    )
    witness.error(lambda: BlobStorageWriter(f"ftp://example.com/x?{query or 'sig=x'}"))


def test_no_sas_signature_anywhere(
    container: Container, azurite: Azurite, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    sas = container.container_sas(read=True, write=True, delete=True, list=True, create=True, add=True)
    signature = dict(urllib.parse.parse_qsl(sas))["sig"]
    witness = Witness()

    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive_every_path(
            witness, container, azurite, proxy, query=sas, credential=False, plugin_credential=AzureSasCredential(sas)
        )

    seen = everything_logged(caplog, caught) + "\n".join(witness.texts)
    assert any("GET" in record.getMessage() for record in caplog.records), "expected the HTTP stack's debug records"
    for form in {signature, urllib.parse.quote(signature, safe=""), sas.split("sig=", 1)[1].split("&")[0]}:
        assert form not in seen, f"the SAS signature appeared ({form[:6]}...)"


def test_no_account_key_anywhere(
    container: Container, azurite: Azurite, proxy: FaultProxy, caplog: pytest.LogCaptureFixture
) -> None:
    credential = AzureNamedKeyCredential(ACCOUNT_NAME, ACCOUNT_KEY)
    witness = Witness()

    with caplog.at_level(logging.DEBUG), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drive_every_path(
            witness, container, azurite, proxy, query="", credential=credential, plugin_credential=credential
        )

    seen = everything_logged(caplog, caught) + "\n".join(witness.texts)
    assert ACCOUNT_KEY not in seen
    assert ACCOUNT_KEY[:20] not in seen
