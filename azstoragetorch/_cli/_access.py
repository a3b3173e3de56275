"""What the URLs a command is given name, and the credential each is opened with."""

from __future__ import annotations

import os

from azure.core.credentials import AzureNamedKeyCredential

from azstoragetorch._client import AzStorageTorchContainerClient, BlobUrl, ContainerUrl, CredentialArgument

ACCOUNT_KEY_VARIABLE = "AZURE_STORAGE_KEY"


class _UsageError(Exception):
    """Arguments that parse but make no sense together (reported like argparse's own errors)."""


def _credential(url: ContainerUrl | BlobUrl, anonymous: bool) -> CredentialArgument:
    if anonymous:
        return False
    if url.has_sas:
        return None  # the SAS in the URL is used
    key = os.environ.get(ACCOUNT_KEY_VARIABLE)
    if key:
        return AzureNamedKeyCredential(url.account_name, key)
    return None  # DefaultAzureCredential


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _container_and_prefix(url: str, anonymous: bool) -> tuple[AzStorageTorchContainerClient, str]:
    container_url, prefix = ContainerUrl.parse_with_prefix(url)
    return AzStorageTorchContainerClient(container_url, _credential(container_url, anonymous)), prefix


def _blob_url(client: AzStorageTorchContainerClient, name: str) -> str:
    """The URL of blob ``name``, with the container's SAS if it has one (never printed)."""
    return client.container_url.blob_url(name).request_url()
