"""Whole-blob CRC-32s: computed piece by piece, in any order, and combined.

Writers record the CRC-32 of everything they committed in the blob's metadata. Readers that opt in
compute the CRC-32 of every byte range they download, in whatever order the ranges arrive, and
combine them into the whole blob's, to compare with the recorded one. Combining two CRC-32s needs
only their values and the second piece's length (a GF(2) matrix product, as zlib's
``crc32_combine``), so nothing is read twice and nothing is kept but a number per piece.

The CRC-32 itself is ISA-L's (the ``isal`` package) where it is installed: the same CRC-32 (IEEE
802.3, as zlib computes it), at a fraction of zlib's CPU per byte, which matters because every
write records one. Both release the GIL, so upload threads
checksum their blocks in parallel. Without ``isal``, zlib computes the identical values.
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections.abc import Callable

_Buffer = bytes | bytearray | memoryview

# Blob metadata (x-ms-meta-<name>) in which writers record the CRC-32, as 8 hexadecimal digits.
METADATA_NAME = "azstoragetorch_crc32"
_POLYNOMIAL = 0xEDB88320  # CRC-32 (IEEE 802.3), reflected, as zlib.crc32 computes it


def _isal_crc32_or_none() -> Callable[[_Buffer, int], int] | None:
    try:
        from isal import isal_zlib
    except ImportError:
        return None
    return isal_zlib.crc32


_isal_crc32 = _isal_crc32_or_none()
_crc32: Callable[[_Buffer, int], int] = _isal_crc32 or zlib.crc32  # both return the unsigned value


def crc32(data: _Buffer, value: int = 0) -> int:
    """The CRC-32 of ``data``, continuing from ``value`` (the CRC-32 of the bytes before it)."""
    return _crc32(data, value)


def _times(matrix: tuple[int, ...], vector: int) -> int:
    total = 0
    index = 0
    while vector:
        if vector & 1:
            total ^= matrix[index]
        vector >>= 1
        index += 1
    return total


@functools.cache
def _zeros_operator(power: int) -> tuple[int, ...]:
    """The operator that appends 2**power zero bytes to a CRC-32 (as a GF(2) matrix, one int per column)."""
    if power == 0:
        one_bit = (_POLYNOMIAL, *(1 << n for n in range(31)))  # one zero bit
        operator = one_bit
        for _ in range(3):  # 2, 4 then 8 zero bits: one zero byte
            operator = tuple(_times(operator, column) for column in operator)
        return operator
    half = _zeros_operator(power - 1)
    return tuple(_times(half, column) for column in half)


def crc32_combine(first: int, second: int, second_length: int) -> int:
    """The CRC-32 of ``A + B`` from ``crc32(A)``, ``crc32(B)`` and ``len(B)``."""
    power = 0
    while second_length:
        if second_length & 1:
            first = _times(_zeros_operator(power), first)
        second_length >>= 1
        power += 1
    return first ^ second


class RunningCrc:
    """The CRC-32 of a range's bytes, taken piece by piece as they arrive from the socket (one thread).

    A piece just received is still in the CPU's cache: its CRC-32 there costs less than the same
    bytes cost once the whole range is in memory and must be read back from it.
    """

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0

    def update(self, data: _Buffer) -> None:
        self.value = _crc32(data, self.value)


class PieceChecksums:
    """CRC-32s of downloaded byte ranges of one blob (thread-safe), and the whole blob's CRC-32 from them.

    Ranges may arrive in any order, overlap, or be fetched twice; the whole blob's CRC-32 is known as
    soon as some of them, laid end to end, cover it exactly. ``size`` may be set after the first
    ranges were added (a reader that learns it from the first answer).
    """

    def __init__(self, size: int | None = None) -> None:
        self.size = size
        self._lock = threading.Lock()
        self._pieces: dict[int, set[tuple[int, int]]] = {}  # start -> {(end, crc)}

    def add(self, start: int, data: bytes | bytearray | memoryview) -> None:
        if len(data):
            self.add_crc(start, len(data), crc32(data))

    def add_crc(self, start: int, length: int, crc: int) -> None:
        """A range of ``length`` bytes from ``start`` whose CRC-32 is ``crc``."""
        if not length:
            return
        with self._lock:
            self._pieces.setdefault(start, set()).add((start + length, crc))

    def whole(self) -> int | None:
        """The blob's CRC-32 if the pieces tile it, else ``None`` (also while its size is unknown)."""
        with self._lock:
            pieces = {start: sorted(ends) for start, ends in self._pieces.items()}
        if self.size is None:
            return None
        if self.size == 0:
            return 0
        # Depth first from offset 0, longest pieces first; each offset is explored once.
        stack: list[tuple[int, int]] = [(0, 0)]
        seen: set[int] = set()
        while stack:
            offset, crc = stack.pop()
            if offset == self.size:
                return crc
            if offset in seen:
                continue
            seen.add(offset)
            for end, piece_crc in pieces.get(offset, ()):
                if end <= self.size:
                    stack.append((end, crc32_combine(crc, piece_crc, end - offset)))
        return None

    def covered_from_start(self) -> int:
        """How far from offset 0 the pieces reach without a gap (where to download from to finish)."""
        assert self.size is not None
        with self._lock:
            ends_by_start = {start: max(end for end, _ in ends) for start, ends in self._pieces.items()}
        reach = 0
        frontier = [0]
        seen: set[int] = set()
        while frontier:
            offset = frontier.pop()
            if offset in seen:
                continue
            seen.add(offset)
            reach = max(reach, offset)
            if offset in ends_by_start:
                frontier.append(ends_by_start[offset])
        return min(reach, self.size)


def parse_recorded(value: str | None) -> int | None:
    """The CRC-32 recorded in blob metadata, or ``None`` when absent or malformed."""
    if not value:
        return None
    try:
        return int(value, 16) & 0xFFFFFFFF
    except ValueError:
        return None
