"""No SAS token or account key in anything a user can see: log records, warnings, exception messages,
traceback text, reprs and returned URLs.

The first tests drive every public path, with SAS tokens and with the account key at DEBUG logging,
through successes and failures both (failures are where URLs end up in messages). The last ones
look closely at ``BlobIO``: its reprs and names, errors from a missing blob or a refused connection,
and account keys that are wrong or not even base64.
"""

from __future__ import annotations

import base64
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
from azure.core.exceptions import AzureError
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


# -- BlobIO up close --------------------------------------------------------------------------


def _signature(sas: str) -> str:
    return next(piece.split("=", 1)[1] for piece in sas.split("&") if piece.startswith("sig="))


def _all_text(error: BaseException) -> str:
    return "".join(traceback.format_exception(error)) + repr(error)


def test_sas_never_in_logs_reprs_or_names(container: Container, caplog: pytest.LogCaptureFixture) -> None:
    container.upload("blob", b"x" * 10_000)
    sas = container.blob_sas("blob", read=True, write=True)
    url = f"{container.blob_url('blob')}?{sas}"
    with caplog.at_level(logging.DEBUG):
        with BlobIO(url, "rb", block_size=1024) as f:
            assert f.read() == b"x" * 10_000
            shown = repr(f) + f.name
        with BlobIO(url, "wb") as f:
            f.write(b"y")
            shown += repr(f) + f.name
    assert caplog.records, "expected debug records from the HTTP stack"
    assert _signature(sas) not in caplog.text
    assert "sig=" not in shown


def test_sas_never_in_error_messages(container: Container) -> None:
    sas = container.blob_sas("missing", read=True)
    with pytest.raises(AzureError) as info:
        BlobIO(f"{container.blob_url('missing')}?{sas}", "rb")
    assert _signature(sas) not in _all_text(info.value)


def test_sas_never_in_connection_errors() -> None:
    sas = "sv=2021-08-06&sp=r&sig=c2VjcmV0LXNpZ25hdHVyZQ%3D%3D"
    with pytest.raises(AzureError) as info:
        # Nothing listens on port 9: the connection is refused and requests names the URL.
        BlobIO(f"http://127.0.0.1:9/devstoreaccount1/c/b?{sas}", "rb")
    assert "c2VjcmV0LXNpZ25hdHVyZQ" not in _all_text(info.value)


def test_account_key_never_shown(container: Container, caplog: pytest.LogCaptureFixture) -> None:
    url = container.upload("blob", b"x")
    wrong = base64.b64encode(b"a wrong but well-formed account key").decode()
    not_base64 = "not base64 at all!"
    for key, error_type in ((wrong, AzureError), (not_base64, ValueError)):
        with caplog.at_level(logging.DEBUG), pytest.raises(error_type) as info:
            BlobIO(url, "rb", credential=AzureNamedKeyCredential("devstoreaccount1", key))
        assert key not in _all_text(info.value) + caplog.text
    with BlobIO(url, "rb", credential=AzureNamedKeyCredential("devstoreaccount1", ACCOUNT_KEY)) as f:
        assert ACCOUNT_KEY not in repr(f) + repr(f._client) + repr(f._client._get_pipeline()._impl_policies)
