"""Which bytes a load fetches, in which requests: the load plan's items grouped into spans.

Each span is one contiguous byte range of one shard file, fetched by one ranged request (or a few
of ``block_size``, in parallel); grouping neighbouring items saves the round trips that fetching
them one by one would cost.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import TYPE_CHECKING, Any

from torch.distributed.checkpoint.planner import ReadItem

if TYPE_CHECKING:
    # A private torch name needed only for annotations: a release that moves it cannot break an import.
    from torch.distributed.checkpoint.filesystem import _StorageInfo

# Two wanted byte ranges of a shard file closer than this are fetched by one request: the bytes in
# between cost less than another request's round trip to Azure.
_COALESCE_GAP = 256 * 1024


@dataclasses.dataclass
class _Span:
    """One contiguous byte range of one shard file, covering the items in ``requests``."""

    relative_path: str
    start: int
    end: int
    requests: list[ReadItem]


def _coalesce(items: list[ReadItem], storage_data: dict[Any, _StorageInfo], *, max_span: int) -> list[_Span]:
    """Group the wanted items into spans: per file, by offset, neighbours within ``_COALESCE_GAP``
    together, no span above ``max_span`` unless one item is larger. Spans of different files are
    interleaved, so that files are read side by side."""
    by_file: dict[str, list[ReadItem]] = collections.defaultdict(list)
    for item in items:
        by_file[storage_data[item.storage_index].relative_path].append(item)
    spans_by_file: list[list[_Span]] = []
    for relative_path, file_items in sorted(by_file.items()):
        file_items.sort(key=lambda item: storage_data[item.storage_index].offset)
        spans: list[_Span] = []
        for item in file_items:
            info = storage_data[item.storage_index]
            item_end = info.offset + info.length
            current = spans[-1] if spans else None
            if (
                current is not None
                and info.offset <= current.end + _COALESCE_GAP
                and max(current.end, item_end) - current.start <= max_span
            ):
                current.end = max(current.end, item_end)
                current.requests.append(item)
            else:
                spans.append(_Span(relative_path, info.offset, item_end, [item]))
        spans_by_file.append(spans)
    interleaved = []
    for round_ in range(max((len(spans) for spans in spans_by_file), default=0)):
        interleaved += [spans[round_] for spans in spans_by_file if round_ < len(spans)]
    return interleaved
