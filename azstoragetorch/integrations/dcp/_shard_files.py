"""The shard files of one save: each a :class:`~azstoragetorch.io.BlobIO` on one of torch's writer
threads, all of them failing together so that a failed save commits none of them."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from typing_extensions import override

from azstoragetorch._client import ProgressHook, TransferStats, pause
from azstoragetorch.io import BlobIO


class _SaveAborted(RuntimeError):
    """Another shard file of the same save failed first; this one was not committed."""


class _ShardWriters:
    """The shard files that one ``write_data`` writes, on torch's writer threads: they fail together.

    The first failure of any of them is recorded, and from then on every other stops at its next
    write and none commits. A commit that had already begun is waited for, so once :meth:`fail`
    returns (and so before the save can raise) no commit of this save is under way or still to come.
    """

    def __init__(self, progress_hook: ProgressHook | None) -> None:
        self._state = threading.Condition()
        self._committing = 0
        self.failure: BaseException | None = None
        self.committed: list[TransferStats] = []  # of the shard files committed so far
        self._progress_hook = progress_hook
        self._written: list[int] = []  # bytes uploaded so far, by shard file (for the progress hook)
        self._reporting = threading.Lock()

    def file_hook(self) -> ProgressHook | None:
        """The progress hook of one more shard file: it reports the bytes of the whole save so far."""
        hook = self._progress_hook
        if hook is None:
            return None
        with self._reporting:
            index = len(self._written)
            self._written.append(0)

        def report(done: int, total: int | None) -> None:
            with self._reporting:  # one call at a time, so that the sums reach the hook in order
                self._written[index] = done
                hook(sum(self._written), None)  # the save's total is known once it is done

        return report

    def finished(self, stats: TransferStats) -> None:
        """A shard file of this save was committed; ``stats`` is what it cost."""
        with self._state:
            self.committed.append(stats)

    def check(self) -> None:
        """Raise if a shard file of this save has failed."""
        if self.failure is not None:
            raise _SaveAborted("Another shard file of this checkpoint save failed; this one was not committed.")

    @contextlib.contextmanager
    def committing(self) -> Iterator[None]:
        """Held while one shard file commits; raises instead if the save has failed."""
        with self._state:
            self.check()
            self._committing += 1
        try:
            yield
        finally:
            with self._state:
                self._committing -= 1
                self._state.notify_all()

    def fail(self, error: BaseException) -> None:
        """Record ``error`` (if it is the first) and wait until no shard file is committing."""
        with self._state:
            if self.failure is None:
                self.failure = error
            self._state.wait_for(lambda: self._committing == 0)


class _ShardFile(BlobIO):
    """A shard file's :class:`BlobIO`, owned by its save's :class:`_ShardWriters`: it stops writing as
    soon as another file of the save has failed, and commits only while none has.

    Opened with :meth:`BlobIO._open` in ``"wb"`` mode, after which the opener sets :attr:`_writers`.
    """

    _writers: _ShardWriters

    @override
    def write(self, data: bytes | bytearray | memoryview, /) -> int:  # type: ignore[override]
        self._writers.check()
        return super().write(data)

    @override
    def flush(self) -> None:
        """Only check the save: a shard file becomes visible at its commit, not before, and torch's
        flush after every item would cut a short block each time and wait for it."""
        self._writers.check()

    @override
    def close(self) -> None:
        if self.closed:
            return
        try:
            self._writers.check()
            super().flush()  # the blocks are uploaded first, so that the commit is a single request
            with self._writers.committing():
                pause("commit")
                super().close()
            self._writers.finished(self.stats)
        except BaseException as error:
            if not self.closed:
                self.__exit__(type(error), error, error.__traceback__)  # stops the uploads, commits nothing
            raise
