"""The options a user may tune, each checked in one place: :class:`TransferOptions` and :func:`check_int`.

A public class that takes transfer keywords (``max_concurrency``, ``block_size``,
``validate_content``, ``verify_checksum``, ``retry``, ``progress_hook``) turns them into one
:class:`TransferOptions` where the user's call enters (:meth:`TransferOptions.from_keywords`), and
hands that value on; the layers below (BlobIO's reader and writer, the block uploads, the clients)
take it, or its ``retry``, as it is and check nothing again. Counts that are not transfer options
(threads, workers, batch sizes) go through :func:`check_int`, so that every bad number is refused
with the same words. A class that takes only ``retry`` or ``progress_hook`` (the datasets, the
Lightning data module) checks it with :func:`check_retry` or :func:`check_progress_hook`, the checks
:class:`TransferOptions` makes.

This module imports nothing of azstoragetorch but :mod:`azstoragetorch.retry`, so that ``_client``,
the bottom layer, can take the value too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

from azstoragetorch.retry import RetryOptions

_MiB = 1024 * 1024
# The service's largest block, and so the largest block_size a writer can use.
MAX_BLOCK_SIZE = 4000 * _MiB
DEFAULT_BLOCK_SIZE = 8 * _MiB
DEFAULT_MAX_CONCURRENCY = 8

# Called with (bytes done, bytes in all), the second None while a write's length is not known.
ProgressHook = Callable[[int, "int | None"], Any]


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


def check_progress_hook(progress_hook: object) -> None:
    """Raise ``TypeError`` unless ``progress_hook`` is ``None`` or callable."""
    if progress_hook is not None and not callable(progress_hook):
        raise TypeError(f"progress_hook must be a callable (or None), not {type(progress_hook).__name__}.")


def check_retry(retry: object) -> None:
    """Raise ``TypeError`` unless ``retry`` is ``None`` or a :class:`~azstoragetorch.retry.RetryOptions`."""
    if retry is not None and not isinstance(retry, RetryOptions):
        raise TypeError(
            f"retry must be an azstoragetorch.retry.RetryOptions (or None for the defaults), not "
            f"{type(retry).__name__}."
        )


@dataclasses.dataclass(frozen=True)
class TransferOptions:
    """How one blob's bytes move: the transfer keywords of BlobIO and the integrations, checked.

    Building one checks every field, and :func:`dataclasses.replace` checks the copy again, so a
    ``TransferOptions`` that exists is valid: code that receives one uses it without checking.
    The fields mean what BlobIO's keywords of the same names mean. The two flags are taken for
    their truth and not checked for type, so that code passing ``1`` or ``0`` keeps working.

    Raises:
        ValueError: ``max_concurrency`` or ``block_size`` is not a positive ``int``, or
            ``block_size`` is more than the service's largest block (4000 MiB).
        TypeError: ``retry`` is not a ``RetryOptions``, or ``progress_hook`` is not callable.
    """

    max_concurrency: int = DEFAULT_MAX_CONCURRENCY
    block_size: int = DEFAULT_BLOCK_SIZE
    validate_content: bool = False
    # None: check a blob read to its end when it has a recorded CRC-32; True insists; False never.
    verify_checksum: bool | None = None
    retry: RetryOptions | None = None  # None: RetryOptions()
    progress_hook: ProgressHook | None = None

    @classmethod
    def from_keywords(cls, arguments: Mapping[str, Any], **overrides: Any) -> TransferOptions:
        """The options among a public entry point's ``arguments``, checked: how such an entry point
        turns its transfer keywords into one value.

        ``arguments`` is the entry point's ``locals()``, taken before it binds any name of its own
        that is also a field's, so that every public signature keeps its keywords while the list of
        them is written once, here. Each field is taken from the argument of the same name; a field
        the entry point does not take (a writer's ``verify_checksum``) keeps its default.
        ``overrides`` replace arguments whose meaning differs from the field's (the DCP reader's
        ``verify_checksum``, whose ``True`` is BlobIO's ``None``).
        """
        given = {**arguments, **overrides}
        return cls(**{field.name: given[field.name] for field in dataclasses.fields(cls) if field.name in given})

    def __post_init__(self) -> None:
        check_progress_hook(self.progress_hook)
        check_int("max_concurrency", self.max_concurrency)
        check_int("block_size", self.block_size)
        if self.block_size > MAX_BLOCK_SIZE:
            raise ValueError(f"block_size must be at most {MAX_BLOCK_SIZE} bytes (4000 MiB), got {self.block_size}.")
        check_retry(self.retry)
