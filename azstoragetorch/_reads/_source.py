"""What a read strategy needs of the network: the client's ranged fetch and its transfer threads."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, Protocol

from azstoragetorch._client import BlobProperties, IntoBytes, PieceChecksums, Recorder


class RangeSource(Protocol):
    """The part of ``AzStorageTorchBlobClient`` that the read strategies use (see its methods)."""

    @property
    def display_url(self) -> str: ...

    @property
    def recorder(self) -> Recorder | None: ...

    def fetch_range_into(
        self,
        offset: int,
        into: memoryview | IntoBytes | Callable[[BlobProperties], memoryview | IntoBytes],
        *,
        etag: str | None,
        length: int | None = None,
        validate_content: bool = False,
        if_none_match: str | None = None,
        stop: threading.Event | None = None,
        on_response: Callable[[BlobProperties], None] | None = None,
        checksums: PieceChecksums | None = None,
    ) -> tuple[BlobProperties, int]: ...

    def submit(self, fn: Any, *args: Any, **kwargs: Any) -> Future[Any]: ...
