"""Which paths are a plugin's blob paths, the URLs they name, and the registry that says whose a path is."""

from __future__ import annotations

import dataclasses
import os
import threading
import urllib.parse
from typing import Any

import fsspec.config
from azure.core.utils import parse_connection_string

from azstoragetorch._client import (
    FSSPEC_PROTOCOLS,
    BlobUrl,
    CredentialArgument,
    fsspec_path_to_url,
    is_azure_blob_host,
    redact_url,
)
from azstoragetorch.integrations.lightning._filesystem import BlobFileSystem
from azstoragetorch.retry import RetryOptions

ACCEPTED_FORMS = (
    "https://<account>.blob.core.windows.net/<container>/<path> (or another Azure cloud's blob endpoint), "
    "a URL under the plugin's account_url (such as the Azurite emulator's "
    "http://127.0.0.1:10000/devstoreaccount1/<container>/<path>), "
    "or, on the account of account_url, az://<container>/<path> or "
    "abfs[s]://<container>@<account>.dfs.core.windows.net/<path>"
)
# What adlfs reads to choose the account of an az:// path that names none.
_ADLFS_SETTINGS = "AZURE_STORAGE_CONNECTION_STRING, AZURE_STORAGE_ACCOUNT_NAME or fsspec's configuration"


@dataclasses.dataclass(frozen=True)
class BlobPaths:
    """Which paths name blobs for one plugin, how they become URLs, and the credential that reaches them.

    A plugin's paths are:

    - URLs on Azure's blob endpoints (fsspec would hand them to its anonymous HTTP filesystem);
    - URLs under ``account_url``, which is how emulators, custom domains and Azure Stack endpoints
      are recognised;
    - the fsspec-style ``az://``, ``abfs://`` and ``abfss://`` paths, which are adlfs's too, only
      on the account of ``account_url``: a path that names that account
      (``abfss://<container>@<account>.dfs.core.windows.net/...``), or one that names no account
      unless adlfs's own settings (a connection string or account name in the environment or in
      fsspec's configuration) name another. A plugin without ``account_url`` has none of them, so it
      never takes an adlfs user's path.
    """

    account_url: str | None
    credential: CredentialArgument = dataclasses.field(compare=False)
    retry: RetryOptions | None = dataclasses.field(default=None, compare=False)

    def owns(self, path: str) -> bool:
        """Whether ``path`` is one of this plugin's paths. Never raises: anything else is "not mine"."""
        try:
            scheme = path.split("://", 1)[0].lower() if "://" in path else ""
            if scheme in FSSPEC_PROTOCOLS:
                return self._fsspec_refusal(path) is None
            if scheme not in ("http", "https"):
                return False
            return is_azure_blob_host(urllib.parse.urlsplit(path).hostname or "") or self.is_under_account_url(path)
        except (AttributeError, TypeError, ValueError):  # not a str, or not a URL at all
            return False

    def is_under_account_url(self, url: str) -> bool:
        return self.account_url is not None and _is_under(url, self.account_url)

    def url_for(self, path: str) -> str | None:
        """The blob (or prefix) URL that ``path`` names, or ``None`` if it is not one of this plugin's paths.

        Raises ``ValueError`` for a path that is this plugin's but cannot be used as a blob path.
        """
        if not self.owns(path):
            return None
        if path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS:
            return fsspec_path_to_url(path, account_url=self.account_url)
        if _has_file_name_in_query(urllib.parse.urlsplit(path).query):
            raise ValueError(
                f"{redact_url(path)!r} has a file name after its query string: Lightning appended it to a directory "
                "URL that carries a SAS token. Pass the SAS token as credential=AzureSasCredential(...) and "
                "keep directory URLs free of query strings."
            )
        return path

    def refusal(self, path: str) -> str:
        """Why ``path`` is not one of this plugin's paths: a sentence for an error message that names the path."""
        reason = self._fsspec_refusal(path) if path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS else None
        return reason or f"expected {ACCEPTED_FORMS}."

    def filesystem(self) -> BlobFileSystem:
        return BlobFileSystem(credential=self.credential, retry=self.retry, to_url=self._required_url)

    def _required_url(self, path: str) -> str:
        url = self.url_for(path)
        if url is None:
            raise ValueError(f"{redact_url(path)!r} is not a blob path here: {self.refusal(path)}")
        return url

    def _fsspec_refusal(self, path: str) -> str | None:
        """``None`` if an ``az://``/``abfs[s]://`` path is this plugin's, otherwise why not."""
        if self.account_url is None:
            return (
                "az:// and abfs[s]:// paths are adlfs's too, so a plugin uses them only on the account of its "
                "account_url. Pass account_url='https://<account>.blob.core.windows.net', or write the path as "
                "an https:// URL."
            )
        location = path.split("://", 1)[1].split("/", 1)[0]
        _, at, host = location.partition("@")
        if at:
            named = _fsspec_account_url(host)
            if named is None or named.lower() != self.account_url.lower():
                return (
                    f"it names another account than the plugin's account_url {self.account_url!r}; such paths are "
                    "left to adlfs."
                )
            return None
        adlfs_endpoint = _adlfs_endpoint()
        if adlfs_endpoint is not None and adlfs_endpoint.lower() != self.account_url.lower():
            return (
                f"it names no account, and this process sets adlfs up ({_ADLFS_SETTINGS}) for another account "
                f"than the plugin's account_url {self.account_url!r}. Name the account in the path "
                "(abfss://<container>@<account>.dfs.core.windows.net/...) or use a URL under account_url."
            )
        return None


