"""Our inotify reader on watchdog's low-level `InotifyFD`: raw events to `RawEvent` batches, in bulk.

watchdog's Observer builds a FileSystemEvent per inotify event and passes it through three threads
and four locked queues; that capped a burst at about 11,000 creates/s applied. Here one thread
reads the kernel queue in large chunks, keeps a wd -> directory map, pairs moves by cookie,
collapses the create/modify/close of one file into one hint, and hands each chunk over as one list.
The translation itself is pure (exporter.index.translate: tuples in, hints and watch actions out);
this module is its shell: the thread, the descriptor, the watches and listings, the hand-off.

What the reader guarantees (the updater's guarantees build on these, see exporter.index.updater):
- R1 (watch before announce): a directory is announced (a `created` hint: made, moved in from
  outside, or newly readable) only after a watch was added at its path, and its subdirectories
  found by listing it were watched too. A directory that cannot be watched yet (EACCES) is not a
  failure: it is remembered and watched, and announced again, at its next IN_ATTRIB.
- R2 (every directory ends up watched under its path): watches are added by path when an event is
  read, which can be after the directory moved on. Each directory's last announcement or move is read
  after its last rename, and each one re-adds the watch at the path it names: inotify answers with the
  directory's existing wd, so a move whose destination answers with a different wd than the one we
  moved (we had watched another directory at the source) re-watches and announces the destination.
- R3 (moves out forget only what left): a directory moved out of the tree (a move-from with no
  move-to in the same read) is forgotten by the wds it had when it left (and those a later watch at
  the same path displaced, whose directory had left that path before), except those re-added
  during the read (moved back in at once: `mv m out/x; mv out/x m` leaves m watched). A watch added
  while a read is translated was added after every event of that read, so no event of it moves or
  forgets that watch; a wd leaves with one move only (a directory made under the name it left is
  another one); a directory whose move's destination holds another one is not mapped until an
  event finds it (announced then): no wd is left naming a path that is another directory's.
- R5 (mounts): a directory covered or uncovered by a mount is another directory at the same path:
  `remount` (called by exporter.index.mounts' watcher, which sees the change) drops the old watches
  under the path and watches the new tree before the service announces it.
- R6 (no path too long): a directory whose path passes PATH_MAX is watched through an O_PATH
  descriptor opened by an openat chain (/proc/self/fd/N names it for inotify_add_watch), and listed
  through its descriptor: depth alone never makes the reader fail (exporter.index.longpath).
- R4 (no lost hints): one hint per path between moves, in kernel order; a move-from whose move-to is
  in the same read is one `moved` hint; an unpaired move-to is a `created` hint, an unpaired
  move-from a `deleted` one.
- R7 (opens apart): with opens tracked, an IN_OPEN of a file is never a hint (no lstat, no index
  work): it becomes an `open` item for exporter.index.opens, in kernel order with the own-reads marker
  directory's items (watched on the same descriptor); a directory's own IN_OPEN is dropped first.
- R8 (the initial watch and scan in one pass): the reader starts with the root watched; the initial
  scan calls `watch_ahead` for each directory it lists itself and for each subtree before a worker
  gets it, so every directory is watched before it is listed (what is written before its listing
  is in the scan, what comes after has its event) and the workers scan while the rest is watched.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable
from typing import assert_never

from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask, WatchDescriptor
from watchdog.observers.inotify_c import InotifyConstants as C

from exporter.index.events import OpenItem, RawEvent
from exporter.index.longpath import PATH_FLAGS, lstat, open_path, too_long
from exporter.index.translate import (
    Action,
    AddWatch,
    Forget,
    Ignored,
    MoveTree,
    Overflow,
    WatchTable,
    WatchTree,
    parse_events,
    run,
    translate,
)

# Reads are not events: no IN_ACCESS or IN_CLOSE_NOWRITE ever reach the kernel queue. IN_OPEN is
# added when opens are tracked (OPENS_MASK): one event per open(), none per read() or mmap page.
MASK = Mask(
    C.IN_CREATE
    | C.IN_MODIFY
    | C.IN_ATTRIB
    | C.IN_CLOSE_WRITE
    | C.IN_DELETE
    | C.IN_MOVED_FROM
    | C.IN_MOVED_TO
    | C.IN_DONT_FOLLOW
    | C.IN_ONLYDIR
    | C.IN_EXCL_UNLINK
)
# About 16,000 small events per read: few wake-ups, few GIL hand-overs during a burst.
READ_BUFFER = 512 * 1024
# A chunk much smaller than the buffer means the queue was nearly empty: wait a moment and let
# the kernel gather more (its queue holds 16,384 events, ~0.3 s of a 20,000 files/s writer).
GATHER_SECONDS = 0.01
OPENS_MASK = Mask(MASK | C.IN_OPEN)
# The own-reads marker directory (shared.own_reads): arrivals and ends of sessions only.
MARKER_MASK = Mask(C.IN_MOVED_TO | C.IN_MOVED_FROM | C.IN_DELETE | C.IN_ONLYDIR | C.IN_DONT_FOLLOW)
_CALLBACK_ID = CallbackId(1)
# Adding a watch again is how a directory is re-checked; watchdog warns each time the callback is
# already there. Ignored by one filter set once (see InotifyReader.__init__): a catch_warnings
# around every add cost a tenth of the initial scan's watching, and is not thread-safe.
_REWATCH_WARNING = r"Callback with id .* already exists for watch"
# Errors that mean "not now" for one directory, not "events can no longer be trusted" (R1).
_UNWATCHABLE = (errno.EACCES, errno.EPERM)


def _subdirs(path: str) -> list[str]:
    """Names of the subdirectories of `path` (relative to its descriptor past PATH_MAX)."""
    try:
        with os.scandir(path) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    except OSError as err:
        if not too_long(err):
            raise
    fd = open_path(path)
    try:
        with os.scandir(fd) as entries:
            return [e.name for e in entries if e.is_dir(follow_symlinks=False)]
    finally:
        os.close(fd)


class _NoCallback:
    """watchdog's bookkeeping wants a callback per watch; our reader never dispatches to it."""

    def on_event(self, event: object) -> None:
        pass

    def on_watch_deleted(self, wd: int) -> None:
        pass

    def on_queue_overflow(self) -> None:
        pass


