"""torch's ``FileSystemBase`` seam over blob URLs: where a checkpoint's bytes go and come from.

torch's ``FileSystemWriter`` and ``FileSystemReader`` plan, lay out and name a checkpoint's files,
and reach storage only through this interface; swapping it is how the writer and reader keep
torch's checkpoint format while the bytes travel to and from blobs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import urllib.parse
from collections.abc import Generator
from typing import Any

from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from torch.distributed.checkpoint.filesystem import FileSystemBase
from typing_extensions import override

from azstoragetorch._client import (
    AzStorageTorchBlobClient,
    AzStorageTorchContainerClient,
    CredentialArgument,
    ProgressHook,
    crc32,
    is_missing_container,
    pause,
    validate_credential,
)
from azstoragetorch._options import TransferOptions
from azstoragetorch._reads import WholeBlobRead
from azstoragetorch.integrations.dcp._locations import _missing_blob_as_file_not_found, _parse_location
from azstoragetorch.integrations.dcp._shard_files import _ShardFile, _ShardWriters
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions


class _BlobFiles(FileSystemBase):
    """torch's file-system interface over blob URLs: a "path" is a blob (or prefix) URL.

    A checkpoint URL may carry a SAS token; names are joined before its query string.
    """

    def __init__(self, credential: CredentialArgument, options: TransferOptions) -> None:
        # options.verify_checksum is BlobIO's: None checks a file read whole that has a recorded
        # CRC-32, False checks nothing.
        validate_credential(credential)
        self.credential = credential
        self.options = options
        self.shard_writers = _ShardWriters(None)  # those of the save under way; write_data starts a new one

    # The options one by one, for the code that reads them from the files.
    @property
    def max_concurrency(self) -> int:
        return self.options.max_concurrency

    @property
    def block_size(self) -> int:
        return self.options.block_size

    @property
    def validate_content(self) -> bool:
        return self.options.validate_content

    @property
    def verify_checksum(self) -> bool:
        """Whether files read whole are checked against their recorded CRC-32."""
        return self.options.verify_checksum is not False

    @property
    def retry(self) -> RetryOptions | None:
        return self.options.retry

    @property
    def progress_hook(self) -> ProgressHook | None:
        return self.options.progress_hook

    def __getstate__(self) -> dict[str, Any]:
        # dcp.async_save with the process checkpointer pickles the writer into its saving process;
        # the shard writers (a lock) belong to a save under way in this process, not to the copy.
        state = dict(self.__dict__)
        del state["shard_writers"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.shard_writers = _ShardWriters(None)

    @contextlib.contextmanager
    @override
    def create_stream(self, path: str | os.PathLike[str], mode: str) -> Generator[io.IOBase, None, None]:
        url = os.fspath(path)
        if mode == "wb":
            # Only torch's writer threads open files for writing (finish writes .metadata itself).
            writers = self.shard_writers
            options = dataclasses.replace(self.options, progress_hook=writers.file_hook())
            shard = _ShardFile._open(url, "wb", credential=self.credential, options=options)
            shard._writers = writers
            try:
                with shard:
                    yield shard
            except Exception as error:
                # Kept here, not raised: torch joins its writer threads only when the calling
                # thread's own writes succeed (and only prints the others' exceptions), and the
                # save must not return while any of them may still commit. write_data raises it.
                writers.fail(error)
            except BaseException as error:  # KeyboardInterrupt and the like: stop the others, then go
                writers.fail(error)
                raise
        elif mode == "rb":
            with _missing_blob_as_file_not_found(url):
                reading = BlobIO._open(
                    url, "rb", credential=self.credential, options=dataclasses.replace(self.options, progress_hook=None)
                )
            with reading as f:
                yield f
        else:
            raise ValueError(f"Unsupported mode {mode!r}: checkpoint files are opened with 'rb' or 'wb'.")

    @override
    def concat_path(self, path: str | os.PathLike[str], suffix: str) -> str:
        base, mark, query = os.fspath(path).partition("?")
        return f"{base.rstrip('/')}/{urllib.parse.quote(suffix, safe='/~')}{mark}{query}"

    @override
    def init_path(self, path: str | os.PathLike[str]) -> str:
        url = os.fspath(path)
        _parse_location(url)
        base, mark, query = url.partition("?")
        return f"{base.rstrip('/')}{mark}{query}"

    def write_whole(self, path: str | os.PathLike[str], data: bytes) -> None:
        """Make ``data`` the blob's content in one commit: before it, the blob is as it was."""
        # Not a shard file: the save's progress counts only those.
        options = TransferOptions(validate_content=self.validate_content, retry=self.retry)
        with BlobIO._open(os.fspath(path), "wb", credential=self.credential, options=options) as f:
            f.write(data)
            pause("commit")

    def version(self, path: str | os.PathLike[str]) -> str | None:
        """The blob's ETag; ``None`` if it does not exist."""
        try:
            return self.blob_client(path).get_properties().etag
        except ResourceNotFoundError as error:
            if is_missing_container(error):
                raise
            return None

    def commit_if(self, path: str | os.PathLike[str], data: bytes, version: str | None) -> bool:
        """Make ``data`` the blob's content in one request if the blob still has ETag ``version``
        (``None``: if it still does not exist). ``False``, and the blob unchanged by us, if it had
        changed."""
        client = self.blob_client(path)
        try:
            client.put_blob(
                data,
                validate_content=self.validate_content,
                crc32=crc32(data),
                if_match=version,
                if_none_match="*" if version is None else None,
            )
        except (ResourceModifiedError, ResourceExistsError, ResourceNotFoundError) as error:
            refused = (
                isinstance(error, ResourceModifiedError)
                or (
                    isinstance(error, ResourceExistsError) and getattr(error, "error_code", None) == "BlobAlreadyExists"
                )
                or (isinstance(error, ResourceNotFoundError) and not is_missing_container(error))
            )
            if not refused:
                raise
            # The refusal may answer a retry whose first attempt was committed (and its answer
            # lost): then the blob holds exactly these bytes, which no other save writes.
            try:
                whole = WholeBlobRead(client, block_size=self.block_size, max_concurrency=self.max_concurrency)
                return whole.read()[1] == data
            except ResourceNotFoundError:
                return False
        return True

    @override
    def rename(self, path: str | os.PathLike[str], new_path: str | os.PathLike[str]) -> None:
        """Copy through this process and delete the source; the destination is committed whole, as a
        rename would be. (``BlobStorageWriter`` renames nothing; torch's ``FileSystemBase`` asks for it.)"""
        source = self.blob_client(path)
        whole = WholeBlobRead(source, block_size=self.block_size, max_concurrency=self.max_concurrency)
        self.write_whole(new_path, whole.read()[1])
        source.delete()

    @override
    def mkdir(self, path: str | os.PathLike[str]) -> None:
        """Nothing to do: a blob prefix exists as soon as a blob is written under it."""

    @classmethod
    @override
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        if not isinstance(checkpoint_id, str):
            return False
        try:
            _parse_location(checkpoint_id)
        except (TypeError, ValueError):
            return False
        return True

    @override
    def exists(self, path: str | os.PathLike[str]) -> bool:
        try:
            self.blob_client(path).get_properties()
        except ResourceNotFoundError:
            return False
        return True

    @override
    def rm_file(self, path: str | os.PathLike[str]) -> None:
        with _missing_blob_as_file_not_found(os.fspath(path)):
            self.blob_client(path).delete()

    def ls(self, path: str | os.PathLike[str]) -> list[str]:
        """The URLs (without any SAS token) of the blobs under the prefix ``path``."""
        client, prefix = self.container_client(path)
        listed = client.list_blobs(f"{prefix}/" if prefix else None)
        return [blob.client.display_url for blob in listed if not blob.is_directory]  # (ADLS Gen2 folders)

    def container_client(self, path: str | os.PathLike[str]) -> tuple[AzStorageTorchContainerClient, str]:
        """The client of the container that holds the prefix ``path``, and the prefix."""
        container, prefix = _parse_location(os.fspath(path))
        return AzStorageTorchContainerClient(container, self.credential, retry=self.retry), prefix

    def blob_client(self, path: str | os.PathLike[str]) -> AzStorageTorchBlobClient:
        return AzStorageTorchBlobClient.from_url(os.fspath(path), self.credential, retry=self.retry)
