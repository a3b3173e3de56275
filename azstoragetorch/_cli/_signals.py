"""Ctrl-C and SIGTERM: noted while ``cp``'s transfers run, and turned into one way out."""

from __future__ import annotations

import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Iterator, Sequence
from typing import Any


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``cp``'s transfers, once they were told to stop (see
    :func:`azstoragetorch._cli._main._main`); ``signum`` is the signal that stopped them, if
    :class:`_StopSignals` noted it."""

    def __init__(self, signum: int | None = None) -> None:
        super().__init__()
        self.signum = signum


# How long the main thread waits on the transfers before it looks again for a noted Ctrl-C.
_STOP_POLL_SECONDS = 0.1


class _StopSignals:
    """Ctrl-C and SIGTERM noted while ``cp``'s transfers may run, and acted on where the main thread
    looks for them (:meth:`check`).

    Python runs a signal's handler in the main thread, between two bytecodes. A main thread blocked
    on a lock with no timeout is woken only if the signal interrupts that very wait; one that the
    kernel hands to another thread of the process, or that comes just before the wait begins (a
    loaded machine makes that window wide), is handled only once the wait ends: when a transfer
    finishes, which one held on a slow request does not do for minutes. And a KeyboardInterrupt
    raised at any bytecode may skip the stop of the transfers, or leave a lock of ``threading`` taken.
    So while :meth:`noted` is active the handlers only note the signal, and the main thread waits in
    short slices (:meth:`wait`) and checks between them: every interruption takes the one way out
    that stops the transfers and leaves at once.
    """

    def __init__(self) -> None:
        self.signum: int | None = None

    def check(self) -> None:
        if self.signum is not None:
            raise _Interrupted(self.signum)

    @contextlib.contextmanager
    def noted(self) -> Iterator[_StopSignals]:
        if threading.current_thread() is not threading.main_thread():
            yield self  # only the main thread receives signals; a caller's own thread keeps its own
            return

        def note(signum: int, frame: Any) -> None:
            if self.signum is None:
                self.signum = signum

        previous: dict[int, Any] = {}
        try:
            for number in (signal.SIGINT, signal.SIGTERM):
                # Only a Python handler is replaced: a signal the process was told to ignore stays
                # ignored, and one left to its default still ends the process.
                if callable(handler := signal.getsignal(number)):
                    previous[number] = handler
                    signal.signal(number, note)
            yield self
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def wait(self, futures: Sequence[concurrent.futures.Future[Any]]) -> set[concurrent.futures.Future[Any]]:
        """Wait until one of ``futures`` is done, or a signal was noted (raised as :class:`_Interrupted`)."""
        while True:
            self.check()
            done, _ = concurrent.futures.wait(
                futures, timeout=_STOP_POLL_SECONDS, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if done:
                self.check()
                return done


@contextlib.contextmanager
def _sigterm_as_ctrl_c() -> Iterator[list[int]]:
    """SIGTERM (``kill``, ``timeout``, a batch scheduler ending the job) stops the command as Ctrl-C
    does, cleaning up after itself; yields the number of the signal that stopped it, if one did."""
    received: list[int] = [signal.SIGINT]

    def stop(signum: int, frame: Any) -> None:
        received[0] = signum
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield received  # only the main thread may handle signals; a caller's own thread keeps its own
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)
