"""What a read strategy needs of the network: the client's ranged fetch and its transfer threads."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Concatenate, ParamSpec, Protocol, TypeVar

from azstoragetorch._client import AzStorageTorchBlobClient, Recorder

_Parameters = ParamSpec("_Parameters")
_Result = TypeVar("_Result")


def signature_of(
    model: Callable[Concatenate[Any, _Parameters], _Result],
) -> Callable[[Callable[..., Any]], Callable[Concatenate[Any, _Parameters], _Result]]:
    """Give the decorated method ``model``'s parameters and result, for type checkers only.

    A protocol member or a test's stand-in that decorates itself with the client's method takes
    the client's signature as it stands, written once, in the client: a parameter added there is
    one the read strategies may pass at once, and a wrong keyword fails type checking.
    """

    def same(method: Callable[..., Any]) -> Callable[Concatenate[Any, _Parameters], _Result]:
        return method

    return same


class RangeSource(Protocol):
    """The part of ``AzStorageTorchBlobClient`` that the read strategies use (see its methods)."""

    @property
    def display_url(self) -> str: ...

    @property
    def recorder(self) -> Recorder | None: ...

    @signature_of(AzStorageTorchBlobClient.fetch_range_into)
    def fetch_range_into(self, *args: Any, **kwargs: Any) -> Any: ...

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]: ...
