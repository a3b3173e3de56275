"""How a dataset turns one :class:`Blob` into one sample: the default transform, and the user's
transform applied with the progress hook set and the blob named if it raises."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from azstoragetorch._client import ProgressHook
from azstoragetorch._options import check_progress_hook
from azstoragetorch.datasets._blob import Blob

# What a dataset's transform returns: the type of its samples.
_TransformOutputType_co = TypeVar("_TransformOutputType_co", covariant=True)
_T = TypeVar("_T")


def _read_whole_blob(blob: Blob) -> dict[str, str | bytes]:
    """The default transform: ``{"url": ..., "data": <the blob's bytes>}``."""
    # Straight from the client (or the cache) rather than through blob.reader(): no read-ahead
    # buffers to fill and copy out of, which for a dataset of small blobs is most of the client's work.
    return _whole_blob_sample(blob, blob.read())


def _whole_blob_sample(blob: Blob, data: bytes) -> dict[str, str | bytes]:
    return {"url": blob.url, "data": data}


def _apply(transform: Callable[[Blob], _T], blob: Blob, progress_hook: ProgressHook | None = None) -> _T:
    if progress_hook is not None:  # a Blob made for this sample: no other sample shares it
        blob._progress_hook = progress_hook
    try:
        return transform(blob)
    except Exception as error:
        # Keep the user's exception type; say which blob it was about.
        note = f"azstoragetorch: raised while producing the sample for blob {blob.url}"
        if hasattr(error, "add_note"):
            error.add_note(note)
        else:  # Python 3.10
            error.args = (*error.args, note)
        raise


def _checked_hook(progress_hook: ProgressHook | None) -> ProgressHook | None:
    check_progress_hook(progress_hook)
    return progress_hook
