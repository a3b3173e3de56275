"""The datasets' local disk cache of whole blobs (``cache_dir=``): epoch 2 and later read local files.

**Layout.** One file per blob, named by the SHA-256 of the blob's URL with its snapshot or version
but never its SAS token, so a file name reveals neither a secret nor, without the URL, the blob.
A file holds a header (a magic string, the content's CRC-32 and length, the blob's ETag) and the
content. A hit needs the URL and the ETag to match, so a blob rewritten since it was cached (a new
ETag) is read from the service again and its file replaced.

**Which ETag.** By default a hit is confirmed by the service: the read carries ``If-None-Match``
with the cached ETag, and an unchanged blob answers ``304 Not Modified`` with no body, so a hit
costs one round trip but no transfer. With ``trust_known_etag`` (``cache_trust_listing=True`` on a
listed dataset) the ETag the dataset already knows (from its listing) decides alone, with no
request at all; a blob rewritten after the listing is then served as it was listed.

**Across processes.** DataLoader workers and the ranks of a node share one directory. A file is
written under a temporary name in the same directory and renamed into place (``os.replace``), so a
reader sees the old file or the new one, never a part of one; a reader that opened a file keeps
reading that file even if it is replaced or evicted meanwhile (POSIX unlink semantics). Files are
not fsynced (a cache can be refetched): every read checks the length and the CRC-32, so a torn or
damaged file (a power loss, a bit flip) is fetched again.

**Storing in the background.** A blob read from the service is returned at once and handed to one
writer thread per process, which stores it (the bytes are immutable, so nothing is copied). Until
it is stored, a read in the same process is served from that memory. At most ``_PENDING_LIMIT``
bytes (or one larger blob) wait for the writer; a read that would pass it waits for room, so a
disk slower than the network slows the reads instead of growing the memory. The writer finishes
its work when the process exits normally (a DataLoader worker too); a process killed meanwhile
loses the blobs not yet stored, and at worst leaves a temporary file that is never read.

**Eviction.** With ``max_bytes``, the bytes in the directory are counted in its lock file, updated
under ``flock`` at every store; a store that would pass the limit first deletes the least recently
used files (by modification time, which every hit refreshes) down to 90% of it. Without a limit
nothing is evicted, so hits leave the files untouched (no ``utime``). A store waits at most
``_LOCK_TIMEOUT`` for the lock; a process that holds it longer (stopped, or hung on the disk) makes
this one stop storing (see "Failures"), rather than stop its samples or its exit.

**Trust.** The directory is used only if no one but its user could change what it holds, as ssh
requires of its files: it is refused (then read from the service as without a cache) if another
user owns it, if its group or others can write to it, or if a directory or symbolic link on the way
to it could be replaced by another user (one owned by someone other than the user or root, or
writable by group or others without the sticky bit, as ``/tmp`` has). The parts of the path that do
not exist are created with mode 0o700. The folder is checked once, where the dataset is made
(:func:`make_cache`; ``BlobDataModule`` in its ``setup``), which gives the one warning of a
refusal; the verdict pickles with the cache, so DataLoader workers and spawned ranks neither check
nor warn again. A process that received an accepted folder opens it by path again, walking the same
checks without creating anything, and uses it only if it is the very directory that was accepted
(same ``st_dev`` and ``st_ino``): one removed, renamed away and replaced, or made unsafe since is
not used, with one warning in that process. Every file is then opened, renamed and deleted relative
to that descriptor, by a name with no slash and with ``O_NOFOLLOW``: a symbolic link planted in the
directory is never followed (a lock or entry that is one, or a lock with another hard link, is not
used; a rename replaces a link, never its target). An entry owned by another user (planted while the
directory was writable) or writable by group or others is a miss, replaced by the store. Only names
that the cache gives its files are counted or evicted.

**Failures.** A directory that cannot be created is refused as above. One that cannot be written,
or a full disk, costs one warning per process and directory; that process then stops storing and
reads from the service as without a cache. An entry that cannot be read is a miss, with its own
one warning per process and directory: each cause warns once, so one does not silence another.
"""

from azstoragetorch._cache._blob_cache import BlobCache as BlobCache
from azstoragetorch._cache._blob_cache import make_cache as make_cache
from azstoragetorch._cache._trust import _Verdict
from azstoragetorch._cache._writer import flush as flush

# A dataset's cache is pickled into spawned DataLoader workers and ranks with the folder's verdict:
# both classes keep this package as their home, so that a pickle does not depend on which private
# module defines them.
for _cls in (BlobCache, _Verdict):
    _cls.__module__ = __name__
del _cls
