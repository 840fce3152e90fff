"""The reader's translation, pure: raw inotify events as plain tuples to hints, opens and watch actions.

`translate` reads one chunk of kernel events `(wd, mask, cookie, name)` against a `WatchTable`
(wd <-> directory path) and yields, in kernel order, the watch actions the shell (exporter.index.reader)
must apply before it hands the hints off; it returns the hints (`RawEvent`s) and the open items.
It touches no descriptor and no disk: the shell adds and removes the watches, and the table changes
only through the shell applying an action (or the table's own bookkeeping methods, called by the shell).
An action whose answer the translation needs (the wd the kernel gave a directory) is answered in line:
the shell sends the wd back into the generator, so a batch is translated exactly as one pass would.

Which reader invariant each part keeps (see exporter.index.reader for the whole list):
- R1: a `created` hint for a directory (made, moved in from outside, newly readable) comes after the
  `WatchTree` action for its path; a directory that cannot be watched yet is kept in `unwatched` and
  announced again at its next IN_ATTRIB (`WatchTable.attrib_announces`).
- R2: a move's destination is re-added by path (`AddWatch`); an answer other than the moved wd (or -1)
  means another directory was watched at the source: its tree is watched and announced.
- R3: an unpaired move-from of a directory ends in `Forget(subtree)`: the wds it had when it left,
  bar those (re-)added during the chunk, and the displaced wds under its path
  (`WatchTable.displaced`). A watch added while a chunk is translated says where its
  directory is after every event of the chunk, so no event of the chunk moves or forgets it; a wd
  leaves with one pending move-from only (a later move-from of the same path is another directory);
  a move whose destination answers another wd forgets the moved wds (they went on to a path not
  known yet; whatever event finds them re-adds them and announces them, R2).
- R4: one hint per path between moves, in kernel order; a paired move is one `moved` hint; an unpaired
  move-to is `created`, an unpaired move-from `deleted`.
- R7: an IN_OPEN of a file is an `open` item, never a hint; a directory's own IN_OPEN is dropped; the
  own-reads marker directory's arrivals and departures are `start`/`end` items, in kernel order.
- Overflow: IN_Q_OVERFLOW is an `overflow` item (with opens tracked) and an `Overflow` action (the shell
  watches the whole tree again and asks for a rescan).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Generator, Iterable
from dataclasses import dataclass, field

from exporter.index.events import OpenItem, RawEvent

# inotify(7) mask bits (linux/inotify.h), as watchdog's InotifyConstants has them.
IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_OPEN = 0x00000020
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ISDIR = 0x40000000

# Directories remembered as not watchable yet (EACCES); past this many the oldest is dropped.
UNWATCHED_LIMIT = 10_000

# One raw kernel event: (wd, mask, cookie, name).
RawInotify = tuple[int, int, int, bytes]


_HEADER = struct.Struct("iIII")  # struct inotify_event without its name


def parse_events(buffer: bytes) -> list[RawInotify]:
    """The events of one read(2) of an inotify descriptor, as plain tuples; as watchdog's
    read_events, events without a watch (wd -1) are dropped, bar IN_Q_OVERFLOW. A quarter of the
    cost of read_events per event (no InotifyEvent object, no generator): during a burst with
    opens tracked the kernel reports four events per file written."""
    out: list[RawInotify] = []
    add = out.append
    unpack = _HEADER.unpack_from
    end = len(buffer)
    at = 0
    while at + 16 <= end:
        wd, mask, cookie, length = unpack(buffer, at)
        start = at + 16
        at = start + length
        if wd != -1 or mask & IN_Q_OVERFLOW:
            add((wd, mask, cookie, buffer[start:at].rstrip(b"\0")))
    return out


@dataclass(slots=True)
class WatchTable:
    """Which directory each watch descriptor stands for, and back; plain dicts, changed by the shell."""

    paths: dict[int, str] = field(default_factory=dict)  # wd -> directory path
    wds: dict[str, int] = field(default_factory=dict)  # directory path -> wd
    # Directories that could not be watched (EACCES): watched at their next IN_ATTRIB (R1).
    unwatched: dict[str, None] = field(default_factory=dict)
    # Within one translated chunk: the event number at which each wd was last (re-)added (R3). Such
    # a watch was added after the chunk was read, so it says where its directory is after every event
    # of the chunk: no move or move-out in the chunk re-keys or forgets it.
    added: dict[int, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.paths)

    def record(self, path: str, wd: int, seq: int) -> None:
        """The kernel answered `wd` for a watch added at `path` during event number `seq`."""
        if self.unwatched:
            self.unwatched.pop(path, None)
        old = self.paths.get(wd)
        if old is not None and old != path and self.wds.get(old) == wd:
            del self.wds[old]
        self.paths[wd] = path
        self.wds[path] = wd
        self.added[wd] = seq

    def unwatchable(self, path: str) -> int:
        """Remember `path` for its next IN_ATTRIB; -1 (no watch)."""
        if len(self.unwatched) >= UNWATCHED_LIMIT:
            del self.unwatched[next(iter(self.unwatched))]
        self.unwatched[path] = None
        return -1

    def subtree(self, top: str) -> list[tuple[str, int]]:
        prefix = top + "/"
        return [(p, wd) for p, wd in self.wds.items() if p == top or p.startswith(prefix)]

    def displaced(self, top: str) -> list[tuple[str, int]]:
        """The wds under `top` that no path maps back to: another watch was recorded at their path
        since (`record`), so their directory had left it by then, and no move has re-keyed them."""
        prefix = top + "/"
        wds = self.wds
        return [(p, wd) for wd, p in self.paths.items() if (p == top or p.startswith(prefix)) and wds.get(p) != wd]

    def drop(self, gone: list[tuple[str, int]]) -> None:
        """Unmap a subtree that is no longer there (another directory took its path)."""
        for sub, wd in gone:
            if self.wds.get(sub) == wd:
                del self.wds[sub]
            if self.paths.get(wd) == sub:
                del self.paths[wd]

    def forget(self, gone: list[tuple[str, int]]) -> list[int]:
        """Unmap a subtree that left the models path, bar the wds (re-)added during this chunk (R3);
        returns the wds whose watches are to be removed."""
        dropped = []
        for path, wd in gone:
            if wd in self.added:
                continue  # in the tree after every event of the chunk (back in, or never the one that left)
            if self.wds.get(path) == wd:
                del self.wds[path]
            if self.paths.get(wd) == path:
                del self.paths[wd]
                dropped.append(wd)
        return dropped

    def move_tree(self, src: str, dst: str, moved: list[tuple[str, int]]) -> None:
        """A watched directory moved inside the tree: its watches (and their wds) go with it."""
        moved = [(path, wd) for path, wd in moved if wd not in self.added]  # where they are now (R3)
        for path, wd in moved:
            if self.wds.get(path) == wd:
                del self.wds[path]
        for path, wd in moved:
            new = dst + path[len(src) :]
            self.wds[new] = wd
            self.paths[wd] = new

    def ignored(self, wd: int) -> None:
        """The kernel dropped watch `wd` (its directory is gone or unmounted)."""
        path = self.paths.pop(wd, None)
        if path is not None and self.wds.get(path) == wd:
            del self.wds[path]

    def attrib_announces(self, path: str) -> bool:
        """Whether an IN_ATTRIB on this directory may have made it, or a directory in it, watchable
        (watching needs read on the directory and search on its parent; deeper ones were never listed)."""
        if path not in self.wds:
            return True
        return bool(self.unwatched) and any(p.rpartition("/")[0] == path for p in self.unwatched)


# ----- the watch actions, applied by the shell in the order they are yielded -----


@dataclass(frozen=True, slots=True)
class WatchTree:
    """Watch `path` and every directory below it (each before it is listed); answer: `path`'s wd or -1."""

    path: str
    seq: int


