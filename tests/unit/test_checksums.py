"""Whole-blob CRC-32s from pieces: combining, and tiling pieces that arrive in any order."""

from __future__ import annotations

import itertools
import random
import zlib

from hypothesis import given, settings
from hypothesis import strategies as st

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
