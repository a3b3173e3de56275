"""PyTorch datasets whose samples are blobs: :class:`BlobDataset`, :class:`IterableBlobDataset`, :class:`Blob`."""

from __future__ import annotations

from azstoragetorch._compat import warn_if_untested
from azstoragetorch.datasets._blob import READ_ALL_BLOCK_SIZE as READ_ALL_BLOCK_SIZE
from azstoragetorch.datasets._blob import READ_ALL_CONCURRENCY as READ_ALL_CONCURRENCY
from azstoragetorch.datasets._blob import Blob
from azstoragetorch.datasets._iterable import DEFAULT_PREFETCH as DEFAULT_PREFETCH
from azstoragetorch.datasets._iterable import IterableBlobDataset
from azstoragetorch.datasets._map_style import BlobDataset
from azstoragetorch.datasets._sample_pool import MAX_SAMPLE_THREADS as MAX_SAMPLE_THREADS
from azstoragetorch.datasets._samples import _read_whole_blob
from azstoragetorch.datasets._sources import _Blobs

__all__ = ["Blob", "BlobDataset", "IterableBlobDataset"]

warn_if_untested("torch")

# One module per idea; every class and function that a pickle, a repr or a LightningCLI class_path
# names keeps the package's path: datasets and their Blobs are pickled into spawn and forkserver
# DataLoader workers, and a pickle must not depend on which private module defines what it holds.
for _named in (Blob, BlobDataset, IterableBlobDataset, _Blobs, _read_whole_blob):
    _named.__module__ = __name__
