"""No SAS token or account key in exception messages, log records, reprs or returned URLs."""

import base64
import logging
import traceback

import pytest
from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import AzureError

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import ACCOUNT_KEY
from tests.conftest import Container


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
