"""``python -m azstoragetorch`` (and the ``azstoragetorch`` command): list, verify and copy checkpoints.

- ``ls URL``: the checkpoints under a container URL (and prefix): Lightning/``torch.save`` files
  (``.ckpt``, ``.pt``, ``.pth``) and DCP checkpoints (a folder with a ``.metadata``), one line each.
- ``verify URL``: check a blob, or every file of a DCP checkpoint, against its recorded CRC-32.
- ``cp SRC DST``: copy a blob or a folder (a DCP checkpoint) between a container and a local folder.

Credentials are the library's: a SAS token in the URL, else the account key in ``AZURE_STORAGE_KEY``
(as the Azure CLI reads it), else :class:`azure.identity.DefaultAzureCredential`; ``--anonymous``
sends no credential. Output names URLs without their SAS token. Exit codes: 0 success, 1 failure
(or a blob ``cp`` refused, or, for ``verify``, a file that does not match), 2 bad arguments,
130 interrupted (Ctrl-C), 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import errno
import itertools
import os
import pathlib
import secrets
import signal
import stat
import sys
import threading
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any, NoReturn, TextIO

from azure.core.credentials import AzureNamedKeyCredential
from azure.core.exceptions import AzureError, ResourceNotFoundError

from azstoragetorch._client import (
    AzStorageTorchContainerClient,
    BlobUrl,
    ContainerUrl,
    CredentialArgument,
    ListedBlob,
    TransferStats,
    crc32,
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


def _printable(name: str) -> str:
    """``name`` with control and other unprintable characters escaped (``\\n``, ``\\x1b``,
    ``\\u202e``): whoever can write to a container chooses its blob names, and one must not be able
    to move the terminal's cursor, or add a line (``OK ...``) to what a command prints."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


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
    try:
        result = reader.verify()
    except (AzureError, OSError):
        raise  # the service or the connection failed, not the checkpoint
    except Exception:
        # Reading .metadata is all that verify() raises for: a damaged one is a file that does not
        # match like any other, not a traceback. Anything else stays the error it is.
        damage = _metadata_damage(client, folder)
        if damage is None:
            raise
        print(f"MISMATCH {DCP_METADATA}", file=out)
        shown = client.container_url.blob_url(folder).display_url
        print(f"FAILED {shown}: {DCP_METADATA} is damaged ({damage}); its shard files were not checked", file=out)
        return 1
    for name in result.mismatched:
        print(f"MISMATCH {_printable(name)}", file=out)
    for name in result.missing:
        print(f"MISSING {_printable(name)}", file=out)
    for name in result.unchecked:
        print(f"UNVERIFIED {_printable(name)} (no recorded CRC-32)", file=out)
    matched = len(result.checked) - len(result.mismatched)
    all_matched = result.ok and not result.unchecked
    verdict = "OK" if all_matched else "FAILED"
    print(
        f"{verdict} {result.checkpoint_id}: {matched} of {len(result.checked) + len(result.missing)} files match",
        file=out,
    )
    return 0 if all_matched else 1


def _metadata_damage(client: AzStorageTorchContainerClient, folder: str) -> str | None:
    """What is wrong with the checkpoint's ``.metadata``, or ``None`` if it reads as a DCP checkpoint's."""
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    # Unchecked by BlobIO: a mismatch is reported below like any other file's, not raised.
    url = _blob_url(client, f"{folder}/{DCP_METADATA}")
    with BlobIO(url, "rb", credential=client.credential, verify_checksum=False) as reader:
        data = reader.read()
        recorded = reader.properties.crc32
    if recorded is not None and crc32(data) != recorded:
        return f"its CRC-32 is {crc32(data):08x}, not the {recorded:08x} recorded when it was written"
    try:
        # torch's own reader unpickles it the same way (read_metadata): nothing new is trusted here.
        metadata = pickle.loads(data)
    except Exception as error:
        return f"it cannot be read: {type(error).__name__}: {error}"
    if not isinstance(metadata, Metadata):
        return f"it holds a {type(metadata).__name__}, not a checkpoint's Metadata"
    return None


# -- cp ----------------------------------------------------------------------------------------------

# How long the first Ctrl-C waits for transfers to notice that they must stop before the process exits
# without them: a transfer blocked on a slow or throttled request would otherwise hold it for minutes.
_STOP_GRACE_SECONDS = 1.0
# The longest file or folder name most local file systems take, in bytes (NAME_MAX).
_NAME_MAX = 255
_PARTIAL_SUFFIX = ".partial"


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


