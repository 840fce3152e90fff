"""Whether a run may change the models path: a read-only or unwritable one stops it before anything moves.

Without this check, a rename out of a read-only mount fails with EXDEV (as renames between mounts
do), the copy fallback copies the whole model into the trash, and deleting the original then
fails: disk use doubles and nothing is freed. This is how the exporter's container sees the models
(mounted read-only), so a cleanup the API starts there must refuse, not half-act.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cleaner.plan_values import Eviction
from shared.errors import PreconditionError
from shared.layout import Layout


@dataclass(frozen=True, slots=True)
class Place:
    """What the run needs to know about one directory it would change."""

    path: Path
    read_only: bool  # on a filesystem mounted read-only (statvfs ST_RDONLY)
    writable: bool  # this user may add and remove entries (access W_OK | X_OK)


def problem(places: Sequence[Place]) -> str | None:
    """Why the run cannot change these places, or None when it can. Pure."""
    for place in places:
        if place.read_only:
            return f"{place.path} is on a read-only mount"
        if not place.writable:
            return f"{place.path} is not writable by this user"
    return None


def places_to_check(models_path: Path, layout: Layout, evictions: Sequence[Eviction]) -> list[Path]:
    """The models path first, then each tier directory and model the plan would change, once each. Pure.

    Only the mount of the models path matters (an eviction changes the tier directory, not it: a
    root-owned models path over tiers the cleaner's user owns is fine); see `probe`'s `need_write`.
    """
    paths = [models_path]
    for eviction in evictions:
        tier_dir = models_path / layout.dir_for_tier(eviction.tier)
        paths += [tier_dir, tier_dir / eviction.model]
    return list(dict.fromkeys(paths))


def probe(
    path: Path,
    statvfs: Callable[[Path], os.statvfs_result] = os.statvfs,
    access: Callable[[Path, int], bool] = os.access,
    *,
    need_write: bool = True,
) -> Place | None:
    """The facts about one path; None when there is nothing to judge here.

    A missing path changes nothing, and a symlink is never followed: verification skips a model
    that is one, so the filesystem it points to must not stop the whole run.
    """
    try:
        mode = os.lstat(path).st_mode
        flags = statvfs(path).f_flag
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(mode):
        return None
    # A file's own mode does not decide whether it can be moved or removed (its directory's does,
    # checked as the tier directory); a directory's does, as the copying modes empty it.
    writable = access(path, os.W_OK | os.X_OK) if need_write and stat.S_ISDIR(mode) else True
    return Place(path, bool(flags & os.ST_RDONLY), writable)


def require_writable(paths: Sequence[Path], probe_path: Callable[..., Place | None] = probe) -> None:
    """Raise PreconditionError (exit 4) when the run could not finish what it starts in these places.

    The first path is the models path: only its mount is judged (see `places_to_check`).
    """
    probed = [probe_path(path, need_write=index > 0) for index, path in enumerate(paths)]
    places = [place for place in probed if place is not None]
    why = problem(places)
    if why is not None:
        raise PreconditionError(
            f"cannot run: {why}, so an evicted model could not be removed from it; nothing was changed",
            hint="run the cleaner where the models path is mounted read-write; plan and run --dry-run work read-only",
        )
