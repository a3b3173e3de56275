"""Parsing and rebuilding blob URLs, keeping any SAS token out of what is shown to people."""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import re
import urllib.parse

from azstoragetorch._client._redaction import redact_url

# Query parameters that select what is read rather than authorize the request. They are kept in
# URLs shown to users; every other query parameter is treated as part of a SAS token.
_SELECTOR_PARAMETERS = ("snapshot", "versionid")

# The account of the Azure Storage emulator (Azurite), always the first segment of its URLs' paths.
EMULATOR_ACCOUNT = "devstoreaccount1"

# fsspec's names for Azure Blob Storage (adlfs registers these), accepted so that paths written
# for adlfs keep working.
FSSPEC_PROTOCOLS = ("az", "abfs", "abfss")
# The storage endpoint suffixes of Azure's clouds: public, China, US Government. Only these (or a
# host the user named in account_url) may be sent a credential found for "Azure Storage".
_AZURE_CLOUD_SUFFIXES = r"core\.(?:windows\.net|chinacloudapi\.cn|usgovcloudapi\.net)"
# Blob endpoints of Azure's clouds: <account>.blob.core.windows.net, the sovereign clouds'
# blob.core.* names, and the DNS-zone endpoints <account>.z<NN>.blob.storage.azure.net.
_AZURE_BLOB_HOST = re.compile(
    rf"^[a-z0-9]+(-secondary)?\.(z\d+\.blob\.storage\.azure\.net|blob\.{_AZURE_CLOUD_SUFFIXES})$"
)
# "<container>@<account>.dfs.core.windows.net": adlfs's way of naming the account in a path, on the
# dfs or blob endpoint of one of Azure's clouds (or of a DNS zone).
_FSSPEC_ACCOUNT_HOST = re.compile(
    rf"^(?P<account>[a-z0-9]+)\.(?:(?P<zone>z\d+)\.(?:dfs|blob)\.storage\.azure\.net"
    rf"|(?:dfs|blob)\.(?P<suffix>{_AZURE_CLOUD_SUFFIXES}))$"
)


@dataclasses.dataclass(frozen=True)
class BlobUrl:
    """A parsed ``https://<account>.blob.core.windows.net/<container>/<blob>`` style URL.

    Path-style URLs (``http://127.0.0.1:10000/<account>/<container>/<blob>``, as used by Azurite and
    other endpoints addressed by IP or a bare host name) are understood too. ``blob_name`` is
    decoded; ``sas_query`` keeps the SAS parameters exactly as the user wrote them so that their
    signature stays valid.
    """

    scheme: str
    netloc: str
    account_name: str
    container_name: str
    blob_name: str
    path_style: bool
    sas_query: str = ""
    snapshot: str | None = None
    version_id: str | None = None

    @classmethod
    def parse(cls, url: str) -> BlobUrl:
        """Parse a blob URL; raises ``ValueError`` naming the problem for anything malformed."""
        account_url, container_name, blob_name, query = _split_resource_url(url, want_blob=True)
        sas_pieces, selectors = _split_query(query)
        return cls(
            scheme=account_url.scheme,
            netloc=account_url.netloc,
            account_name=account_url.account_name,
            container_name=container_name,
            blob_name=blob_name,
            path_style=account_url.path_style,
            sas_query="&".join(sas_pieces),
            snapshot=selectors.get("snapshot"),
            version_id=selectors.get("versionid"),
        )

    @property
    def has_sas(self) -> bool:
        """Whether the URL carries a SAS signature (which then wins over any credential)."""
        return _has_signature(self.sas_query)

    @property
    def container(self) -> ContainerUrl:
        """The blob's container, authorized by the same SAS, if any."""
        return ContainerUrl(
            self.scheme, self.netloc, self.account_name, self.container_name, self.path_style, self.sas_query
        )

    @property
    def account_url(self) -> str:
        return self.container.account_url

    # The URL strings are made once per object (cached_property writes the instance's __dict__, which a
    # frozen dataclass allows): a small blob's request needs them several times, and quoting the name
    # again each time cost more than the rest of building the request.
    @functools.cached_property
    def container_url(self) -> str:
        return self.container.url_without_query

    @functools.cached_property
    def url_without_query(self) -> str:
        """The blob's URL with no query string at all: no SAS, snapshot or version."""
        return f"{self.container_url}/{urllib.parse.quote(self.blob_name, safe='/~')}"

    @functools.cached_property
    def display_url(self) -> str:
        """The URL to show in messages and reprs: snapshot and version kept, SAS dropped."""
        return _with_query(self.url_without_query, self._selector_pieces())

    def request_url(self, *extra_query: str) -> str:
        """The URL to send: with the SAS token, snapshot/version and any extra parameters."""
        pieces = [*extra_query, *self._selector_pieces()]
        if self.sas_query:
            pieces.append(self.sas_query)
        return _with_query(self.url_without_query, pieces)

    def _selector_pieces(self) -> list[str]:
        pieces = []
        if self.snapshot is not None:
            pieces.append(f"snapshot={urllib.parse.quote(self.snapshot, safe='')}")
        if self.version_id is not None:
            pieces.append(f"versionid={urllib.parse.quote(self.version_id, safe='')}")
        return pieces

    def __post_init__(self) -> None:
        if _has_dot_segment(self.blob_name):  # (the URL to show is built only for the error)
            check_no_dot_segments(self.blob_name, shown=f"{self.container_url}/{self.blob_name}")

    def __repr__(self) -> str:
        return f"BlobUrl({self.display_url!r})"


