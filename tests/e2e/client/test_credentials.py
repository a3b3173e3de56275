"""Every credential form against Azurite, and the rule that a SAS in the URL wins."""

import time
from typing import Any

import pytest
from azure.core.credentials import AccessToken, AzureNamedKeyCredential, AzureSasCredential
from azure.core.exceptions import ClientAuthenticationError
from azure.storage.blob import BlobServiceClient

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite, AzuriteTokenCredential
from tests.conftest import Container


class RecordingTokenCredential:
    def __init__(self) -> None:
        self.scopes: list[tuple[str, ...]] = []

    def get_token(self, *scopes: str, **kwargs: Any) -> AccessToken:
        self.scopes.append(scopes)
        return AccessToken("not-a-real-token", int(time.time()) + 3600)


def round_trip(url: str, credential: Any, data: bytes = b"payload") -> bytes:
    with BlobIO(url, "wb", credential=credential) as f:
        f.write(data)
    with BlobIO(url, "rb", credential=credential) as f:
        return f.read()


def test_account_key(container: Container, account_credential: AzureNamedKeyCredential) -> None:
    assert round_trip(container.blob_url("dir/key blob ü.bin"), account_credential) == b"payload"


def test_sas_in_url_for_read_and_write(container: Container) -> None:
    sas = container.blob_sas("sas.bin", read=True, write=True, create=True)
    assert round_trip(f"{container.blob_url('sas.bin')}?{sas}", None) == b"payload"


def test_container_sas_in_url(container: Container) -> None:
    sas = container.container_sas(read=True, write=True, create=True)
    assert round_trip(f"{container.blob_url('container-sas.bin')}?{sas}", None) == b"payload"


def test_azure_sas_credential(container: Container) -> None:
    sas = container.container_sas(read=True, write=True, create=True)
    assert round_trip(container.blob_url("sas-credential.bin"), AzureSasCredential(sas)) == b"payload"


@pytest.mark.parametrize(
    "ignored", [False, AzureNamedKeyCredential("devstoreaccount1", "AAAA" + "B" * 84), RecordingTokenCredential()]
)
def test_sas_in_url_wins_over_the_credential_argument(container: Container, ignored: Any) -> None:
    container.upload("blob", b"x")
    sas = container.blob_sas("blob", read=True)
    with BlobIO(f"{container.blob_url('blob')}?{sas}", "rb", credential=ignored) as f:
        assert f.read() == b"x"
    if isinstance(ignored, RecordingTokenCredential):
        assert ignored.scopes == []


def test_read_only_sas_cannot_write(container: Container) -> None:
    from azstoragetorch.exceptions import FatalBlobIOWriteError

    container.upload("blob", b"old")
    sas = container.blob_sas("blob", read=True)
    f = BlobIO(f"{container.blob_url('blob')}?{sas}", "wb")
    f.write(b"new")
    with pytest.raises(FatalBlobIOWriteError) as info:
        f.close()
    assert "sig=" not in str(info.value)
    assert container.download("blob") == b"old"


def test_token_credential_over_https(https_azurite: Azurite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", https_azurite.ca_bundle)  # trust the emulator's certificate
    service = BlobServiceClient(
        https_azurite.account_url, credential=https_azurite.credential, connection_verify=https_azurite.ca_bundle
    )
    service.create_container("tokens")
    credential = AzuriteTokenCredential()
    assert round_trip(https_azurite.blob_url("tokens", "by token.bin"), credential) == b"payload"
    assert set(credential.requested_scopes) == {("https://storage.azure.com/.default",)}


def test_token_credential_is_sent_even_to_a_plain_http_emulator(container: Container) -> None:
    # Tokens normally require HTTPS; on loopback the request goes out and plain Azurite refuses
    # the scheme, which shows the token was obtained and sent rather than silently dropped.
    credential = RecordingTokenCredential()
    url = container.upload("blob", b"x")
    with pytest.raises(ClientAuthenticationError):
        BlobIO(url, "rb", credential=credential)
    assert credential.scopes == [("https://storage.azure.com/.default",)]
