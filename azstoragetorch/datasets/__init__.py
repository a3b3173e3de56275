"""PyTorch datasets whose samples are blobs: :class:`BlobDataset`, :class:`IterableBlobDataset`, :class:`Blob`."""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import hashlib
import mmap
import os
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar, cast

import torch
import torch.distributed
import torch.utils.data
from typing_extensions import Buffer, Self

from azstoragetorch import _client
from azstoragetorch._cache import BlobCache, make_cache
from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    BlobProperties,
    ContainerUrl,
    CredentialArgument,
    ProgressHook,
    Recorder,
    validate_credential,
    validate_retry,
)
from azstoragetorch._compat import warn_if_untested
from azstoragetorch._entries import Entries, EntriesBuilder
from azstoragetorch._options import check_int
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions

if TYPE_CHECKING:
    import datetime

__all__ = ["Blob", "BlobDataset", "IterableBlobDataset"]

warn_if_untested("torch")

_TransformOutputType_co = TypeVar("_TransformOutputType_co", covariant=True)
_T = TypeVar("_T")

# Samples fetched ahead of the consumer by IterableBlobDataset. Small blobs are latency-bound, so
# many requests in flight are what makes a loader fast; transforms that decode or augment still run
# one at a time under the GIL.
DEFAULT_PREFETCH = 32
# Threads per process that fetch samples (created as needed): the ceiling for prefetch and for the
# blobs of one batch fetched together by BlobDataset.__getitems__. Set in _client, which sizes the
# connection pool that these threads share with the transfer threads.
MAX_SAMPLE_THREADS = _client.MAX_SAMPLE_THREADS
# The default sample reads a blob up to this size in one request; larger blobs in parallel parts.
READ_ALL_BLOCK_SIZE = 8 * 1024 * 1024
READ_ALL_CONCURRENCY = 8
_PAGE_SIZE = mmap.PAGESIZE
_READ_ALL = {"block_size": READ_ALL_BLOCK_SIZE, "max_concurrency": READ_ALL_CONCURRENCY}


