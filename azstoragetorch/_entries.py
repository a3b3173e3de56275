"""The blobs of a dataset, stored compactly: a few large buffers instead of millions of objects.

A dataset of 10 M blobs held as ``Blob`` objects costs gigabytes, and every forked DataLoader worker
that touches them copies the pages they live on (touching a Python object writes its reference
count). Here the blob names are one contiguous UTF-8 buffer with an array of offsets; the container
URL (with any SAS) and the part of the names that a run of blobs shares are stored once per run;
sizes, ETags and modification times, when known, are arrays. Client objects are made on access.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import itertools
import operator
import os
import re
import urllib.parse
from array import array
from collections.abc import Iterable, Iterator, Sequence

from azstoragetorch._client import BlobProperties, BlobUrl, ContainerUrl

# URLs are taken in chunks, so that an iterable of millions of URLs never lives as one list.
_CHUNK = 65536
# Azure ETags are '"0x" + upper-case hex'; those are kept as integers, anything else as text.
_HEX_ETAG = re.compile(r'"0x([0-9A-F]{1,16})"')
_UNKNOWN_SIZE = -1
_NO_TIME = -(2**63)
_EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)
_MICROSECOND = datetime.timedelta(microseconds=1)


def _offset_array() -> array[int]:
    # Four-byte offsets while the names fit in 4 GiB, which they do for tens of millions of blobs.
    return array("I") if array("I").itemsize == 4 else array("L")


@dataclasses.dataclass(frozen=True)
class _Run:
    """What consecutive entries share: their container (with its SAS) and the start of their names."""

    container: ContainerUrl
    name_prefix: bytes


class Entries(Sequence[tuple[BlobUrl, "BlobProperties | None"]]):
    """An immutable list of blobs (their URLs and, when known, their properties); build it with
    :class:`EntriesBuilder`. Fetched properties can be remembered with :meth:`remember`."""

    def __init__(
        self,
        runs: list[_Run],
        run_starts: array[int],
        run_of: array[int],
        names: bytes,
        ends: array[int],
        selectors: dict[int, tuple[str | None, str | None]],
        properties: _PropertyColumns | None,
    ) -> None:
        self._runs = runs
        self._run_starts = run_starts
        self._run_of = run_of
        self._names = names
        self._ends = ends  # entry i's name is names[ends[i]:ends[i + 1]], after its run's prefix
        self._selectors = selectors  # snapshot and version id of the few entries that have them
        self._properties = properties
        self._fetched: dict[str, _PropertyColumns] = {}

    def __len__(self) -> int:
        return len(self._ends) - 1

    def __getitem__(self, index: int) -> tuple[BlobUrl, BlobProperties | None]:  # type: ignore[override]
        return self.url(index), self.properties(index)

    def __iter__(self) -> Iterator[tuple[BlobUrl, BlobProperties | None]]:
        return (self[index] for index in range(len(self)))

    def position(self, index: int) -> int:
        """``index`` as a position from 0, counting negative indexes from the end, as a list does."""
        length = len(self)
        position = index + length if index < 0 else index
        if not 0 <= position < length:
            raise IndexError(f"dataset index {index} out of range for {length} blobs")
        return position

    def url(self, index: int) -> BlobUrl:
        position = self.position(index)
        run = self._runs[self._run_of[bisect.bisect_right(self._run_starts, position) - 1]]
        name = (run.name_prefix + self._names[self._ends[position] : self._ends[position + 1]]).decode(
            "utf-8", "surrogatepass"
        )
        url = run.container.blob_url(name)
        selectors = self._selectors.get(position)
        if selectors is not None:
            url = dataclasses.replace(url, snapshot=selectors[0], version_id=selectors[1])
        return url

    def properties(self, index: int) -> BlobProperties | None:
        if self._properties is None:
            return None
        return self._properties.get(self.position(index))

    def remember(self, index: int, properties: BlobProperties) -> None:
        """Keep properties fetched for entry ``index``, so that later accesses need no request."""
        columns = self._properties
        if columns is None:
            # Threads of one batch may get here together; setdefault keeps one set of columns.
            columns = self._fetched.setdefault("columns", _PropertyColumns.unknown(len(self)))
            self._properties = columns
        columns.set(self.position(index), properties)

    def __repr__(self) -> str:
        return f"<{len(self)} blobs>"  # never the URLs: they may carry a SAS


class _PropertyColumns:
    """Sizes, ETags and modification times of the entries, one array each."""

    def __init__(self) -> None:
        self.sizes = array("q")
        self.etags = array("Q")
        self.times = array("q")  # microseconds since 1970 (UTC)
        # Properties that the arrays cannot hold (an ETag not in Azure's form, a recorded CRC-32).
        self.odd: dict[int, BlobProperties] = {}

    @classmethod
    def unknown(cls, count: int) -> _PropertyColumns:
        columns = cls()
        columns.pad(count)
        return columns

    def pad(self, count: int) -> None:
        missing = count - len(self.sizes)
        self.sizes.extend(itertools.repeat(_UNKNOWN_SIZE, missing))
        self.etags.extend(itertools.repeat(0, missing))
        self.times.extend(itertools.repeat(_NO_TIME, missing))

    def append(self, properties: BlobProperties) -> None:
        self.pad(len(self.sizes) + 1)
        self.set(len(self.sizes) - 1, properties)

    def set(self, position: int, properties: BlobProperties) -> None:
        # The size is written last: a known size says the entry's other columns are written too,
        # for a thread that reads the same entry meanwhile.
        self.odd.pop(position, None)
        match = _HEX_ETAG.fullmatch(properties.etag)
        etag = int(match[1], 16) if match else 0
        modified = properties.last_modified
        if (
            properties.size < 0
            or f'"0x{etag:X}"' != properties.etag
            or (modified is not None and modified.utcoffset() != datetime.timedelta(0))
            or properties.crc32 is not None
        ):
            self.odd[position] = properties
        else:
            self.etags[position] = etag
            self.times[position] = _NO_TIME if modified is None else (modified - _EPOCH) // _MICROSECOND
        self.sizes[position] = properties.size

    def get(self, position: int) -> BlobProperties | None:
        odd = self.odd.get(position)
        if odd is not None:
            return odd
        size = self.sizes[position]
        if size == _UNKNOWN_SIZE:
            return None
        time = self.times[position]
        return BlobProperties(
            size=size,
            etag=f'"0x{self.etags[position]:X}"',
            last_modified=None if time == _NO_TIME else _EPOCH + datetime.timedelta(microseconds=time),
        )


class EntriesBuilder:
    """Collects entries, run by run, into an :class:`Entries`."""

    def __init__(self) -> None:
        self._runs: list[_Run] = []
        self._run_index: dict[_Run, int] = {}
        self._run_starts = array("Q")
        self._run_of = array("I")
        self._names = bytearray()
        self._ends = _offset_array()
        self._ends.append(0)
        self._selectors: dict[int, tuple[str | None, str | None]] = {}
        self._properties: _PropertyColumns | None = None

    def __len__(self) -> int:
        return len(self._ends) - 1

    def add_names(
        self, container: ContainerUrl, names: Sequence[str], properties: Sequence[BlobProperties] | None = None
    ) -> None:
        """Append blobs of ``container`` (whose URL may carry a SAS), with their properties if known."""
        if not names:
            return
        shared = _shared_start(min(names), max(names)) if len(names) > 1 else ""
        self._start_run(_Run(container, shared.encode("utf-8", "surrogatepass")))
        cut = len(shared)
        encoded = [name[cut:].encode("utf-8", "surrogatepass") for name in names]
        self._append_encoded(encoded)
        if properties is not None:
            self._add_properties(properties)

    def add_urls(self, urls: Iterable[str]) -> None:
        """Append blobs named by URLs; raises ``ValueError`` (as :meth:`BlobUrl.parse`) for a bad one."""
        iterator = iter(urls)
        while chunk := list(itertools.islice(iterator, _CHUNK)):
            if not self._add_uniform_urls(chunk):
                self._add_parsed_urls(chunk)

    def build(self) -> Entries:
        if self._properties is not None:
            self._properties.pad(len(self))
        return Entries(
            self._runs,
            self._run_starts,
            self._run_of,
            bytes(self._names),
            self._ends,
            self._selectors,
            self._properties,
        )

    def _start_run(self, run: _Run) -> None:
        index = self._run_index.setdefault(run, len(self._runs))
        if index == len(self._runs):
            self._runs.append(run)
        if not self._run_of or self._run_of[-1] != index:
            self._run_starts.append(len(self))
            self._run_of.append(index)

    def _append_encoded(self, encoded: list[bytes]) -> None:
        joined = b"".join(encoded)
        if len(self._names) + len(joined) >= 2**32 and self._ends.itemsize < 8:
            self._ends = array("Q", self._ends)
        ends = itertools.accumulate(map(len, encoded), initial=len(self._names))
        next(ends)  # where the first one starts: already there
        self._ends.extend(ends)
        self._names += joined

    def _add_properties(self, properties: Sequence[BlobProperties]) -> None:
        if self._properties is None:
            self._properties = _PropertyColumns()
        columns = self._properties
        columns.pad(len(self) - len(properties))
        for each in properties:
            columns.append(each)

    def _add_uniform_urls(self, urls: list[str]) -> bool:
        """Append ``urls`` in bulk if they differ only in their blob names, which need no decoding
        beyond percent-escapes; return False, having appended nothing, otherwise."""
        first = urls[0]
        if type(first) is not str:
            return False
        parsed = BlobUrl.parse(first)
        if parsed.snapshot is not None or parsed.version_id is not None:
            return False
        head, question, query = first.partition("?")
        prefix = _container_part(head, parsed.path_style)
        if prefix is None or BlobUrl.parse(prefix + "x").container != dataclasses.replace(
            parsed.container, sas_query=""
        ):
            return False
        suffix = question + query
        try:
            joined = "\n".join(urls)
        except TypeError:
            return False
        # The start that all names share, guessed from the first and the last, is stored once.
        first_name, last_name = (url[len(prefix) : len(url) - len(suffix)] for url in (urls[0], urls[-1]))
        shared = _shared_start(first_name, last_name).partition("%")[0]
        # Every separator stands between one URL's suffix and the next one's prefix, and nowhere
        # else: each URL is then exactly prefix + shared + name + suffix.
        separator = f"{suffix}\n{prefix}{shared}"
        count = len(urls) - 1
        if joined.count("\n") != count or not joined.endswith(suffix) or not joined.startswith(prefix + shared):
            return False
        if joined.count(separator) != count:
            shared = ""
            separator = f"{suffix}\n{prefix}"
            if joined.count(separator) != count:
                return False
        # Each URL is prefix + shared + name + suffix, so its name is a slice (cheaper than replacing
        # the separators in the joined text).
        name_slice = operator.itemgetter(slice(len(prefix) + len(shared), -len(suffix) or None))
        body = "\n".join(map(name_slice, urls))
        if any(character in body for character in "\t\r?#"):
            return False
        if not shared and (not body or body[0] == "\n" or body[-1] == "\n" or "\n\n" in body):
            return False  # a URL without a blob name: BlobUrl.parse says so
        if "%" in body:
            names = [urllib.parse.unquote(name) for name in body.split("\n")]
            encoded = [name.encode("utf-8", "surrogatepass") for name in names]
        else:
            encoded = body.encode("utf-8", "surrogatepass").split(b"\n")
        self._start_run(_Run(parsed.container, shared.encode("utf-8", "surrogatepass")))
        self._append_encoded(encoded)
        return True

    def _add_parsed_urls(self, urls: list[str]) -> None:
        parsed = [BlobUrl.parse(url) for url in urls]  # all checked before any is appended
        for container, group in itertools.groupby(parsed, key=lambda url: url.container):
            blobs = list(group)
            start = len(self)
            self.add_names(container, [url.blob_name for url in blobs])
            for offset, url in enumerate(blobs):
                if url.snapshot is not None or url.version_id is not None:
                    self._selectors[start + offset] = (url.snapshot, url.version_id)


def _container_part(head: str, path_style: bool) -> str | None:
    """The text of a URL up to and including the ``/`` after its container name."""
    start = head.find("://")
    end = head.find("/", start + 3) if start >= 0 else -1
    if end >= 0 and path_style:
        end = head.find("/", end + 1)  # past the account name
    end = head.find("/", end + 1) if end >= 0 else -1
    return head[: end + 1] if end >= 0 else None


def _shared_start(first: str, second: str) -> str:
    # Character by character, as wanted here: a shared start need not end at a "/".
    return os.path.commonprefix([first, second])  # noqa: RUF071
