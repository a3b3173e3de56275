"""What the commands show: blob names made safe to print, sizes, and ``cp``'s progress bar."""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

_MiB = 1024 * 1024


def _printable(name: str) -> str:
    """``name`` with control and other unprintable characters escaped (``\\n``, ``\\x1b``,
    ``\\u202e``): whoever can write to a container chooses its blob names, and one must not be able
    to move the terminal's cursor, or add a line (``OK ...``) to what a command prints."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in name)


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


class _Progress:
    """One progress bar (tqdm) for the bytes of every file being copied; thread-safe.

    If standard error goes away (``2>&1 | less``, quit), the bar stops: a copy never fails, and an
    interrupted one is never held up, for want of somewhere to draw it.
    """

    def __init__(self, total: int, enabled: bool) -> None:
        from tqdm import tqdm

        try:
            self._bar = tqdm(
                total=total, unit="B", unit_scale=True, unit_divisor=1024, disable=not enabled, file=sys.stderr
            )
        except (OSError, ValueError):  # it draws itself at once
            self._bar = tqdm(disable=True)
        self._lock = threading.Lock()

    def hook(self) -> Any:
        done = [0]

        def report(bytes_done: int, bytes_total: int | None) -> None:
            with self._lock:
                self._draw(self._bar.update, bytes_done - done[0])
                done[0] = bytes_done

        return report

    def close(self) -> None:
        with self._lock:
            self._draw(self._bar.close)

    def _draw(self, method: Callable[..., Any], *args: Any) -> None:
        try:
            method(*args)
        except (OSError, ValueError):  # a closed pipe or file
            self._bar.disable = True
