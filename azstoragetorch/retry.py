"""How azstoragetorch retries requests that fail for a passing reason: :class:`RetryOptions`.

Pass an instance as the ``retry`` keyword, for example
``BlobIO(url, "wb", retry=RetryOptions(retry_total=20))``; without it, the defaults below apply.
"""

from __future__ import annotations

import dataclasses
import math

__all__ = ["RetryOptions"]

_MOST_SECONDS = 3600


@dataclasses.dataclass(frozen=True)
class RetryOptions:
    """When and how often a failed request is tried again.

    A request is retried when the service is throttling the account or briefly failing (HTTP 408,
    429, 500, 502, 503, 504 and 506 or above), and after any error answer that carries
    ``Retry-After``. Other error answers (a missing blob, a denied request, a conflict) are not
    retried. Uploads are retried like reads: every request azstoragetorch sends may be repeated safely.

    Between attempts the wait doubles, starting from ``retry_backoff_factor`` seconds and never
    exceeding ``retry_backoff_max``; each wait is drawn at random between half and all of that, so
    that requests throttled together do not all return together. When the service says how long
    to wait (``Retry-After``), the wait is at least that, up to ``retry_backoff_max``. With the
    defaults a request keeps trying through between about 2 and 5 minutes of throttling.

    A connection that fails, or a response that never arrives (60 seconds of silence), is retried
    at most 3 times (or ``retry_total``, if smaller), the first time at once: most often a
    connection kept open for reuse was closed by the other end. A response body that breaks off
    part way is resumed from the first byte not yet received, up to 5 times.

    The names are those of the Azure SDK's client keywords (``retry_total``, ``retry_backoff_factor``,
    ``retry_backoff_max``), with the same meaning.

    Args:
        retry_total: How many times one request may be retried; ``0`` turns retries off. Any
            number is allowed: past a few doublings every wait is ``retry_backoff_max``.
        retry_backoff_factor: Seconds to wait before the first retry of a throttled request, at
            most 3600.
        retry_backoff_max: The longest wait between two attempts, in seconds, at most 3600.

    Raises:
        TypeError: A value is not a number (``retry_total`` must be an ``int``).
        ValueError: A value is negative, not finite, or (a number of seconds) more than an hour.
    """

    retry_total: int = 10
    retry_backoff_factor: float = 0.8
    retry_backoff_max: float = 60.0

    def __post_init__(self) -> None:
        if not isinstance(self.retry_total, int) or isinstance(self.retry_total, bool):
            raise TypeError(f"retry_total must be an int, not {type(self.retry_total).__name__}.")
        if self.retry_total < 0:
            raise ValueError(f"retry_total must be 0 or more, not {self.retry_total}.")
        for name in ("retry_backoff_factor", "retry_backoff_max"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise TypeError(f"{name} must be a number of seconds, not {type(value).__name__}.")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number of seconds, 0 or more, not {value}.")
            if value > _MOST_SECONDS:
                # Longer waits are a mistake (milliseconds given as seconds) that would look like a hang.
                raise ValueError(f"{name} must be at most {_MOST_SECONDS} seconds (an hour), not {value}.")