@dataclasses.dataclass(frozen=True)
class ContainerUrl:
    """A parsed container URL (``https://<account>.blob.core.windows.net/<container>``), with any SAS."""

    scheme: str
    netloc: str
    account_name: str
    container_name: str
    path_style: bool
    sas_query: str = ""

    @classmethod
    def parse(cls, url: str) -> ContainerUrl:
        """Parse a container URL; raises ``ValueError`` naming the problem for anything malformed."""
        container, prefix = cls.parse_with_prefix(url)
        if prefix.strip("/"):
            raise ValueError(f"Container URL {redact_url(url)!r} has a path after the container name.")
        return container

    @classmethod
    def parse_with_prefix(cls, url: str) -> tuple[ContainerUrl, str]:
        """Parse ``<container URL>[/<prefix>]``: a container and a (decoded, possibly empty) name prefix.

        This is how a "folder" of blobs is named, such as a checkpoint directory. Raises
        ``ValueError`` naming the problem for anything malformed.
        """
        account_url, container_name, prefix, query = _split_resource_url(url, want_blob=False)
        check_no_dot_segments(prefix, shown=redact_url(url))
        sas_pieces, selectors = _split_query(query)
        if selectors:
            raise ValueError(f"URL {redact_url(url)!r} has a snapshot or version id; those select single blobs.")
        container = cls(
            scheme=account_url.scheme,
            netloc=account_url.netloc,
            account_name=account_url.account_name,
            container_name=container_name,
            path_style=account_url.path_style,
            sas_query="&".join(sas_pieces),
        )
        return container, prefix or ""

    @property
    def has_sas(self) -> bool:
        return _has_signature(self.sas_query)

    @property
    def account_url(self) -> str:
        base = f"{self.scheme}://{self.netloc}"
        return f"{base}/{self.account_name}" if self.path_style else base

    @functools.cached_property
    def url_without_query(self) -> str:
        return f"{self.account_url}/{urllib.parse.quote(self.container_name, safe='')}"

    @property
    def display_url(self) -> str:
        return self.url_without_query

    def request_url(self, *extra_query: str) -> str:
        pieces = list(extra_query)
        if self.sas_query:
            pieces.append(self.sas_query)
        return _with_query(self.url_without_query, pieces)

    def blob_url(self, blob_name: str) -> BlobUrl:
        """The URL of a blob in this container, authorized by the same SAS, if any."""
        blob = BlobUrl(
            scheme=self.scheme,
            netloc=self.netloc,
            account_name=self.account_name,
            container_name=self.container_name,
            blob_name=blob_name,
            path_style=self.path_style,
            sas_query=self.sas_query,
        )
        # A dataset makes the URL of every sample it reads from one container's: its quoted part
        # is this container's, made once.
        blob.__dict__["container_url"] = self.url_without_query
        return blob

    def __repr__(self) -> str:
        return f"ContainerUrl({self.display_url!r})"


@dataclasses.dataclass(frozen=True)
class _AccountUrl:
    scheme: str
    netloc: str
    account_name: str
    path_style: bool


