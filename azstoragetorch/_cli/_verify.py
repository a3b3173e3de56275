"""``verify``: a blob, or every file of a DCP checkpoint, checked against its recorded CRC-32."""

from __future__ import annotations

import argparse
from typing import TextIO

from azure.core.exceptions import AzureError

from azstoragetorch._cli._access import _blob_url, _container_and_prefix, _UsageError
from azstoragetorch._cli._ls import DCP_METADATA, _is_dcp_checkpoint
from azstoragetorch._cli._output import _printable, _size
from azstoragetorch._cli._transfer import _COPY_PIECE
from azstoragetorch._client import AzStorageTorchContainerClient, crc32
from azstoragetorch.exceptions import ChecksumMismatchError
from azstoragetorch.io import BlobIO


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
