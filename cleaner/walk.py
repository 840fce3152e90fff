"""One walk of a model on disk with lstat only: its bytes and files (each inode once), newest change, inodes."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

Inode = tuple[int, int, int]  # (major, minor, inode number) as /proc/locks and maps spell them


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a model is on disk now."""

    bytes: int
    files: int
    newest_change: float  # newest mtime/ctime of the model and everything in it
    inodes: frozenset[Inode] = frozenset()


def snapshot(path: Path) -> Snapshot:
    """Walk the model with lstat only: sizes of regular files (each inode once), newest change."""
    seen: set[tuple[int, int]] = set()
    inodes: set[Inode] = set()
    total = files = 0
    newest = 0.0
    stack = [path]
    while stack:
        current = stack.pop()
        try:
            st = os.lstat(current)
        except FileNotFoundError:
            continue
        mode = st.st_mode
        inodes.add((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino))
        if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
            newest = max(newest, st.st_mtime, st.st_ctime)
        if stat.S_ISDIR(mode):
            try:
                stack.extend(Path(entry.path) for entry in os.scandir(current))
            except FileNotFoundError:
                continue
        elif stat.S_ISREG(mode) and (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
            files += 1
    return Snapshot(total, files, newest, frozenset(inodes))
