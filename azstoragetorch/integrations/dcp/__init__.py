"""torch.distributed.checkpoint in Blob Storage: :class:`BlobStorageWriter` and :class:`BlobStorageReader`.

They are torch's ``FileSystemWriter`` and ``FileSystemReader`` with the file system swapped for a
container (the seam torch itself uses for its fsspec classes), so planning, sharding, resharding and
the checkpoint format stay torch's own: a ``.metadata`` file and shard files under a blob prefix,
with the bytes ``FileSystemWriter`` writes on disk. What changes is how the bytes move: each shard
file is a :class:`~azstoragetorch.io.BlobIO` uploading blocks in parallel, and loads fetch only the
byte ranges they need, sorted, coalesced and in parallel. Two things differ from ``FileSystemWriter``
on purpose, so that an overwrite is safe at every instant: shard file names carry a token of their
save, so a save never touches a file that the checkpoint it replaces still uses, and ``.metadata``
is committed last, in one request, and only over the version the save found when it started.
"""

# One idea per module: _filesystem (torch's FileSystemBase seam over blob URLs), _shard_files (a
# save's shard files, failing together), _writer, _reader, _spans (which byte ranges a load
# fetches), _pinned_files (a load's shard files, each pinned to one version, and their checksums),
# _in_memory (loading an item from fetched bytes) and _locations (checkpoint URLs). How the spans
# are fetched, in order within a memory budget, is a read strategy: azstoragetorch._reads.PlannedSpans.

from azstoragetorch._compat import warn_if_untested
from azstoragetorch.integrations.dcp._filesystem import _BlobFiles
from azstoragetorch.integrations.dcp._reader import BlobStorageReader, CheckpointVerification
from azstoragetorch.integrations.dcp._writer import BlobStorageWriter, _SeenMetadata

__all__ = ["BlobStorageReader", "BlobStorageWriter", "CheckpointVerification"]

warn_if_untested("torch")

# The classes keep this package as their home: it is where users, LightningCLI configs, reprs and
# Sphinx name them, and where pickle looks them up. _BlobFiles and _SeenMetadata are pickled inside
# a writer (dcp.async_save with the process checkpointer sends the writer to its saving process),
# so they stay reachable here under the names pickles of the writer record.
for _cls in (BlobStorageWriter, BlobStorageReader, CheckpointVerification, _BlobFiles, _SeenMetadata):
    _cls.__module__ = __name__
del _cls
