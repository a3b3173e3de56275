"""PyTorch Lightning integration: checkpoints and data in Azure Blob Storage.

- :class:`AzureBlobCheckpointIO` saves and loads Trainer checkpoints in Blob Storage.
- :class:`BlobDataModule` serves train/val/test/predict data from containers, with
  :class:`BlobSplit` describing each split.
- :class:`BlobSaveConfigCallback` lets ``LightningCLI`` save its config into a container.

Needs Lightning: ``pip install "azstoragetorch[lightning]"``.
"""

from __future__ import annotations

try:
    import lightning.pytorch  # noqa: F401  # fail here, with how to install it, rather than deep inside
except ImportError as error:  # pragma: no cover - exercised by a test in a process without Lightning
    raise ImportError(
        "azstoragetorch.integrations.lightning needs PyTorch Lightning. "
        'Install it with: pip install "azstoragetorch[lightning]"'
    ) from error

from azstoragetorch._compat import warn_if_untested
from azstoragetorch.integrations.lightning._checkpoint_io import AzureBlobCheckpointIO
from azstoragetorch.integrations.lightning._config_callback import BlobSaveConfigCallback
from azstoragetorch.integrations.lightning._data_module import BlobDataModule, BlobSplit

__all__ = ["AzureBlobCheckpointIO", "BlobDataModule", "BlobSaveConfigCallback", "BlobSplit"]

warn_if_untested("torch")
warn_if_untested("lightning")

# One module per feature; the public path stays azstoragetorch.integrations.lightning (for LightningCLI
# configs' class_path, pickles and the docs).
for _public in (AzureBlobCheckpointIO, BlobDataModule, BlobSaveConfigCallback, BlobSplit):
    _public.__module__ = __name__
