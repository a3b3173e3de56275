"""Whole-blob CRC-32s from pieces: combining, and tiling pieces that arrive in any order."""

from __future__ import annotations

import itertools
import random
import sys
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from azstoragetorch._client import _checksums
from azstoragetorch._client._checksums import PieceChecksums, crc32, crc32_combine, parse_recorded


@settings(max_examples=200, deadline=None)
@given(first=st.binary(max_size=300), second=st.binary(max_size=300))
def test_combine_equals_the_crc_of_the_concatenation(first: bytes, second: bytes) -> None:
    assert crc32_combine(crc32(first), crc32(second), len(second)) == zlib.crc32(first + second)


def test_combine_handles_long_second_pieces() -> None:
    second = bytes(range(256)) * 40_000  # ~10 MB: many bits in its length
    assert crc32_combine(crc32(b"head"), crc32(second), len(second)) == zlib.crc32(b"head" + second)


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=2000),
    cuts=st.lists(st.integers(0, 2000), max_size=12),
    extra=st.lists(st.tuples(st.integers(0, 2000), st.integers(1, 500)), max_size=6),
    seed=st.integers(0, 1000),
)
def test_pieces_in_any_order_with_overlaps_give_the_whole_crc(
    data: bytes, cuts: list[int], extra: list[tuple[int, int]], seed: int
) -> None:
    bounds = sorted({0, len(data), *(cut for cut in cuts if cut <= len(data))})
    pieces = [(start, data[start:end]) for start, end in itertools.pairwise(bounds)]
    pieces += [(start, data[start : start + length]) for start, length in extra if start < len(data)]  # overlaps
    random.Random(seed).shuffle(pieces)
    checksums = PieceChecksums(len(data))
    for start, piece in pieces:
        checksums.add(start, piece)

    assert checksums.whole() == zlib.crc32(data)
    assert checksums.covered_from_start() == len(data)


def test_a_gap_leaves_the_whole_unknown_and_says_where_to_continue() -> None:
    data = bytes(range(200))
    checksums = PieceChecksums(len(data))
    checksums.add(0, data[:50])
    checksums.add(50, data[50:90])
    checksums.add(120, data[120:])  # 90-120 missing

    assert checksums.whole() is None
    assert checksums.covered_from_start() == 90
    checksums.add(90, data[90:])
    assert checksums.whole() == zlib.crc32(data)


def test_recorded_values_parse_or_are_none() -> None:
    assert parse_recorded("0000ffff") == 0xFFFF
    assert parse_recorded(None) is None
    assert parse_recorded("not-hex") is None


# ISA-L computes the CRC-32 where it is installed; recorded checksums must stay zlib's values, so
# that blobs written with either read back verified with the other.
_IMPLEMENTATIONS = {"zlib": zlib.crc32, **({"isal": _checksums._isal_crc32} if _checksums._isal_crc32 else {})}


def test_isal_is_used_when_installed() -> None:
    # isal is a declared dependency; the fallback exists for platforms without its wheel.
    assert _checksums._isal_crc32 is not None
    assert _checksums._crc32 is _checksums._isal_crc32


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=5000), start=st.integers(0, 0xFFFFFFFF), offset=st.integers(1, 64))
def test_every_implementation_gives_zlibs_crc32(data: bytes, start: int, offset: int) -> None:
    buffer = bytearray(offset) + data  # a view that starts at an unaligned address
    for name, implementation in _IMPLEMENTATIONS.items():
        assert implementation(memoryview(buffer)[offset:], 0) == zlib.crc32(data), name
        assert implementation(data, start) == zlib.crc32(data, start), name  # incremental


@settings(max_examples=100, deadline=None)
@given(pieces=st.lists(st.binary(max_size=700), max_size=8))
def test_incremental_and_combined_crcs_agree_across_implementations(pieces: list[bytes]) -> None:
    whole = b"".join(pieces)
    for name, implementation in _IMPLEMENTATIONS.items():
        running = 0
        combined = 0
        for piece in pieces:
            running = implementation(piece, running)
            combined = crc32_combine(combined, implementation(piece, 0), len(piece))
        assert running == combined == zlib.crc32(whole), name


def test_large_buffers_agree_across_implementations() -> None:
    data = random.Random(7).randbytes(3 * 1024 * 1024 + 5)  # past any small-input special case
    assert {name: impl(data, 0) for name, impl in _IMPLEMENTATIONS.items()} == dict.fromkeys(
        _IMPLEMENTATIONS, zlib.crc32(data)
    )
    assert crc32(data) == zlib.crc32(data)


def test_without_isal_zlib_is_the_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "isal", None)  # what an import of a missing package sees
    assert _checksums._isal_crc32_or_none() is None
