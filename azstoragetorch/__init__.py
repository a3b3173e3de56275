"""azstoragetorch: read training data from and write checkpoints to Azure Blob Storage from PyTorch."""

__version__ = "0.1.0"

# Imported after __version__, which the client layer reads.
from azstoragetorch._client import TransferStats, stats

__all__ = ["TransferStats", "__version__", "stats"]
