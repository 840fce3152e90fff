"""Paths longer than PATH_MAX: the system calls the index needs, by directory descriptors.

A path-based call fails with ENAMETOOLONG once a path passes PATH_MAX (4096 bytes), yet a tree can
nest that deep (every name is short; only the whole is long). Each function here first tries the
plain call, which is what every path under the limit takes at no extra cost, and only on
ENAMETOOLONG opens the path in pieces below the limit, each relative to the previous one's
descriptor (openat chains), and works relative to the last. Symlinks are never followed in the last
component, as with the plain calls.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

# Pieces well under PATH_MAX (4096, counting the terminating NUL).
PIECE_BYTES = 3000
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
PATH_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def too_long(err: OSError) -> bool:
    return err.errno == errno.ENAMETOOLONG


def _pieces(path: str) -> list[str]:
    """`path` cut at slashes into pieces of at most PIECE_BYTES; the first keeps a leading '/'."""
    names = [name for name in path.split("/") if name]
    pieces: list[str] = []
    current = "/" if path.startswith("/") else ""
    for name in names:
        size = len(os.fsencode(name))
        if size > PIECE_BYTES:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), path)
        if current and current != "/" and len(os.fsencode(current)) + 1 + size > PIECE_BYTES:
            pieces.append(current)
            current = name
        else:
            current = current + name if current in ("", "/") else current + "/" + name
    if current:
        pieces.append(current)
    return pieces


def open_path(path: str, flags: int = DIR_FLAGS) -> int:
    """os.open(path, flags), also when `path` is longer than PATH_MAX (intermediate pieces are
    opened O_PATH and closed). The caller closes the descriptor."""
    try:
        return os.open(path, flags)
    except OSError as err:
        if not too_long(err):
            raise
    pieces = _pieces(path)
    fd = os.open(pieces[0], PATH_FLAGS)
    try:
        for piece in pieces[1:-1]:
            child = os.open(piece, PATH_FLAGS, dir_fd=fd)
            os.close(fd)
            fd = child
        return os.open(pieces[-1], flags, dir_fd=fd) if len(pieces) > 1 else os.open(pieces[0], flags)
    finally:
        os.close(fd)


def in_parent(path: str, call: Callable[[str, int], T]) -> T:
    """`call(name, parent_fd)` for the last component of a path too long for a plain call."""
    parent, _, name = path.rstrip("/").rpartition("/")
    fd = open_path(parent or "/", PATH_FLAGS)
    try:
        return call(name, fd)
    finally:
        os.close(fd)


def lstat(path: str) -> os.stat_result:
    """os.lstat, past PATH_MAX too."""
    try:
        return os.lstat(path)
    except OSError as err:
        if not too_long(err):
            raise
    return in_parent(path, lambda name, fd: os.stat(name, dir_fd=fd, follow_symlinks=False))
