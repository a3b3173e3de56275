"""``python -m azstoragetorch`` (and the ``azstoragetorch`` command): list, verify and copy checkpoints.

- ``ls URL``: the checkpoints under a container URL (and prefix): Lightning/``torch.save`` files
  (``.ckpt``, ``.pt``, ``.pth``) and DCP checkpoints (a folder with a ``.metadata``), one line each.
- ``verify URL``: check a blob, or every file of a DCP checkpoint, against its recorded CRC-32.
- ``cp SRC DST``: copy a blob or a folder (a DCP checkpoint) between a container and a local folder.
  A download is checked against the CRC-32 recorded for each blob (``--no-verify`` skips the check).

Credentials are the library's: a SAS token in the URL, else the account key in ``AZURE_STORAGE_KEY``
(as the Azure CLI reads it), else :class:`azure.identity.DefaultAzureCredential`; ``--anonymous``
sends no credential. Output names URLs without their SAS token. Exit codes: 0 success, 1 failure
(or, for ``verify``, a file that does not match), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import os
import pathlib
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, TextIO

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError

from azstoragetorch._client import (
    AzStorageTorchContainerClient,
    BlobUrl,
    ContainerUrl,
    CredentialArgument,
    ListedBlob,
    redact,
)
from azstoragetorch.exceptions import AZStorageTorchError, ChecksumMismatchError
from azstoragetorch.io import BlobIO

_MiB = 1024 * 1024
CHECKPOINT_SUFFIXES = (".ckpt", ".pt", ".pth")
DCP_METADATA = ".metadata"
ACCOUNT_KEY_VARIABLE = "AZURE_STORAGE_KEY"
_COPY_PIECE = 8 * _MiB


class _UsageError(Exception):
    """Arguments that parse but make no sense together (reported like argparse's own errors)."""


# -- credentials and URLs ----------------------------------------------------------------------------


def _credential(url: ContainerUrl | BlobUrl, anonymous: bool) -> CredentialArgument:
    if anonymous:
        return False
    if url.has_sas:
        return None  # the SAS in the URL is used
    key = os.environ.get(ACCOUNT_KEY_VARIABLE)
    if key:
        return AzureNamedKeyCredential(url.account_name, key)
    return None  # DefaultAzureCredential


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _container_and_prefix(url: str, anonymous: bool) -> tuple[AzStorageTorchContainerClient, str]:
    container_url, prefix = ContainerUrl.parse_with_prefix(url)
    return AzStorageTorchContainerClient(container_url, _credential(container_url, anonymous)), prefix


def _blob_url(client: AzStorageTorchContainerClient, name: str) -> str:
    """The URL of blob ``name``, with the container's SAS if it has one (never printed)."""
    return client.container_url.blob_url(name).request_url()


def _is_dcp_checkpoint(client: AzStorageTorchContainerClient, folder: str) -> bool:
    try:
        client.blob_client(f"{folder}/{DCP_METADATA}" if folder else DCP_METADATA).get_properties()
    except ResourceNotFoundError:
        return False
    return True


# -- ls ----------------------------------------------------------------------------------------------


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


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def command_ls(args: argparse.Namespace, out: TextIO) -> int:
    client, prefix = _container_and_prefix(args.url, args.anonymous)
    entries = find_checkpoints(list(client.list_blobs(prefix or None)))
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
            f"{entry.kind:<5} {_size(entry.size):>10} {entry.files:>6} {modified:<20} {entry.crc32:<7} {entry.name}",
            file=out,
        )
    return 0


# -- verify ------------------------------------------------------------------------------------------


def command_verify(args: argparse.Namespace, out: TextIO) -> int:
    client, prefix = _container_and_prefix(args.url, args.anonymous)
    folder = prefix.rstrip("/")
    if not folder:
        raise _UsageError("verify needs the URL of a blob or of a DCP checkpoint folder, not of a container.")
    if _is_dcp_checkpoint(client, folder):
        return _verify_dcp(client, folder, args, out)
    url = _blob_url(client, folder)
    shown = client.container_url.blob_url(folder).display_url
    try:
        with BlobIO(url, "rb", credential=client.credential, verify_checksum=True) as reader:
            buffer = bytearray(_COPY_PIECE)
            while reader.readinto(buffer):
                pass
    except ChecksumMismatchError as error:
        print(f"MISMATCH {shown}: {error}", file=out)
        return 1
    except ValueError as error:  # no recorded CRC-32
        print(f"UNVERIFIED {shown}: {error}", file=out)
        return 1
    print(f"OK {shown} ({_size(reader.stats.bytes)}, CRC-32 matches)", file=out)
    return 0


