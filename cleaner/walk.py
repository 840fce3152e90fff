"""One walk of a model on disk with lstat only: its bytes and files (each inode once), newest change, inodes.

What evicting a model frees (`freed_bytes`) is the size of each regular file whose last link goes
with it: every one of its `st_nlink` names lies inside the model. A `cp -al` twin or a model in a
hard-link farm shares its inodes with another model, so evicting it alone frees nothing of those.
The planner sizes a selected model by this rule and the run re-checks it by the same rule.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable, Sequence
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
    freed_bytes: int = 0  # bytes whose last link is inside the model (see the module docstring)


def snapshot(path: Path) -> Snapshot:
    """Walk the model with lstat only: sizes of regular files (each inode once), newest change."""
    seen: set[tuple[int, int]] = set()
    links: dict[tuple[int, int], list[int]] = {}  # inode -> [st_nlink, names seen here, size]
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
        elif stat.S_ISREG(mode):
            key = (st.st_dev, st.st_ino)
            if key not in seen:
                seen.add(key)
                total += st.st_size
                files += 1
                links[key] = [st.st_nlink, 0, st.st_size]
            links[key][1] += 1
    return Snapshot(total, files, newest, frozenset(inodes), freed_bytes(links.values()))


def freed_bytes(links: Iterable[Sequence[int]]) -> int:
    """The rule, in one place: (st_nlink, names seen inside the model, size) per inode -> bytes freed."""
    return sum(size for nlink, here, size in links if here >= nlink)


def walk_selected(path: Path, partial_suffixes: tuple[str, ...]) -> tuple[str | None, int]:
    """The planner's one walk of a selected directory model: its first partial-download entry (or
    None) and the bytes evicting it frees. scandir, plus one lstat per regular file only."""
    partial: str | None = None
    links: dict[tuple[int, int], list[int]] = {}
    pending = [str(path)]
    while pending:
        with os.scandir(pending.pop()) as entries:
            for entry in entries:
                if partial is None and entry.name.endswith(partial_suffixes):
                    partial = entry.path
                if entry.is_dir(follow_symlinks=False):
                    pending.append(entry.path)
                elif entry.is_file(follow_symlinks=False):
                    st = entry.stat(follow_symlinks=False)
                    key = (st.st_dev, st.st_ino)
                    if key not in links:
                        links[key] = [st.st_nlink, 0, st.st_size]
                    links[key][1] += 1
    return partial, freed_bytes(links.values())
