"""Turning the ``credential`` argument into the pipeline policy that authorizes requests."""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import threading
import time
import urllib.parse
from email.utils import formatdate
from typing import TYPE_CHECKING, Any, Literal, Union

from azure.core.credentials import AzureNamedKeyCredential, AzureSasCredential, TokenCredential
from azure.core.pipeline import PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import (
    AzureSasCredentialPolicy,
    BearerTokenCredentialPolicy,
    HTTPPolicy,
    SansIOHTTPPolicy,
)
from typing_extensions import override

if TYPE_CHECKING:
    from azure.core.credentials import SupportsTokenInfo

AzureCredential = Union[AzureSasCredential, AzureNamedKeyCredential, "TokenCredential", "SupportsTokenInfo"]
CredentialArgument = Union[AzureCredential, None, Literal[False]]  # noqa: UP007 (a runtime alias)

_STORAGE_SCOPE = "https://storage.azure.com/.default"

ACCEPTED_CREDENTIALS = (
    "None (use DefaultAzureCredential), False (anonymous access), "
    "azure.core.credentials.AzureSasCredential, azure.core.credentials.AzureNamedKeyCredential, "
    "or a token credential such as azure.identity.DefaultAzureCredential"
)


def validate_credential(credential: object) -> None:
    """Raise ``TypeError`` listing the accepted types unless ``credential`` is one of them."""
    if credential is None or credential is False:
        return
    if isinstance(credential, (AzureSasCredential, AzureNamedKeyCredential)) or _is_token_credential(credential):
        return
    hint = ""
    if isinstance(credential, str):
        hint = (
            " To use an account key, pass AzureNamedKeyCredential(account_name, key); to use a SAS "
            "token, append it to the URL or pass AzureSasCredential(token)."
        )
    raise TypeError(f"Unsupported credential type {type(credential).__name__}; expected {ACCEPTED_CREDENTIALS}.{hint}")


def _is_token_credential(credential: object) -> bool:
    return callable(getattr(credential, "get_token", None)) or callable(getattr(credential, "get_token_info", None))