class _Stopped(Exception):
    """Raised in a transfer thread that was told to stop (Ctrl-C, or another file failed)."""


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``cp``'s transfers, once they were told to stop (see :func:`main`); ``signum``
    is the signal that stopped them, if :class:`_StopSignals` noted it."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__()
        self.signum = signum


# How long the main thread waits on the transfers before it looks again for a noted Ctrl-C.
_STOP_POLL_SECONDS = 0.1


class _StopSignals:
    """Ctrl-C and SIGTERM noted while ``cp``'s transfers may run, and acted on where the main thread
    looks for them (:meth:`check`).

    Python runs a signal's handler in the main thread, between two bytecodes. A main thread blocked
    on a lock with no timeout is woken only if the signal interrupts that very wait; one that the
    kernel hands to another thread of the process, or that comes just before the wait begins (a
    loaded machine makes that window wide), is handled only once the wait ends: when a transfer
    finishes, which one held on a slow request does not do for minutes. And a KeyboardInterrupt
    raised at any bytecode may skip the stop of the transfers, or leave a lock of ``threading`` taken.
    So while :meth:`noted` is active the handlers only note the signal, and the main thread waits in
    short slices (:meth:`wait`) and checks between them: every interruption takes the one way out
    that stops the transfers and leaves at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise _Interrupted(self.signum)

    @contextlib.contextmanager
    def noted(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # only the main thread receives signals; a caller's own thread keeps its own
            return

        def note(signum: int, frame: Any) -> None:
            if self.signum is None:
                self.signum = signum

        previous: dict[int, Any] = {}
        try:
            for number in (signal.SIGINT, signal.SIGTERM):
                # Only a Python handler is replaced: a signal the process was told to ignore stays
                # ignored, and one left to its default still ends the process.
                if callable(handler := signal.getsignal(number)):
                    previous[number] = handler
                    signal.signal(number, note)
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def wait(self, futures: Sequence[concurrent.futures.Future[Any]]) -> set[concurrent.futures.Future[Any]]:
        """Wait until one of ``futures`` is done, or a signal was noted (raised as :class:`_Interrupted`)."""
        while True:
            self.check()
            done, _ = concurrent.futures.wait(
                futures, timeout=_STOP_POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if done:
                self.check()
                return done


def local_parts(name: str) -> tuple[str, ...]:
    """The local path that the blob name ``name`` (relative to the folder being copied) becomes, one
    name per level, or ``ValueError`` saying why it has none.

    A blob name is any string, and whoever can write to a container chooses it; a local path must
    stay inside the destination. Refused: an empty name or level (a leading ``/``, ``//``, a trailing
    ``/``), ``.`` and ``..``, a backslash (a separator on Windows), NUL and other control characters,
    a level longer than 255 bytes, and a name that has one of these only after Unicode NFKC
    normalisation (fullwidth dots U+FF0E or backslash U+FF3C), which some tools and file systems apply.
    """
    if not name:
        raise ValueError("its name is empty")
    for form, how in ((name, ""), (unicodedata.normalize("NFKC", name), " after Unicode normalisation")):
        control = next((char for char in form if ord(char) < 0x20 or ord(char) == 0x7F), None)
        if control is not None:
            raise ValueError(f"its name holds the control character {control!r}{how}")
        if "\\" in form:
            raise ValueError(f"its name holds a backslash{how}, a folder separator on Windows")
        levels = form.split("/")
        if form.startswith("/"):
            raise ValueError(f"it names an absolute path{how}")
        if "" in levels:
            raise ValueError(f"its name has an empty level ('//' or a trailing '/'){how}")
        if any(level in (".", "..") for level in levels):
            raise ValueError(f"its name has a '.' or '..' level{how}")
    parts = tuple(name.split("/"))
    if any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in parts):
        raise ValueError(f"a level of its name is longer than {_NAME_MAX} bytes")
    return parts


def _collision_key(parts: Sequence[str]) -> str:
    # Names that differ only in case or Unicode form are one file on macOS and Windows, and look
    # alike everywhere: the result of a copy must not depend on the file system it lands on.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", "/".join(parts)).casefold())


def local_collisions(paths: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Of ``paths`` (blob name -> local parts), those that would land on the same local file or folder
    as another, each with a reason: the same name up to case or Unicode normalisation, or a file
    that is also a folder of another blob (``a`` and ``a/b``)."""
    files: dict[str, list[str]] = {}
    folders: dict[str, list[str]] = {}
    for name, parts in paths.items():
        files.setdefault(_collision_key(parts), []).append(name)
        for depth in range(1, len(parts)):
            folders.setdefault(_collision_key(parts[:depth]), []).append(name)
    refused: dict[str, str] = {}
    for key, names in files.items():
        if len(names) > 1:
            for name in names:
                others = ", ".join(repr(other) for other in names if other != name)
                refused[name] = f"it differs only in case or Unicode form from {others}"
        for name in folders.get(key, []):
            refused[name] = f"a folder on its path is also the blob {names[0]!r}"
            for file in names:
                refused[file] = f"it is also a folder of the blob {name!r}"
    return refused


