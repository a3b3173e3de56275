"""Keeping SAS tokens out of exception messages and log records.

SAS tokens travel in the query string, and the HTTP stack below us (requests, urllib3) writes full
request URLs into its exception messages and debug logs. Everything that leaves this package passes
through :func:`redact` first (:func:`redact_url` for a URL, :func:`redact_error` for an azure-core
exception), and :func:`install_log_filter` redacts urllib3's own log records.
"""

from __future__ import annotations

import logging
import re

from azure.core.exceptions import AzureError

_REDACTED = "REDACTED"

# "sig" is the secret part of a SAS; the other SAS fields are not secret on their own, but a URL
# with its query string removed is what users expect to see, so whole query strings are dropped
# where we can recognise them and any stray signature is masked as a fallback.
# A signature percent-encoded into a path ("b%3Fsv=...%26sig%3D...", a SAS pasted into a blob name)
# is masked too.
_SIGNATURE = re.compile(r"(?i)((?:\b|(?<=%3f)|(?<=%26))sig(?:=|%3d))[^&\s'\"]+")
_QUERY_AFTER_PATH = re.compile(r"(https?://[^\s'\"?]+|/[^\s'\"?]*)\?[^\s'\"]*(?:\bsig=)[^\s'\"]*", re.IGNORECASE)


def redact(text: str) -> str:
    """Return ``text`` with every SAS query string and signature removed."""
    text = _QUERY_AFTER_PATH.sub(r"\1?<SAS REDACTED>", text)
    return _SIGNATURE.sub(rf"\1{_REDACTED}", text)


def redact_url(url: str) -> str:
    """``url`` as it may appear in a message: without its query string (and so without any SAS),
    its fragment, or a user name and password before an http(s) host."""
    shown = redact(url).split("?", 1)[0].split("#", 1)[0]
    match = _USERINFO.match(shown)
    return shown if match is None else match["scheme"] + shown[match.end() :]


# "https://user:password@host/...": everything up to the last "@" before the path.
_USERINFO = re.compile(r"(?i)(?P<scheme>https?://)[^/]*@")


def redact_error(error: AzureError, *, prefix: str = "") -> AzureError:
    """A new exception of the same type whose message has no SAS, and that chains to nothing."""
    # The original carries the request URL (and so any SAS) in its message and in its chained
    # exceptions; build a fresh one of the same type from the redacted message instead.
    replacement = type(error)(redact(prefix + str(error)))
    replacement.error_code = getattr(error, "error_code", None)  # type: ignore[attr-defined]
    return replacement


class _ScrubSecretsFilter(logging.Filter):
    """Rewrites a log record's message so that it carries no SAS token."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg = cleaned
            record.args = None
        return True


_FILTER = _ScrubSecretsFilter()
# Loggers that may print request URLs: urllib3 logs "GET /account/container/blob?<query>" at DEBUG.
_LOGGERS_THAT_PRINT_URLS = (
    "urllib3.connectionpool",
    "urllib3.util.retry",
    "azure.core.pipeline.policies.http_logging_policy",
)


def install_log_filter() -> None:
    """Attach the scrubbing filter to the loggers of the HTTP stack (idempotent)."""
    for name in _LOGGERS_THAT_PRINT_URLS:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
