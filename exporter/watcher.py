"""Watchdog adapter: filesystem events in, bounded hand-off, coalesced stat-based index updates out.

Events are hints, not deltas: each batch marks paths dirty and one lstat per dirty path decides
what the index holds. That makes replaying an event harmless, which is what lets a full scan run
while events keep arriving (they are applied again to the scanned tree before it is swapped in).
"""

from __future__ import annotations

import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from exporter.scan import file_info, scan_local, stat_changed
from exporter.tree import DirNode, Parts, Tree

# Reads are not events: opens and close-without-write never reach the kernel queue.
EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileDeletedEvent,
    FileMovedEvent,
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
]


@dataclass(frozen=True, slots=True)
class RawEvent:
    """What the index needs of a watchdog event; plain values, easy to build in a test."""

    kind: str  # created | modified | closed | deleted | moved
    src: str
    dst: str = ""


class QueueingHandler(FileSystemEventHandler):
    """Runs on watchdog's thread: copy the event into a bounded queue and return at once."""

    def __init__(self, events: queue.Queue[RawEvent], on_overflow: Callable[[str], None]) -> None:
        self._events = events
        self._on_overflow = on_overflow

    def on_any_event(self, event: FileSystemEvent) -> None:
        kind = event.event_type
        if kind in ("opened", "closed_no_write"):
            return
        src = os.fsdecode(event.src_path)
        dst = os.fsdecode(event.dest_path) if event.dest_path else ""
        try:
            self._events.put_nowait(RawEvent(kind, src, dst))
        except queue.Full:
            self._on_overflow("handoff_queue_full")


class OverflowLogHook(logging.Handler):
    """watchdog only logs a kernel queue overflow and never tells the handler: listen for that log."""

    LOGGERS = ("watchdog.observers.inotify_c", "watchdog.observers.inotify", "watchdog.observers.inotify_buffer")

    def __init__(self, on_overflow: Callable[[str], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in record.getMessage().lower():
            self._on_overflow("inotify_queue_overflow")

    def install(self) -> None:
        for name in self.LOGGERS:
            logger = logging.getLogger(name)
            logger.addHandler(self)
            if logger.getEffectiveLevel() > logging.WARNING:
                logger.setLevel(logging.WARNING)

    def uninstall(self) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeHandler(self)


class IndexUpdater:
    """Applies batches of events to a tree: one lstat per dirty path, moves re-keyed without stat."""

    def __init__(
        self, root: str, on_error: Callable[[str, str, str], None], on_new_dir: Callable[[Parts], None]
    ) -> None:
        self.root = root.rstrip("/") or "/"
        self._prefix = self.root + "/" if self.root != "/" else "/"
        self._on_error = on_error
        self._on_new_dir = on_new_dir

    def parts(self, path: str) -> Parts | None:
        """Path components relative to the models path, or None when outside it."""
        if path == self.root:
            return ()
        if not path.startswith(self._prefix):
            return None
        return tuple(part for part in path[len(self._prefix) :].split("/") if part)

    def path(self, parts: Parts) -> str:
        return os.path.join(self.root, *parts) if parts else self.root

    def apply(self, tree: Tree, events: Iterable[RawEvent]) -> int:
        """Apply a batch; returns the number of lstat calls made."""
        dirty: dict[Parts, None] = {}
        stats = 0
        for event in events:
            src = self.parts(event.src)
            if event.kind == "moved":
                dst = self.parts(event.dst)
                stats += self._flush(tree, dirty)
                if (
                    src is not None
                    and dst is not None
                    and tree.move(src, dst)
                    and isinstance(tree.lookup(dst), DirNode)
                ):
                    # watchdog can deliver a directory's move after events from a new directory
                    # made at its old path; those land in the moved node. Re-check it after a settle.
                    self._on_new_dir(dst)
                for parts in (src, dst):
                    if parts is not None:
                        dirty[parts] = None
                        if parts:
                            dirty[parts[:-1]] = None
                continue
            if src is None:
                continue
            dirty[src] = None
            if event.kind == "deleted" and src:
                # The parent's mtime/ctime moved: it is the model's newest change now.
                dirty[src[:-1]] = None
        stats += self._flush(tree, dirty)
        return stats

    def _flush(self, tree: Tree, dirty: dict[Parts, None]) -> int:
        count = len(dirty)
        for parts in dirty:
            self.refresh(tree, parts)
        dirty.clear()
        return count

    def refresh(self, tree: Tree, parts: Parts) -> None:
        """Make the index agree with the filesystem at one path (scanning it if it is a new dir)."""
        full = self.path(parts)
        try:
            st = os.lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            tree.remove(parts)
            return
        except OSError as err:
            self._on_error("stat", full, err.strerror or str(err))
            return
        if stat.S_ISREG(st.st_mode):
            tree.set_file(parts, file_info(st))
        elif stat.S_ISDIR(st.st_mode):
            known = tree.lookup(parts)
            if isinstance(known, DirNode):
                tree.touch(parts, stat_changed(st))
            else:
                self.rescan(tree, parts)
                self._on_new_dir(parts)
        else:
            tree.remove(parts)  # symlinks, sockets, fifos are never counted

    def rescan(self, tree: Tree, parts: Parts) -> None:
        """Replace a subtree by a fresh scan of it (new directories, settle re-checks)."""
        result = scan_local(self.path(parts))
        for path, reason in result.errors:
            self._on_error("scan", path, reason)
        if result.node is None:
            self.refresh_missing(tree, parts)
        else:
            tree.graft(parts, result.node)

    def refresh_missing(self, tree: Tree, parts: Parts) -> None:
        try:
            st = os.lstat(self.path(parts))
        except OSError:
            tree.remove(parts)
            return
        if stat.S_ISREG(st.st_mode):
            tree.set_file(parts, file_info(st))
        else:
            tree.remove(parts)


def drain(events: queue.Queue[RawEvent], first_timeout: float, window: float, limit: int) -> list[RawEvent]:
    """Block up to `first_timeout` for one event, then gather what arrives within `window`."""
    try:
        batch = [events.get(timeout=first_timeout)]
    except queue.Empty:
        return []
    deadline = time.monotonic() + window
    while len(batch) < limit:
        try:
            batch.append(events.get_nowait())
            continue
        except queue.Empty:
            pass
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            batch.append(events.get(timeout=remaining))
        except queue.Empty:
            break
    return batch


class OverflowFlag:
    """Set from any thread when events were lost; the service answers with a full rescan."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reasons: list[str] = []

    def raise_(self, reason: str) -> None:
        with self._lock:
            self._reasons.append(reason)

    def take(self) -> list[str]:
        with self._lock:
            reasons, self._reasons = self._reasons, []
            return reasons