def _split_resource_url(url: str, *, want_blob: bool) -> tuple[_AccountUrl, str, str, str]:
    """Split a URL into its account, container name, decoded blob name (or prefix; may be empty)
    and query string. With ``want_blob``, a missing blob name is an error."""
    if not isinstance(url, str):
        raise TypeError(f"A blob URL must be a str, not {type(url).__name__}.")
    parsed = urllib.parse.urlsplit(url)
    shown = redact_url(url)
    kind = "Blob URL" if want_blob else "URL"
    if parsed.scheme.lower() not in ("http", "https"):
        raise ValueError(f"{kind} {shown!r} must start with https:// (or http:// for an emulator).")
    if not parsed.hostname:
        raise ValueError(f"{kind} {shown!r} has no host name.")
    if "@" in parsed.netloc:
        # It would be shown in messages and sent in the Host header; Azure takes no credential there.
        raise ValueError(
            f"{kind} {shown!r} has a user name or password before its host (user@host), which Azure Storage "
            "does not use: pass credential=..., or a SAS token in the query string."
        )
    if parsed.fragment:
        raise ValueError(f"{kind} {shown!r} has a '#' fragment; percent-encode '#' in blob names as %23.")

    segments = parsed.path.split("/")[1:]  # the path starts with "/"
    path_style = _is_path_style_host(parsed.hostname)
    if path_style:
        if not segments or not segments[0]:
            raise ValueError(
                f"{kind} {shown!r} addresses an emulator or IP endpoint, so its path must start "
                "with the account name: http://<host>:<port>/<account>/<container>[/<blob>]."
            )
        account_name, segments = segments[0], segments[1:]
    else:
        account_name = parsed.hostname.split(".", 1)[0]

    container_name = urllib.parse.unquote(segments[0]) if segments else ""
    blob_name = urllib.parse.unquote("/".join(segments[1:]))
    if path_style and (not container_name or (want_blob and not blob_name)):
        if account_name == EMULATOR_ACCOUNT:
            # The emulator's own account comes first, so the account is not what is missing.
            if container_name:
                problem = f"names a container but no blob (account {account_name!r}, container {container_name!r})"
            else:
                problem = f"names no container (account {account_name!r})"
            raise ValueError(f"{kind} {shown!r} {problem}: the path is /<account>/<container>/<blob>.")
        # The usual slip is leaving out the account: say how the path was read.
        if container_name:
            problem = f"names a container but no blob (read as account {account_name!r}, container {container_name!r})"
        else:
            problem = f"names no container (read as account {account_name!r})"
        raise ValueError(
            f"{kind} {shown!r} {problem}: on an emulator or IP endpoint the path starts with the account name, "
            f"http://<host>:<port>/<account>/<container>/<blob>. If {account_name!r} is your container, the "
            "account name is missing (devstoreaccount1 for Azurite)."
        )
    if not container_name:
        raise ValueError(f"URL {shown!r} names no container.")
    if want_blob and not blob_name:
        raise ValueError(f"Blob URL {shown!r} names a container but no blob: add the blob's name, <container>/<blob>.")

    account = _AccountUrl(parsed.scheme.lower(), parsed.netloc, account_name, path_style)
    check_sas_complete(parsed.query, where=f"the URL {shown!r}")
    return account, container_name, blob_name, parsed.query


def check_no_dot_segments(name: str, *, shown: str) -> None:
    """Raise ``ValueError`` if the blob name (or prefix) ``name`` has a ``.`` or ``..`` segment.

    HTTP clients and servers resolve such segments (``a/../b.pt`` is ``b.pt``), percent-encoded or
    not, so a request for that name would reach another blob; with a SAS it would overwrite it.
    Such names are refused rather than sent.
    """
    if _has_dot_segment(name):
        raise ValueError(
            f"{shown!r} has a '.' or '..' segment in its blob name, which HTTP resolves to another name "
            "(a/../b.pt is b.pt): azstoragetorch does not address such names. Remove the segment."
        )


def _has_dot_segment(name: str) -> bool:
    # Asked for every blob a dataset reads: string searches rather than a split of every name.
    return (
        name in (".", "..")
        or name.startswith(("./", "../"))
        or name.endswith(("/.", "/.."))
        or "/./" in name
        or "/../" in name
    )


def _split_query(query: str) -> tuple[list[str], dict[str, str]]:
    sas_pieces: list[str] = []
    selectors: dict[str, str] = {}
    for piece in query.split("&"):
        if not piece:
            continue
        name, _, value = piece.partition("=")
        if name.lower() in _SELECTOR_PARAMETERS:
            selectors[name.lower()] = urllib.parse.unquote(value)
        else:
            sas_pieces.append(piece)
    return sas_pieces, selectors