class Blob:
    """One blob of a dataset, as handed to a dataset's ``transform``.

    ``url``, ``blob_name`` and ``container_name`` identify it; ``size``, ``etag`` and
    ``last_modified`` describe it (without a request when the dataset was listed from a container,
    since the listing already returned them); :meth:`reader` opens its content::

        def to_tensor(blob: Blob) -> torch.Tensor:
            with blob.reader() as f:
                return torch.load(f)

    :meth:`read_tensor` and :meth:`readinto` receive the whole content straight into a tensor's (or
    any buffer's) memory, which suits large samples decoded from their raw bytes.

    Datasets create these objects; constructing one directly is not supported.
    """

    def __init__(self, blob_client: AzStorageTorchBlobClient, properties: BlobProperties | None = None) -> None:
        self._client = blob_client
        self._properties = properties
        # Where fetched properties are kept for the next Blob made for the same entry of a dataset.
        self._remember: Callable[[BlobProperties], None] | None = None
        self._cache: BlobCache | None = None  # the dataset's cache_dir, if it has one
        # The dataset's progress_hook, given every read of this blob (set by _apply).
        self._progress_hook: ProgressHook | None = None

    @property
    def url(self) -> str:
        """The blob's URL, without any query string (no SAS token, snapshot or version)."""
        return self._client.blob_url.url_without_query

    @property
    def blob_name(self) -> str:
        """The blob's name within its container, for example ``"images/cat 1.jpg"``."""
        return self._client.blob_url.blob_name

    @property
    def container_name(self) -> str:
        """The name of the blob's container."""
        return self._client.blob_url.container_name

    @property
    def size(self) -> int:
        """The blob's size in bytes."""
        return self._get_properties().size

    @property
    def etag(self) -> str:
        """The blob's ETag, quoted as in HTTP headers (``'"0x8DC..."'``); it changes with every write."""
        return self._get_properties().etag

    @property
    def last_modified(self) -> datetime.datetime | None:
        """When the blob was last written (timezone-aware UTC)."""
        return self._get_properties().last_modified

    def reader(self, *, validate_content: bool = False, verify_checksum: bool | None = None) -> BlobIO:
        """Open the blob for reading, as a :class:`~azstoragetorch.io.BlobIO` in ``"rb"`` mode.

        Each call opens a new reader, so a blob can be read any number of times, in any epoch.
        ``validate_content`` and ``verify_checksum`` check what is read, as for ``BlobIO``: by
        default a blob read to the end is checked against its recorded CRC-32, if it has one.
        """
        return BlobIO(
            self._client.display_url,
            "rb",
            blob_client=self._client,
            validate_content=validate_content,
            verify_checksum=verify_checksum,
            progress_hook=self._progress_hook,
        )

    def read(self) -> bytes:
        """The blob's whole content, from the dataset's local cache when it has one (``cache_dir``).

        This is what the default sample holds; a ``transform`` that needs the whole blob gets the
        cache's benefit by calling it rather than reading :meth:`reader` to the end.
        """
        cache = self._cache
        if cache is None:
            return self._read_whole(lambda client: client.read_all(**_READ_ALL))
        known_etag = self._properties.etag if self._properties is not None else None
        return self._read_whole(lambda client: cache.read_all(client, known_etag, **_READ_ALL))

    def read_tensor(self) -> torch.Tensor:
        """The blob's content as a new 1-D ``torch.uint8`` tensor, received straight into its storage.

        No ``bytes`` object is made on the way: each part of the response goes from the socket into
        the tensor's memory. In a DataLoader worker the tensor is allocated in shared memory, so
        returned from a transform (as it is, or as a view such as ``.view(torch.float32)``) it
        reaches the main process without a copy, rather than being pickled through a pipe as
        ``bytes`` are (where shared memory, ``/dev/shm``, has no room for it, in ordinary memory,
        which torch copies there if the tensor is returned). Blobs larger than 8 MiB are fetched in
        parallel ranged requests. Decode it with, for example,
        ``torchvision.io.decode_image(blob.read_tensor())``, or reinterpret raw data with
        ``tensor.view(torch.float32)``.

        Raises:
            BlobModifiedDuringReadError: The blob was replaced while it was being read (the read is
                pinned to the ETag of its first response, as for :meth:`reader`).
        """
        tensor = torch.empty(0, dtype=torch.uint8)

        def allocate(size: int) -> memoryview:
            nonlocal tensor
            tensor = _new_byte_tensor(size)
            return _tensor_bytes(tensor)

        self._read_whole(lambda client: client.read_all_into(allocate, **_READ_ALL))
        return tensor

    def readinto(self, buffer: torch.Tensor | Buffer) -> int:
        """Receive the blob's whole content into ``buffer``, which must be exactly :attr:`size` bytes.

        ``buffer`` is a contiguous CPU tensor of ``torch.uint8`` (any shape: its bytes are filled in
        order; pinned memory works too) or any writable, contiguous buffer (``bytearray``,
        ``memoryview``, ``array.array``, a NumPy array), whose raw bytes are filled as
        :meth:`io.RawIOBase.readinto` does. Lets a transform reuse or preallocate the memory a
        sample lands in; :meth:`read_tensor` allocates it for you. Returns the number of bytes read.

        The size is checked against the blob as the service reports it when the read starts, so a
        buffer sized from a listing that is out of date is refused rather than partly filled. If the
        read fails, the buffer's content is unspecified, but nothing writes into it after this
        method has returned or raised.

        Raises:
            TypeError: ``buffer`` is not a buffer, is read-only, or is a tensor whose dtype is not
                ``torch.uint8`` (view one with ``tensor.view(torch.uint8)``).
            ValueError: ``buffer`` is not contiguous or not on the CPU, or its size in bytes is not
                the blob's size.
            BlobModifiedDuringReadError: The blob was replaced while it was being read.
        """
        view = _writable_bytes(buffer)

        def allocate(size: int) -> memoryview:
            if size != len(view):
                raise ValueError(
                    f"readinto needs a buffer of exactly the blob's size: {self.url} has {size} bytes, "
                    f"the buffer holds {len(view)}."
                )
            return view

        self._read_whole(lambda client: client.read_all_into(allocate, **_READ_ALL))
        return len(view)

    def __repr__(self) -> str:
        return f"Blob({self._client.display_url!r})"

    def _read_whole(self, read: Callable[[AzStorageTorchBlobClient], _T]) -> _T:
        """``read(client)``, a read of the whole blob, reported to the progress hook if there is one."""
        hook = self._progress_hook
        if hook is None:
            return read(self._client)
        recorder = Recorder(hook)  # its total is set from the first response
        result = read(self._client.with_recorder(recorder))
        recorder.end(total=recorder.bytes_done() if recorder.total is None else None)  # None: an empty blob
        return result

    def _trusted_hit(self) -> bytes | None:
        """The content from the cache if the listing's ETag confirms it with no request, else ``None``."""
        cache, properties = self._cache, self._properties
        if cache is None or properties is None:
            return None
        return cache.trusted_hit(self._client, properties.etag)

    def _get_properties(self) -> BlobProperties:
        if self._properties is None:
            self._properties = self._client.get_properties()
            if self._remember is not None:
                self._remember(self._properties)
        return self._properties


def _new_byte_tensor(size: int) -> torch.Tensor:
    """A new uint8 tensor of ``size`` elements; in a DataLoader worker, in shared memory, its pages already in.

    A tensor that a worker returns is moved into shared memory when it is sent to the main process,
    which copies it. Received there in the first place, it is sent as it is: one copy of every
    sample and the page faults of a private buffer fewer, in the workers. ``_new_shared`` is how
    torch's own collate allocates a batch in workers; it is private, so without it (or if it fails)
    the tensor is an ordinary one, and torch moves it when sending it.

    Every shared tensor is new memory (the main process may still be reading the ones sent before),
    so its pages are faulted in here, in one system call (see ``_populate``), rather than one page at
    a time by the socket reads that fill it.
    """
    if size and torch.utils.data.get_worker_info() is not None:
        new_shared = getattr(torch.UntypedStorage, "_new_shared", None)
        try:
            storage = new_shared(size) if new_shared is not None else None
        except Exception:
            storage = None
        if storage is not None and storage.nbytes() == size:
            shared: torch.Tensor = torch.empty(0, dtype=torch.uint8).set_(storage)  # type: ignore[call-overload]
            # EFAULT: the shared-memory file system (/dev/shm) has no room for it, and the first write
            # would kill the worker with SIGBUS. Ordinary memory serves a transform that decodes the
            # tensor rather than returning it.
            if _populate(shared) != errno.EFAULT:
                return shared
    # Ordinary memory is often heap memory used before, already mapped: nothing to fault in ahead.
    return torch.empty(size, dtype=torch.uint8)


_MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault a range in, writable, without writing to it


def _libc_madvise() -> Callable[[int, int, int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return cast(Callable[[int, int, int], int], madvise)


_madvise = _libc_madvise()


def _populate(tensor: torch.Tensor) -> int:
    """Fault in the whole pages of a new tensor's memory at once, before anything is written into it.

    A fresh 4 MiB buffer takes 1,024 page faults when it is first written; taken inside the socket
    reads of a worker's many sample threads, they contend for the process's memory map; one
    ``madvise`` maps them all (the kernel still allocates and zeroes every page: that cost, not the
    faults, is most of what fresh memory costs, see docs/benchmarks.md). It also tells, before
    anything is written, whether a write would raise SIGBUS (a full ``/dev/shm``). Where this is
    not available (not Linux, a kernel before 5.14) or fails, the pages are faulted in by the first
    writes, as without it. Returns the ``errno`` of a failure
    (``EFAULT``: a write would raise SIGBUS), else 0.
    """
    if _madvise is None or tensor.nbytes < _PAGE_SIZE:
        return 0
    start = -(-tensor.data_ptr() // _PAGE_SIZE) * _PAGE_SIZE  # whole pages of the tensor's own memory only
    end = (tensor.data_ptr() + tensor.nbytes) // _PAGE_SIZE * _PAGE_SIZE
    if end > start and _madvise(start, end - start, _MADV_POPULATE_WRITE) != 0:
        return ctypes.get_errno() or -1
    return 0


def _tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's memory (which must outlive the view)."""
    if tensor.nbytes == 0:
        return memoryview(bytearray())
    array = (ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())
    return memoryview(array).cast("B")


def _writable_bytes(buffer: object) -> memoryview:
    """``buffer`` (a tensor or a buffer) as a flat writable byte view; a clear error for what cannot be one."""
    if isinstance(buffer, torch.Tensor):
        if buffer.dtype != torch.uint8:
            raise TypeError(
                f"buffer is a tensor of {buffer.dtype}; readinto fills torch.uint8 tensors "
                "(for another dtype, pass tensor.view(torch.uint8) of a contiguous tensor)."
            )
        if buffer.device.type != "cpu" or buffer.layout != torch.strided:
            raise ValueError(
                f"buffer is a {buffer.layout} tensor on {buffer.device}; readinto fills dense CPU tensors "
                "(read into one, pinned for speed, then move it with .to(device, non_blocking=True))."
            )
        if not buffer.is_contiguous():
            raise ValueError("buffer is a non-contiguous tensor; pass a contiguous one (tensor.contiguous() copies).")
        return _tensor_bytes(buffer)
    try:
        view = memoryview(buffer)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(
            f"buffer must be a torch.Tensor or a writable bytes-like object, not {type(buffer).__name__}."
        ) from None
    if view.readonly:
        raise TypeError(
            f"buffer is read-only ({type(buffer).__name__}); pass a bytearray, a tensor or another writable buffer."
        )
    if not view.c_contiguous:
        raise ValueError(f"buffer is a non-contiguous {type(buffer).__name__}; pass a contiguous one.")
    return view.cast("B")


def _read_whole_blob(blob: Blob) -> dict[str, str | bytes]:
    """The default transform: ``{"url": ..., "data": <the blob's bytes>}``."""
    # Straight from the client (or the cache) rather than through blob.reader(): no read-ahead
    # buffers to fill and copy out of, which for a dataset of small blobs is most of the client's work.
    return _whole_blob_sample(blob, blob.read())


def _whole_blob_sample(blob: Blob, data: bytes) -> dict[str, str | bytes]:
    return {"url": blob.url, "data": data}


def _apply(transform: Callable[[Blob], _T], blob: Blob, progress_hook: ProgressHook | None = None) -> _T:
    if progress_hook is not None:  # a Blob made for this sample: no other sample shares it
        blob._progress_hook = progress_hook
    try:
        return transform(blob)
    except Exception as error:
        # Keep the user's exception type; say which blob it was about.
        note = f"azstoragetorch: raised while producing the sample for blob {blob.url}"
        if hasattr(error, "add_note"):
            error.add_note(note)
        else:  # Python 3.10
            error.args = (*error.args, note)
        raise


class _SampleThreads:
    """Threads that fetch samples, one pool per process (a forked DataLoader worker makes its own).

    Separate from the transfer threads on purpose: a sample's transform may itself wait for
    transfers, and waiting on work queued in the same pool could deadlock it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(
                    max_workers=MAX_SAMPLE_THREADS, thread_name_prefix="azstoragetorch-samples"
                )
                self._pid = os.getpid()
            return self._pool.submit(fn, *args)

    def forget(self) -> None:
        self._lock = threading.Lock()
        self._pool = None


_sample_threads = _SampleThreads()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_sample_threads.forget)


class _Blobs(Sequence[Blob]):
    """A dataset's blobs, stored compactly (see ``_entries``); each access makes a new :class:`Blob`.

    The entries are a few large buffers, so DataLoader workers forked from a process that holds
    them share their pages instead of copying them as they touch millions of objects.
    """

    def __init__(
        self,
        entries: Entries,
        credential: CredentialArgument,
        retry: RetryOptions | None,
        cache: BlobCache | None = None,
    ) -> None:
        self._entries = entries
        self._credential = credential
        self._retry = retry
        self._cache = cache

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> Blob:  # type: ignore[override]
        position = self._entries.position(index)
        url, properties = self._entries[position]
        blob = Blob(AzStorageTorchBlobClient(url, self._credential, retry=self._retry), properties)
        if properties is None:
            blob._remember = functools.partial(self._entries.remember, position)
        blob._cache = self._cache
        return blob

    def __iter__(self) -> Iterator[Blob]:
        return (self[index] for index in range(len(self)))

    def __repr__(self) -> str:
        return f"<{len(self)} blobs>"


def _blobs_from_urls(
    blob_urls: str | Iterable[str],
    credential: CredentialArgument,
    retry: RetryOptions | None = None,
    cache: BlobCache | None = None,
) -> _Blobs:
    validate_credential(credential)
    validate_retry(retry)
    builder = EntriesBuilder()
    builder.add_urls([blob_urls] if isinstance(blob_urls, str) else blob_urls)
    return _Blobs(builder.build(), credential, retry, cache)


def _list_source(
    source: str | Iterable[str],
    credential: CredentialArgument,
    retry: RetryOptions | None = None,
    cache: BlobCache | None = None,
) -> Sequence[Blob]:
    """The blobs a data source names, listed now: a container URL whose path after the container is a
    folder (``.../<container>/train`` means the blobs under ``train/``), or an iterable of blob URLs."""
    if not isinstance(source, str):
        return _blobs_from_urls(source, credential, retry, cache)
    container, folder = ContainerUrl.parse_with_prefix(source)
    prefix = folder.strip("/")
    client = AzStorageTorchContainerClient(container, credential, retry=retry)
    return _listed_files(client, f"{prefix}/" if prefix else None, cache)


# Listed blobs are stored a page at a time.
_LISTING_BATCH = 5000


def _listed_files(client: AzStorageTorchContainerClient, prefix: str | None, cache: BlobCache | None = None) -> _Blobs:
    """The blobs under ``prefix``, in name order, without the directories of a hierarchical namespace
    (ADLS Gen2), which are listed as empty blobs but are not samples."""
    builder = EntriesBuilder()
    names: list[str] = []
    properties: list[BlobProperties] = []
    for listed in client.list_blobs(prefix):
        if not listed.is_directory:
            names.append(listed.client.blob_url.blob_name)
            properties.append(listed.properties)
        if len(names) >= _LISTING_BATCH:
            builder.add_names(client.container_url, names, properties)
            names, properties = [], []
    builder.add_names(client.container_url, names, properties)
    return _Blobs(builder.build(), client.credential, client.retry, cache)


def _as_sequence(blobs: Iterable[Blob]) -> Sequence[Blob]:
    if isinstance(blobs, _Blobs):
        return blobs
    return list(blobs)


def _list_container(
    container_url: str,
    prefix: str | None,
    credential: CredentialArgument,
    retry: RetryOptions | None,
    cache: BlobCache | None = None,
) -> _Blobs:
    """The blobs of a container (under ``prefix``), listed now: what ``from_container_url`` serves."""
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"prefix must be a str or None, not {type(prefix).__name__}.")
    client = AzStorageTorchContainerClient(ContainerUrl.parse(container_url), credential, retry=retry)
    return _listed_files(client, prefix, cache)


class BlobDataset(torch.utils.data.Dataset[_TransformOutputType_co]):
    """A map-style dataset with one sample per blob.

    Create it with :meth:`from_blob_urls` or :meth:`from_container_url`; the blobs are listed once,
    when it is created. By default a sample is ``{"url": <blob URL>, "data": <blob bytes>}``; pass
    ``transform`` to turn each :class:`Blob` into whatever your model needs::

        dataset = BlobDataset.from_container_url(
            "https://<account>.blob.core.windows.net/<container>", prefix="train/"
        )
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=2, shuffle=True)

    When the DataLoader asks for a batch, its blobs are fetched concurrently (through
    ``__getitems__``), not one after the other. For training on several ranks, use a
    :class:`~torch.utils.data.distributed.DistributedSampler` as with any map-style dataset
    (Lightning adds one for you).

    **Progress.** With ``progress_hook``, each read of a sample's blob calls ``hook(bytes_done,
    bytes_total)``: the default sample's read, and a transform's :meth:`Blob.read_tensor`,
    :meth:`Blob.readinto` and each :meth:`Blob.reader`. ``bytes_done`` counts that read's bytes
    and ``bytes_total`` is the blob's size, so every read ends with a call where the two are equal.
    The hook is called from the threads that fetch samples, in the process that reads them (a
    DataLoader worker), at most every 100 ms per read and once at its end; with workers started by
    ``spawn`` or ``forkserver`` it must pickle. When it is not set, nothing is reported or counted
    for it.
    """

    def __init__(
        self,
        blobs: Iterable[Blob],
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        *,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        self._blobs = _as_sequence(blobs)
        self._transform = cast(Callable[[Blob], _TransformOutputType_co], transform or _read_whole_blob)
        self._progress_hook = _checked_hook(progress_hook)

    @classmethod
    def from_blob_urls(
        cls,
        blob_urls: str | Iterable[str],
        *,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of the given blobs, in the given order.

        Args:
            blob_urls: One blob URL or an iterable of them. A URL may carry a SAS token, a
                ``snapshot=`` or a ``versionid=``.
            credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored for URLs with a SAS token.
            transform: Turns a :class:`Blob` into a sample; the default returns its URL and bytes.
            retry: How throttled or briefly failing requests are retried, listing and reading
                alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
            cache_dir: A local directory in which the default sample (and :meth:`Blob.read`) keeps
                each blob it reads, for later epochs; DataLoader workers and the ranks of a node may
                share one. Every hit is confirmed with the service by a conditional read (one
                request, no transfer). ``None`` (the default): no cache. ``~`` is expanded; a folder
                that another user could change is refused with a warning. See :ref:`dataset-cache`.
            cache_max_bytes: The most bytes the cache holds; the least recently used blobs are
                deleted beyond it. ``None``: no limit but the disk.
            progress_hook: A callable ``hook(bytes_done, bytes_total)`` given every read of a sample's
                blob (see "Progress" above).

        Raises:
            ValueError: A URL is malformed, ``cache_dir`` is empty, or ``cache_max_bytes`` is not positive
                or has no ``cache_dir``.
            TypeError: ``credential`` or ``cache_dir`` is of an unsupported type, ``retry`` is not a
                ``RetryOptions``, or ``progress_hook`` is not callable.
        """
        cache = make_cache(cache_dir, cache_max_bytes)
        return cls(_blobs_from_urls(blob_urls, credential, retry, cache), transform, progress_hook=progress_hook)

    @classmethod
    def from_container_url(
        cls,
        container_url: str,
        *,
        prefix: str | None = None,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of every blob in a container (whose name starts with ``prefix``), in name order.

        The container is listed now, following every page of the listing. The directories of an
        account with a hierarchical namespace (ADLS Gen2), listed as empty blobs, are not samples.

        Args:
            container_url: ``https://<account>.blob.core.windows.net/<container>``, optionally with
                a SAS token that allows listing and reading.
            prefix: Only blobs whose names start with it; all blobs when ``None``.
            credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored with a SAS token.
            transform: Turns a :class:`Blob` into a sample; the default returns its URL and bytes.
            retry: How throttled or briefly failing requests are retried, listing and reading
                alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
            cache_dir: A local directory in which the default sample (and :meth:`Blob.read`) keeps
                each blob it reads, for later epochs; DataLoader workers and the ranks of a node may
                share one. Every hit is confirmed with the service by a conditional read (one
                request, no transfer). ``None`` (the default): no cache. ``~`` is expanded; a folder
                that another user could change is refused with a warning. See :ref:`dataset-cache`.
            cache_max_bytes: The most bytes the cache holds; the least recently used blobs are
                deleted beyond it. ``None``: no limit but the disk.
            cache_trust_listing: Serve a cached blob whose ETag is the listing's with no request at
                all, at local-disk speed; a blob rewritten after the listing is then served as it
                was listed. ``False`` (the default): confirm every hit with the service.
            progress_hook: A callable ``hook(bytes_done, bytes_total)`` given every read of a sample's
                blob (see "Progress" above).

        Raises:
            ValueError: The URL is malformed, ``cache_dir`` is empty, or a ``cache_*`` option is out of
                range or has no ``cache_dir``.
            azure.core.exceptions.ResourceNotFoundError: The container does not exist.
            azure.core.exceptions.ClientAuthenticationError: Listing is not allowed.
            TypeError: ``progress_hook`` is not callable.
        """
        cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing)
        blobs = _list_container(container_url, prefix, credential, retry, cache)
        return cls(blobs, transform, progress_hook=progress_hook)

    def __len__(self) -> int:
        return len(self._blobs)

    def __getitem__(self, index: int) -> _TransformOutputType_co:
        return _apply(self._transform, self._blobs[index], self._progress_hook)

    def __getitems__(self, indices: list[int]) -> list[_TransformOutputType_co]:
        """Fetch a batch of samples concurrently; the DataLoader calls this for each batch."""
        blobs = [self._blobs[index] for index in indices]  # IndexError before any request is sent
        # A default sample that the cache serves with no request (cache_trust_listing) is read here:
        # handing it to a sample thread costs more than a small hit, and parallel hits only contend
        # for the cores. Everything else goes to the sample threads as soon as it is known to.
        lean = self._transform is _read_whole_blob and self._progress_hook is None
        samples: list[Any] = [None] * len(blobs)
        futures: dict[int, Future[Any]] = {}
        try:
            for position, blob in enumerate(blobs):
                hit = blob._trusted_hit() if lean else None
                if hit is None:
                    futures[position] = _sample_threads.submit(_apply, self._transform, blob, self._progress_hook)
                else:
                    samples[position] = _whole_blob_sample(blob, hit)
            for position, future in futures.items():
                samples[position] = future.result()
            return samples
        finally:
            for future in futures.values():
                future.cancel()


class IterableBlobDataset(torch.utils.data.IterableDataset[_TransformOutputType_co]):
    """An iterable-style dataset with one sample per blob, sharded across workers and ranks.

    Create it with :meth:`from_blob_urls` or :meth:`from_container_url`. A container is listed
    once, when the dataset is created; DataLoader workers share that listing. Samples are the
    same as :class:`BlobDataset`'s, fetched ahead of the consumer (up to ``prefetch`` at once) and
    yielded in order.

    **Sharding.** Iterated by a DataLoader with workers, in a job with several
    :mod:`torch.distributed` ranks, or both, each worker of each rank gets its own share of the
    blobs: over all ranks and workers, every blob is seen exactly once per epoch, and shares differ
    in size by at most one. Blobs are dealt to ranks first, then to each rank's workers, so ranks get
    the same number of samples whenever the number of blobs divides by the number of ranks.

    **Training with DDP.** Every rank must run the same number of steps, or the ranks wait for
    each other forever at the end of the epoch. With ``balance_ranks=True``, ranks whose share is
    one short repeat a blob from the start of the epoch's order, as ``DistributedSampler`` does, so
    an epoch whose count does not divide has up to ``world_size - 1`` repeated samples.

    **Shuffling.** With ``shuffle=True`` the order is a permutation drawn from ``seed`` and the
    epoch set by :meth:`set_epoch`, the same on every rank. Call ``set_epoch(epoch)`` before each
    epoch to get a new order (as with ``DistributedSampler``); the epoch lives in shared memory, so
    it reaches DataLoader workers too, including persistent ones.

    **Resuming.** :meth:`state_dict` and :meth:`load_state_dict` record and restore the position
    within the epoch, so torchdata's ``StatefulDataLoader`` resumes mid-epoch without repeating or
    skipping a sample, with or without workers.

    **Progress.** ``progress_hook`` is given every read of a sample's blob, as for :class:`BlobDataset`.
    """

    def __init__(
        self,
        blobs: Iterable[Blob],
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        *,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> None:
        check_int("prefetch", prefetch, maximum=MAX_SAMPLE_THREADS)
        self._progress_hook = _checked_hook(progress_hook)
        self._blobs_source = blobs
        self._listed: Sequence[Blob] | None = None
        self._transform = cast(Callable[[Blob], _TransformOutputType_co], transform or _read_whole_blob)
        self._shuffle = bool(shuffle)
        self._seed = int(seed)
        self._prefetch = prefetch
        self._balance_ranks = bool(balance_ranks)
        # In shared memory, so that set_epoch in the main process reaches DataLoader workers that
        # persist across epochs (they hold a copy of the dataset, but the same memory).
        self._epoch = _shared_epoch(0)
        self._epoch_owner = os.getpid()
        self._resume_at = 0  # samples of this shard to skip on the next iteration (after a restore)
        self._yielded = 0
        self._rank_at_pickling: tuple[int, int] | None = None

    @classmethod
    def from_blob_urls(
        cls,
        blob_urls: str | Iterable[str],
        *,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of the given blobs, in the given order unless ``shuffle`` is set.

        Args:
            blob_urls: One blob URL or an iterable of them; URLs may carry a SAS token, a
                ``snapshot=`` or a ``versionid=``.
            credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored for URLs with a SAS token.
            transform: Turns a :class:`Blob` into a sample; the default returns its URL and bytes.
            retry: How throttled or briefly failing requests are retried, listing and reading
                alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
            cache_dir: A local directory in which the default sample (and :meth:`Blob.read`) keeps
                each blob it reads, for later epochs; DataLoader workers and the ranks of a node may
                share one. Every hit is confirmed with the service by a conditional read (one
                request, no transfer). ``None`` (the default): no cache. ``~`` is expanded; a folder
                that another user could change is refused with a warning. See :ref:`dataset-cache`.
            cache_max_bytes: The most bytes the cache holds; the least recently used blobs are
                deleted beyond it. ``None``: no limit but the disk.
            shuffle: Visit the blobs in a random order, drawn from ``seed`` and the epoch.
            seed: The shuffling seed; use the same one on every rank.
            prefetch: The most samples fetched ahead of the consumer, per worker (1 to 128).
            balance_ranks: Give every :mod:`torch.distributed` rank the same number of samples,
                with up to ``world_size - 1`` repeats (see "Training with DDP" above).
            progress_hook: A callable ``hook(bytes_done, bytes_total)`` given every read of a sample's
                blob (see "Progress" above).

        Raises:
            ValueError: A URL is malformed, ``prefetch`` is out of range, ``cache_dir`` is empty, or
                ``cache_max_bytes`` is not positive or has no ``cache_dir``.
            TypeError: ``credential`` or ``cache_dir`` is of an unsupported type, or ``retry`` is not a
                ``RetryOptions``.
        """
        blobs = _blobs_from_urls(blob_urls, credential, retry, make_cache(cache_dir, cache_max_bytes))
        return cls(
            blobs,
            transform,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            balance_ranks=balance_ranks,
            progress_hook=progress_hook,
        )

    @classmethod
    def from_container_url(
        cls,
        container_url: str,
        *,
        prefix: str | None = None,
        credential: CredentialArgument = None,
        transform: Callable[[Blob], _TransformOutputType_co] | None = None,
        retry: RetryOptions | None = None,
        shuffle: bool = False,
        seed: int = 0,
        prefetch: int = DEFAULT_PREFETCH,
        balance_ranks: bool = False,
        cache_dir: str | os.PathLike[str] | None = None,
        cache_max_bytes: int | None = None,
        cache_trust_listing: bool = False,
        progress_hook: ProgressHook | None = None,
    ) -> Self:
        """A dataset of every blob in a container (whose name starts with ``prefix``).

        The container is listed now, once: every epoch and every DataLoader worker (and its copy
        of the dataset) deals its share from this one listing, so a blob written while training
        runs neither shifts the shares nor appears; create a new dataset to see it. A missing
        container or a credential that may not list it raises here, naming the container. The
        directories of an account with a hierarchical namespace (ADLS Gen2), listed as empty
        blobs, are not samples.

        Args:
            container_url: ``https://<account>.blob.core.windows.net/<container>``, optionally with
                a SAS token that allows listing and reading.
            prefix: Only blobs whose names start with it; all blobs when ``None``.
            credential: As for :class:`~azstoragetorch.io.BlobIO`; ignored with a SAS token.
            transform: Turns a :class:`Blob` into a sample; the default returns its URL and bytes.
            retry: How throttled or briefly failing requests are retried, listing and reading
                alike: a :class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.
            cache_dir: A local directory in which the default sample (and :meth:`Blob.read`) keeps
                each blob it reads, for later epochs; DataLoader workers and the ranks of a node may
                share one. Every hit is confirmed with the service by a conditional read (one
                request, no transfer). ``None`` (the default): no cache. ``~`` is expanded; a folder
                that another user could change is refused with a warning. See :ref:`dataset-cache`.
            cache_max_bytes: The most bytes the cache holds; the least recently used blobs are
                deleted beyond it. ``None``: no limit but the disk.
            cache_trust_listing: Serve a cached blob whose ETag is the listing's with no request at
                all, at local-disk speed; a blob rewritten after the listing is then served as it
                was listed. ``False`` (the default): confirm every hit with the service.
            shuffle: Visit the blobs in a random order, drawn from ``seed`` and the epoch.
            seed: The shuffling seed; use the same one on every rank.
            prefetch: The most samples fetched ahead of the consumer, per worker (1 to 128).
            balance_ranks: Give every :mod:`torch.distributed` rank the same number of samples,
                with up to ``world_size - 1`` repeats (see "Training with DDP" above).
            progress_hook: A callable ``hook(bytes_done, bytes_total)`` given every read of a sample's
                blob (see "Progress" above).

        Raises:
            ValueError: The URL is malformed, ``prefetch`` is out of range, ``cache_dir`` is empty, or a
                ``cache_*`` option is out of range or has no ``cache_dir``.
            TypeError: ``credential``, ``prefix``, ``cache_dir`` or ``cache_trust_listing`` is of an
                unsupported type, or ``retry`` is not a ``RetryOptions``.
            azure.core.exceptions.ResourceNotFoundError: The container does not exist.
            azure.core.exceptions.ClientAuthenticationError: Listing is not allowed.
        """
        check_int("prefetch", prefetch, maximum=MAX_SAMPLE_THREADS)  # before the listing's requests
        cache = make_cache(cache_dir, cache_max_bytes, trust_listing=cache_trust_listing)
        # Listed here, once: DataLoader workers (forked, or sent a pickled copy) and later epochs
        # share this listing, so every worker deals its share from the same list of blobs. Listed in
        # each worker instead, a blob written between two workers' listings would shift the shares,
        # and the epoch would repeat one blob and skip another.
        blobs = _list_container(container_url, prefix, credential, retry, cache)
        return cls(
            blobs,
            transform,
            shuffle=shuffle,
            seed=seed,
            prefetch=prefetch,
            balance_ranks=balance_ranks,
            progress_hook=progress_hook,
        )

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch whose order the next iteration follows (only matters with ``shuffle=True``)."""
        if self._epoch_owner != os.getpid():
            # A copy sent to another process that sets epochs itself (a rank started by mp.spawn,
            # say) takes a cell of its own, so that it never changes its sender's epoch. DataLoader
            # workers never call this, and keep reading the cell of the process that owns them.
            self._epoch = _shared_epoch(int(self._epoch[0]))
            self._epoch_owner = os.getpid()
        self._epoch[0] = int(epoch)

    def state_dict(self) -> dict[str, Any]:
        """Where this iteration stands: the epoch, the seed and how many samples this shard yielded."""
        return {
            "epoch": int(self._epoch[0]),
            "seed": self._seed,
            "shuffle": self._shuffle,
            "samples_yielded": self._yielded,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resume from :meth:`state_dict`: the next iteration skips the samples already yielded."""
        expected = {"epoch", "seed", "shuffle", "samples_yielded"}
        if not isinstance(state_dict, dict) or not expected <= set(state_dict):
            raise ValueError(
                f"Not a state dict of an IterableBlobDataset: expected the keys {sorted(expected)}, "
                f"got {sorted(state_dict) if isinstance(state_dict, dict) else type(state_dict).__name__}."
            )
        if (state_dict["seed"], state_dict["shuffle"]) != (self._seed, self._shuffle):
            raise ValueError(
                "The state dict was saved with a different order (seed/shuffle "
                f"{state_dict['seed']}/{state_dict['shuffle']}, this dataset has {self._seed}/{self._shuffle})."
            )
        # Written in place, not through set_epoch: StatefulDataLoader restores each worker's copy, and
        # the workers must keep sharing the epoch cell of the process that owns them.
        self._epoch[0] = int(state_dict["epoch"])
        self._resume_at = self._yielded = int(state_dict["samples_yielded"])

    def __iter__(self) -> Iterator[_TransformOutputType_co]:
        # Not a generator function: the position is reset (or restored) when the iterator is
        # created, not at its first sample, since StatefulDataLoader may take a state_dict (or
        # discard the iterator) in between.
        shard = self._my_shard()
        skip, self._resume_at = self._resume_at, 0
        self._yielded = skip
        return self._count_yielded(self._fetch_in_order(shard[skip:]))

    def _count_yielded(self, samples: Iterator[_TransformOutputType_co]) -> Iterator[_TransformOutputType_co]:
        for sample in samples:
            self._yielded += 1
            yield sample

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        # DataLoader workers started with spawn or forkserver have no process group; they learn
        # their rank from the process that pickled the dataset.
        state["_rank_at_pickling"] = _live_rank_and_world_size() or self._rank_at_pickling
        return state

    def _my_shard(self) -> list[int]:
        """The indexes of this worker's blobs, in the epoch's order."""
        if self._listed is None:
            self._listed = _as_sequence(self._blobs_source)
        count = len(self._listed)
        if self._shuffle:
            generator = torch.Generator().manual_seed(_epoch_seed(self._seed, int(self._epoch[0])))
            order = torch.randperm(count, generator=generator)
        else:
            order = torch.arange(count)
        rank, world_size = self._rank_and_world_size()
        worker = torch.utils.data.get_worker_info()
        worker_id, workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        dealt_count = self._dealt_count(count, world_size)
        if dealt_count > count:
            # As DistributedSampler pads: repeat the start of the order up to a multiple of the ranks.
            order = order.repeat(world_size)[:dealt_count]
        # Only this share becomes Python ints (and, as it is fetched, Blob objects).
        return cast(
            list[int], _deal(order, rank=rank, world_size=world_size, worker_id=worker_id, workers=workers).tolist()
        )

    def _share_lengths(
        self, count: int, *, workers: int, rank_and_world_size: tuple[int, int] | None = None
    ) -> list[int]:
        """How many of ``count`` blobs each of a rank's ``workers`` yields in an epoch, dealt as ``__iter__`` deals.

        The rank is this process's (or the one given), so that a DataLoader can know its exact length.
        """
        rank, world_size = rank_and_world_size or self._rank_and_world_size()
        positions = range(self._dealt_count(count, world_size))
        return [
            len(_deal(positions, rank=rank, world_size=world_size, worker_id=worker_id, workers=workers))
            for worker_id in range(workers)
        ]

    def _rank_and_world_size(self) -> tuple[int, int]:
        return _live_rank_and_world_size() or self._rank_at_pickling or (0, 1)

    def _dealt_count(self, count: int, world_size: int) -> int:
        """``count``, padded to a multiple of the ranks when they are balanced."""
        if self._balance_ranks and count and count % world_size:
            return -(-count // world_size) * world_size
        return count

    def _fetch_in_order(self, indexes: list[int]) -> Iterator[_TransformOutputType_co]:
        pending: collections.deque[Future[Any]] = collections.deque()
        blobs = cast(Sequence[Blob], self._listed)  # set by _my_shard
        upcoming = (blobs[index] for index in indexes)
        try:
            for blob in upcoming:
                pending.append(_sample_threads.submit(_apply, self._transform, blob, self._progress_hook))
                if len(pending) >= self._prefetch:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _checked_hook(progress_hook: ProgressHook | None) -> ProgressHook | None:
    if progress_hook is not None and not callable(progress_hook):
        raise TypeError(f"progress_hook must be a callable (or None), not {type(progress_hook).__name__}.")
    return progress_hook


def _shared_epoch(epoch: int) -> torch.Tensor:
    cell = torch.tensor([epoch], dtype=torch.int64)
    return cell.share_memory_()  # type: ignore[no-untyped-call,no-any-return]


def _epoch_seed(seed: int, epoch: int) -> int:
    # Mixed rather than added, so that (seed, epoch + 1) and (seed + 1, epoch) give different orders.
    digest = hashlib.sha256(f"{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


_Dealt = TypeVar("_Dealt", torch.Tensor, range)


def _deal(order: _Dealt, *, rank: int, world_size: int, worker_id: int, workers: int) -> _Dealt:
    """One worker's part of an epoch's ``order``: dealt to ranks first, then to each rank's workers.

    Rank shares then differ by at most one sample. The one place that decides who reads which blob.
    """
    return order[rank::world_size][worker_id::workers]


def _live_rank_and_world_size() -> tuple[int, int] | None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return None
