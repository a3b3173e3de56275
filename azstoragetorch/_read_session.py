"""What ``verify_checksum`` means for a ``BlobIO`` reader: :func:`open_window` and :func:`verify_whole_blob`.

``io.py`` decides what a file object's calls mean and ``_reads`` which ranges to fetch; this
module holds the reader's check of the whole blob against the CRC-32 its writer recorded: whether
there is one to check when the blob is opened, and the check itself when it is closed.
"""

from __future__ import annotations

import logging

from azstoragetorch._client import AzStorageTorchBlobClient, PieceChecksums, Recorder, add_checksum_outcome
from azstoragetorch._options import TransferOptions
from azstoragetorch._reads import ReadAheadWindow, read_first
from azstoragetorch.exceptions import ChecksumMismatchError

_MiB = 1024 * 1024
# The first request of a read also tells the blob's size and ETag; small blobs arrive whole.
_FIRST_READ_BYTES = 4 * _MiB
_LOGGER = logging.getLogger("azstoragetorch")


def open_window(client: AzStorageTorchBlobClient, options: TransferOptions, recorder: Recorder) -> ReadAheadWindow:
    """A read-ahead window over the blob, from its first request, gathering the CRC-32 of what it
    downloads if the blob has a recorded one to check it against (and ``verify_checksum`` is not
    ``False``).

    Raises:
        ValueError: ``verify_checksum`` is ``True`` and the blob has no recorded CRC-32.
    """
    first_length = min(_FIRST_READ_BYTES, options.block_size)
    properties, first = read_first(client, first_length, validate_content=options.validate_content)
    checksums = None
    if options.verify_checksum is not False:
        if properties.crc32 is not None:
            checksums = PieceChecksums(properties.size)
        elif options.verify_checksum is True:
            raise ValueError(
                f"{client.display_url} has no recorded CRC-32 to verify (azstoragetorch records one when "
                "it writes a blob); open it without verify_checksum=True."
            )
        else:
            add_checksum_outcome(recorder, verified=False)
            _LOGGER.debug("%s has no recorded CRC-32: read unverified", client.display_url)
    return ReadAheadWindow(
        client,
        properties,
        block_size=options.block_size,
        max_chunks=options.max_concurrency,
        first_chunk=first,
        validate_content=options.validate_content,
        checksums=checksums,
    )


def verify_whole_blob(window: ReadAheadWindow, recorder: Recorder, name: str, *, download_rest: bool) -> None:
    """Check the CRC-32 of everything ``window`` downloaded against the blob's recorded one, first
    downloading what was never read if ``download_rest``; a blob read in part is otherwise left
    unchecked.

    Raises:
        ChecksumMismatchError: The two differ; ``name`` is the blob's, as shown to the user.
    """
    expected = window.properties.crc32
    actual = window.whole_crc32(download_rest=download_rest)
    if actual is None:
        _LOGGER.debug("%s was read in part: its CRC-32 was not checked", name)
        return
    if actual != expected:
        raise ChecksumMismatchError(name, "CRC-32 of the whole blob", f"{expected:08x}", f"{actual:08x}")
    add_checksum_outcome(recorder, verified=True)