def _has_signature(sas_query: str) -> bool:
    return any(piece.split("=", 1)[0].lower() == "sig" for piece in sas_query.split("&"))


# Fields that only a SAS token has. A query string with some of them but no signature is a token cut
# short when it was copied; sent as it is, it would authorize nothing, and the request would silently
# fall back to another credential.
_SAS_FIELDS = frozenset({"sv", "ss", "srt", "sr", "sp", "se", "st", "spr", "sip", "si", "skoid", "sktid"})


def check_sas_complete(query: str, *, where: str) -> None:
    """Raise ``ValueError`` if ``query`` holds SAS fields but no signature (``sig=``)."""
    names = {piece.split("=", 1)[0].lower() for piece in query.lstrip("?").split("&")}
    if names & _SAS_FIELDS and "sig" not in names:
        raise ValueError(
            f"The SAS token in {where} is incomplete: it has SAS fields "
            f"({', '.join(sorted(f'{name}=' for name in names & _SAS_FIELDS))}) but no signature (sig=). "
            "Copy the whole token, which ends with or contains sig=..."
        )


def _is_path_style_host(hostname: str) -> bool:
    # Azure's own endpoints put the account in the host name (<account>.blob.core.windows.net);
    # IP addresses and bare host names (localhost, a docker service called "azurite") cannot.
    try:
        ipaddress.ip_address(hostname)
    except ValueError:
        return "." not in hostname
    return True


def _with_query(url: str, pieces: list[str]) -> str:
    return f"{url}?{'&'.join(pieces)}" if pieces else url


def is_azure_blob_host(hostname: str) -> bool:
    """Whether ``hostname`` is one of Azure's own blob endpoints (public or sovereign clouds)."""
    return _AZURE_BLOB_HOST.match(hostname.lower()) is not None


def _fsspec_account_base(host: str, account_url: str | None) -> str | None:
    """The account URL for the host named in ``<container>@<host>``: one of Azure's storage endpoints, or
    the host of ``account_url`` (its dfs or blob name); ``None`` for any other host."""
    match = _FSSPEC_ACCOUNT_HOST.match(host)
    if match is not None and match["zone"]:
        return f"https://{match['account']}.{match['zone']}.blob.storage.azure.net"
    if match is not None:
        return f"https://{match['account']}.blob.{match['suffix']}"
    if account_url:
        named = (urllib.parse.urlsplit(account_url).hostname or "").lower()
        if named and host in (named, named.replace(".blob.", ".dfs.", 1)):
            return account_url.rstrip("/")
    return None


def fsspec_path_to_url(path: str, *, account_url: str | None) -> str:
    """Turn an fsspec-style ``az://``, ``abfs://`` or ``abfss://`` path into a blob URL.

    The account is found the way adlfs finds it: named in the path
    (``abfs://<container>@<account>.dfs.core.windows.net/<path>``, on one of Azure's storage endpoints
    or the host of ``account_url``, never another host), else ``account_url`` (such as
    ``https://<account>.blob.core.windows.net`` or an emulator's
    ``http://127.0.0.1:10000/devstoreaccount1``). Blob names in fsspec paths are not percent-encoded; the URL is.
    """
    protocol, _, rest = path.partition("://")
    if protocol.lower() not in FSSPEC_PROTOCOLS:
        raise ValueError(f"{path!r} is not an {'/'.join(FSSPEC_PROTOCOLS)}:// path.")
    location, _, blob_path = rest.partition("/")
    container, at, host = location.partition("@")
    if not container:
        raise ValueError(f"{redact_url(path)!r} names no container: write {protocol}://<container>/<path>.")
    if at:
        base = _fsspec_account_base(host.lower(), account_url)
        if base is None:
            raise ValueError(
                f"{redact_url(path)!r}: {host!r} is not an Azure Storage endpoint; expected "
                f"<container>@<account>.dfs.core.windows.net (or another Azure cloud's endpoint) after {protocol}://. "
                "To use another endpoint (Azure Stack, a custom domain), pass it as account_url."
            )
    elif account_url:
        base = account_url.rstrip("/")
    else:
        raise ValueError(
            f"{redact_url(path)!r} does not say which storage account to use. Name it in the path "
            f"({protocol}://<container>@<account>.dfs.core.windows.net/...) or pass account_url."
        )
    quoted = urllib.parse.quote(blob_path, safe="/~")
    return f"{base}/{urllib.parse.quote(container, safe='')}/{quoted}".rstrip("/")
