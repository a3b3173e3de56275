"""Installers of wrappers around Lightning's code that run once per process, whoever calls them first."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable


def once(install: Callable[[], None]) -> Callable[[], None]:
    """``install``, run by its first call in this process; every later call returns at once.

    A first run that raises is not repeated either: what it installed before raising stays.
    ``__wrapped__`` is ``install`` itself, for a test that needs it run again.
    """
    lock = threading.Lock()
    started = False

    @functools.wraps(install)
    def install_once() -> None:
        nonlocal started
        with lock:
            if started:
                return
            started = True
        install()

    return install_once