def _fsspec_account_url(host: str) -> str | None:
    """The blob endpoint of ``<account>.dfs.core.windows.net`` (as written after ``@`` in an adlfs path)."""
    try:
        return BlobUrl.parse(fsspec_path_to_url(f"az://c@{host}/b", account_url=None)).account_url
    except ValueError:
        return None


def _adlfs_endpoint() -> str | None:
    """The blob endpoint adlfs would use for an ``az://`` path that names no account, as set up by
    fsspec's configuration or adlfs's environment variables (a connection string first, as adlfs
    does); ``""`` when they set up one that cannot be told; ``None`` when nothing sets one up."""
    options: dict[str, Any] = {}
    for protocol in FSSPEC_PROTOCOLS:  # adlfs reads fsspec's configuration under each of its names
        options.update(fsspec.config.conf.get(protocol, {}))
    connection_string = options.get("connection_string") or os.environ.get("AZURE_STORAGE_CONNECTION_STRING")
    if connection_string:
        try:
            settings = parse_connection_string(connection_string, case_sensitive_keys=False)
        except ValueError:
            return ""
        if settings.get("usedevelopmentstorage", "").lower() == "true":
            return "http://127.0.0.1:10000/devstoreaccount1"
        if settings.get("blobendpoint"):
            return str(settings["blobendpoint"]).rstrip("/")
        account = settings.get("accountname")
        suffix = settings.get("endpointsuffix", "core.windows.net")
        scheme = settings.get("defaultendpointsprotocol", "https")
        return f"{scheme}://{account}.blob.{suffix}" if account else ""
    account = options.get("account_name") or os.environ.get("AZURE_STORAGE_ACCOUNT_NAME")
    return f"https://{account}.blob.core.windows.net" if account else None


def _is_under(url: str, account_url: str) -> bool:
    candidate = urllib.parse.urlsplit(url)
    account = urllib.parse.urlsplit(account_url)
    same_origin = (candidate.scheme.lower(), candidate.netloc.lower()) == (
        account.scheme.lower(),
        account.netloc.lower(),
    )
    account_path = account.path.rstrip("/")
    return same_origin and (not account_path or candidate.path.startswith(account_path + "/"))


def _has_file_name_in_query(query: str) -> bool:
    """Whether a query string ends in ``/<name>.<extension>``, as a SAS does once a file name is joined to it.

    A SAS's own values can contain ``/`` (base64 signatures) but never a ``.`` after it.
    """
    if "/" not in query:
        return False
    last_segment = urllib.parse.unquote(query).rsplit("/", 1)[1]
    return "." in last_segment


# -- the registry ------------------------------------------------------------------------------

_lock = threading.Lock()
_registered: list[BlobPaths] = []  # newest first; one entry per account_url


def register(paths: BlobPaths) -> None:
    """Make the paths that ``paths`` owns blob paths for Lightning, in this process (once the
    wrappers of ``_path_wrappers`` are installed)."""
    with _lock:
        _registered[:] = [paths, *(entry for entry in _registered if entry.account_url != paths.account_url)]


def claim(path: Any) -> BlobPaths | None:
    """The registered :class:`BlobPaths` that handles ``path``, if any. Never raises.

    A path under a plugin's ``account_url`` (and an ``az://`` path on its account) is that plugin's;
    a URL on one of Azure's endpoints that no such plugin has belongs to the most recently created
    plugin that owns it.
    """
    with _lock:
        candidates = list(_registered)
    owners = [paths for paths in candidates if paths.owns(path)]
    for paths in owners:
        if paths.account_url is not None and (
            path.split("://", 1)[0].lower() in FSSPEC_PROTOCOLS or paths.is_under_account_url(path)
        ):
            return paths
    return owners[0] if owners else None