class _Transfers:
    """What the copy's threads share: the order to stop, and the hidden ``.partial`` files in progress.

    A download writes ``.<name>.<random>.partial`` beside its file and renames it into place only
    once complete. Stopping removes every ``.partial`` file, and a file is created or renamed into
    place only under the lock and only while not stopped: after :meth:`stop` returns, no thread can
    leave a partial or complete-looking file behind, even one still waiting on a request.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        self._partials: dict[int, tuple[int, str]] = {}  # descriptor of the file -> (its folder's, its name)

    def check(self) -> None:
        if self._stopped.is_set():
            raise _Stopped()

    def stop(self) -> None:
        with self._lock:
            self._stopped.set()
            for folder, name in self._partials.values():
                with contextlib.suppress(OSError):
                    os.unlink(name, dir_fd=folder)
            self._partials.clear()

    def create_partial(self, folder: int, name: str) -> tuple[int, str]:
        partial = f".{name[:48]}.{secrets.token_hex(4)}{_PARTIAL_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        with self._lock:
            self.check()
            descriptor = os.open(partial, flags, 0o666, dir_fd=folder)
            self._partials[descriptor] = (folder, partial)
        return descriptor, partial

    def complete(self, descriptor: int, folder: int, name: str) -> None:
        """Rename the finished ``.partial`` file (still registered under ``descriptor``) to ``name``."""
        with self._lock:
            self.check()
            partial = self._partials.pop(descriptor)[1]
            os.replace(partial, name, src_dir_fd=folder, dst_dir_fd=folder)

    def discard(self, descriptor: int) -> None:
        with self._lock:
            found = self._partials.pop(descriptor, None)
            if found is not None:
                with contextlib.suppress(OSError):
                    os.unlink(found[1], dir_fd=found[0])


class _Progress:
    """One progress bar (tqdm) for the bytes of every file being copied; thread-safe.

    If standard error goes away (``2>&1 | less``, quit), the bar stops: a copy never fails, and an
    interrupted one is never held up, for want of somewhere to draw it.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        try:
            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, file=sys.stderr
            )
        except (OSError, ValueError):  # it draws itself at once
            self._bar = tqdm(disable=True)
        self._lock = threading.Lock()

    def hook(self) -> Any:
        done = [0]

        def report(bytes_done: int, bytes_total: int | None) -> None:
            with self._lock:
                self._draw(self._bar.update, bytes_done - done[0])
                done[0] = bytes_done

        return report

    def close(self) -> None:
        with self._lock:
            self._draw(self._bar.close)

    def _draw(self, method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except (OSError, ValueError):  # a closed pipe or file
            self._bar.disable = True


def command_cp(args: argparse.Namespace, out: TextIO) -> int:
    source_is_url, destination_is_url = _is_url(args.source), _is_url(args.destination)
    if source_is_url == destination_is_url:
        raise _UsageError("cp copies between a container and a local path: exactly one of SRC and DST must be a URL.")
    refused: list[_Refused] = []
    root: pathlib.Path | None = None
    if source_is_url:
        client, prefix = _container_and_prefix(args.source, args.anonymous)
        # "DST/" is a folder, as it is to cp, even before it exists (pathlib drops the slash).
        into_folder = args.destination.endswith(("/", os.sep))
        root, copies, refused = _download_plan(client, prefix, pathlib.Path(args.destination), into_folder)
    else:
        client, prefix = _container_and_prefix(args.destination, args.anonymous)
        copies, refused = _upload_plan(pathlib.Path(args.source), client, prefix)
    for refusal in refused:
        print(f"azstoragetorch: {refusal}", file=sys.stderr)
    # From here to the end, transfer threads may run: a Ctrl-C is noted, and acted on by the main
    # thread at the points where it stops them (see _StopSignals).
    stops = _StopSignals()
    with stops.noted():
        return _copy_all(args, out, client, root, copies, refused, stops)


def _copy_all(
    args: argparse.Namespace,
    out: TextIO,
    client: AzStorageTorchContainerClient,
    root: pathlib.Path | None,
    copies: list[_Copy],
    refused: list[_Refused],
    stops: _StopSignals,
) -> int:
    transfers = _Transfers()
    progress = _Progress(sum(copy.size or 0 for copy in copies), enabled=not args.no_progress)
    started = time.perf_counter()
    copied = moved = retries = 0
    folder = _open_destination(root) if root is not None else None

    def copy_one(copy: _Copy) -> TransferStats:
        if folder is not None:
            return _download_one(copy, folder, client.credential, progress.hook(), transfers, not args.no_verify)
        return _upload_one(copy, client.credential, progress.hook(), transfers)

    try:
        # A DCP checkpoint's .metadata goes last, so that a reader never sees it before the shards.
        last = [copy for copy in copies if copy.destination.rsplit("/", 1)[-1].startswith(DCP_METADATA)]
        first = [copy for copy in copies if copy not in last]
        if folder is not None and first:
            for copy in last:
                _remove_old_metadata(folder, copy)
        for batch in (first, last):
            for outcome in _run_all(batch, copy_one, args.parallel, transfers, stops):
                if isinstance(outcome, _Refused):
                    print(f"azstoragetorch: {outcome}", file=sys.stderr)
                    refused.append(outcome)
                    continue
                copied += 1
                moved += outcome.bytes
                retries += outcome.retries
    finally:
        progress.close()
        if folder is not None:
            os.close(folder)
    stops.check()  # a Ctrl-C once every transfer had finished: the copy is whole, the summary not shown
    seconds = time.perf_counter() - started
    rate = moved / _MiB / seconds if seconds > 0 else 0.0
    print(
        f"Copied {copied} file{'s' if copied != 1 else ''}, {_size(moved)} in {seconds:.1f} s "
        f"({rate:.1f} MiB/s, {retries} retries)" + (f"; refused {len(refused)} (named above)" if refused else ""),
        file=out,
    )
    return 1 if refused else 0


def _run_all(
    copies: Sequence[_Copy],
    copy_one: Callable[[_Copy], TransferStats],
    parallel: int,
    transfers: _Transfers,
    stops: _StopSignals | None = None,
) -> list[TransferStats | _Refused]:
    """Run ``copy_one`` on every copy, ``parallel`` at a time, and return the outcomes.

    The first failure stops every other transfer (each stops between two pieces and cleans up after
    itself) and is raised once they have. Ctrl-C (noted by ``stops``, or raised as KeyboardInterrupt
    where no one notes it) stops them too, removes every unfinished download at once, and waits at
    most a moment for them (see :func:`main`).
    """
    stops = stops or _StopSignals()
    pool = concurrent.futures.ThreadPoolExecutor(parallel, thread_name_prefix="azstoragetorch-cp")
    futures: list[concurrent.futures.Future[TransferStats]] = []
    outcomes: list[TransferStats | _Refused] = []
    try:
        for copy in copies:  # Ctrl-C may come while the first transfers already run
            stops.check()
            futures.append(pool.submit(copy_one, copy))
        # The pool runs the copies in the order given: only the first ``parallel`` unfinished ones
        # can be running, so only they are waited on (a folder of many files costs no more).
        window: list[concurrent.futures.Future[TransferStats]] = []
        following = iter(futures)
        while window or len(outcomes) < len(futures):
            window.extend(itertools.islice(following, parallel - len(window)))
            done = stops.wait(window)
            window = [future for future in window if future not in done]
            for future in done:
                try:
                    outcomes.append(future.result())
                except _Refused as refusal:
                    outcomes.append(refusal)
    except KeyboardInterrupt as interruption:
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C is still this interruption
            transfers.stop()
            pool.shutdown(wait=False, cancel_futures=True)
            concurrent.futures.wait(futures, timeout=_STOP_GRACE_SECONDS)
        signum = interruption.signum if isinstance(interruption, _Interrupted) else stops.signum
        raise _Interrupted(signum) from None
    except BaseException:
        transfers.stop()
        pool.shutdown(wait=False, cancel_futures=True)
        # The failure is raised once the others have stopped; a Ctrl-C meanwhile leaves at once.
        try:
            while not all(future.done() for future in futures):
                stops.wait([future for future in futures if not future.done()])
        except KeyboardInterrupt as interruption:
            signum = interruption.signum if isinstance(interruption, _Interrupted) else stops.signum
            raise _Interrupted(signum) from None
        raise
    pool.shutdown()
    return outcomes


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


def _open_destination(root: pathlib.Path) -> int:
    """A descriptor of the local folder DST (created if missing); the user named it, so it may be a link."""
    if os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        # Without them no path inside DST could be opened without following a planted link.
        raise OSError(
            errno.ENOSYS,
            "cp downloads need a POSIX system (Linux, macOS): this one cannot open files "
            "relative to a folder without following symbolic links",
        )
    root.mkdir(parents=True, exist_ok=True)
    return os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def _open_folder(root: int, copy: _Copy) -> int:
    """A descriptor of the folder inside ``root`` that ``copy``'s file goes in, created as needed.

    Reached one level at a time from ``root``'s descriptor and never through a symbolic link, so a
    link planted inside the destination (``ck -> /etc``) cannot lead the copy out of it.
    """
    folder = os.dup(root)
    try:
        for level in copy.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(level, 0o777, dir_fd=folder)
            try:
                inner = os.open(level, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
            except OSError as error:
                if error.errno not in (errno.ELOOP, errno.ENOTDIR):
                    raise
                raise _Refused(copy.blob, f"{level!r} on its local path is a symbolic link or not a folder") from None
            os.close(folder)
            folder = inner
    except BaseException:
        os.close(folder)
        raise
    return folder


def _remove_old_metadata(root: int, copy: _Copy) -> None:
    """Remove the local file that the download of a ``.metadata`` will replace, before any other.

    A DCP checkpoint downloaded over an older one (``__0_0.distcp`` is the same name in each save
    that torch's own writer makes) would otherwise be, until its new ``.metadata`` lands or forever if
    the copy stops, the old ``.metadata`` over a mix of old and new shard files: wrong tensors, not an
    error. Without it the folder is plainly not a checkpoint until the copy completes.
    """
    try:
        folder = _open_folder(root, copy)
    except (_Refused, OSError):
        return  # the download itself reports this
    try:
        os.unlink(copy.parts[-1], dir_fd=folder)
    except FileNotFoundError:
        pass
    except OSError as error:
        raise OSError(error.errno, f"cannot remove the old {copy.destination}: {error.strerror or error}") from error
    finally:
        os.close(folder)


def _download_one(
    copy: _Copy, root: int, credential: CredentialArgument, hook: Any, transfers: _Transfers, verify: bool = True
) -> TransferStats:
    """Download into a hidden ``.partial`` file, renamed to its name only once the blob is whole.

    Whatever goes wrong (a full disk, a failed request, Ctrl-C, a blob that does not match its
    recorded CRC-32, which BlobIO checks at close unless ``verify`` is off), the ``.partial`` file
    is removed.
    """
    transfers.check()
    try:
        folder = _open_folder(root, copy)
    except OSError as error:
        raise _local_error(error, copy.destination) from error
    descriptor = -1
    try:
        checking = None if verify else False
        with BlobIO(copy.source, "rb", credential=credential, progress_hook=hook, verify_checksum=checking) as reader:
            try:
                descriptor, _ = transfers.create_partial(folder, copy.parts[-1])
                with open(descriptor, "wb", closefd=False) as file:
                    buffer = bytearray(_COPY_PIECE)
                    while count := reader.readinto(buffer):
                        transfers.check()
                        file.write(memoryview(buffer)[:count])
            except OSError as error:  # a full or read-only disk, a file too large, ...
                raise _local_error(error, copy.destination) from error
        try:
            transfers.complete(descriptor, folder, copy.parts[-1])
        except OSError as error:
            raise _local_error(error, copy.destination) from error
        return reader.stats
    finally:
        if descriptor >= 0:
            transfers.discard(descriptor)
            os.close(descriptor)
        os.close(folder)


def _local_error(error: OSError, path: str) -> OSError:
    """``error`` as it happened to the local file ``path``, named as the user knows it."""
    return OSError(error.errno, f"cannot write {path}: {error.strerror or error}; its partial download was removed")


def _upload_one(copy: _Copy, credential: CredentialArgument, hook: Any, transfers: _Transfers) -> TransferStats:
    """Upload a file; the blob is committed only if nothing told the copy to stop before the commit,
    and only if the file did not change while it was read (the blob would hold a mix of both)."""
    transfers.check()
    try:
        # O_NONBLOCK: a file swapped for a FIFO since the plan must not hang the copy on its open.
        descriptor = os.open(copy.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        raise OSError(error.errno, f"cannot read {copy.blob}: {error.strerror or error}") from error
    with open(descriptor, "rb") as file:
        before = os.fstat(descriptor)
        if not stat.S_ISREG(before.st_mode):
            raise OSError(errno.EINVAL, f"cannot read {copy.blob}: it is no longer a regular file")
        with BlobIO(copy.destination, "wb", credential=credential, progress_hook=hook) as writer:
            read = 0
            while piece := file.read(_COPY_PIECE):
                transfers.check()
                writer.write(piece)
                read += len(piece)
            after = os.fstat(descriptor)
            if read != after.st_size or (before.st_size, before.st_mtime_ns) != (after.st_size, after.st_mtime_ns):
                raise OSError(
                    f"{copy.blob} changed while it was being uploaded; nothing was committed for it "
                    "(copy it again once whatever writes it has finished)"
                )
            writer.flush()  # every block staged: what is left is the commit, a single request
            transfers.check()
    return writer.stats


# -- entry point -------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse's parser, but its errors, which quote the arguments given, show no SAS token."""

    def error(self, message: str) -> NoReturn:
        super().error(redact(message))


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    cp.add_argument(
        "--parallel", type=_parallel, default=4, help=f"files copied at once (default 4, at most {_MAX_PARALLEL})"
    )
    cp.add_argument("--no-progress", action="store_true", help="no progress bar")
    cp.add_argument("--no-verify", action="store_true", help="do not check downloads against their recorded CRC-32")
    return parser


# Each file copied at once holds a thread, its own parallel requests and tens of MiB of buffers:
# thousands at once would exhaust threads or memory long before they made a copy faster.
_MAX_PARALLEL = 64


def _parallel(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= _MAX_PARALLEL:
        raise argparse.ArgumentTypeError(f"must be an integer from 1 to {_MAX_PARALLEL}, not {text!r}")
    return value


_COMMANDS = {"ls": command_ls, "verify": command_verify, "cp": command_cp}


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler ending the job) stops the command as Ctrl-C
    does, cleaning up after itself; yields the number of the signal that stopped it, if one did."""
    received: list[int] = [signal.SIGINT]

    def stop(signum: int, frame: Any) -> None:
        received[0] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may handle signals; a caller's own thread keeps its own
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    with _sigterm_as_ctrl_c() as received:
        return _main(parser, args, received)


def _main(parser: argparse.ArgumentParser, args: argparse.Namespace, received: list[int]) -> int:
    try:
        code = _COMMANDS[args.command](args, sys.stdout)
        sys.stdout.flush()  # here, so that a closed standard output is handled below
        return code
    except BrokenPipeError:
        # Whoever read standard output stopped (``azstoragetorch ls URL | head``): stop quietly, as
        # other command-line tools do, and keep the interpreter's own last flush from complaining.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except _UsageError as error:
        parser.error(str(error))  # exits with 2 after the usage line
    except ValueError as error:  # a malformed URL, and the like
        parser.error(str(error))
    except (AzureError, AZStorageTorchError, OSError) as error:
        print(f"azstoragetorch: error: {redact(str(error))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as interruption:
        signum = interruption.signum if isinstance(interruption, _Interrupted) else None
        code = 128 + (signum or received[0])  # 130 for Ctrl-C, 143 for SIGTERM, as a shell reports them
        # Standard error may be gone (``2>&1 | less``, quit): the exit below must happen anyway.
        with contextlib.suppress(OSError, ValueError):
            print(f"azstoragetorch: {'terminated' if code == 143 else 'interrupted'}", file=sys.stderr)
        if isinstance(interruption, _Interrupted):
            # Transfer threads (ours, or the requests of a BlobIO that stopped without waiting for
            # them) may still wait on the service, and the interpreter would wait for them at exit:
            # minutes, when throttled. They were told to stop, and none can commit a blob or leave
            # a file any more, so leaving now is what makes the first Ctrl-C work.
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(OSError, ValueError):
                    stream.flush()
            os._exit(code)
        return code
    return 1
