"""What the blob and container clients share: their URL, credential, pipeline and request sending."""

from __future__ import annotations

import base64
import copy
import functools
import hashlib
import os
import urllib.parse
from typing import Any

from azure.core.credentials import AzureSasCredential
from azure.core.pipeline import Pipeline
from azure.core.pipeline.transport import HttpRequest, HttpResponse

from azstoragetorch._client import _pipeline
from azstoragetorch._client._credentials import CredentialArgument, check_not_sent_in_clear, validate_credential
from azstoragetorch._client._stats import Recorder
from azstoragetorch._client._urls import BlobUrl, ContainerUrl, check_sas_complete
from azstoragetorch.retry import RetryOptions

ResourceUrl = BlobUrl | ContainerUrl


class ResourceClient:
    """A client for one resource (a blob or a container) at one URL.

    Cheap to create and safe to pickle: the pipeline (and its connection pool) is looked up per
    process on first use, so a copy sent to a DataLoader worker opens its own connections.
    ``retry`` was checked where the user gave it (a public class's constructor), and is taken as it is.
    """

    def __init__(
        self, url: ResourceUrl, credential: CredentialArgument = None, *, retry: RetryOptions | None = None
    ) -> None:
        validate_credential(credential)
        host = _host_of(url.netloc)
        check_not_sent_in_clear(credential, url_has_sas=url.has_sas, scheme=url.scheme, host=host)
        if isinstance(credential, AzureSasCredential):
            check_sas_complete(credential.signature, where="AzureSasCredential")
        self._url = url
        self._credential = credential
        self._retry = retry
        self._pipeline: Pipeline[Any, Any] | None = None
        self._pipeline_pid = 0
        # Counts this client's requests, retries and bytes for one transfer (a BlobIO); not pickled.
        self.recorder: Recorder | None = None
        # Built on first use and kept: quoting the names again for every request costs more than the
        # rest of building it.
        self._display_url: str | None = None
        self._plain_request_url: str | None = None

    def with_recorder(self, recorder: Recorder | None) -> Any:
        """A copy of this client whose transfers ``recorder`` counts (this one's stay uncounted by it)."""
        clone = copy.copy(self)
        clone.recorder = recorder
        return clone

    @property
    def credential(self) -> CredentialArgument:
        return self._credential

    @property
    def retry(self) -> RetryOptions | None:
        """The retry options of every request; ``None`` for the defaults."""
        return self._retry

    @property
    def display_url(self) -> str:
        """The URL to show: without any SAS token."""
        if self._display_url is None:
            self._display_url = self._url.display_url
        return self._display_url

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.display_url!r})"

    def __getstate__(self) -> dict[str, Any]:
        return {"url": self._url, "credential": self._credential, "retry": self._retry}

    def __setstate__(self, state: dict[str, Any]) -> None:
        ResourceClient.__init__(self, state["url"], state["credential"], retry=state["retry"])

    def _get_pipeline(self) -> Pipeline[Any, Any]:
        if self._pipeline is None or self._pipeline_pid != os.getpid():
            origin = f"{self._url.scheme}://{self._url.netloc}"
            self._pipeline = _pipeline.pipeline_for(
                origin, self._credential, url_has_sas=self._url.has_sas, retry=self._retry
            )
            self._pipeline_pid = os.getpid()
        return self._pipeline

    def _send(
        self,
        method: str,
        *,
        action: str,
        query: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        body: bytes | memoryview | None = None,
        validate_content: bool = False,
        expected: int = 200,
        stream: bool = False,
    ) -> HttpResponse:
        """Send one request; any status but ``expected`` raises the matching azure-core error."""
        response = self._send_unchecked(
            method, query=query, headers=headers, body=body, stream=stream, validate_content=validate_content
        )
        if response.status_code != expected:
            _pipeline.raise_for_status(response, action=action, display_url=self.display_url)
        return response

    def _send_unchecked(
        self,
        method: str,
        *,
        query: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        body: bytes | memoryview | None = None,
        validate_content: bool = False,
        stream: bool = False,
    ) -> HttpResponse:
        if query:
            url = self._url.request_url(*query)
        else:
            if self._plain_request_url is None:
                self._plain_request_url = self._url.request_url()
            url = self._plain_request_url
        request = HttpRequest(method, url, headers=headers or {})
        if body is not None:
            # A memoryview is sent as it is (urllib3 hands buffers straight to sendall).
            request.set_bytes_body(body)  # type: ignore[arg-type]
            if validate_content:
                request.headers["Content-MD5"] = base64.b64encode(hashlib.md5(body).digest()).decode()
        return _pipeline.run(
            self._get_pipeline(), request, display_url=self.display_url, stream=stream, recorder=self.recorder
        )


# A dataset makes a client for every sample it reads, all of a few hosts.
@functools.lru_cache(maxsize=256)
def _host_of(netloc: str) -> str:
    return urllib.parse.urlsplit(f"//{netloc}").hostname or ""
