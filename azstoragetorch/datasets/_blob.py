"""The sample handle: :class:`Blob`, one blob of a dataset as a transform receives it."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import torch
from typing_extensions import Buffer

from azstoragetorch._cache import BlobCache
from azstoragetorch._client import AzStorageTorchBlobClient, BlobProperties, ProgressHook, Recorder
from azstoragetorch._options import TransferOptions
from azstoragetorch._reads import WholeBlobRead
from azstoragetorch.datasets._tensor_memory import _new_byte_tensor, _tensor_bytes, _writable_bytes
from azstoragetorch.io import BlobIO

if TYPE_CHECKING:
    import datetime

_T = TypeVar("_T")

# The default sample reads a blob up to this size in one request; larger blobs in parallel parts.
READ_ALL_BLOCK_SIZE = 8 * 1024 * 1024
READ_ALL_CONCURRENCY = 8
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
        options = TransferOptions(
            validate_content=validate_content, verify_checksum=verify_checksum, progress_hook=self._progress_hook
        )
        return BlobIO._open(self._client.display_url, "rb", options=options, client=self._client)

    def read(self) -> bytes:
        """The blob's whole content, from the dataset's local cache when it has one (``cache_dir``).

        This is what the default sample holds; a ``transform`` that needs the whole blob gets the
        cache's benefit by calling it rather than reading :meth:`reader` to the end.
        """
        cache = self._cache
        if cache is None:
            return self._read_whole(lambda client: WholeBlobRead(client, **_READ_ALL).read()[1])
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

        self._read_whole(lambda client: WholeBlobRead(client, **_READ_ALL).read_into(allocate))
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

        self._read_whole(lambda client: WholeBlobRead(client, **_READ_ALL).read_into(allocate))
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

    def _known_size(self) -> int | None:
        """The blob's size if it is known without a request (listed, or read before), else ``None``."""
        return None if self._properties is None else self._properties.size

    def _get_properties(self) -> BlobProperties:
        if self._properties is None:
            self._properties = self._client.get_properties()
            if self._remember is not None:
                self._remember(self._properties)
        return self._properties
