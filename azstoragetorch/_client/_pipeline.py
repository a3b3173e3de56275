"""HTTP plumbing shared by every client in a process: connection pools, the request pipeline,
the worker threads, and the translation of error responses into exceptions.

Connection pools and threads belong to one process. After ``fork`` the child drops its copies
(without closing the sockets, which the parent still uses) and builds its own on first use, so a
DataLoader worker never reads a response meant for its parent.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import errno
import logging
import os
import random
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import requests
import requests.adapters
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.core.pipeline import Pipeline, PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import HTTPPolicy, RetryPolicy, UserAgentPolicy
from azure.core.pipeline.transport import HttpResponse, HttpTransport, RequestsTransport
from typing_extensions import override

from azstoragetorch import __version__
from azstoragetorch._client._credentials import CredentialArgument, auth_policy_for, shared_default_credential
from azstoragetorch._client._redaction import install_log_filter, redact, redact_error, redact_url
from azstoragetorch._client._stats import OPTION as _STATS_OPTION
from azstoragetorch._client._stats import Recorder, StatsPolicy
from azstoragetorch._client._transport import WireTransport
from azstoragetorch.exceptions import ClientRequestIdMismatchError
from azstoragetorch.retry import RetryOptions

_LOGGER = logging.getLogger("azstoragetorch")

# The Blob Storage REST API version we speak. Features used: ranged GET with If-Match, Put Blob,
# Put Block / Put Block List, List Blobs; all long available, so an older version keeps working
# against sovereign clouds and Azure Stack as well.
API_VERSION = "2021-08-06"

# Threads per process that run transfers (block uploads, parallel ranged reads). A BlobIO limits its
# own in-flight requests (max_concurrency); this cap only keeps many concurrent BlobIOs from
# exhausting sockets.
MAX_THREADS = 64
# Threads per process that fetch dataset samples (azstoragetorch.datasets); each holds a connection
# while its sample's first request runs, on top of the transfer threads.
MAX_SAMPLE_THREADS = 128
# Connections kept per host: one for every thread that may hold one at the same time. A smaller pool
# closes the surplus after each request ("Connection pool is full"), and on Azure every connection
# opened again costs a TLS handshake.
MAX_CONNECTIONS = MAX_THREADS + MAX_SAMPLE_THREADS
# Pipelines kept per process, least recently used dropped first. Each holds its credential, so an
# unbounded cache would keep every credential ever used alive (one made per sample adds up).
MAX_PIPELINES = 64

CONNECTION_TIMEOUT_SECONDS = 20
# How long a response may go silent before it counts as failed (and is retried).
READ_TIMEOUT_SECONDS = 60
# Retries after a failed connection or a response that never came, whatever retry_total allows
# beyond: unlike throttling, these rarely last, and a mistyped host should fail in seconds.
TRANSPORT_RETRIES = 3
_DEFAULT_RETRY = RetryOptions()


_PipelineKey = tuple[str, str, int, RetryOptions]


class _ProcessState:
    """Connection pools and threads of the current process, created lazily."""

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.lock = threading.Lock()
        self.transports: dict[str, HttpTransport] = {}  # type: ignore[type-arg]
        # Pipelines by (origin, kind of authorization, id of the credential, retry options), least
        # recently used first. The credential is kept in the value so that its id cannot be reused
        # by another object while the entry exists.
        self.pipelines: collections.OrderedDict[_PipelineKey, tuple[object, Pipeline[Any, Any]]] = (
            collections.OrderedDict()
        )
        self.executor: ThreadPoolExecutor | None = None


_state = _ProcessState()
_T = TypeVar("_T")


def _forget_parent_state() -> None:
    global _state
    # The parent's sockets and threads are unusable here; drop them without closing anything.
    _state = _ProcessState()
    shared_default_credential.forget()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_state)

install_log_filter()


def _current_state() -> _ProcessState:
    # register_at_fork covers os.fork; the pid check also covers forks that bypass it.
    if _state.pid != os.getpid():
        _forget_parent_state()
    return _state


def transport_for(origin: str) -> HttpTransport:  # type: ignore[type-arg]
    """The shared transport (one connection pool) for ``scheme://host:port``."""
    state = _current_state()
    with state.lock:
        transport = state.transports.get(origin)
        if transport is None:
            transport = _new_transport(origin)
            state.transports[origin] = transport
        return transport


