"""Parallel ranged reads: every part is joined before the call returns or raises."""

from __future__ import annotations

import threading

import pytest

from azstoragetorch._client import BlobProperties, _buffers
from azstoragetorch._reads import DirectReads
from tests.unit.fakes import InMemoryBlobClient

PART = 1024


class _OnePartFails(InMemoryBlobClient):
    """The part at ``failing_offset`` fails at once; the others write their bytes a little later."""

    def __init__(self, data: bytes, failing_offset: int) -> None:
        super().__init__(data)
        self.failing_offset = failing_offset
        self.finished = threading.Semaphore(0)
        self.started = 0

    def fetch_range_into(  # type: ignore[override]
        self, offset: int, buffer: memoryview, *, stop: threading.Event | None = None, **kwargs: object
    ) -> object:
        with self._lock:
            self.started += 1
        try:
            if offset == self.failing_offset:
                raise ConnectionError("injected failure of one part")
            threading.Event().wait(0.2)  # still running when the failure is noticed
            return super().fetch_range_into(offset, buffer, etag=None)
        finally:
            self.finished.release()


def test_a_failed_part_leaves_no_writes_into_the_buffer_after_the_call_raises() -> None:
    data = bytes(range(256)) * 32  # 8 parts
    client = _OnePartFails(data, failing_offset=0)
    guard = bytearray(len(data))
    with pytest.raises(ConnectionError, match="injected"):
        DirectReads(client, block_size=PART, max_concurrency=4).read_into(0, memoryview(guard), etag='"1"')
    seen_when_raised = bytes(guard)
    started = client.started
    for _ in range(started):
        assert client.finished.acquire(timeout=10)  # every part that started has now ended
    assert bytes(guard) == seen_when_raised  # nothing wrote into the caller's buffer afterwards
    assert started <= 4  # parts beyond the first window were never started


def test_read_leased_returns_a_lease_and_releases_it_on_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    data = bytes(range(256)) * 16
    client = InMemoryBlobClient(data)
    lease = DirectReads(client, block_size=PART, max_concurrency=2).read_leased(100, 3000, etag='"1"')
    assert bytes(lease.view(3000)) == data[100:3100]
    assert len(lease.buffer) == 3 * PART  # rounded up to whole parts, so similar ranges share buffers
    lease.release()

    returned: list[bytearray] = []
    monkeypatch.setattr(_buffers, "give_back", returned.append)
    failing = _OnePartFails(data, failing_offset=PART)
    with pytest.raises(ConnectionError):
        DirectReads(failing, block_size=PART, max_concurrency=4).read_leased(0, 4 * PART, etag='"1"')
    assert len(returned) == 1  # released exactly once, after every part ended
    assert failing.finished.acquire(timeout=0)  # (and the parts had all ended by then)


class _RecordsEtags(InMemoryBlobClient):
    """Records each part's ETag, and whether the first answer had come when the part was sent."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.answered = threading.Event()
        self.sent: list[tuple[int, str | None, bool]] = []

    def fetch_range_into(  # type: ignore[override]
        self, offset: int, buffer: memoryview, *, etag: str | None, on_response: object = None, **kwargs: object
    ) -> object:
        with self._lock:
            self.sent.append((offset, etag, self.answered.is_set()))

        def answered(properties: BlobProperties) -> None:
            self.answered.set()
            if callable(on_response):
                on_response(properties)

        return super().fetch_range_into(offset, buffer, etag=etag, on_response=answered)


def test_without_an_etag_the_first_answer_pins_the_other_parts() -> None:
    data = bytes(range(256)) * 32  # 8 parts
    client = _RecordsEtags(data)
    seen: list[str] = []
    guard = bytearray(len(data))

    DirectReads(client, block_size=PART, max_concurrency=4).read_into(
        0, memoryview(guard), etag=None, on_response=lambda p: seen.append(p.etag)
    )

    assert bytes(guard) == data
    assert seen == [client.properties.etag]  # reported once, for the first answer
    first, *others = sorted(client.sent)
    assert first == (0, None, False)
    assert others == [(offset, client.properties.etag, True) for offset in range(PART, len(data), PART)]
