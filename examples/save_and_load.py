"""Save a model's weights to Azure Blob Storage and load them back.

Point it at a container you can write to::

    export AZSTORAGETORCH_CONTAINER_URL="https://<account>.blob.core.windows.net/<container>"
    python examples/save_and_load.py

Requests are authorized with ``DefaultAzureCredential`` (``az login``, a managed identity, environment
variables, ...), which needs a data role such as "Storage Blob Data Contributor" on the container. A
container URL that carries a SAS token (``...<container>?sv=...&sig=...``) is used as is instead.

Without the environment variable the example runs against a local Azurite emulator.
"""

from __future__ import annotations

import os

import torch
from azure.core.credentials import AzureNamedKeyCredential
from azure.storage.blob import BlobServiceClient
from torch import nn

from azstoragetorch.io import BlobIO
from azstoragetorch.testing import Azurite


def blob_url(container_url: str, blob_name: str) -> str:
    """The URL of ``blob_name`` in the container, keeping a SAS token from the container URL."""
    base, _, sas = container_url.partition("?")
    return f"{base.rstrip('/')}/{blob_name}" + (f"?{sas}" if sas else "")


def save_and_load(container_url: str, credential: AzureNamedKeyCredential | None = None) -> None:
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    url = blob_url(container_url, "examples/model_weights.pt")

    with BlobIO(url, "wb", credential=credential) as f:
        torch.save(model.state_dict(), f)
    with BlobIO(url, "rb", credential=credential) as f:
        state = torch.load(f)

    restored = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 10))
    restored.load_state_dict(state)
    pairs = zip(model.state_dict().values(), restored.state_dict().values(), strict=True)
    if not all(torch.equal(saved, loaded) for saved, loaded in pairs):
        raise SystemExit("The loaded weights differ from the saved ones.")
    print(f"Saved and loaded {url.partition('?')[0]}")


def main() -> None:
    container_url = os.environ.get("AZSTORAGETORCH_CONTAINER_URL")
    if container_url:
        save_and_load(container_url)  # credential=None: DefaultAzureCredential
        return
    print("AZSTORAGETORCH_CONTAINER_URL is not set; using a local Azurite emulator.")
    with Azurite() as azurite:
        BlobServiceClient.from_connection_string(azurite.connection_string).create_container("examples")
        save_and_load(azurite.container_url("examples"), azurite.credential)


if __name__ == "__main__":
    main()