def _verify_dcp(client: AzStorageTorchContainerClient, folder: str, args: argparse.Namespace, out: TextIO) -> int:
    from azstoragetorch.integrations.dcp import BlobStorageReader

    reader = BlobStorageReader(_blob_url(client, folder), credential=client.credential)
    result = reader.verify()
    for name in result.mismatched:
        print(f"MISMATCH {name}", file=out)
    for name in result.missing:
        print(f"MISSING {name}", file=out)
    for name in result.unchecked:
        print(f"UNVERIFIED {name} (no recorded CRC-32)", file=out)
    matched = len(result.checked) - len(result.mismatched)
    all_matched = result.ok and not result.unchecked
    verdict = "OK" if all_matched else "FAILED"
    print(
        f"{verdict} {result.checkpoint_id}: {matched} of {len(result.checked) + len(result.missing)} files match",
        file=out,
    )
    return 0 if all_matched else 1


# -- cp ----------------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Copy:
    source: str  # a blob URL (may hold a SAS; never printed) or a local path
    destination: str
    size: int | None


class _Progress:
    """One progress bar (tqdm) for the bytes of every file being copied; thread-safe."""

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        self._bar = tqdm(
            total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, file=sys.stderr
        )
        self._lock = threading.Lock()

    def hook(self) -> Any:
        done = [0]

        def report(bytes_done: int, bytes_total: int | None) -> None:
            with self._lock:
                self._bar.update(bytes_done - done[0])
                done[0] = bytes_done

        return report

    def close(self) -> None:
        self._bar.close()


def command_cp(args: argparse.Namespace, out: TextIO) -> int:
    source_is_url, destination_is_url = _is_url(args.source), _is_url(args.destination)
    if source_is_url == destination_is_url:
        raise _UsageError("cp copies between a container and a local path: exactly one of SRC and DST must be a URL.")
    if source_is_url:
        client, prefix = _container_and_prefix(args.source, args.anonymous)
        copies = _download_plan(client, prefix, pathlib.Path(args.destination))
        credential = client.credential
    else:
        client, prefix = _container_and_prefix(args.destination, args.anonymous)
        copies = _upload_plan(pathlib.Path(args.source), client, prefix)
        credential = client.credential
    total = sum(copy.size or 0 for copy in copies)
    progress = _Progress(total, enabled=not args.no_progress)
    started = time.perf_counter()
    moved = retries = 0
    try:
        # A DCP checkpoint's .metadata goes last, so that a reader never sees it before the shards.
        last = [copy for copy in copies if copy.destination.rsplit("/", 1)[-1].startswith(DCP_METADATA)]
        first = [copy for copy in copies if copy not in last]
        for batch in (first, last):
            with concurrent.futures.ThreadPoolExecutor(args.parallel) as pool:
                futures = [
                    pool.submit(_copy_one, copy, credential, source_is_url, progress.hook(), not args.no_verify)
                    for copy in batch
                ]
                for future in futures:
                    stats = future.result()
                    moved += stats.bytes
                    retries += stats.retries
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    rate = moved / _MiB / seconds if seconds > 0 else 0.0
    print(
        f"Copied {len(copies)} file{'s' if len(copies) != 1 else ''}, {_size(moved)} in {seconds:.1f} s "
        f"({rate:.1f} MiB/s, {retries} retries)",
        file=out,
    )
    return 0


