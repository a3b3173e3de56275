"""Train with LightningCLI, everything configured in YAML, data and checkpoints in Blob Storage.

::

    python examples/lightning_cli.py fit --config examples/lightning_cli_config.yaml

With ``AZSTORAGETORCH_CONTAINER_URL`` set (``https://<account>.blob.core.windows.net/<container>``), the
example uploads its data set (``examples/shapes.py``) to that container if it is not there yet, and points
the config's URLs at it; requests use ``DefaultAzureCredential``. Without it, it starts a local Azurite
emulator and does the same there, adding the emulator's account key as the credential. Either way the
command line is passed on to LightningCLI, so any option of the config can be overridden there too.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from typing import Any

from azure.storage.blob import BlobServiceClient, ContainerClient
from lightning.pytorch.cli import LightningCLI

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from shapes import ShapesClassifier, upload_shapes

from azstoragetorch.integrations.lightning import BlobSaveConfigCallback
from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME, Azurite


def overrides(container_url: str, credential: dict[str, Any] | None, account_url: str | None) -> list[str]:
    """Command-line options that point the config's placeholder URLs at ``container_url``."""
    plugin: dict[str, Any] = {"class_path": "azstoragetorch.integrations.lightning.AzureBlobCheckpointIO"}
    if credential or account_url:
        plugin["init_args"] = {"credential": credential, "account_url": account_url}
    options = [
        f"--trainer.default_root_dir={container_url}/shapes-cli",
        f"--trainer.plugins={json.dumps([plugin])}",
        f"--data.init_args.train.source={container_url}/shapes/train",
        f"--data.init_args.val={container_url}/shapes/val",
    ]
    if credential:
        options.append(f"--data.init_args.credential={json.dumps(credential)}")
    return options


def ensure_data(container: ContainerClient, container_url: str, credential: Any) -> None:
    if next(iter(container.list_blobs(name_starts_with="shapes/train/")), None) is None:
        print("Uploading the shapes data set ...")
        upload_shapes(f"{container_url}/shapes/train", 2048, seed=0, credential=credential)
        upload_shapes(f"{container_url}/shapes/val", 512, seed=1, credential=credential)


def run_cli(extra_arguments: list[str]) -> None:
    sys.argv = [sys.argv[0], *sys.argv[1:], *extra_arguments]
    LightningCLI(
        ShapesClassifier,
        subclass_mode_data=True,
        save_config_callback=BlobSaveConfigCallback,  # saves config.yaml into the container
        save_config_kwargs={"overwrite": True},
    )


def main() -> None:
    warnings.filterwarnings("ignore", category=UserWarning)
    container_url = os.environ.get("AZSTORAGETORCH_CONTAINER_URL", "").rstrip("/")
    if container_url:
        from azure.identity import DefaultAzureCredential

        container = ContainerClient.from_container_url(container_url, credential=DefaultAzureCredential())
        ensure_data(container, container_url, None)
        run_cli(overrides(container_url, None, None))
        return
    print("AZSTORAGETORCH_CONTAINER_URL is not set; using a local Azurite emulator.")
    with Azurite() as azurite:
        container = BlobServiceClient.from_connection_string(azurite.connection_string).create_container("examples")
        container_url = azurite.container_url("examples")
        ensure_data(container, container_url, azurite.credential)
        key = {"class_path": "azure.core.credentials.AzureNamedKeyCredential"}
        key["init_args"] = {"name": ACCOUNT_NAME, "key": ACCOUNT_KEY}  # type: ignore[assignment]
        run_cli(overrides(container_url, key, azurite.account_url))
        names = sorted(blob.name for blob in container.list_blobs(name_starts_with="shapes-cli/"))
        print("In the container:", ", ".join(names))
        print("lightning CLI example OK" if any(name.endswith("/last.ckpt") for name in names) else "no last.ckpt!")


if __name__ == "__main__":
    main()
