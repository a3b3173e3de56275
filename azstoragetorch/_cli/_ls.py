"""``ls``: what counts as a checkpoint in a container's listing, and the table of them."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
from collections.abc import Sequence
from typing import TextIO

from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._cli._access import _container_and_prefix
from azstoragetorch._cli._output import _printable, _size
from azstoragetorch._client import AzStorageTorchContainerClient, ListedBlob

CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
DCP_METADATA = ".metadata"


def _is_dcp_checkpoint(client: AzStorageTorchContainerClient, folder: str) -> bool:
    try:
        client.blob_client(f"{folder}/{DCP_METADATA}" if folder else DCP_METADATA).get_properties()
    except ResourceNotFoundError:
        return False
    return True


@dataclasses.dataclass
class CheckpointEntry:
    """One line of ``ls``: a checkpoint file, or a DCP checkpoint folder with all its files."""

    name: str
    kind: str  # "file" or "dcp"
    size: int
    files: int
    modified: datetime.datetime | None
    with_crc32: int  # how many of its files have a recorded CRC-32

    @property
    def crc32(self) -> str:
        if self.with_crc32 == self.files:
            return "yes"
        return "no" if not self.with_crc32 else f"{self.with_crc32}/{self.files}"


def find_checkpoints(blobs: Sequence[ListedBlob]) -> list[CheckpointEntry]:
    """Group a listing into checkpoints: each folder holding a ``.metadata`` is one DCP checkpoint;
    other ``.ckpt``/``.pt``/``.pth`` blobs are one each."""
    names = [blob.client.blob_url.blob_name for blob in blobs]
    folders = {name[: -len(DCP_METADATA)].rstrip("/") for name in names if name.rsplit("/", 1)[-1] == DCP_METADATA}
    entries: dict[str, CheckpointEntry] = {}
    for name, blob in zip(names, blobs, strict=True):
        if blob.is_directory:
            continue
        folder = next((f for f in folders if name.startswith(f"{f}/") or not f), None)
        if folder is not None:
            entry = entries.setdefault(folder, CheckpointEntry(f"{folder}/" if folder else "./", "dcp", 0, 0, None, 0))
            entry.size += blob.properties.size
            entry.files += 1
            entry.with_crc32 += blob.properties.crc32 is not None
            if name.rsplit("/", 1)[-1] == DCP_METADATA:
                entry.modified = blob.properties.last_modified  # committed last: the checkpoint's time
        elif name.lower().endswith(CHECKPOINT_SUFFIXES):
            crc = int(blob.properties.crc32 is not None)
            entries[name] = CheckpointEntry(name, "file", blob.properties.size, 1, blob.properties.last_modified, crc)
    return sorted(entries.values(), key=lambda entry: entry.name)


def _listed_under(client: AzStorageTorchContainerClient, prefix: str) -> list[ListedBlob]:
    """The blobs that a prefix names, as ``ls`` takes a path on a disk: ``run-1/`` is that folder, and
    ``run-1`` is the blob ``run-1`` or the folder ``run-1/`` (never ``run-10/...``)."""
    blobs = client.list_blobs(prefix or None)
    if not prefix or prefix.endswith("/"):
        return list(blobs)
    folder = f"{prefix}/"
    return [blob for blob in blobs if (name := blob.client.blob_url.blob_name) == prefix or name.startswith(folder)]


def command_ls(args: argparse.Namespace, out: TextIO) -> int:
    client, prefix = _container_and_prefix(args.url, args.anonymous)
    entries = find_checkpoints(_listed_under(client, prefix))
    where = client.display_url + (f"/{prefix}" if prefix else "")
    if not entries:
        print(f"No checkpoints under {where}", file=out)
        return 0
    print(f"Checkpoints under {where}:", file=out)
    print(f"{'KIND':<5} {'SIZE':>10} {'FILES':>6} {'MODIFIED (UTC)':<20} {'CRC-32':<7} NAME", file=out)
    for entry in entries:
        modified = (
            entry.modified.astimezone(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S") if entry.modified else "-"
        )
        print(
            f"{entry.kind:<5} {_size(entry.size):>10} {entry.files:>6} {modified:<20} {entry.crc32:<7} {_printable(entry.name)}",
            file=out,
        )
    return 0