def _download_plan(client: AzStorageTorchContainerClient, prefix: str, destination: pathlib.Path) -> list[_Copy]:
    folder = prefix.rstrip("/")
    if not folder:
        raise _UsageError("cp needs the URL of a blob or of a folder (a DCP checkpoint), not of a whole container.")
    if not prefix.endswith("/"):
        try:
            size = client.blob_client(folder).get_properties().size
        except ResourceNotFoundError:
            size = None
        if size is not None:
            target = destination / folder.rsplit("/", 1)[-1] if destination.is_dir() else destination
            return [_Copy(_blob_url(client, folder), str(target), size)]
    blobs = [blob for blob in client.list_blobs(f"{folder}/") if not blob.is_directory]
    if not blobs:
        raise FileNotFoundError(
            f"Nothing to copy: no blob or folder {client.container_url.blob_url(folder).display_url}"
        )
    return [
        _Copy(
            _blob_url(client, blob.client.blob_url.blob_name),
            str(destination / blob.client.blob_url.blob_name[len(folder) + 1 :]),
            blob.properties.size,
        )
        for blob in blobs
    ]


def _upload_plan(source: pathlib.Path, client: AzStorageTorchContainerClient, prefix: str) -> list[_Copy]:
    if source.is_file():
        name = prefix + source.name if not prefix or prefix.endswith("/") else prefix
        return [_Copy(str(source), _blob_url(client, name), source.stat().st_size)]
    if not source.is_dir():
        raise FileNotFoundError(f"Nothing to copy: {source} is neither a file nor a folder.")
    base = prefix.rstrip("/")
    files = sorted(path for path in source.rglob("*") if path.is_file())
    return [
        _Copy(
            str(path),
            _blob_url(client, f"{base}/{path.relative_to(source).as_posix()}".lstrip("/")),
            path.stat().st_size,
        )
        for path in files
    ]


def _copy_one(copy: _Copy, credential: CredentialArgument, download: bool, hook: Any, verify: bool = True) -> Any:
    if download:
        target = pathlib.Path(copy.destination)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.partial")
        # Read whole, so BlobIO's close checks the CRC-32 when one was recorded: a blob that does
        # not match raises there, before the file takes the target's name.
        checking = None if verify else False
        with (
            BlobIO(copy.source, "rb", credential=credential, progress_hook=hook, verify_checksum=checking) as reader,
            partial.open("wb") as file,
        ):
            buffer = bytearray(_COPY_PIECE)
            while count := reader.readinto(buffer):
                file.write(memoryview(buffer)[:count])
        partial.replace(target)  # the local file is the whole blob or untouched
        return reader.stats
    with (
        open(copy.source, "rb") as file,
        BlobIO(copy.destination, "wb", credential=credential, progress_hook=hook) as writer,
    ):
        while piece := file.read(_COPY_PIECE):
            writer.write(piece)
    return writer.stats


# -- entry point -------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="azstoragetorch",
        description="List, verify and copy PyTorch checkpoints in Azure Blob Storage.",
        epilog=(
            f"Credentials: a SAS token in the URL, else the account key in {ACCOUNT_KEY_VARIABLE}, "
            "else DefaultAzureCredential (az login, managed identity, ...)."
        ),
    )
    parser.add_argument("--anonymous", action="store_true", help="send no credential (public containers)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls = commands.add_parser("ls", help="list the checkpoints under a container URL or prefix")
    ls.add_argument("url", metavar="URL")
    verify = commands.add_parser("verify", help="check a blob or a DCP checkpoint against its recorded CRC-32")
    verify.add_argument("url", metavar="URL")
    cp = commands.add_parser("cp", help="copy a blob or a DCP checkpoint between a container and a local folder")
    cp.add_argument("source", metavar="SRC")
    cp.add_argument("destination", metavar="DST")
    cp.add_argument("--parallel", type=_positive, default=4, help="files copied at once (default 4)")
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    cp.add_argument("--no-verify", action="store_true", help="do not check downloads against their recorded CRC-32")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text!r}")
    return value


_COMMANDS = {"ls": command_ls, "verify": command_verify, "cp": command_cp}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args, sys.stdout)
    except _UsageError as error:
        parser.error(str(error))  # exits with 2 after the usage line
    except ValueError as error:  # a malformed URL, and the like
        parser.error(redact(str(error)))
    except (AzureError, AZStorageTorchError, OSError) as error:
        print(f"azstoragetorch: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("azstoragetorch: interrupted", file=sys.stderr)
        return 130
    return 1