class Handoff:
    """Bounded hand-off of event lists from the reader to the updater (the bound counts events)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._cond = threading.Condition()
        self._batches: deque[list[RawEvent]] = deque()
        self._size = 0

    def put(self, events: list[RawEvent]) -> bool:
        """False (and nothing queued) when the batch does not fit: the caller must rescan."""
        with self._cond:
            if self._size + len(events) > self.limit:
                return False
            self._batches.append(events)
            self._size += len(events)
            self._cond.notify()
            return True

    def pending(self) -> int:
        """Events queued and not yet taken."""
        with self._cond:
            return self._size

    def get(self, first_timeout: float, window: float, limit: int) -> list[RawEvent]:
        """Block up to `first_timeout` for events, then gather for `window`; at most `limit`."""
        with self._cond:
            if not self._size and not self._cond.wait_for(lambda: self._size > 0, first_timeout):
                return []
            if window > 0 and self._size < limit:
                deadline = time.monotonic() + window
                self._cond.wait_for(lambda: self._size >= limit, max(0.0, deadline - time.monotonic()))
            out: list[RawEvent] = []
            while self._batches and len(out) < limit:
                batch = self._batches.popleft()
                room = limit - len(out)
                if len(batch) > room:
                    self._batches.appendleft(batch[room:])
                    batch = batch[:room]
                out.extend(batch)
            self._size -= len(out)
            return out

    def __len__(self) -> int:
        return self._size


class InotifyReader:
    """Watches a tree recursively and feeds `Handoff` with one list of hints per kernel read."""

    def __init__(
        self,
        root: str,
        handoff: Handoff,
        on_overflow: Callable[[str], None],
        on_watch_error: Callable[[str, OSError], None],
        leaf_device: int | None = None,
        on_opens: Callable[[list[OpenItem]], None] | None = None,
        marker_dir: str | None = None,
    ) -> None:
        self.root = root
        warnings.filterwarnings("ignore", message=_REWATCH_WARNING, category=RuntimeWarning)
        # Opens of files (exporter.index.opens), in kernel order with the own-reads markers; None: not tracked.
        self._on_opens = on_opens
        self._mask = OPENS_MASK if on_opens is not None else MASK
        self._long_mask = Mask(self._mask & ~C.IN_DONT_FOLLOW)
        self._marker_dir = marker_dir if on_opens is not None else None
        self._marker_wd = -1
        self._opens: list[OpenItem] = []
        self.marker_error = ""  # why the marker directory is not watched, if it is not
        # Directories on this device with st_nlink 2 have no subdirectories (see fsinfo.COUNTS_SUBDIRS):
        # watching a tree lists only the others, not every file of a million-file store.
        self._leaf_device = leaf_device
        self._handoff = handoff
        self._on_overflow = on_overflow
        self._on_watch_error = on_watch_error
        self._fd = InotifyFD()
        self._callback = _NoCallback()
        # wd <-> directory path, read by the pure translation, changed here only.
        self._table = WatchTable()
        # The table's own dicts (never replaced), under the names the rest of the shell uses.
        self._paths = self._table.paths
        self._wds = self._table.wds
        self._map_lock = threading.Lock()  # the table: the reader's, and `rewatch` from the updater
        self._seq = 0  # the event number of the action being applied (R3)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # Events can no longer be trusted (a watch could not be added, the read failed): the service
        # polls instead. `failure` says why.
        self.failed = False
        self.failure = ""

    @property
    def watches(self) -> int:
        return len(self._paths)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self.failed

    def start(self, *, tree: bool = True) -> None:
        """Watch the root and, with `tree`, every directory under it (raises OSError when not even
        the root can be watched), then read. Without `tree` the caller watches the rest before it
        lists it (`watch_ahead`, R8)."""
        try:
            with self._map_lock:
                self._watch_tree(self.root, strict=True, subtree=tree)
                self._watch_markers()
        except OSError:
            self._fd.close()
            raise
        self._thread = threading.Thread(target=self._run, name="inotify-reader", daemon=True)
        self._thread.start()

    def _watch_markers(self) -> None:
        """Watch the own-reads marker directory on the same descriptor, so its events are ordered
        with the opens they cover. Best effort: without it, the cleaner's own opens count as use."""
        if self._marker_dir is None:
            return
        try:
            self._marker_wd = self._fd.add_callback(
                os.fsencode(self._marker_dir), MARKER_MASK, self._callback, _CALLBACK_ID
            )
        except OSError as err:
            self.marker_error = f"{self._marker_dir}: {err.strerror or err}"

    def stop(self) -> None:
        self._stop.set()
        self._fd.close()  # wakes a blocked read
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ----- watches -----

    def watch_ahead(self, path: str, subtree: bool) -> None:
        """For a scan that watches as it goes (R8): watch `path` and, with `subtree`, every directory
        below it, before the scan lists them. A watch that cannot be added fails the reader (once:
        the service polls after the scan, so the rest is not tried)."""
        if self.failed:
            return
        with self._map_lock:
            self._watch_tree(path, subtree=subtree)

    def rewatch(self, path: str) -> None:
        """Make sure `path` and everything below it is watched (and mapped) as it is now."""
        with self._map_lock:
            self._watch_tree(path)

    def remount(self, path: str) -> None:
        """A mount at `path` appeared or went: what is there now is another directory (another
        inode, often another device). Drop the watches of what was there, then watch what is."""
        with self._map_lock:
            gone = self._table.subtree(path)
            self._table.drop(gone)
            # Those of an unmounted filesystem are gone already (IN_IGNORED is on its way): no error.
            self._fd.remove_callbacks([(WatchDescriptor(wd), _CALLBACK_ID) for _, wd in gone])
            self._watch_tree(path)

    def _add_watch(self, path: str, ancestors: frozenset[int] = frozenset()) -> int:
        """The directory's wd (an existing one when it was watched already), or -1 when it is gone
        or cannot be watched yet (remembered for its next IN_ATTRIB), or is one of `ancestors`."""
        try:
            wd = self._add_callback(path)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return -1  # gone already; its delete event follows
            if err.errno in _UNWATCHABLE:
                return self._table.unwatchable(path)
            raise
        if wd < 0:
            # watchdog answers EACCES with wd -1 (and keeps a placeholder watch for it) rather than raising.
            self._fd._watch_for_wd.pop(wd, None)
            return self._table.unwatchable(path)
        if wd in ancestors:
            return -1  # a directory cycle: the scan reports it
        self._table.record(path, wd, self._seq)
        return wd

    def _add_callback(self, path: str) -> WatchDescriptor:
        try:
            return self._fd.add_callback(os.fsencode(path), self._mask, self._callback, _CALLBACK_ID)
        except OSError as err:
            if not too_long(err):
                raise
        # Past PATH_MAX (R6): watch the directory through an O_PATH descriptor's /proc entry.
        # That entry is a symlink to the directory, so it must be followed: no IN_DONT_FOLLOW (the
        # descriptor was opened O_NOFOLLOW, so the directory itself is no symlink).
        fd = open_path(path, PATH_FLAGS)
        try:
            proc = f"/proc/self/fd/{fd}".encode()
            return self._fd.add_callback(proc, self._long_mask, self._callback, _CALLBACK_ID)
        finally:
            os.close(fd)

    def _watch_tree(self, top: str, *, strict: bool = False, subtree: bool = True) -> int:
        """Watch `top` and (with `subtree`) every directory below it; a watch comes before its
        directory is listed. Returns `top`'s wd (-1: gone or not watchable)."""
        # The wds of the directories above each pending one: a directory whose wd is one of them is
        # its own ancestor (a bind mount into its own subtree) and is neither re-mapped nor listed.
        above: frozenset[int] = frozenset(
            wd for wd in (self._wds.get(top[:i]) for i, c in enumerate(top) if c == "/" and i) if wd is not None
        )
        pending = [(top, above)]
        top_wd = -1
        while pending:
            path, ancestors = pending.pop()
            try:
                wd = self._add_watch(path, ancestors)
            except OSError as err:
                if strict:
                    raise
                self._fail(path, err, "cannot add inotify watches for new directories")
                return -1
            if path == top:
                top_wd = wd
            if wd < 0 or not subtree:
                continue
            if self._leaf_device is not None and self._is_leaf(path):
                continue
            try:
                inner = ancestors | {wd}
                pending.extend((path + "/" + name, inner) for name in _subdirs(path))
            except OSError:
                continue  # unreadable or gone: the scan reports it
        return top_wd

    def _is_leaf(self, path: str) -> bool:
        """No subdirectories, by the link count. Asked after the watch was added: a subdirectory
        made since then has its own create event, which adds its watch."""
        try:
            st = lstat(path)
        except OSError:
            return False  # the listing says what is wrong, or finds it gone
        return st.st_nlink == 2 and st.st_dev == self._leaf_device

    # ----- reading -----

    def _fail(self, path: str, err: OSError, why: str) -> None:
        """From here on events are missed: report it and let the service poll instead."""
        if self._stop.is_set():
            return  # stopping: the descriptor was closed on purpose
        self.failure = f"{why}: {err.strerror or err}"
        self.failed = True
        self._on_watch_error(path, err)

    def _run(self) -> None:
        try:
            self._read()
        except Exception as err:
            # A bug in translating must not leave the index silently stale either.
            self._fail(self.root, OSError(errno.EIO, f"{type(err).__name__}: {err}"), "inotify reader failed")

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                # Parsed here, not by read_events (see parse_events).
                events = parse_events(self._fd._read_event_buffer(event_buffer_size=READ_BUFFER))
            except OSError as err:
                self._fail(self.root, err, "inotify read failed")
                return
            if not events:
                # watchdog reads a closed or invalid descriptor (EBADF) as no events, at once and
                # forever: unless we are stopping, nothing will ever come again.
                self._fail(self.root, OSError(errno.EBADF, "inotify descriptor closed"), "inotify read failed")
                return
            with self._map_lock:
                hints = self.translate(events)
            opens = self.take_opens()
            if opens and self._on_opens is not None:
                self._on_opens(opens)
            if hints and not self._handoff.put(hints):
                self._on_overflow("handoff_queue_full")
            if len(events) < 256:
                self._stop.wait(GATHER_SECONDS)

    def take_opens(self) -> list[OpenItem]:
        """The opens and marker items the last `translate` found, in kernel order."""
        opens, self._opens = self._opens, []
        return opens

    def translate(self, raw: Iterable[tuple[int, int, int, bytes]]) -> list[RawEvent]:
        """One chunk of kernel events to hints (exporter.index.translate), its watch actions applied
        in order as they come; the opens and marker items go to `take_opens`."""
        self._table.added.clear()
        steps = translate(self._table, raw, self._marker_wd, self._on_opens is not None, os.fsdecode)
        hints, opens = run(steps, self._apply)
        if opens:
            self._opens.extend(opens)
        return hints

    def _apply(self, action: Action) -> int:
        """Carry out one watch action of the translation; the answer it asks for (a wd), else -1."""
        if isinstance(action, WatchTree):
            self._seq = action.seq
            return self._watch_tree(action.path)
        if isinstance(action, AddWatch):
            self._seq = action.seq
            return self._add_watch(action.path)
        if isinstance(action, MoveTree):
            self._table.move_tree(action.src, action.dst, action.moved)
        elif isinstance(action, Forget):
            dropped = self._table.forget(action.gone)
            self._fd.remove_callbacks([(WatchDescriptor(wd), _CALLBACK_ID) for wd in dropped])
        elif isinstance(action, Ignored):
            self._table.ignored(action.wd)
            self._fd.remove_callbacks([(WatchDescriptor(action.wd), _CALLBACK_ID)])
        elif isinstance(action, Overflow):
            # Directories made while events were lost have no watch yet: add them before the rescan.
            self._seq = action.seq
            self._watch_tree(self.root)
            self._on_overflow("inotify_queue_overflow")
        else:
            assert_never(action)
        return -1
