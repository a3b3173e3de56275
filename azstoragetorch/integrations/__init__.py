"""Adapters that plug azstoragetorch into PyTorch Lightning and torch.distributed.checkpoint.

- :mod:`azstoragetorch.integrations.lightning`: the ``AzureBlobCheckpointIO`` plugin, ``BlobDataModule``
  and the ``LightningCLI`` callback (needs the ``lightning`` extra);
- :mod:`azstoragetorch.integrations.dcp`: ``BlobStorageWriter`` and ``BlobStorageReader`` for
  ``torch.distributed.checkpoint``.

Each is a small adapter over :class:`azstoragetorch.io.BlobIO`, the datasets and the ``_client`` layer's
exports; importing this package imports neither.
"""
