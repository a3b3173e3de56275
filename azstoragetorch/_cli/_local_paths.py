"""Which local path a blob name becomes inside the destination, and which names would collide."""

from __future__ import annotations

import unicodedata
from collections.abc import Sequence

# The longest file or folder name most local file systems take, in bytes (NAME_MAX).
_NAME_MAX = 255


def local_parts(name: str) -> tuple[str, ...]:
    """The local path that the blob name ``name`` (relative to the folder being copied) becomes, one
    name per level, or ``ValueError`` saying why it has none.

    A blob name is any string, and whoever can write to a container chooses it; a local path must
    stay inside the destination. Refused: an empty name or level (a leading ``/``, ``//``, a trailing
    ``/``), ``.`` and ``..``, a backslash (a separator on Windows), NUL and other control characters,
    a level longer than 255 bytes, and a name that has one of these only after Unicode NFKC
    normalisation (fullwidth dots U+FF0E or backslash U+FF3C), which some tools and file systems apply.
    """
    if not name:
        raise ValueError("its name is empty")
    for form, how in ((name, ""), (unicodedata.normalize("NFKC", name), " after Unicode normalisation")):
        control = next((char for char in form if ord(char) < 0x20 or ord(char) == 0x7F), None)
        if control is not None:
            raise ValueError(f"its name holds the control character {control!r}{how}")
        if "\\" in form:
            raise ValueError(f"its name holds a backslash{how}, a folder separator on Windows")
        levels = form.split("/")
        if form.startswith("/"):
            raise ValueError(f"it names an absolute path{how}")
        if "" in levels:
            raise ValueError(f"its name has an empty level ('//' or a trailing '/'){how}")
        if any(level in (".", "..") for level in levels):
            raise ValueError(f"its name has a '.' or '..' level{how}")
    parts = tuple(name.split("/"))
    if any(len(part.encode("utf-8", "surrogatepass")) > _NAME_MAX for part in parts):
        raise ValueError(f"a level of its name is longer than {_NAME_MAX} bytes")
    return parts


def _collision_key(parts: Sequence[str]) -> str:
    # Names that differ only in case or Unicode form are one file on macOS and Windows, and look
    # alike everywhere: the result of a copy must not depend on the file system it lands on.
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKC", "/".join(parts)).casefold())


def local_collisions(paths: dict[str, tuple[str, ...]]) -> dict[str, str]:
    """Of ``paths`` (blob name -> local parts), those that would land on the same local file or folder
    as another, each with a reason: the same name up to case or Unicode normalisation, or a file
    that is also a folder of another blob (``a`` and ``a/b``)."""
    files: dict[str, list[str]] = {}
    folders: dict[str, list[str]] = {}
    for name, parts in paths.items():
        files.setdefault(_collision_key(parts), []).append(name)
        for depth in range(1, len(parts)):
            folders.setdefault(_collision_key(parts[:depth]), []).append(name)
    refused: dict[str, str] = {}
    for key, names in files.items():
        if len(names) > 1:
            for name in names:
                others = ", ".join(repr(other) for other in names if other != name)
                refused[name] = f"it differs only in case or Unicode form from {others}"
        for name in folders.get(key, []):
            refused[name] = f"a folder on its path is also the blob {names[0]!r}"
            for file in names:
                refused[file] = f"it is also a folder of the blob {name!r}"
    return refused
