"""What a ``BlobIO`` writer does when something fails: :class:`WriteSession`.

``io.py`` decides what a file object's calls mean; this module holds the one promise a writer
makes about failures, that a blob is the complete new content or untouched, and the error a
``with`` block reports when a failure inside it caused others.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from azstoragetorch._client import BlockUploader, Recorder
from azstoragetorch.exceptions import FatalBlobIOWriteError


class WriteSession:
    """A writer's uploads, failed for good by the first step that fails.

    Every step (a write, a flush, the commit) runs through :meth:`run`. Once one raises, or is
    interrupted part way (Ctrl-C), the uploads are aborted and every later step raises
    :class:`~azstoragetorch.exceptions.FatalBlobIOWriteError` with the first cause: a write may
    have been half taken, so nothing of this writer may be committed any more.
    """

    def __init__(self, uploader: BlockUploader, recorder: Recorder) -> None:
        self.uploader = uploader
        self._recorder = recorder
        self.fatal_error: FatalBlobIOWriteError | None = None

    def write(self, chunk: memoryview) -> None:
        self.run(self.uploader.write, chunk)

    def flush(self) -> None:
        self.run(self.uploader.flush)

    def commit(self, size: int) -> None:
        """Upload what remains and commit the blob of ``size`` bytes written."""
        self.run(self._commit, size)

    def abort(self) -> None:
        self.uploader.abort()

    def _commit(self, size: int) -> None:
        self.uploader.flush()  # every block staged (a one-block blob is kept for its Put Blob)
        # The hook's last call comes before the commit, so that an exception from it means, like any
        # other failure of close(), that nothing was committed.
        self._recorder.report_last(done=size, total=size)
        self.uploader.commit()

    def run(self, step: Callable[..., Any], *args: Any) -> None:
        if self.fatal_error is not None:
            raise FatalBlobIOWriteError(self.fatal_error.underlying_exception)
        try:
            step(*args)
        except FatalBlobIOWriteError as error:  # a kind of its own, such as BlobWriteConflictError
            self._fail(error)
            raise
        except Exception as error:
            fatal = FatalBlobIOWriteError(error)
            self._fail(fatal)
            raise fatal from error
        except BaseException as interruption:
            # Ctrl-C (or SystemExit) part-way through a step may leave a write half-taken: nothing
            # of this writer may be committed any more. The interruption itself goes on unchanged.
            self._fail(FatalBlobIOWriteError(interruption))
            raise

    def _fail(self, error: FatalBlobIOWriteError) -> None:
        self.fatal_error = error
        self.uploader.abort()


def raise_first_failure_behind(
    error: BaseException | None, *, since: BaseException | None, fatal_error: FatalBlobIOWriteError | None
) -> None:
    """Report what failed first, not a later error that it caused, leaving a ``with`` block.

    When a write inside :func:`torch.save` raises, torch's own clean-up then fails on the
    half-written archive with a ``RuntimeError`` ("unexpected pos") that hides the reason.
    The caller should see why the save failed, so an error raised while handling an
    interruption (Ctrl-C's ``KeyboardInterrupt``, ``SystemExit``) that happened inside the
    block, or while handling the writer's upload failure (``fatal_error``), is replaced by it.
    ``since`` is what was being handled when the block began: not one of the block's failures.
    """
    if not isinstance(error, Exception):
        return  # an interruption itself goes on as it is
    handled = list(_handled_while_raising(error, since=since))
    interruption = next((earlier for earlier in handled if not isinstance(earlier, Exception)), None)
    if interruption is not None:
        raise interruption
    if fatal_error is None or isinstance(error, FatalBlobIOWriteError):
        return
    if any(isinstance(earlier, FatalBlobIOWriteError) for earlier in handled):
        underlying = fatal_error.underlying_exception
        raise FatalBlobIOWriteError(underlying) from underlying


def _handled_while_raising(error: BaseException, *, since: BaseException | None) -> Iterator[BaseException]:
    """The exceptions being handled when ``error`` was raised (its ``__context__`` chain), newest first,
    leaving out ``since`` and what it was raised while handling: those came before."""
    earlier_ones: set[int] = set()
    while since is not None and id(since) not in earlier_ones:
        earlier_ones.add(id(since))
        since = since.__context__
    earlier = error.__context__
    while earlier is not None and id(earlier) not in earlier_ones:
        yield earlier
        earlier_ones.add(id(earlier))
        earlier = earlier.__context__