def _new_transport(origin: str) -> HttpTransport:  # type: ignore[type-arg]
    if not _proxy_configured():
        return WireTransport(
            origin,
            connection_timeout=CONNECTION_TIMEOUT_SECONDS,
            read_timeout=READ_TIMEOUT_SECONDS,
            maxsize=MAX_CONNECTIONS,
        )
    # Proxies (with NO_PROXY exceptions and the rest) are what requests handles and our lean
    # transport does not: use azure-core's requests transport, which reads them per request.
    session = requests.Session()
    adapter = requests.adapters.HTTPAdapter(pool_connections=1, pool_maxsize=MAX_CONNECTIONS, max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    transport: HttpTransport = RequestsTransport(  # type: ignore[type-arg]
        session=session,
        session_owner=False,
        connection_timeout=CONNECTION_TIMEOUT_SECONDS,
        read_timeout=READ_TIMEOUT_SECONDS,
    )
    return transport


def _proxy_configured() -> bool:
    return any(name.lower().endswith("_proxy") and value for name, value in os.environ.items())


def executor() -> ThreadPoolExecutor:
    """The process-wide pool of threads that run transfers."""
    state = _current_state()
    with state.lock:
        if state.executor is None:
            state.executor = ThreadPoolExecutor(max_workers=MAX_THREADS, thread_name_prefix="azstoragetorch")
        return state.executor


def submit(fn: Callable[..., _T], *args: Any, **kwargs: Any) -> Future[_T]:
    """Run ``fn`` on the transfer threads; once the interpreter is exiting, on a thread of its own.

    ``concurrent.futures`` stops every pool when the main thread has ended, before it joins the
    pools' threads, and from then on their ``submit`` refuses work. A transfer that is still under
    way at that moment on such a thread (the save of ``dcp.async_save``, which the exit waits for)
    would then fail half done; its remaining requests run on threads started for them instead.
    (The callers bound their own requests in flight, so these threads are few.)
    """
    try:
        return executor().submit(fn, *args, **kwargs)
    except RuntimeError:  # "cannot schedule new futures after interpreter shutdown"
        pass
    future: Future[_T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            result = fn(*args, **kwargs)
        except BaseException as error:
            future.set_exception(error)
        else:
            future.set_result(result)

    threading.Thread(target=run, name="azstoragetorch-exiting").start()
    return future


def interpreter_exiting() -> bool:
    """Whether the interpreter is exiting: the transfer threads take no more work (see :func:`submit`)."""
    try:
        executor().submit(int)  # (not waited for: the pool may be busy, and only the refusal matters)
    except RuntimeError:
        return True
    return False


class _RequestHeadersPolicy(HTTPPolicy[Any, Any]):
    """Sets the headers every request carries (API version, User-Agent), tags each request with a
    fresh ``x-ms-client-request-id`` and checks its echo.

    One policy rather than azure-core's HeadersPolicy and UserAgentPolicy plus one of our own, and
    a plain ``send`` rather than the request and response hooks, which azure-core wraps in calls of
    its own: every layer costs microseconds per request, and a dataset of small blobs sends
    thousands of requests per second. The User-Agent is azure-core's (with ``AZURE_HTTP_USER_AGENT``
    from the environment), computed once.

    It sits before the signing policy so the ID is part of a Shared Key signature. Error responses
    from some endpoints (Azurite's among them) carry no echo; only a present, different ID is an
    error.
    """

    def __init__(self) -> None:
        super().__init__()
        self._user_agent = UserAgentPolicy(sdk_moniker=f"azstoragetorch/{__version__}").user_agent

    @override
    def send(self, request: PipelineRequest[Any]) -> PipelineResponse[Any, Any]:
        headers = request.http_request.headers
        headers["x-ms-version"] = API_VERSION
        headers["User-Agent"] = self._user_agent
        sent = headers["x-ms-client-request-id"] = _request_id()
        response = self.next.send(request)
        echoed = response.http_response.headers.get("x-ms-client-request-id")
        if echoed is not None and echoed != sent:
            service_id = response.http_response.headers.get("x-ms-request-id", "")
            response.http_response.internal_response.close()
            raise ClientRequestIdMismatchError(sent, echoed, service_id)
        return response


def _request_id() -> str:
    """A random (version 4) UUID as text, as ``str(uuid.uuid4())`` gives it at a third of the CPU."""
    digits = os.urandom(16).hex()
    variant = "89ab"[int(digits[16], 16) & 3]
    return f"{digits[:8]}-{digits[8:12]}-4{digits[13:16]}-{variant}{digits[17:20]}-{digits[20:]}"


# Error codes that call for a retry whatever their status says: the request's bytes were damaged on
# the way (a 400), and sending them again fixes it.
_RETRYABLE_CODES = frozenset({"Md5Mismatch", "Crc64Mismatch"})


class _StorageRetryPolicy(RetryPolicy[Any, Any]):
    """The SDK's retry policy, set from :class:`~azstoragetorch.retry.RetryOptions`.

    It differs from the SDK's defaults where a throttled storage account needs it: every retry of an
    error answer waits (the SDK's first retry does not), the waits are jittered so that parallel
    requests throttled together do not all return together, ``Retry-After`` never shortens a wait
    nor stretches it beyond the maximum, and a throttled request is retried as often as
    ``retry_total`` allows (the SDK stops after 3 error answers whatever ``retry_total`` says).
    Whether an answer is retried depends on its error code where the status alone would mislead.
    """

    def __init__(self, options: RetryOptions) -> None:
        transport_retries = min(options.retry_total, TRANSPORT_RETRIES)
        super().__init__(
            retry_total=options.retry_total,
            retry_status=options.retry_total,
            retry_connect=transport_retries,
            retry_read=transport_retries,
            retry_backoff_factor=options.retry_backoff_factor,
            retry_backoff_max=options.retry_backoff_max,
        )

    def is_retry(self, settings: dict[str, Any], response: PipelineResponse[Any, Any]) -> bool:
        if response.http_response.headers.get("x-ms-error-code") in _RETRYABLE_CODES:
            return bool(settings["total"])
        return bool(super().is_retry(settings, response))

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        history = settings["history"]
        if len(history) == 1 and history[0].error is not None:
            # A first connection failure is most often a pooled connection that the other end had
            # closed: the next one, on a new connection, goes at once.
            return 0.0
        # self.backoff_max, not settings["max_backoff"]: azure-core 1.31 fills the latter with its
        # class default (120 s) whatever retry_backoff_max says.
        backoff = doubled(settings["backoff"], len(history) - 1, most=self.backoff_max)
        return backoff * random.uniform(0.5, 1.0)

    def sleep(
        self, settings: dict[str, Any], transport: Any, response: PipelineResponse[Any, Any] | None = None
    ) -> None:
        backoff = self.get_backoff_time(settings)
        if response is not None:
            _discard_error_body(response.http_response)
            retry_after = self.get_retry_after(response)
            if retry_after is not None:
                backoff = max(backoff, min(retry_after, self.backoff_max))
        if backoff > 0:
            transport.sleep(backoff)


def _discard_error_body(response: HttpResponse) -> None:
    """Read a (small) error answer that is about to be retried, so that its connection is reused."""
    try:
        response.body()
    except Exception:
        response.internal_response.close()


def pipeline_for(
    origin: str, credential: CredentialArgument, *, url_has_sas: bool, retry: RetryOptions | None = None
) -> Pipeline[Any, Any]:
    """The pipeline for requests to ``origin`` authorized by ``credential``, shared in this process.

    Sharing matters for token credentials: one pipeline holds one token, so the thousands of blobs
    of a dataset do not each ask the credential for a token of their own.
    """
    retry = _DEFAULT_RETRY if retry is None else retry
    if url_has_sas:
        key: _PipelineKey = (origin, "sas-in-url", 0, retry)
    elif credential is None or credential is False:
        key = (origin, repr(credential), 0, retry)
    else:
        key = (origin, type(credential).__name__, id(credential), retry)
    state = _current_state()
    with state.lock:
        entry = state.pipelines.get(key)
        if entry is not None:
            state.pipelines.move_to_end(key)
    if entry is None:
        host = urllib.parse.urlsplit(origin).hostname or ""
        pipeline = build_pipeline(origin, auth_policy_for(credential, url_has_sas=url_has_sas, host=host), retry)
        with state.lock:
            entry = state.pipelines.setdefault(key, (credential, pipeline))
            while len(state.pipelines) > MAX_PIPELINES:
                # Clients that use a dropped pipeline keep it; only new clients build another.
                state.pipelines.popitem(last=False)
    return entry[1]


def build_pipeline(origin: str, auth_policy: Any | None, retry: RetryOptions) -> Pipeline[Any, Any]:
    policies: list[Any] = [
        _RequestHeadersPolicy(),
        _StorageRetryPolicy(retry),
        StatsPolicy(),  # inside the retry loop: it sees every attempt
    ]
    if auth_policy is not None:
        policies.append(auth_policy)
    return Pipeline(transport=transport_for(origin), policies=policies)


def run(
    pipeline: Pipeline[Any, Any],
    request: Any,
    *,
    display_url: str,
    stream: bool = False,
    recorder: Recorder | None = None,
) -> HttpResponse:
    """Send ``request``; transport failures come back naming the blob, with any SAS token removed.

    ``recorder`` counts the request and its retries (:class:`~azstoragetorch._client._stats.StatsPolicy`).
    """
    try:
        response: HttpResponse = pipeline.run(request, stream=stream, **{_STATS_OPTION: recorder}).http_response
        return response
    except ClientRequestIdMismatchError:
        raise
    except AzureError as error:
        replacement = redact_error(error, prefix=f"Request to {display_url} failed: ")
    # Raised outside the except block so that the original, which names the full URL with its
    # SAS, is not kept as __context__.
    raise replacement


# The exception for an error answer comes from the service's error code: one status stands for many
# situations (a 409 may mean that a blob exists, or that it is leased, archived or being copied),
# and code that catches ResourceExistsError or ResourceModifiedError must be able to trust it.
_ERRORS_BY_CODE: dict[str, type[HttpResponseError]] = {
    "BlobNotFound": ResourceNotFoundError,
    "ContainerNotFound": ResourceNotFoundError,
    "ResourceNotFound": ResourceNotFoundError,
    "BlobAlreadyExists": ResourceExistsError,
    "ContainerAlreadyExists": ResourceExistsError,
    "ResourceAlreadyExists": ResourceExistsError,
    "SnapshotsPresent": ResourceExistsError,  # deleting a blob whose snapshots exist
    "ConditionNotMet": ResourceModifiedError,
    "TargetConditionNotMet": ResourceModifiedError,
}
# Statuses whose every code names the same kind of failure: 401/403 are about authorization and 404
# about something missing, whatever the code says in detail.
_ERRORS_BY_STATUS: dict[int, type[HttpResponseError]] = {
    401: ClientAuthenticationError,
    403: ClientAuthenticationError,
    404: ResourceNotFoundError,
}
# What 409 and 412 mean when an answer carries no code at all (HEAD answers have no body, and
# endpoints other than Azure's may not send the header).
_ERRORS_BY_STATUS_WITHOUT_CODE: dict[int, type[HttpResponseError]] = {
    409: ResourceExistsError,
    412: ResourceModifiedError,
}


def _error_type(status: int, error_code: str | None) -> type[HttpResponseError]:
    if status in _ERRORS_BY_STATUS:
        return _ERRORS_BY_STATUS[status]
    if error_code:
        return _ERRORS_BY_CODE.get(error_code, HttpResponseError)
    return _ERRORS_BY_STATUS_WITHOUT_CODE.get(status, HttpResponseError)


def is_missing_container(error: ResourceNotFoundError) -> bool:
    """Whether a "not found" answer was about the container rather than the blob."""
    return getattr(error, "error_code", None) == "ContainerNotFound"


@contextlib.contextmanager
def not_found_as_file_not_found(url: str, *, hint: str = "") -> Iterator[None]:
    """Turn a "not found" answer into the ``FileNotFoundError`` that file APIs (torch, fsspec) expect.

    The error says whether the blob or its container is missing, names ``url`` without any SAS token
    as its ``filename``, and carries ``hint`` (such as "(is a checkpoint saved here?)") after that.
    """
    try:
        yield
    except ResourceNotFoundError as error:
        what = "container" if is_missing_container(error) else "blob"
        message = f"No such {what} {hint}" if hint else f"No such {what}"
        raise FileNotFoundError(errno.ENOENT, message, redact_url(url)) from None


_LEASED = (
    "Someone holds a lease on the blob; azstoragetorch takes no leases, so it can change the blob only once the "
    "lease is released or expires."
)
_HINTS = {
    "ContainerNotFound": "Check the container name in the URL.",
    "BlobNotFound": "Check the blob name in the URL.",
    "AuthenticationFailed": "Check the credential (or the SAS token in the URL) and that it has not expired.",
    "AuthorizationFailure": "The credential is not allowed to do this; check its role assignments or SAS permissions.",
    "AuthorizationPermissionMismatch": "The credential lacks the permission this needs (for example write or read).",
    "NoAuthenticationInformation": "The resource is private; pass a credential or a URL with a SAS token.",
    "ResourceNotFound": "Check the account, container and blob names in the URL (an anonymous request to a private container also reports this).",
    "LeaseIdMissing": _LEASED,
    "LeaseIdMismatchWithBlobOperation": _LEASED,
    "BlobArchived": "The blob is in the Archive tier; rehydrate it to the Hot or Cool tier before reading it.",
    "BlobBeingRehydrated": "The blob is being rehydrated from the Archive tier; it can be read once that has finished.",
}


def raise_for_status(response: HttpResponse, *, action: str, display_url: str) -> NoReturn:
    """Raise the azure-core exception that matches an error response, naming the blob."""
    error_code = response.headers.get("x-ms-error-code") or _error_code_from_body(response)
    hint = _HINTS.get(error_code or "", "")
    if response.status_code in (401, 403, 404) and _was_anonymous(response):
        # Services answer an anonymous request for a private resource with 403 or 404, whose usual
        # hints (a wrong name, missing permissions) would point the wrong way.
        hint = (
            "The request was anonymous (credential=False, no SAS token); if the container is private, pass a "
            "credential or a URL with a SAS token."
        )
    hint = _sas_time_hint(response, error_code) or hint
    message = f"Could not {action} {display_url}: HTTP {response.status_code} {response.reason}"
    if error_code:
        message += f" ({error_code})"
    if hint:
        message += f". {hint}"
    error = _error_type(response.status_code, error_code)(message=redact(message))
    error.status_code = response.status_code
    error.reason = response.reason
    error.error_code = error_code  # type: ignore[attr-defined]
    raise error


def _sas_time_hint(response: HttpResponse, error_code: str | None) -> str | None:
    """A hint for a refused SAS whose validity period does not include now, if that is the reason.

    Azure explains it in the error's ``AuthenticationErrorDetail``; other endpoints (Azurite) do not,
    so the SAS's own start (``st``) and expiry (``se``) are also compared with this machine's clock.
    """
    request = getattr(response, "request", None)
    if response.status_code != 403 or error_code not in ("AuthenticationFailed", "AuthorizationFailure"):
        return None
    if request is None:
        return None
    fields = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(request.url).query))
    if "sig" not in fields:
        return None
    now = datetime.datetime.now(datetime.timezone.utc)
    expiry, start = _sas_time(fields.get("se")), _sas_time(fields.get("st"))
    if expiry is not None and expiry <= now:
        return f"The SAS token expired at {fields['se']}; create a new one."
    if start is not None and start > now:
        return f"The SAS token is not valid before {fields['st']}; wait, or check this machine's clock."
    detail = _element_text(response, "AuthenticationErrorDetail")
    # Only this detail is passed on: others can quote the signature that was sent.
    if detail and detail.startswith("Signature not valid in the specified time frame"):
        return f"The SAS token has expired or is not yet valid (the service says: {detail})."
    return None


