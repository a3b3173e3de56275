"""How a load plan's items become spans: per shard file, by offset, neighbours coalesced, files interleaved."""

from __future__ import annotations

import torch
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from azstoragetorch.integrations.dcp._spans import _COALESCE_GAP, _coalesce, _Span

KiB = 1024
MiB = 1024 * KiB


class Plan:
    """Read items and the storage data they point into, built one item at a time."""

    def __init__(self) -> None:
        self.items: list[ReadItem] = []
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}

    def item(self, name: str, path: str, offset: int, length: int) -> ReadItem:
        index = MetadataIndex(name)
        self.storage_data[index] = _StorageInfo(path, offset, length)
        read = ReadItem(LoadItemType.BYTE_IO, index, torch.Size([0]), index, torch.Size([0]), torch.Size([0]))
        self.items.append(read)
        return read

    def spans(self, max_span: int = 64 * MiB) -> list[_Span]:
        return _coalesce(self.items, self.storage_data, max_span=max_span)


def ranges(spans: list[_Span]) -> list[tuple[str, int, int, list[str]]]:
    return [(span.relative_path, span.start, span.end, [r.storage_index.fqn for r in span.requests]) for span in spans]


def test_no_items_make_no_spans() -> None:
    assert Plan().spans() == []


def test_neighbours_within_the_gap_share_a_span_and_farther_ones_do_not() -> None:
    plan = Plan()
    plan.item("a", "f", 0, 100)
    plan.item("b", "f", 100 + _COALESCE_GAP, 10)  # exactly the gap away: one request is cheaper
    plan.item("c", "f", 110 + 2 * _COALESCE_GAP + 1, 10)  # one byte farther: a request of its own

    assert ranges(plan.spans()) == [
        ("f", 0, 110 + _COALESCE_GAP, ["a", "b"]),
        ("f", 110 + 2 * _COALESCE_GAP + 1, 120 + 2 * _COALESCE_GAP + 1, ["c"]),
    ]


def test_items_are_ordered_by_offset_whatever_the_plan_order() -> None:
    plan = Plan()
    plan.item("late", "f", 2000, 10)
    plan.item("early", "f", 0, 10)
    plan.item("middle", "f", 1000, 10)

    assert ranges(plan.spans()) == [("f", 0, 2010, ["early", "middle", "late"])]


def test_a_span_stops_growing_at_max_span_but_one_larger_item_keeps_its_own() -> None:
    plan = Plan()
    plan.item("a", "f", 0, 3 * MiB)
    plan.item("b", "f", 3 * MiB, 3 * MiB)  # adjacent, but together above max_span
    plan.item("c", "f", 6 * MiB, 10 * MiB)  # alone above max_span

    assert ranges(plan.spans(max_span=4 * MiB)) == [
        ("f", 0, 3 * MiB, ["a"]),
        ("f", 3 * MiB, 6 * MiB, ["b"]),
        ("f", 6 * MiB, 16 * MiB, ["c"]),
    ]


def test_overlapping_items_share_one_span_that_covers_both() -> None:
    # Resharding reads parts of one stored tensor into several destinations: the same bytes twice.
    plan = Plan()
    plan.item("whole", "f", 0, 1000)
    plan.item("inside", "f", 200, 100)

    assert ranges(plan.spans()) == [("f", 0, 1000, ["whole", "inside"])]


def test_spans_of_different_files_are_interleaved_so_files_are_read_side_by_side() -> None:
    plan = Plan()
    far = 2 * _COALESCE_GAP
    for n in range(3):
        plan.item(f"b{n}", "__1_0.distcp", n * far, 10)
    plan.item("a0", "__0_0.distcp", 0, 10)
    plan.item("c0", "__2_0.distcp", 0, 10)
    plan.item("c1", "__2_0.distcp", far, 10)

    assert [fqn for *_, names in ranges(plan.spans()) for fqn in names] == ["a0", "b0", "c0", "b1", "c1", "b2"]
