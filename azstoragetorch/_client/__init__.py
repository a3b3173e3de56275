"""The one layer of azstoragetorch that talks to Azure Blob Storage.

Everything about how bytes travel lives here: URL parsing, credentials, the HTTP pipeline and its
retries, connection pools, the one ranged fetch every read comes down to
(``AzStorageTorchBlobClient.fetch_range_into``) and block uploads, the pooled buffers they fill and
the checksums they record. Which ranges to fetch, and when, is decided above, in
:mod:`azstoragetorch._reads`. The modules above (:mod:`azstoragetorch.io`, the datasets and the
integrations) use only what this package exports; ruff's ``banned-api`` setting in
``pyproject.toml`` fails the lint step for any import of a ``_client._*`` submodule from outside.
"""

from azstoragetorch._client._blob_client import AzStorageTorchBlobClient, BlobNotModified, BlobProperties, IntoBytes
from azstoragetorch._client._buffers import Lease, lease
from azstoragetorch._client._checksums import PieceChecksums, crc32
from azstoragetorch._client._container_client import AzStorageTorchContainerClient, Level, ListedBlob
from azstoragetorch._client._credentials import CredentialArgument, validate_credential
from azstoragetorch._client._pipeline import (
    MAX_SAMPLE_THREADS,
    interpreter_exiting,
    is_missing_container,
    not_found_as_file_not_found,
)
from azstoragetorch._client._redaction import redact, redact_error, redact_url
from azstoragetorch._client._schedule import pause
from azstoragetorch._client._stats import (
    PROGRESS_INTERVAL_SECONDS,
    Recorder,
    TransferStats,
    add_checksum_outcome,
    stats,
    sum_stats,
)
from azstoragetorch._client._uploads import BlockUploader
from azstoragetorch._client._urls import (
    FSSPEC_PROTOCOLS,
    BlobUrl,
    ContainerUrl,
    fsspec_path_to_url,
    is_azure_blob_host,
)

# Defined with the options; re-exported for the modules above that take a progress hook.
from azstoragetorch._options import ProgressHook

__all__ = [
    "FSSPEC_PROTOCOLS",
    "MAX_SAMPLE_THREADS",
    "PROGRESS_INTERVAL_SECONDS",
    "AzStorageTorchBlobClient",
    "AzStorageTorchContainerClient",
    "BlobNotModified",
    "BlobProperties",
    "BlobUrl",
    "BlockUploader",
    "ContainerUrl",
    "CredentialArgument",
    "IntoBytes",
    "Lease",
    "Level",
    "ListedBlob",
    "PieceChecksums",
    "ProgressHook",
    "Recorder",
    "TransferStats",
    "add_checksum_outcome",
    "crc32",
    "fsspec_path_to_url",
    "interpreter_exiting",
    "is_azure_blob_host",
    "is_missing_container",
    "lease",
    "not_found_as_file_not_found",
    "pause",
    "redact",
    "redact_error",
    "redact_url",
    "stats",
    "sum_stats",
    "validate_credential",
]