def _sas_time(value: str | None) -> datetime.datetime | None:
    """A SAS start or expiry time (ISO 8601, UTC; a date alone means its midnight)."""
    if not value:
        return None
    try:
        parsed = datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=datetime.timezone.utc)


def _was_anonymous(response: HttpResponse) -> bool:
    request = getattr(response, "request", None)
    if request is None:
        return False
    has_sas = "sig=" in urllib.parse.urlsplit(request.url).query.lower()
    return "Authorization" not in request.headers and not has_sas


def _error_code_from_body(response: HttpResponse) -> str | None:
    return _element_text(response, "Code")


def _element_text(response: HttpResponse, name: str) -> str | None:
    """The text of element ``name`` in an XML error body, if the body was read and has one."""
    try:
        body = response.body()
    except Exception:  # a streamed body that was not read: fall back to nothing
        return None
    start = body.find(f"<{name}>".encode())
    end = body.find(f"</{name}>".encode())
    if start == -1 or end == -1:
        return None
    return body[start + len(name) + 2 : end].decode("utf-8", "replace")


def log_debug(message: str, *args: object) -> None:
    if _LOGGER.isEnabledFor(logging.DEBUG):
        _LOGGER.debug(redact(message % args))


def doubled(base: float, times: int, *, most: float) -> float:
    """``base`` doubled ``times`` times, but at most ``most``, for any number of times.

    ``base * 2 ** times`` raises ``OverflowError`` past 1,023 doublings (the int cannot become a
    float), which a policy of over a thousand retries reaches. With the exponent stopped at 1,023
    (the largest a float holds) the product saturates instead, and ``most`` caps it.
    """
    return min(most, base * 2.0 ** min(max(times, 0), 1023))


def backoff_seconds(attempt: int, *, base: float = 0.25, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter for the ``attempt``-th retry (1-based)."""
    return random.uniform(0, doubled(base, attempt - 1, most=cap))
