"""The scrub's decisions, pure: what differs between one indexed directory and its listing, when to
leave a difference to the events still on their way, how fast to go, and how much to log.

No I/O, no clock, no threads here: the scrub thread (exporter/index/scrub.py) passes in what it listed,
what the index held, and the time.

A difference is only ever a *name* to look at again: the scrub never writes what it listed into
the index. The updater re-lstats the name (or scans it, when it is a new directory) and the index
takes what that lstat says, as for any event. So a listing that went stale before it was used can
cost one lstat, never a stale value in the index (see exporter/index/scrub.py for the full invariant).
"""

from __future__ import annotations

from dataclasses import dataclass

from exporter.index.tree import BLOCK_BYTES, DirNode, Parts, Tree

# A regular file as the scrub compares it: (st_size, st_blocks). Allocation can change with no
# event at all (delayed allocation, compression or deduplication at writeback), so it is compared
# as well: the scrub is what keeps allocated bytes true on such filesystems.
Sizes = tuple[int, int]


@dataclass(frozen=True, slots=True)
class Listing:
    """What a directory holds on disk, from listdir and one lstat per name (sets and dicts, so an
    exact directory compares with its index copy in C)."""

    files: dict[str, Sizes]  # regular files: name -> (st_size, st_blocks)
    linked: frozenset[str]  # regular files with st_nlink > 1 (the index counts such a file once per inode)
    dirs: frozenset[str]
    others: frozenset[str]  # symlinks, sockets, fifos: never counted
    changed: float  # the directory's own max(mtime, ctime): a name came or went then


@dataclass(frozen=True, slots=True)
class DirView:
    """What the index holds for one directory: copied under the index lock, compared outside it."""

    files: dict[str, Sizes]
    linked: frozenset[str]
    dirs: tuple[str, ...]

    @classmethod
    def of(cls, node: DirNode) -> DirView:
        # Never `node.files.get(name)` per name: it builds the table's name index, which costs
        # ~100 bytes a file for as long as the directory lives.
        table = node.files
        files = dict(zip(table.name_list(), zip(table.sizes, table.blocks, strict=True), strict=True))
        return cls(files, frozenset(node.hard or ()), tuple(node.dirs))


@dataclass(frozen=True, slots=True)
class Difference:
    """A name whose index entry disagrees with the listing; `index` and `disk` say how, for the log."""

    name: str
    index: str
    disk: str


def _describe_index(view: DirView, name: str) -> str:
    if name in view.dirs:
        return "directory"
    sizes = view.files.get(name)
    if sizes is None:
        return "absent"
    return _describe_file(sizes) + (" (linked)" if name in view.linked else "")


def _describe_file(sizes: Sizes) -> str:
    return f"file {sizes[0]} bytes, {sizes[1] * BLOCK_BYTES} allocated"


def _describe_disk(disk: Listing, name: str) -> str:
    if name in disk.dirs:
        return "directory"
    if name in disk.others:
        return "not a regular file"
    sizes = disk.files.get(name)
    if sizes is None:
        return "absent"
    return _describe_file(sizes) + (" (linked)" if name in disk.linked else "")


def compare(view: DirView, disk: Listing) -> list[Difference]:
    """Names whose kind, size, allocation or being hard-linked differ, in either direction. A directory's
    contents are its own visit's business: here only that it exists."""
    dirs = frozenset(view.dirs)
    if view.files == disk.files and view.linked == disk.linked and dirs == disk.dirs:
        return []  # the common case, in C: everything agrees (others are never indexed)
    names = set(view.files).union(dirs, disk.files, disk.dirs)
    found: list[Difference] = []
    for name in sorted(names):
        index_size = view.files.get(name)
        disk_size = disk.files.get(name)
        same = (
            (name in dirs) == (name in disk.dirs)
            and index_size == disk_size
            and (name in view.linked) == (name in disk.linked)
        )
        if not same:
            found.append(Difference(name, _describe_index(view, name), _describe_disk(disk, name)))
    return found


def recent(times: dict[str, float], dir_changed: float, now: float, grace: float) -> bool:
    """Whether a difference may be an event still on its way: the directory (a name came or went)
    or a differing entry (`times`: its max(mtime, ctime)) changed less than `grace` seconds ago."""
    since = now - grace
    return dir_changed >= since or any(changed >= since for changed in times.values())


def held(tree: Tree, parts: Parts) -> tuple[int, int, int]:
    """(bytes, files, allocated bytes) the index counts at `parts`: a file's, a directory's subtree,
    or nothing. A hard-linked file counts its sizes at each of its paths here (the totals count it once)."""
    found = tree.lookup(parts)
    if found is None:
        return 0, 0, 0
    if isinstance(found, DirNode):
        nbytes = nfiles = nallocated = 0
        for node in found.walk():
            nbytes += node.own_bytes
            nfiles += node.own_files
            nallocated += node.own_allocated
        return nbytes, nfiles, nallocated
    parent = tree.lookup(parts[:-1])
    assert isinstance(parent, DirNode)
    return found, 1, parent.files.blocks_of(parts[-1]) * BLOCK_BYTES


class Pacer:
    """A budget in stats per second: how long to wait after spending some. Credit left unused for
    more than `burst` seconds is dropped, so a pause is never followed by a burst."""

    def __init__(self, per_second: float, burst: float = 1.0) -> None:
        self.per_second = per_second
        self.burst = burst
        self._due: float | None = None

    def charge(self, stats: int, now: float) -> float:
        """Spend `stats` at `now`; the seconds to wait before spending more."""
        due = self._due if self._due is not None else now
        due = max(due, now - self.burst) + stats / self.per_second
        self._due = due
        return max(0.0, due - now)


class BacklogYield:
    """How long the scrub waits for a backlog of events before its next directory: steps of `step`
    seconds while events are queued, at most `share` of a cycle's expected time in all per cycle.

    A directory being written differs from the index only until its events are applied; listing it
    meanwhile finds differences that the events settle anyway, and competes with the updater for
    the interpreter during the burst. The allowance keeps a steady stream of events from holding a
    cycle back without end: a cycle takes at most (1 + share) times its expected time, under the
    staleness alert's 3x."""

    def __init__(self, step: float = 0.05, share: float = 1.0) -> None:
        self.step = step
        self.share = share
        self._left = 0.0

    def start_cycle(self, expected_seconds: float) -> None:
        self._left = expected_seconds * self.share

    def wait(self, backlog: bool) -> float:
        """Seconds to wait now (0: go on)."""
        if not backlog or self._left <= 0:
            return 0.0
        step = min(self.step, self._left)
        self._left -= step
        return step


class LogBudget:
    """At most `per_minute` lines a minute; the rest are counted and reported with the next line."""

    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self._window = float("-inf")
        self._used = 0
        self.suppressed = 0

    def allow(self, now: float) -> bool:
        if now - self._window >= 60.0:
            self._window = now
            self._used = 0
        if self._used < self.per_minute:
            self._used += 1
            return True
        self.suppressed += 1
        return False

    def take_suppressed(self) -> int:
        count, self.suppressed = self.suppressed, 0
        return count
