"""The arguments the datasets' constructors share, described once: :func:`_describe_arguments` fills
them into each constructor's docstring, in the order of its signature."""

from __future__ import annotations

import inspect
import textwrap
from collections.abc import Callable
from typing import TypeVar

_Method = TypeVar("_Method", bound=Callable[..., object])

# Where a docstring's "Args:" section lists the method's arguments.
_MARKER = "{arguments}"
_WIDTH = 108

_DESCRIPTIONS = {
    "blob_urls": "One blob URL or an iterable of them. A URL may carry a SAS token, a ``snapshot=`` or a "
    "``versionid=``.",
    "container_url": "``https://<account>.blob.core.windows.net/<container>``, optionally with a SAS token that "
    "allows listing and reading.",
    "prefix": "Only blobs whose names start with it; all blobs when ``None``.",
    "credential": "As for :class:`~azstoragetorch.io.BlobIO`; ignored for a URL that carries a SAS token.",
    "transform": "Turns a :class:`Blob` into a sample; the default returns its URL and bytes.",
    "retry": "How throttled or briefly failing requests are retried, listing and reading alike: a "
    ":class:`~azstoragetorch.retry.RetryOptions`; ``None`` for its defaults.",
    "cache_dir": "A local directory in which the default sample (and :meth:`Blob.read`) keeps each blob it "
    "reads, for later epochs; DataLoader workers and the ranks of a node may share one. Every hit is "
    "confirmed with the service by a conditional read (one request, no transfer). ``None`` (the default): "
    "no cache. ``~`` is expanded; a folder that another user could change is refused with a warning. See "
    ":ref:`dataset-cache`.",
    "cache_max_bytes": "The most bytes the cache holds; the least recently used blobs are deleted beyond it. "
    "``None``: no limit but the disk.",
    "cache_trust_listing": "Serve a cached blob whose ETag is the listing's with no request at all, at "
    "local-disk speed; a blob rewritten after the listing is then served as it was listed. ``False`` (the "
    "default): confirm every hit with the service.",
    "shuffle": "Visit the blobs in a random order, drawn from ``seed`` and the epoch.",
    "seed": "The shuffling seed; use the same one on every rank.",
    "prefetch": "The most samples fetched ahead of the consumer, per worker (1 to 128).",
    "balance_ranks": "Give every :mod:`torch.distributed` rank the same number of samples, with up to "
    '``world_size - 1`` repeats (see "Training with DDP" above).',
    "progress_hook": "A callable ``hook(bytes_done, bytes_total)`` given every read of a sample's blob (see "
    '"Progress" above).',
}


def _describe_arguments(method: _Method) -> _Method:
    """Replace the ``{arguments}`` line of ``method``'s docstring with a description of each of its
    keyword arguments and its first positional one, in the signature's order."""
    if method.__doc__ is None:  # python -OO
        return method
    lines = method.__doc__.splitlines()
    at = next((number for number, line in enumerate(lines) if line.strip() == _MARKER), None)
    if at is None:
        raise AssertionError(f"{method.__qualname__}'s docstring has no {_MARKER} line")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    parameters = [name for name in inspect.signature(method).parameters if name not in ("self", "cls")]
    described = []
    for name in parameters:
        if name not in _DESCRIPTIONS:
            raise AssertionError(f"{method.__qualname__} has an argument {name!r} that _DESCRIPTIONS lacks")
        described += textwrap.wrap(
            f"{name}: {_DESCRIPTIONS[name]}",
            _WIDTH,
            initial_indent=indent,
            subsequent_indent=indent + "    ",
            break_on_hyphens=False,
        )
    method.__doc__ = "\n".join([*lines[:at], *described, *lines[at + 1 :]])
    return method
