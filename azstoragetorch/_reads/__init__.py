"""How a read of a blob becomes ranged fetches: one small class per read strategy.

Every strategy moves bytes only through the client's one primitive, ``fetch_range_into`` (a ranged
GET into the caller's buffer, pinned to a version, with its checks and stats), and runs parallel
work on the client's ``submit``: :class:`RangeSource` names those two. A strategy decides which
ranges to fetch, when, and into what memory; how a range travels (retries, validation, the error
when the blob changed) is the client's. Unit tests hand the strategies an in-memory fake instead.

- :class:`DirectReads`: one large read straight into the caller's memory, in parallel parts.
- :class:`ReadAheadWindow`: a window of chunks fetched ahead of a reader that moves forward in
  reads of any size (``BlobIO``, ``torch.load``).
- :class:`WholeBlobRead`: a whole blob in one pass, sized by the first answer (dataset samples,
  the local cache, small files).
- :class:`PlannedSpans` over :class:`PinnedBlob`: ranges planned ahead (a DCP load's spans, of many
  blobs), fetched in parallel and handed over in the planned order within a memory budget, every
  blob's ranges pinned to the version of its first answer.
"""

from azstoragetorch._reads._direct import DirectReads
from azstoragetorch._reads._pinned import PinnedBlob
from azstoragetorch._reads._planned import PlannedSpans, Span
from azstoragetorch._reads._source import RangeSource
from azstoragetorch._reads._whole import WholeBlobRead
from azstoragetorch._reads._window import ReadAheadWindow, read_first

__all__ = [
    "DirectReads",
    "PinnedBlob",
    "PlannedSpans",
    "RangeSource",
    "ReadAheadWindow",
    "Span",
    "WholeBlobRead",
    "read_first",
]
