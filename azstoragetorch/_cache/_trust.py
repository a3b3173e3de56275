"""Whether the cache directory, and every name on the way to it, could be changed by another user."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from typing import NamedTuple

from azstoragetorch._cache._files import _NO_LINKS

# Symbolic links followed on the way to the directory before it counts as a loop (Linux's limit).
_MAX_LINKS = 40


class _Refused(Exception):
    """The cache directory, or the way to it, could be changed by another user."""


class _Verdict(NamedTuple):
    """What checking the folder found, carried to other processes by pickling."""

    node: str  # the machine that checked: a verdict sent elsewhere is of another folder
    identity: tuple[int, int] | None  # (st_dev, st_ino) of the accepted folder
    refusal: str | None  # why it is not used, if it is not


def _node() -> str:
    return os.uname().nodename if hasattr(os, "uname") else ""


def _open_directory(directory: str, *, create: bool = True) -> int:
    """A descriptor of ``directory`` (absolute), created with mode 0o700 where it is missing (with
    ``create``), once it and the way to it are safe (see the package's "Trust"); raises
    :class:`_Refused` if not."""
    if os.name != "posix" or os.open not in os.supports_dir_fd or not hasattr(os, "O_NOFOLLOW"):
        raise _Refused("this platform cannot open files without following symbolic links")
    uid = os.geteuid()
    # Walked one name at a time, following links by hand, so that every directory passed through and
    # every link followed is checked (realpath would hide a link in a directory others can write).
    todo = directory.split("/")[::-1]
    current = "/"
    found = _lstat_safe("/", uid)
    links = 0
    while todo:
        part = todo.pop()
        if part in ("", "."):
            continue
        if part == "..":
            current = os.path.dirname(current)  # a resolved path: lexical is right here
            found = os.lstat(current)
            continue
        path = os.path.join(current, part)
        try:
            found = _lstat_safe(path, uid)
        except FileNotFoundError:
            if not create:
                raise
            # Only the user can add to a safe directory, except a sticky one (/tmp), where another
            # user may have made it first: then it is theirs, and the checks below refuse it.
            with contextlib.suppress(FileExistsError):
                os.mkdir(path, 0o700)
            found = _lstat_safe(path, uid)
        if stat.S_ISLNK(found.st_mode):
            links += 1
            if links > _MAX_LINKS:
                raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path)
            target = os.readlink(path)
            if target.startswith("/"):
                current = "/"
            todo.extend(target.split("/")[::-1])
            continue
        if not stat.S_ISDIR(found.st_mode):
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), path)
        if found.st_mode & 0o022 and not found.st_mode & stat.S_ISVTX:
            raise _Refused(_writable_by_others(path, found))  # another user could rename what it holds
        current = path
    fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | _NO_LINKS)
    try:
        opened = os.fstat(fd)
        if (opened.st_dev, opened.st_ino) != (found.st_dev, found.st_ino):
            raise _Refused(f"{current} was replaced while it was checked")
        if opened.st_uid != uid:
            raise _Refused(f"{current} is owned by uid {opened.st_uid}, not by this user (uid {uid})")
        if opened.st_mode & 0o022:  # sticky or not: another user could add files to it
            raise _Refused(_writable_by_others(current, opened))
    except BaseException:
        os.close(fd)
        raise
    return fd


def _writable_by_others(path: str, found: os.stat_result) -> str:
    mode = stat.S_IMODE(found.st_mode)
    return f"{path} can be written by its group or by others (mode {mode:#o}); 'chmod go-w {path}' makes it safe"


def _lstat_safe(path: str, uid: int) -> os.stat_result:
    """``os.lstat(path)``, if the user or root owns it: only they may choose what a name on the way
    to the cache stands for."""
    found = os.lstat(path)
    if found.st_uid not in (uid, 0):
        raise _Refused(f"{path} is owned by uid {found.st_uid}, not by this user (uid {uid}) or root")
    return found
