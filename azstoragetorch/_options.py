"""Checks of the options users pass to the public classes, so that each check is written once.

Every class that takes ``max_concurrency``/``block_size`` (BlobIO and the integrations built on it)
or a count (threads, workers, batch sizes) checks it here, and so rejects bad values with the same
words.
"""

from __future__ import annotations

from azstoragetorch._client import MAX_BLOCK_SIZE


def check_int(name: str, value: object, *, minimum: int = 1, maximum: int | None = None) -> None:
    """Raise ``ValueError`` unless ``value`` is an ``int`` (not a ``bool``) within the bounds given."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < minimum
        or (maximum is not None and value > maximum)
    ):
        if maximum is not None:
            expected = f"an int from {minimum} to {maximum}"
        elif minimum == 1:
            expected = "a positive int"
        else:
            expected = f"an int of at least {minimum}"
        raise ValueError(f"{name} must be {expected}, got {value!r}.")


def check_transfer_options(max_concurrency: object, block_size: object) -> None:
    """Raise ``ValueError`` for a ``max_concurrency`` or ``block_size`` that BlobIO cannot use."""
    check_int("max_concurrency", max_concurrency)
    check_int("block_size", block_size)
    assert isinstance(block_size, int)
    if block_size > MAX_BLOCK_SIZE:
        raise ValueError(f"block_size must be at most {MAX_BLOCK_SIZE} bytes (4000 MiB), got {block_size}.")
