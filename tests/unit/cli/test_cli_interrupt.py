"""``azstoragetorch cp``'s transfers stop on Ctrl-C, whenever it comes."""

from __future__ import annotations

import concurrent.futures
import threading
from typing import Any

import pytest

from azstoragetorch._cli import _Copy, _Interrupted, _run_all, _Stopped, _Transfers


def test_ctrl_c_while_transfers_are_being_started_stops_those_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transfers = _Transfers()
    running = threading.Event()
    outcomes: list[str] = []

    def copy_one(copy: _Copy) -> Any:
        running.set()
        try:
            for _ in range(500):  # a transfer of many pieces, checking between them
                transfers.check()
                threading.Event().wait(0.01)
        except _Stopped:
            outcomes.append("stopped")
            raise
        outcomes.append("committed")
        return None

    submit = concurrent.futures.ThreadPoolExecutor.submit
    submitted = [0]

    def submit_then_ctrl_c(self: concurrent.futures.ThreadPoolExecutor, *args: Any) -> Any:
        submitted[0] += 1
        if submitted[0] == 2:  # Ctrl-C while the second of many files is handed to the pool
            assert running.wait(10)
            raise KeyboardInterrupt
        return submit(self, *args)

    monkeypatch.setattr(concurrent.futures.ThreadPoolExecutor, "submit", submit_then_ctrl_c)
    copies = [_Copy(f"source-{number}", f"destination-{number}", 1) for number in range(100)]

    raised: BaseException | None = None
    try:
        _run_all(copies, copy_one, 4, transfers)
    except BaseException as error:  # a bare KeyboardInterrupt must not end the test run
        raised = error
    for thread in threading.enumerate():
        if thread.name.startswith("azstoragetorch-cp"):
            thread.join(10)

    assert isinstance(raised, _Interrupted), repr(raised)
    assert outcomes == ["stopped"]
