"""Our inotify reader on watchdog's low-level `InotifyFD`: raw events to `RawEvent` batches, in bulk.

watchdog's Observer builds a FileSystemEvent per inotify event and passes it through three threads
and four locked queues; that capped a burst at about 11,000 creates/s applied. Here one thread
reads the kernel queue in large chunks, keeps a wd -> directory map, pairs moves by cookie,
collapses the create/modify/close of one file into one hint, and hands each chunk over as one list.
"""

from __future__ import annotations

import errno
import os
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable

from watchdog.observers.inotify_c import CallbackId, InotifyFD, Mask, WatchDescriptor
from watchdog.observers.inotify_c import InotifyConstants as C

from exporter.watcher import RawEvent

# Reads are not events: no IN_OPEN, IN_ACCESS or IN_CLOSE_NOWRITE ever reach the kernel queue.
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
_CALLBACK_ID = CallbackId(1)
_IN_Q_OVERFLOW = C.IN_Q_OVERFLOW
_IN_IGNORED = C.IN_IGNORED
_IN_ISDIR = C.IN_ISDIR
_IN_CREATE = C.IN_CREATE
_IN_DELETE = C.IN_DELETE
_IN_MOVED_FROM = C.IN_MOVED_FROM
_IN_MOVED_TO = C.IN_MOVED_TO


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
    ) -> None:
        self.root = root
        # Directories on this device with st_nlink 2 have no subdirectories (see fsinfo.COUNTS_SUBDIRS):
        # watching a tree lists only the others, not every file of a million-file store.
        self._leaf_device = leaf_device
        self._handoff = handoff
        self._on_overflow = on_overflow
        self._on_watch_error = on_watch_error
        self._fd = InotifyFD()
        self._callback = _NoCallback()
        self._paths: dict[int, str] = {}  # wd -> directory path
        self._wds: dict[str, int] = {}  # directory path -> wd
        self._map_lock = threading.Lock()  # the maps: the reader's, and `rewatch` from the updater
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

    def start(self) -> None:
        """Watch every directory under the root (raises OSError when not even that works), then read."""
        try:
            with self._map_lock:
                self._watch_tree(self.root, strict=True)
        except OSError:
            self._fd.close()
            raise
        self._thread = threading.Thread(target=self._run, name="inotify-reader", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._fd.close()  # wakes a blocked read
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ----- watches -----

    def rewatch(self, path: str) -> None:
        """Make sure `path` and everything below it is watched (and mapped) as it is now."""
        with self._map_lock:
            self._watch_tree(path)

    def _add_watch(self, path: str) -> bool:
        try:
            with warnings.catch_warnings():
                # Adding an existing watch is how we re-check it; watchdog warns about that.
                warnings.simplefilter("ignore", RuntimeWarning)
                wd = self._fd.add_callback(os.fsencode(path), MASK, self._callback, _CALLBACK_ID)
        except OSError as err:
            if err.errno in (errno.ENOENT, errno.ENOTDIR):
                return False  # gone already; its delete event follows
            raise
        old = self._paths.get(wd)
        if old is not None and old != path and self._wds.get(old) == wd:
            del self._wds[old]
        self._paths[wd] = path
        self._wds[path] = wd
        return True

    def _watch_tree(self, top: str, *, strict: bool = False) -> None:
        """Watch `top` and every directory below it; a watch comes before its directory is listed."""
        pending = [top]
        while pending:
            path = pending.pop()
            try:
                if not self._add_watch(path):
                    continue
            except OSError as err:
                if strict:
                    raise
                self._fail(path, err, "cannot add inotify watches for new directories")
                return
            if self._leaf_device is not None and self._is_leaf(path):
                continue
            try:
                with os.scandir(path) as entries:
                    pending.extend(e.path for e in entries if e.is_dir(follow_symlinks=False))
            except OSError:
                continue  # unreadable or gone: the scan reports it

    def _is_leaf(self, path: str) -> bool:
        """No subdirectories, by the link count. Asked after the watch was added: a subdirectory
        made since then has its own create event, which adds its watch."""
        try:
            st = os.lstat(path)
        except OSError:
            return False  # the listing says what is wrong, or finds it gone
        return st.st_nlink == 2 and st.st_dev == self._leaf_device

    def _forget_tree(self, top: str) -> None:
        """Stop watching a subtree that left the models path (a watch follows its inode)."""
        prefix = top + "/"
        gone = [(p, wd) for p, wd in self._wds.items() if p == top or p.startswith(prefix)]
        for path, wd in gone:
            del self._wds[path]
            self._paths.pop(wd, None)
        self._fd.remove_callbacks([(WatchDescriptor(wd), _CALLBACK_ID) for _, wd in gone])

    def _move_tree(self, src: str, dst: str) -> None:
        """A watched directory moved inside the tree: its watches (and their wds) go with it."""
        prefix = src + "/"
        moved = [(p, wd) for p, wd in self._wds.items() if p == src or p.startswith(prefix)]
        for path, _wd in moved:
            del self._wds[path]
        for path, wd in moved:
            new = dst + path[len(src) :]
            self._wds[new] = wd
            self._paths[wd] = new

    def _ignored(self, wd: int) -> None:
        path = self._paths.pop(wd, None)
        if path is not None and self._wds.get(path) == wd:
            del self._wds[path]
        self._fd.remove_callbacks([(WatchDescriptor(wd), _CALLBACK_ID)])

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
                events = self._fd.read_events(event_buffer_size=READ_BUFFER)
            except OSError as err:
                self._fail(self.root, err, "inotify read failed")
                return
            if not events:
                # watchdog reads a closed or invalid descriptor (EBADF) as no events, at once and
                # forever: unless we are stopping, nothing will ever come again.
                self._fail(self.root, OSError(errno.EBADF, "inotify descriptor closed"), "inotify read failed")
                return
            with self._map_lock:
                hints = self.translate((e.wd, e.mask, e.cookie, e.name) for e in events)
            if hints and not self._handoff.put(hints):
                self._on_overflow("handoff_queue_full")
            if len(events) < 256:
                self._stop.wait(GATHER_SECONDS)

    def translate(self, raw: Iterable[tuple[int, int, int, bytes]]) -> list[RawEvent]:
        """One chunk of kernel events to hints: one per path between moves, moves paired by cookie."""
        out: list[RawEvent] = []
        touched: dict[str, str] = {}  # path -> created | deleted (the parent changes too) | modified
        moved_from: dict[int, tuple[str, bool]] = {}  # cookie -> (path, is_dir)
        paths = self._paths
        fsdecode = os.fsdecode

        def flush() -> None:
            out.extend(RawEvent(kind, path) for path, kind in touched.items())
            touched.clear()

        for wd, mask, cookie, name in raw:
            if mask & _IN_Q_OVERFLOW:
                self._recover_from_overflow()
                continue
            if mask & _IN_IGNORED:
                self._ignored(wd)
                continue
            parent = paths.get(wd)
            if parent is None:
                continue  # a watch we dropped (moved out); its events are stale
            path = parent + "/" + fsdecode(name) if name else parent
            if mask & _IN_MOVED_FROM:
                moved_from[cookie] = (path, bool(mask & _IN_ISDIR))
                continue
            if mask & _IN_MOVED_TO:
                source = moved_from.pop(cookie, None)
                flush()
                if source is None:
                    # Moved in from outside: new to us, like a create.
                    if mask & _IN_ISDIR:
                        self._watch_tree(path)
                    out.append(RawEvent("created", path))
                else:
                    if source[1]:
                        self._move_tree(source[0], path)
                    out.append(RawEvent("moved", source[0], path))
                continue
            if mask & _IN_DELETE:
                touched[path] = "deleted"
            elif mask & _IN_CREATE:
                if mask & _IN_ISDIR:
                    self._watch_tree(path)
                touched[path] = "created"
            elif path not in touched:
                touched[path] = "modified"
        flush()
        # A move whose other half never came in this chunk left the tree: a delete.
        for path, is_dir in moved_from.values():
            if is_dir:
                self._forget_tree(path)
            out.append(RawEvent("deleted", path))
        return out

    def _recover_from_overflow(self) -> None:
        # Directories made while events were lost have no watch yet: add them before the rescan.
        self._watch_tree(self.root)
        self._on_overflow("inotify_queue_overflow")
