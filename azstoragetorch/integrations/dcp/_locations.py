"""Checkpoint locations: the blob prefix URLs a writer or reader is given, checked and parsed."""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._client import ContainerUrl, is_missing_container, redact_url

if TYPE_CHECKING:
    from azstoragetorch.integrations.dcp._filesystem import _BlobFiles


def _initial_location(files: _BlobFiles, url: str | None) -> str:
    """The constructor's checkpoint URL, checked; ``""`` when there is none yet (``dcp.save`` and
    ``dcp.load`` then give it as ``checkpoint_id``)."""
    return "" if url is None else files.init_path(url)


class _AtBlobLocation:
    """What a blob checkpoint's writer and reader share: torch's file system swapped for blobs, and a
    checkpoint ID that never carries a SAS token (torch records it in ``.metadata`` and its logs)."""

    fs: _BlobFiles
    path: str | os.PathLike[str]

    def _use_blob_files(self, files: _BlobFiles, url: str) -> None:
        self.fs = files
        self.path = url

    @property
    def checkpoint_id(self) -> str:
        """The checkpoint's URL without any SAS token."""
        return redact_url(os.fspath(self.path))


def _require_location(path: str | os.PathLike[str], owner: str, call: str) -> None:
    if not os.fspath(path):
        raise ValueError(
            f"{owner} has no checkpoint URL: pass it to {owner}(url) or as {call}(..., checkpoint_id=url)."
        )


def _parse_location(url: str) -> tuple[ContainerUrl, str]:
    """The container and blob prefix of a checkpoint URL; ``ValueError`` for anything else."""
    if not isinstance(url, str):
        raise TypeError(f"A checkpoint location must be a blob URL string, not {type(url).__name__}.")
    if "://" not in url or url.split("://", 1)[0].lower() not in ("http", "https"):
        raise ValueError(
            f"{redact_url(url)!r} is not a blob prefix URL: expected "
            "https://<account>.blob.core.windows.net/<container>/<prefix> "
            "(or http://127.0.0.1:10000/<account>/<container>/<prefix> for Azurite)."
        )
    container, prefix = ContainerUrl.parse_with_prefix(url)
    return container, prefix.strip("/")


@contextlib.contextmanager
def _missing_blob_as_file_not_found(url: str) -> Iterator[None]:
    try:
        yield
    except ResourceNotFoundError as error:
        what = "container" if is_missing_container(error) else "blob"
        raise FileNotFoundError(
            errno.ENOENT, f"No such {what} (is a checkpoint saved here?)", redact_url(url)
        ) from None
