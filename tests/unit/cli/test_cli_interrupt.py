"""``azstoragetorch cp``'s transfers stop on Ctrl-C, whenever it comes."""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import pathlib
import random
import signal
import sys
import threading
from typing import Any

import pytest

from azstoragetorch._cli import _cp
from azstoragetorch._cli._cp import _run_all
from azstoragetorch._cli._plan import _Copy, _Refused
from azstoragetorch._cli._signals import _Interrupted, _sigterm_as_ctrl_c
from azstoragetorch._cli._transfer import _Stopped, _Transfers
from azstoragetorch._client import TransferStats


def transfer_pieces(transfers: _Transfers, pieces: int, outcomes: list[str]) -> None:
    """A transfer of ``pieces`` pieces of 10 ms that checks between them for the order to stop, as
    ``cp``'s do: ``stopped`` is appended to ``outcomes`` (and the stop raised) if it comes in time,
    else ``committed``."""
    try:
        for _ in range(pieces):
            transfers.check()
            threading.Event().wait(0.01)
    except _Stopped:
        outcomes.append("stopped")
        raise
    outcomes.append("committed")


def test_ctrl_c_while_transfers_are_being_started_stops_those_already_running(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    transfers = _Transfers()
    running = threading.Event()
    outcomes: list[str] = []

    def copy_one(copy: _Copy) -> Any:
        running.set()
        transfer_pieces(transfers, 500, outcomes)
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


# -- a Ctrl-C that the main thread does not receive itself ---------------------------------------------


def cp_arguments(source: pathlib.Path) -> argparse.Namespace:
    """``cp SRC http://.../c/ck/`` (the uploads are faked: nothing is sent anywhere)."""
    return argparse.Namespace(
        source=str(source),
        destination="http://127.0.0.1:1/devstoreaccount1/c/ck/",
        anonymous=True,
        parallel=4,
        no_progress=True,
        no_verify=False,
    )


def main_thread_waits_for_the_transfers() -> None:
    """Return once the main thread has been waiting in ``threading`` for a while (for a transfer
    to finish), so that a signal sent now comes while it is blocked, not on its way there."""
    main = threading.main_thread().ident
    assert main is not None
    stable = 0
    while stable < 5:
        frame = sys._current_frames().get(main)
        waiting = frame is not None and frame.f_code.co_filename == threading.__file__
        stable = stable + 1 if waiting else 0
        threading.Event().wait(0.01)


def held_upload(outcomes: list[str], signal_to_send: signal.Signals) -> Any:
    """A fake ``_upload_one`` that sends ``signal_to_send`` to its own thread (Linux gives a signal
    sent to the process to any of its threads: the one running the C handler need not be the main
    thread, which Python's own handler runs in), then waits for the order to stop, as an upload
    blocked on a held request would, and commits if none comes within a minute."""

    def upload(copy: _Copy, credential: Any, hook: Any, transfers: _Transfers) -> Any:
        main_thread_waits_for_the_transfers()
        signal.pthread_kill(threading.get_ident(), signal_to_send)
        transfer_pieces(transfers, 6000, outcomes)
        return TransferStats()

    return upload


@pytest.mark.skipif(not hasattr(signal, "pthread_kill"), reason="sending a signal to one thread needs POSIX")
@pytest.mark.parametrize(("signal_to_send", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_that_a_transfer_thread_receives_stops_the_copy(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: pathlib.Path,
    python_ctrl_c: None,
    signal_to_send: signal.Signals,
    code: int,
) -> None:
    # The main thread then never sees its wait interrupted (EINTR): the same as a Ctrl-C that comes
    # just before it blocks, which a loaded machine makes likely. Python runs the handler only once
    # the main thread runs again, which a copy held on a slow request would not let it do.
    source = tmp_path / "model.pt"
    source.write_bytes(b"the new checkpoint")
    outcomes: list[str] = []
    monkeypatch.setattr(_cp, "_upload_one", held_upload(outcomes, signal_to_send))

    raised: BaseException | None = None
    with _sigterm_as_ctrl_c() as received:
        try:
            _cp.command_cp(cp_arguments(source), io.StringIO())
        except BaseException as error:  # a bare KeyboardInterrupt must not end the test run
            raised = error
    for thread in threading.enumerate():
        if thread.name.startswith("azstoragetorch-cp"):
            thread.join(60)

    assert outcomes == ["stopped"]
    assert isinstance(raised, _Interrupted), repr(raised)
    assert (raised.signum or received[0]) + 128 == code


def test_every_copy_is_waited_for_whatever_order_the_copies_finish_in() -> None:
    delays = random.Random(7)
    waits = [delays.uniform(0, 0.02) for _ in range(60)]

    def copy_one(copy: _Copy) -> TransferStats:
        number = int(copy.source)
        threading.Event().wait(waits[number])
        if number % 7 == 0:
            raise _Refused(copy.source, "refused for the test")
        return TransferStats(bytes=number)

    copies = [_Copy(str(number), f"destination-{number}", 1) for number in range(60)]
    outcomes = _run_all(copies, copy_one, 4, _Transfers())

    assert sorted(o.bytes for o in outcomes if isinstance(o, TransferStats)) == [n for n in range(60) if n % 7]
    assert len([o for o in outcomes if isinstance(o, _Refused)]) == len(range(0, 60, 7))
