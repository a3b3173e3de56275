"""RetryOptions' bounds, and retry policies of any length (against a local stub that always says 503)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
from azure.core.exceptions import HttpResponseError
from azure.core.pipeline.policies import RequestHistory
from azure.core.pipeline.transport import HttpRequest

from azstoragetorch._client import _pipeline
from azstoragetorch.io import BlobIO
from azstoragetorch.retry import RetryOptions
from tests.stub_server import StubServer, close_pooled_connections

# -- bounds: 0, 1, huge and negative values of every field -------------------------------------------


@pytest.mark.parametrize("value", [0, 1, 1024, 10**30])
def test_any_number_of_retries_is_accepted(value: int) -> None:
    assert RetryOptions(retry_total=value).retry_total == value


@pytest.mark.parametrize("name", ["retry_backoff_factor", "retry_backoff_max"])
@pytest.mark.parametrize("value", [0, 0.0, 1, 1e-300, 3600])
def test_waits_from_none_to_an_hour_are_accepted(name: str, value: float) -> None:
    assert getattr(RetryOptions(**{name: value}), name) == value


@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("retry_total", -1, "0 or more"),
        ("retry_total", -(10**30), "0 or more"),
        ("retry_backoff_factor", -1, "0 or more"),
        ("retry_backoff_factor", -1e-9, "0 or more"),
        ("retry_backoff_factor", 3600.5, "at most 3600 seconds"),
        ("retry_backoff_factor", 1e300, "at most 3600 seconds"),
        ("retry_backoff_factor", math.inf, "finite"),
        ("retry_backoff_factor", math.nan, "finite"),
        ("retry_backoff_max", -1, "0 or more"),
        ("retry_backoff_max", 10**30, "at most 3600 seconds"),
        ("retry_backoff_max", 1e300, "at most 3600 seconds"),
        ("retry_backoff_max", -math.inf, "finite"),
    ],
)
def test_out_of_range_values_are_value_errors_naming_the_field(name: str, value: float, problem: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must .*{problem}"):
        RetryOptions(**{name: value})


# -- the backoff never overflows ---------------------------------------------------------------------------


@pytest.mark.parametrize("times", [0, 1, 10, 1023, 1024, 1025, 5000, 10**9])
@pytest.mark.parametrize("base", [0.0, 1e-300, 0.8, 3600.0])
def test_doubling_is_capped_for_any_number_of_times(times: int, base: float) -> None:
    expected = 0.0 if base == 0 else 60.0 if times >= 1023 else min(60.0, base * 2**times)
    assert _pipeline.doubled(base, times, most=60.0) == expected


def _policy_backoff(options: RetryOptions, attempts: int) -> float:
    policy = _pipeline._StorageRetryPolicy(options)
    settings: dict[str, Any] = policy.configure_retries({})
    request = HttpRequest("GET", "http://127.0.0.1/a/c/b")
    settings["history"] = [RequestHistory(request, http_response=None)] * attempts  # type: ignore[arg-type]
    return policy.get_backoff_time(settings)


@pytest.mark.parametrize("attempts", [2, 1024, 1025, 1026, 100_000])
def test_the_policys_wait_after_any_number_of_attempts_is_at_most_the_maximum(attempts: int) -> None:
    options = RetryOptions(retry_total=10**6, retry_backoff_factor=0.8, retry_backoff_max=60)
    assert 0 < _policy_backoff(options, attempts) <= 60
    no_waits = RetryOptions(retry_total=10**6, retry_backoff_factor=0, retry_backoff_max=0)
    assert _policy_backoff(no_waits, attempts) == 0


@pytest.fixture
def always_busy() -> Iterator[StubServer]:
    server = StubServer(b"HTTP/1.1 503 Server Busy\r\nx-ms-error-code: ServerBusy\r\nContent-Length: 0\r\n\r\n")
    yield server
    close_pooled_connections(server.port)
    server.close()


def test_a_policy_of_more_than_1024_retries_retries_them_all(always_busy: StubServer) -> None:
    # Floats, as the defaults are: 0.0 * 2**1024 is what overflowed (an int 0 times it does not).
    retry = RetryOptions(retry_total=1100, retry_backoff_factor=0.0, retry_backoff_max=0.0)
    url = f"http://127.0.0.1:{always_busy.port}/devstoreaccount1/container/blob"
    with pytest.raises(HttpResponseError, match="ServerBusy"):
        BlobIO(url, "rb", credential=False, retry=retry)
    assert always_busy.requests == 1101
