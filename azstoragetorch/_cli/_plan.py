"""What ``cp`` copies: the downloads or uploads its arguments name, and the names it refuses."""

from __future__ import annotations

import dataclasses
import os
import pathlib

from azure.core.exceptions import ResourceNotFoundError

from azstoragetorch._cli._access import _blob_url, _UsageError
from azstoragetorch._cli._local_paths import local_collisions, local_parts
from azstoragetorch._client import AzStorageTorchContainerClient


@dataclasses.dataclass
class _Copy:
    source: str  # a blob URL (may hold a SAS; never printed) or a local path
    destination: str  # a blob URL, or the local path shown to the user
    size: int | None
    blob: str = ""  # for messages: the blob's name (downloads), the local path as given (uploads)
    parts: tuple[str, ...] = ()  # downloads: the path inside the local folder, one name per level


class _Refused(Exception):
    """A blob that is not downloaded (or a local file not uploaded), and why; the copy goes on without it."""

    def __init__(
        self, blob: str, reason: str, *, kind: str = "blob", outcome: str = "nothing was written for it"
    ) -> None:
        super().__init__(f"refused {kind} {blob!r}: {reason}; {outcome}")


def _download_plan(
    client: AzStorageTorchContainerClient, prefix: str, destination: pathlib.Path, into_folder: bool
) -> tuple[pathlib.Path, list[_Copy], list[_Refused]]:
    """The local folder to write into, the copies to make inside it, and the blobs refused."""
    folder = prefix.rstrip("/")
    if not folder:
        raise _UsageError("cp needs the URL of a blob or of a folder (a DCP checkpoint), not of a whole container.")
    if not prefix.endswith("/"):
        try:
            size = client.blob_client(folder).get_properties().size
        except ResourceNotFoundError:
            size = None
        if size is not None:
            # One blob: into DST if it is a folder, else to the path DST itself, which the user chose.
            if into_folder or destination.is_dir():
                root, name = destination, folder.rsplit("/", 1)[-1]
                try:
                    parts = local_parts(name)
                except ValueError as error:
                    return root, [], [_Refused(folder, str(error))]
            else:
                root, parts = destination.parent, (destination.name,)
            copy = _Copy(_blob_url(client, folder), str(root.joinpath(*parts)), size, folder, parts)
            return root, [copy], []
    blobs = [blob for blob in client.list_blobs(f"{folder}/") if not blob.is_directory]
    if not blobs:
        raise FileNotFoundError(
            f"Nothing to copy: no blob or folder {client.container_url.blob_url(folder).display_url}"
        )
    refused: dict[str, str] = {}
    paths: dict[str, tuple[str, ...]] = {}
    for blob in blobs:
        name = blob.client.blob_url.blob_name
        try:
            paths[name] = local_parts(name[len(folder) + 1 :])
        except ValueError as error:
            refused[name] = str(error)
    refused.update(local_collisions(paths))
    copies = [
        _Copy(_blob_url(client, name), str(destination.joinpath(*paths[name])), blob.properties.size, name, paths[name])
        for blob in blobs
        if (name := blob.client.blob_url.blob_name) not in refused
    ]
    return destination, copies, [_Refused(name, reason) for name, reason in sorted(refused.items())]


def _upload_plan(
    source: pathlib.Path, client: AzStorageTorchContainerClient, prefix: str
) -> tuple[list[_Copy], list[_Refused]]:
    """The uploads to make, and the local files refused.

    ``SRC`` itself is what the user named, link or not. Inside a folder, only regular files are
    uploaded: a symbolic link only if it leads to a regular file inside ``SRC`` (Lightning's
    ``last.ckpt`` link), so that a link planted in the folder cannot send a file from elsewhere
    (``~/.ssh/id_rsa``) to the container; FIFOs, sockets and devices are refused too.
    """
    if source.is_file():
        if prefix and not prefix.endswith("/"):
            name = prefix  # the blob name the user gave
        elif (problem := _blob_name_problem(source.name)) is not None:
            return [], [_Refused(str(source), problem, kind="file", outcome="nothing was uploaded for it")]
        else:
            name = prefix + source.name
        return [_Copy(os.path.realpath(source), _blob_url(client, name), source.stat().st_size, str(source))], []
    if not source.is_dir():
        raise FileNotFoundError(f"Nothing to copy: {source} is neither a file nor a folder.")
    base = prefix.rstrip("/")
    inside = os.path.realpath(source)
    copies: list[_Copy] = []
    refused: list[_Refused] = []
    for path in sorted(source.rglob("*")):  # rglob does not descend into linked folders
        if path.is_dir() and not path.is_symlink():
            continue
        target = os.path.realpath(path)
        if path.is_symlink() and (os.path.commonpath([inside, target]) != inside or not os.path.isfile(target)):
            reason = "it is a symbolic link that does not lead to a regular file inside the folder being copied"
        elif not os.path.isfile(target):
            reason = "it is not a regular file (a FIFO, socket or device)"
        elif (problem := _blob_name_problem(relative := path.relative_to(source).as_posix())) is not None:
            reason = problem
        else:
            name = f"{base}/{relative}".lstrip("/")
            copies.append(_Copy(target, _blob_url(client, name), os.stat(target).st_size, blob=str(path)))
            continue
        refused.append(_Refused(str(path), reason, kind="file", outcome="nothing was uploaded for it"))
    return copies, refused


def _blob_name_problem(relative: str) -> str | None:
    """Why the local name ``relative`` (below ``SRC``) makes no blob name that ``cp`` would download
    again as the same file (a name that is not UTF-8, a backslash, ...), or ``None``."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8, as a blob name must be"
    try:
        local_parts(relative)
    except ValueError as error:
        return str(error)
    return None
