"""Mounts at and under the models path: which are there, and a thread that reports when they change.

The index counts across mounts (what `du -sb` counts): a filesystem mounted on a directory inside
the models path is part of the tree, its files counted and its directories watched. mount() and
umount() produce no inotify event on the directory they cover or uncover, so the mount table is
watched instead: /proc/self/mountinfo is pollable (the kernel flags POLLPRI|POLLERR on it when this
mount namespace's table changes), and a poll wakes the watcher within milliseconds of the change.

What the watcher guarantees:
- M1 (every change is reported): a mount point at or under the root whose set of mount ids changed
  (mounted, unmounted, or one replaced by another between two reads) is reported once per read
  that saw it change; a path below another reported path is not reported again (the outer one's
  rescan covers it).
- M2 (report after the change): the table is read after the kernel flagged the change, so what
  the callback does with the path (watch it, scan it) sees the new mount.
- M3 (a replacement that left no trace): the kernel reuses a freed mount id, and a tmpfs mounted
  again where one was unmounted has the very same mountinfo line, so an unmount and a mount between
  two reads can leave the table unchanged. When the kernel flagged a change and the whole table
  (every line, not only those under the root) reads exactly as before, every mount point strictly
  below the root is reported (outermost only), since any of them may have been replaced. A change
  elsewhere in the system changes some line, so it costs nothing here.
"""

from __future__ import annotations

import contextlib
import select
import threading
import time
from collections.abc import Callable

MOUNTINFO = "/proc/self/mountinfo"
# Without a poll flag (or if one were missed), the table is read again this often anyway.
REREAD_SECONDS = 5.0

# (mount point, identity): the identity is the mount id, the device and the root of the mount within
# its filesystem, so a bind mount of another directory of the same filesystem is another mount even
# where the kernel handed it the freed id.
MountTable = frozenset[tuple[str, str]]


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as three octal digits."""
    if "\\" not in field:
        return field
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mounts_under(mountinfo: str, root: str) -> MountTable:
    """(mount point, identity) of every mount at `root` or below it."""
    prefix = root.rstrip("/") + "/"
    found = set()
    for line in mountinfo.splitlines():
        fields = line.split(" ", 5)
        if len(fields) < 5:
            continue
        point = _unescape(fields[4])
        if point == root or point.startswith(prefix):
            found.add((point, f"{fields[0]} {fields[2]} {fields[3]}"))
    return frozenset(found)


def changed_points(old: MountTable, new: MountTable) -> list[str]:
    """Mount points whose mounts differ, outermost only, in order (M1)."""
    points = sorted({point for point, _ in old ^ new})
    out: list[str] = []
    for point in points:
        if any(point == top or point.startswith(top.rstrip("/") + "/") for top in out):
            continue
        out.append(point)
    return out


def read_mountinfo() -> str | None:
    try:
        with open(MOUNTINFO) as handle:
            return handle.read()
    except OSError:
        return None


def points_to_report(old: MountTable, new: MountTable, root: str, *, flagged_unchanged: bool) -> list[str]:
    """What a read reports: the points whose mounts differ (M1), or, when the kernel flagged a change
    that left the whole table as it was, every point below the root (M3)."""
    if not flagged_unchanged:
        return changed_points(old, new)
    inner = frozenset(entry for entry in new if entry[0] != root)
    return changed_points(frozenset(), inner)


class MountWatcher:
    """Calls `on_change(path)` for each mount point at or under `root` whose mounts changed."""

    def __init__(self, root: str, on_change: Callable[[str], None], stop: threading.Event) -> None:
        self.root = root
        self._on_change = on_change
        self._stop = stop
        self._text = read_mountinfo()
        self._table = mounts_under(self._text, root) if self._text is not None else frozenset()
        self._thread: threading.Thread | None = None
        self._last = time.monotonic()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mount-watcher", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def has_inner(self) -> bool:
        """Whether something is mounted strictly below the root (where a bind mount can make a cycle)."""
        return any(point != self.root for point, _ in self._table)

    def check(self, *, flagged: bool = False) -> list[str]:
        """Read the table now and report what changed since the last read (`flagged`: the kernel
        said the table changed, M3)."""
        text = read_mountinfo()
        if text is None:
            return []
        table = mounts_under(text, self.root)
        unchanged = flagged and text == self._text
        changed = points_to_report(self._table, table, self.root, flagged_unchanged=unchanged)
        self._table, self._text = table, text
        for point in changed:
            self._on_change(point)
        return changed

    def _run(self) -> None:
        try:
            handle = open(MOUNTINFO, "rb")  # noqa: SIM115 - held open for the thread's life
        except OSError:
            handle = None
        poller = select.poll()
        if handle is not None:
            poller.register(handle.fileno(), select.POLLPRI | select.POLLERR)
        try:
            while not self._stop.is_set():
                # A flagged change stays flagged until the file is read again from its start.
                ready = poller.poll(min(REREAD_SECONDS, 1.0) * 1000) if handle is not None else []
                if self._stop.is_set():
                    return
                if ready and handle is not None:
                    handle.seek(0)
                    with contextlib.suppress(OSError):
                        while handle.read(65536):
                            pass
                    self.check(flagged=True)
                elif not ready and self._due():
                    self.check()
        finally:
            if handle is not None:
                handle.close()

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self._last >= REREAD_SECONDS:
            self._last = now
            return True
        return False