class _SharedDefaultCredential:
    """One ``DefaultAzureCredential`` per process, created on first use.

    Creating it probes environment variables, managed identity and developer tools, and each
    instance keeps its own token cache, so every BlobIO and dataset in a process shares one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._credential: TokenCredential | None = None

    def get(self) -> TokenCredential:
        with self._lock:
            if self._credential is None:
                from azure.identity import DefaultAzureCredential

                self._credential = DefaultAzureCredential()
            return self._credential

    def forget(self) -> None:
        """Drop the instance (called in a forked child, whose token cache must not be shared)."""
        self._lock = threading.Lock()
        self._credential = None


shared_default_credential = _SharedDefaultCredential()


def auth_policy_for(
    credential: CredentialArgument, *, url_has_sas: bool, host: str
) -> HTTPPolicy[Any, Any] | SansIOHTTPPolicy[Any, Any] | BearerTokenCredentialPolicy[Any, Any] | None:
    """The policy that authorizes requests; ``None`` for anonymous requests or a SAS in the URL."""
    validate_credential(credential)
    if url_has_sas or credential is False:
        return None
    if isinstance(credential, AzureSasCredential):
        return AzureSasCredentialPolicy(credential)
    if isinstance(credential, AzureNamedKeyCredential):
        return SharedKeyPolicy(credential)
    token_credential = shared_default_credential.get() if credential is None else credential
    if _is_loopback(host):
        # Bearer tokens normally require TLS; a local emulator on loopback never leaves the machine.
        return _LoopbackBearerTokenPolicy(token_credential, _STORAGE_SCOPE)
    return BearerTokenCredentialPolicy(token_credential, _STORAGE_SCOPE)


def check_not_sent_in_clear(credential: CredentialArgument, *, url_has_sas: bool, scheme: str, host: str) -> None:
    """Raise ``ValueError`` if requests to ``scheme://host`` would carry a secret over plain HTTP to
    another machine: a SAS token, a Shared Key signature or a bearer token. Anonymous requests, and
    any request to this machine (a local emulator), may use plain HTTP."""
    if scheme != "http" or _is_loopback(host):
        return
    if url_has_sas or isinstance(credential, AzureSasCredential):
        secret = "a SAS token"
    elif credential is False:
        return
    elif isinstance(credential, AzureNamedKeyCredential):
        if _is_published_development_key(credential):
            return  # Azurite's key is public: a signature made with it protects nothing
        secret = "a signature made with the account key"
    else:
        secret = "a bearer token" + (" (from DefaultAzureCredential)" if credential is None else "")
    raise ValueError(
        f"Refusing to send {secret} over plain http:// to {host}: anyone on the network could read it. Use "
        "https://; plain http:// is allowed only to this machine (localhost, 127.0.0.1, ::1), for a local "
        "emulator, or with credential=False."
    )


def _is_published_development_key(credential: AzureNamedKeyCredential) -> bool:
    from azstoragetorch.testing import ACCOUNT_KEY, ACCOUNT_NAME

    return tuple(credential.named_key) == (ACCOUNT_NAME, ACCOUNT_KEY)


class _LoopbackBearerTokenPolicy(BearerTokenCredentialPolicy[Any, Any]):
    def on_request(self, request: PipelineRequest[Any]) -> None:
        request.context["enforce_https"] = False
        super().on_request(request)


# Asked for every client made (a dataset makes one per sample); parsing the address costs more than the rest.
@functools.lru_cache(maxsize=256)
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# Headers that take part in a Shared Key signature, in the order the service expects them.
_SIGNED_STANDARD_HEADERS = (
    "content-encoding",
    "content-language",
    "content-length",
    "content-md5",
    "content-type",
    "date",
    "if-modified-since",
    "if-match",
    "if-none-match",
    "if-unmodified-since",
    "range",
)


class SharedKeyPolicy(HTTPPolicy[Any, Any]):
    """Signs each request with the storage account key (the "Shared Key" scheme).

    Runs after the retry policy so that every attempt gets a fresh ``x-ms-date`` and signature.
    The key itself never leaves this object: only the HMAC goes on the wire.

    Signing runs once per request, and a dataset of small blobs sends thousands per second, so the
    work that does not change between requests is done once: the key is decoded and an HMAC keyed
    with it is kept (each request signs with a copy), and the date string is reused within its
    second. The key is read from the credential at every request all the same, so that
    ``AzureNamedKeyCredential.update`` takes effect at once. A plain ``send`` rather than azure-core's
    request hook spares the calls azure-core wraps a hook in.
    """

    def __init__(self, credential: AzureNamedKeyCredential) -> None:
        super().__init__()
        self._credential = credential
        self._keyed: tuple[str, str, Any] | None = None  # (account name, key, HMAC keyed with it)
        self._date: tuple[int, str] = (-1, "")

    def __repr__(self) -> str:
        return f"SharedKeyPolicy(account={self._credential.named_key.name!r})"

    @override
    def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
        self.on_request(request)
        return self.next.send(request)

    def on_request(self, request: PipelineRequest[Any]) -> None:
        """Date and sign ``request`` (its ``Authorization`` header)."""
        http_request = request.http_request
        http_request.headers["x-ms-date"] = self._now()
        account_name, key = self._credential.named_key
        keyed = self._keyed
        if keyed is None or keyed[0] != account_name or keyed[1] != key:
            keyed = self._keyed = (account_name, key, _keyed_hmac(account_name, key))
        string_to_sign = _string_to_sign(http_request.method, http_request.url, http_request.headers, account_name)
        mac = keyed[2].copy()
        mac.update(string_to_sign.encode("utf-8"))
        http_request.headers["Authorization"] = f"SharedKey {account_name}:{base64.b64encode(mac.digest()).decode()}"

    def _now(self) -> str:
        second = int(time.time())
        cached = self._date
        if cached[0] != second:
            cached = self._date = (second, formatdate(second, usegmt=True))
        return cached[1]


def _keyed_hmac(account_name: str, key: str) -> Any:
    try:
        decoded_key = base64.b64decode(key, validate=True)
    except ValueError:
        raise ValueError(
            f"The account key for {account_name!r} in AzureNamedKeyCredential is not valid base64."
        ) from None
    return hmac.new(decoded_key, digestmod=hashlib.sha256)


def _string_to_sign(method: str, url: str, headers: Any, account_name: str) -> str:
    # azure-core's case-insensitive headers hand out their lower-cased names without a lookup per name.
    pairs = headers.lowerkey_items() if hasattr(headers, "lowerkey_items") else headers.items()
    lowered = {name.lower(): str(value) for name, value in pairs}
    if lowered.get("content-length") == "0":
        lowered["content-length"] = ""  # the service signs an empty length for empty bodies
    standard = [lowered.get(name, "") for name in _SIGNED_STANDARD_HEADERS]
    ms_headers = sorted((name, value.strip()) for name, value in lowered.items() if name.startswith("x-ms-"))
    resource = f"/{account_name}{_canonical_path(url)}"
    query_start = url.find("?")
    if query_start != -1:
        query: dict[str, list[str]] = {}
        for name, value in urllib.parse.parse_qsl(url[query_start + 1 :], keep_blank_values=True):
            query.setdefault(name.lower(), []).append(value)
        for name in sorted(query):
            resource += f"\n{name}:{','.join(sorted(query[name]))}"
    lines = [method.upper(), *standard, *(f"{name}:{value}" for name, value in ms_headers), resource]
    return "\n".join(lines)


@functools.lru_cache(maxsize=4096)
def _canonical_path(url: str) -> str:
    # Cached by URL: a data set reads each blob (and its URL) again in every epoch.
    return urllib.parse.urlsplit(url).path or "/"
