"""The one layer of azstoragetorch that talks to Azure Blob Storage.

Everything about how bytes travel lives here: URL parsing, credentials, the HTTP pipeline and its
retries, connection pools, parallel ranged downloads and block uploads. The public classes
(:mod:`azstoragetorch.io`, later the datasets and integrations) only use what this package exports.
"""

from azstoragetorch._client._blob_client import AzStorageTorchBlobClient, BlobProperties
from azstoragetorch._client._container_client import AzStorageTorchContainerClient, Level, ListedBlob
from azstoragetorch._client._credentials import CredentialArgument
from azstoragetorch._client._pipeline import MAX_SAMPLE_THREADS
from azstoragetorch._client._stats import PROGRESS_INTERVAL_SECONDS, ProgressHook, Recorder, TransferStats, stats
from azstoragetorch._client._uploads import BlockUploader
from azstoragetorch._client._urls import BlobUrl, ContainerUrl

__all__ = [
    "MAX_SAMPLE_THREADS",
    "PROGRESS_INTERVAL_SECONDS",
    "AzStorageTorchBlobClient",
    "AzStorageTorchContainerClient",
    "BlobProperties",
    "BlobUrl",
    "BlockUploader",
    "ContainerUrl",
    "CredentialArgument",
    "Level",
    "ListedBlob",
    "ProgressHook",
    "Recorder",
    "TransferStats",
    "stats",
]