@dataclass(frozen=True, slots=True)
class AddWatch:
    """Add (or re-check) the watch of the directory at `path` alone; answer: its wd, or -1."""

    path: str
    seq: int


@dataclass(frozen=True, slots=True)
class MoveTree:
    """Re-key the watches of `moved` (the subtree under `src` when it moved) under `dst`."""

    src: str
    dst: str
    moved: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Forget:
    """Stop watching what left the tree: `WatchTable.forget(gone)`, then remove those watches."""

    gone: list[tuple[str, int]]


@dataclass(frozen=True, slots=True)
class Ignored:
    """Unmap watch `wd` (IN_IGNORED) and drop the shell's bookkeeping for it."""

    wd: int


@dataclass(frozen=True, slots=True)
class Overflow:
    """Events were lost: watch the whole tree again, then ask for a rescan."""

    seq: int


Action = WatchTree | AddWatch | MoveTree | Forget | Ignored | Overflow
# What `translate` returns when the chunk is done.
Translated = tuple[list[RawEvent], list[OpenItem]]


def translate(
    table: WatchTable,
    raw: Iterable[RawInotify],
    marker_wd: int = -1,
    opens_tracked: bool = False,
    fsdecode: Callable[[bytes], str] | None = None,
) -> Generator[Action, int, Translated]:
    """One chunk of kernel events to hints: one per path between moves, moves paired by cookie.
    Opens are no hints: they are returned apart, with the marker items (`marker_wd`: the own-reads
    marker directory's watch). Yields the watch actions; the shell sends back each one's answer.
    `fsdecode` turns a kernel name into a path component (the shell passes os.fsdecode)."""
    out: list[RawEvent] = []
    opens: list[OpenItem] = []
    touched: dict[str, str] = {}  # path -> created | deleted (the parent changes too) | modified
    # cookie -> (path, is_dir, its watched subtree then, the displaced wds under it then)
    moved_from: dict[int, tuple[str, bool, list[tuple[str, int]], list[tuple[str, int]]]] = {}
    # The wds taken along by a move-from still unpaired (R3): those directories are no longer at the
    # path the table still gives them, so a later move-from of that path cannot take them too.
    leaving: set[int] = set()
    paths = table.paths
    decode = fsdecode or _decode
    seq = 0

    def flush() -> None:
        out.extend(RawEvent(kind, path) for path, kind in touched.items())
        touched.clear()

    for wd, mask, cookie, name in raw:
        seq += 1
        if mask & IN_OPEN:
            # A directory's own open (listing it) has IN_ISDIR, or no name when the watched one
            # itself is opened: never use. Checked first, so an open costs two tests and an append.
            if name and not mask & IN_ISDIR:
                parent = paths.get(wd)
                if parent is not None:
                    opens.append(("open", parent + "/" + decode(name)))
            continue
        if wd == marker_wd and not mask & (IN_Q_OVERFLOW | IN_IGNORED):
            marker = decode(name)
            if marker.endswith(".json"):
                opens.append(("start" if mask & IN_MOVED_TO else "end", marker))
            continue
        if mask & IN_Q_OVERFLOW:
            # Directories made while events were lost have no watch yet: the shell adds them before the rescan.
            if opens_tracked:
                opens.append(("overflow", ""))  # opens were lost too: a gap in the tracking
            yield Overflow(seq)
            continue
        if mask & IN_IGNORED:
            yield Ignored(wd)
            continue
        parent = paths.get(wd)
        if parent is None:
            continue  # a watch we dropped (moved out); its events are stale
        path = parent + "/" + decode(name) if name else parent
        if mask & IN_MOVED_FROM:
            is_dir = bool(mask & IN_ISDIR)
            subtree = []
            displaced = []
            if is_dir:
                # What moved is what the table has at the path, bar the wds another move-from took
                # and those added during this chunk (they name where their directory is now).
                added = table.added
                subtree = [(p, w) for p, w in table.subtree(path) if w not in leaving and w not in added]
                leaving.update(w for _, w in subtree)
                # Displaced wds under the path: if this move leaves the tree they go with it; a
                # displaced directory still in the tree has its last move or announcement still to
                # read, which re-adds its watch (R2).
                displaced = [(p, w) for p, w in table.displaced(path) if w not in leaving and w not in added]
            moved_from[cookie] = (path, is_dir, subtree, displaced)
            continue
        if mask & IN_MOVED_TO:
            source = moved_from.pop(cookie, None)
            flush()
            if source is None:
                # Moved in from outside (or back in): new to us, like a create (R1).
                if mask & IN_ISDIR:
                    yield WatchTree(path, seq)
                out.append(RawEvent("created", path))
                continue
            out.append(RawEvent("moved", source[0], path))
            if source[1]:
                moved = source[2]
                leaving.difference_update(w for _, w in moved)
                yield MoveTree(source[0], path, moved)
                expected = next((w for p, w in moved if p == source[0]), -1)
                if (yield AddWatch(path, seq)) not in (expected, -1):
                    # What we watched at the source was another directory (R2): watch this
                    # one's tree and have it scanned. The moved one went on to a path we do not
                    # know: it no longer names one (its later events would name wrong paths); a
                    # later event that finds it re-adds it, announced (R2, R3).
                    yield WatchTree(path, seq)
                    out.append(RawEvent("created", path))
                    if moved:
                        yield Forget([(path + p[len(source[0]) :], w) for p, w in moved])
            continue
        if mask & IN_DELETE:
            touched[path] = "deleted"
        elif mask & IN_CREATE:
            if mask & IN_ISDIR:
                yield WatchTree(path, seq)
            touched[path] = "created"
        elif mask & IN_ATTRIB and mask & IN_ISDIR and table.attrib_announces(path):
            # Permissions changed on a directory we could not watch or read in full (R1).
            yield WatchTree(path, seq)
            touched[path] = "created"
        elif path not in touched:
            touched[path] = "modified"
    flush()
    # A move whose other half never came in this chunk left the tree: a delete.
    for path, is_dir, subtree, displaced in moved_from.values():
        if is_dir:
            yield Forget(subtree + displaced)
        out.append(RawEvent("deleted", path))
    return out, opens


def run(steps: Generator[Action, int, Translated], apply: Callable[[Action], int]) -> Translated:
    """Drive a translation: each action applied (`apply`) as it is yielded, its answer sent back."""
    try:
        action = next(steps)
        while True:
            action = steps.send(apply(action))
    except StopIteration as done:
        translated: Translated = done.value
    return translated


def _decode(name: bytes) -> str:
    """os.fsdecode where the filesystem encoding is UTF-8 (Linux, Python 3.11): bytes that are not
    UTF-8 become surrogates, so the path round-trips."""
    return name.decode("utf-8", "surrogateescape")
