"""Listing the blobs of a container."""

from __future__ import annotations

import dataclasses
import urllib.parse
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from typing import Any

from azstoragetorch._client import _checksums
from azstoragetorch._client._blob_client import AzStorageTorchBlobClient, BlobProperties
from azstoragetorch._client._credentials import CredentialArgument
from azstoragetorch._client._resource import ResourceClient
from azstoragetorch._client._urls import ContainerUrl
from azstoragetorch.retry import RetryOptions

# The service returns at most 5,000 blobs per List Blobs page.
_PAGE_SIZE = 5000


@dataclasses.dataclass(frozen=True)
class ListedBlob:
    """A blob as List Blobs described it: its client, and the properties that came with the listing.

    ``is_directory`` marks a directory of an account with a hierarchical namespace (ADLS Gen2),
    which the Blob API lists as a zero-length blob with the metadata ``hdi_isfolder=true``: not data.
    """

    client: AzStorageTorchBlobClient
    properties: BlobProperties
    is_directory: bool = False


@dataclasses.dataclass(frozen=True)
class Level:
    """One level of a container's ``/`` hierarchy: the blobs directly in it and its sub-prefixes
    (each ending with ``/``), both in name order."""

    blobs: list[ListedBlob]
    prefixes: list[str]


class AzStorageTorchContainerClient(ResourceClient):
    """Talks to one container: lists its blobs."""

    def __init__(
        self, container_url: ContainerUrl, credential: CredentialArgument = None, *, retry: RetryOptions | None = None
    ) -> None:
        super().__init__(container_url, credential, retry=retry)
        self.container_url = container_url

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self.container_url = state["url"]

    @classmethod
    def from_url(
        cls, url: str, credential: CredentialArgument = None, *, retry: RetryOptions | None = None
    ) -> AzStorageTorchContainerClient:
        return cls(ContainerUrl.parse(url), credential, retry=retry)

    def blob_client(self, blob_name: str) -> AzStorageTorchBlobClient:
        """A client for a blob of this container, with the same credential (or SAS) and retry options."""
        return AzStorageTorchBlobClient(self.container_url.blob_url(blob_name), self.credential, retry=self.retry)

    def list_blobs(self, prefix: str | None = None) -> Iterator[ListedBlob]:
        """Every blob whose name starts with ``prefix``, in name order, following every page.

        Raises ``ResourceNotFoundError`` for a missing container and ``ClientAuthenticationError``
        when listing is not allowed, naming the container (never its SAS).
        """
        for page in self._pages(prefix):
            for element in page.iterfind("Blobs/Blob"):
                yield self._listed_blob(element)

    def list_level(self, prefix: str, *, max_results: int | None = None) -> Level:
        """One level of the ``/``-separated hierarchy under ``prefix`` (which should end with ``/``,
        or be empty for the container's top level), like listing a directory.

        With ``max_results``, stops after that many entries (enough to tell whether the "directory"
        exists). Errors as for :meth:`list_blobs`.
        """
        blobs: list[ListedBlob] = []
        prefixes: list[str] = []
        for page in self._pages(prefix, delimiter="/", page_size=max_results or _PAGE_SIZE):
            blobs.extend(self._listed_blob(element) for element in page.iterfind("Blobs/Blob"))
            prefixes.extend(_decoded_name(element) for element in page.iterfind("Blobs/BlobPrefix"))
            if max_results is not None and len(blobs) + len(prefixes) >= max_results:
                break
        return Level(blobs, prefixes)

    def _pages(
        self, prefix: str | None, *, delimiter: str | None = None, page_size: int = _PAGE_SIZE
    ) -> Iterator[ElementTree.Element]:
        marker = ""
        while True:
            # Metadata, so that the directories of a hierarchical namespace can be told from blobs.
            query = ["restype=container", "comp=list", "include=metadata", f"maxresults={page_size}"]
            if prefix:
                query.append(f"prefix={urllib.parse.quote(prefix, safe='')}")
            if delimiter:
                query.append(f"delimiter={urllib.parse.quote(delimiter, safe='')}")
            if marker:
                query.append(f"marker={urllib.parse.quote(marker, safe='')}")
            response = self._send("GET", action="list the blobs of", query=tuple(query))
            page = ElementTree.fromstring(response.body())
            yield page
            marker = page.findtext("NextMarker") or ""
            if not marker:
                return

    def _listed_blob(self, element: ElementTree.Element) -> ListedBlob:
        name = _decoded_name(element)
        last_modified = element.findtext("Properties/Last-Modified")
        etag = element.findtext("Properties/Etag") or ""
        properties = BlobProperties(
            size=int(element.findtext("Properties/Content-Length") or 0),
            # Listings give the ETag bare; headers (and If-Match) quote it. Keep the header form.
            etag=etag if etag.startswith('"') or not etag else f'"{etag}"',
            last_modified=parsedate_to_datetime(last_modified) if last_modified else None,
            crc32=_checksums.parse_recorded(_metadata_value(element, _checksums.METADATA_NAME)),
        )
        return ListedBlob(self.blob_client(name), properties, is_directory=_is_directory(element))


def _is_directory(element: ElementTree.Element) -> bool:
    # Metadata names are case-insensitive in Blob Storage; the listing gives them as they were set.
    return any(
        entry.tag.lower() == "hdi_isfolder" and (entry.text or "").strip().lower() == "true"
        for entry in element.iterfind("Metadata/*")
    )


def _metadata_value(element: ElementTree.Element, name: str) -> str | None:
    for entry in element.iterfind("Metadata/*"):
        if entry.tag.lower() == name:
            return entry.text
    return None


def _decoded_name(element: ElementTree.Element) -> str:
    name_element = element.find("Name")
    name = (name_element.text or "") if name_element is not None else ""
    if name_element is not None and name_element.get("Encoded") == "true":
        name = urllib.parse.unquote(name)  # names with characters XML cannot carry
    return name
