"""azstoragetorch: read training data from and write checkpoints to Azure Blob Storage from PyTorch."""

__version__ = "0.1.0"
