"""Filesystem event hints in, coalesced stat-based index updates out.

Events are hints, not deltas: each batch marks paths dirty and one lstat per dirty path decides
what the index holds. That makes replaying an event harmless, which is what lets a full scan run
while events keep arriving (they are applied again to the scanned tree before it is swapped in).

What the updater guarantees, given the reader's guarantees (see exporter.index.reader):
- U1 (announced directories are scanned): a directory at a path named by a `created` hint (made,
  moved in from outside, moved back in, put there by rename() over another, recreated under the same
  name, or newly readable) is scanned from scratch, whatever the index holds at that path. The scan
  runs after the hint was queued, so after the directory's watch was added: everything made before
  the watch is in the scan and everything after it has its own event. A same-named directory the
  index already holds is never merely "touched" (a replaced directory has a new identity).
- U2 (last write wins): a path's hints are applied by one lstat taken after the last of them was
  queued, so the size of a file after its last write (IN_MODIFY/IN_CLOSE_WRITE) is what the index holds.
- U3 (unreadable is retried): a directory the updater could not read (its scan failed, or an lstat
  in it was refused) is scanned again at the next hint for it or for its parent (reading needs read
  on it and search on its parent); a change of permissions is such a hint (IN_ATTRIB).
- U5 (no endless walk): a directory that is one of its own ancestors (a bind mount into its own
  subtree) is reported as a scan error and not descended, also when the cycle passes through the
  directories above a scanned one (their chain is given to the scan while mounts exist below the root).
- U4 (moves re-key): a move inside the tree re-keys the indexed subtree without a stat, and the moved
  directory is scanned again `settle_seconds` later (hints inside it read after the move lstat the
  old path). A move whose source the index does not hold announces its destination (U1), and so
  does the reader when it cannot vouch for the moved directory's watch (R2).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from exporter.index.events import RawEvent
from exporter.index.longpath import lstat
from exporter.index.scan import ScanResult, ancestors, file_info, scan_local, stat_changed
from exporter.index.tree import DirNode, InodeKey, Parts, Tree

# Inodes remembered as searched, so a file whose other links are outside the tree is not searched
# for again on each of its events; past this many the memory starts over.
SEARCHED_LIMIT = 100_000
# Unreadable directories remembered for a retry (U3); past this many the oldest are dropped (the
# hourly reconcile still covers them).
UNREADABLE_LIMIT = 10_000
# Index changes of a link pass are applied this many at a time, so a scrape never waits long for the lock.
LINK_SLICE = 500

Lock = AbstractContextManager[Any]
# For trees no other thread sees yet (a full scan's replay).
_NO_LOCK: Lock = contextlib.nullcontext()
# What `_look` found at a path: gone (None), an lstat error, a new directory scanned, or an lstat.
_Seen = None | OSError | ScanResult | os.stat_result


def _link_state(st: os.stat_result) -> tuple[int, int]:
    """What must change before a searched inode is searched again: its link count, or its ctime
    (link() moves it; so does reuse of the inode number by a new file)."""
    return st.st_nlink, st.st_ctime_ns


class IndexUpdater:
    """Applies batches of events to a tree: one lstat per dirty path, moves re-keyed without stat."""

    def __init__(
        self, root: str, on_error: Callable[[str, str, str], None], on_moved_dir: Callable[[Parts], None]
    ) -> None:
        self.root = root.rstrip("/") or "/"
        self._prefix = self.root + "/" if self.root != "/" else "/"
        self._on_error = on_error
        self._on_moved_dir = on_moved_dir
        # Inodes an lstat saw with more links than the index knows: a link may be counted as plain.
        self._wanted: dict[InodeKey, None] = {}
        self._searched: dict[InodeKey, tuple[int, int]] = {}
        # Directories that could not be read: scanned again at their next hint (U3).
        self._unreadable: dict[Parts, None] = {}
        # Whether anything is mounted below the models path (set by the service from the mount table).
        self.inner_mounts: Callable[[], bool] = lambda: False

    def parts(self, path: str) -> Parts | None:
        """Path components relative to the models path, or None when outside it."""
        if path == self.root:
            return ()
        if not path.startswith(self._prefix):
            return None
        # Once per event: filter and a join, not a generator and os.path.join (a fifth of the
        # updater's time per event went to these two).
        return tuple(filter(None, path[len(self._prefix) :].split("/")))

    def path(self, parts: Parts) -> str:
        # Parts never hold a "/" (they come from split("/") or a directory listing), so a plain
        # join is what os.path.join would make.
        return self._prefix + "/".join(parts) if parts else self.root

    def apply(self, tree: Tree, events: Iterable[RawEvent], lock: Lock = _NO_LOCK) -> int:
        """Apply a batch; returns the number of lstat calls made.

        The lstats, and the scans of new directories, run before `lock` is taken; only the index
        changes hold it, so a scrape waits for a few milliseconds of arithmetic, not for syscalls.
        The updater is the index's only writer: reading the tree without the lock is safe here.
        """
        # path -> announced (a directory there is to be scanned, U1)
        dirty: dict[Parts, bool] = {}
        stats = 0
        for event in events:
            src = self.parts(event.src)
            if event.kind == "moved":
                dst = self.parts(event.dst)
                stats += self._flush(tree, dirty, lock)
                if src is not None and dst is not None:
                    with lock:
                        rekeyed = tree.move(src, dst)
                        moved_dir = rekeyed and isinstance(tree.lookup(dst), DirNode)
                    if moved_dir:
                        # Watches are added by path when their event is read, which can be after the
                        # directory moved and a new one took its place: re-check the moved one later.
                        self._on_moved_dir(dst)
                    elif not rekeyed:
                        # Nothing indexed at the source (made and moved before its hints were applied,
                        # whose lstats then found it gone): what is at the destination is new to us.
                        dirty[dst] = True
                elif dst is not None:
                    dirty[dst] = True  # moved in from outside the models path: new to us
                for parts in (src, dst):
                    if parts is not None:
                        dirty.setdefault(parts, False)
                        if parts:
                            dirty.setdefault(parts[:-1], False)
                continue
            if src is None:
                continue
            if event.kind == "created":
                dirty[src] = True
            else:
                dirty.setdefault(src, False)
            if event.kind != "modified" and src:
                # A create or delete moves the parent's mtime, later than the entry's own ctime (they
                # are separate clock reads): it is the model's newest change now.
                dirty.setdefault(src[:-1], False)
        stats += self._flush(tree, dirty, lock)
        return stats

    def _flush(self, tree: Tree, dirty: dict[Parts, bool], lock: Lock) -> int:
        seen: list[tuple[Parts, _Seen]] = []
        scanned: set[Parts] = set()
        stats = 0
        for parts, announced in dirty.items():
            if scanned and any(parts[:depth] in scanned for depth in range(len(parts))):
                # Inside a directory scanned in this flush, after every event of the batch was
                # queued: that scan already holds what this path's lstat would say.
                continue
            found = self._look(tree, parts, announced)
            stats += 1
            if isinstance(found, ScanResult):
                scanned.add(parts)
            seen.append((parts, found))
        dirty.clear()
        with lock:
            for parts, found in seen:
                self._settle(tree, parts, found)
        return stats

    def refresh(self, tree: Tree, parts: Parts) -> None:
        """Make the index agree with the filesystem at one path (scanning it if it is a new dir)."""
        self._settle(tree, parts, self._look(tree, parts, False))

    def _look(self, tree: Tree, parts: Parts, announced: bool) -> _Seen:
        """What is at `parts` now: the syscalls of `refresh`, with no change to the index."""
        full = self.path(parts)
        try:
            st = lstat(full)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM) and parts:
                self.note_unreadable(parts[:-1])
            return err
        if stat.S_ISDIR(st.st_mode) and (
            announced or self._retry_unreadable(parts) or not isinstance(tree.lookup(parts), DirNode)
        ):
            # New to the index, or announced anew (U1): its watch was added before this hint was
            # queued, so a scan now sees every file made before the watch and events report the rest.
            # Below a mount, a cycle could pass through the directories above this one (U5).
            return scan_local(full, above=ancestors(self.root, full) if self.inner_mounts() else None)
        return st

    def note_unreadable(self, parts: Parts) -> None:
        """`parts` could not be read: scan it again at its next hint (U3)."""
        if parts in self._unreadable:
            return
        if len(self._unreadable) >= UNREADABLE_LIMIT:
            del self._unreadable[next(iter(self._unreadable))]
        self._unreadable[parts] = None

    def note_unreadable_path(self, path: str) -> None:
        parts = self.parts(path)
        if parts is not None:
            self.note_unreadable(parts)

    def _retry_unreadable(self, parts: Parts) -> bool:
        """Whether `parts` or a directory in it could not be read (a permission change of either is a
        hint for `parts`); forgets them, as a scan follows."""
        if not self._unreadable:
            return False
        below = [u for u in self._unreadable if u == parts or u[:-1] == parts]
        for u in below:
            del self._unreadable[u]
        return bool(below)

    def _settle(self, tree: Tree, parts: Parts, found: _Seen) -> None:
        """Make the index say what `_look` found (runs under the index lock)."""
        if found is None:
            tree.remove(parts)
        elif isinstance(found, OSError):
            self._on_error("stat", self.path(parts), found.strerror or str(found))
        elif isinstance(found, ScanResult):
            self._graft(tree, parts, found)
        elif stat.S_ISREG(found.st_mode):
            inode = self._set_file(tree, parts, found)
            if inode is not None:
                self._wanted[inode] = None
        elif stat.S_ISDIR(found.st_mode):
            if isinstance(tree.lookup(parts), DirNode):
                tree.touch(parts, stat_changed(found))
            else:
                self.refresh(tree, parts)  # gone from the index since it was looked at: scan it now
        else:
            tree.remove(parts)  # symlinks, sockets, fifos are never counted

    def rescan(self, tree: Tree, parts: Parts, lock: Lock = _NO_LOCK) -> None:
        """Replace a subtree by a fresh scan of it (new directories, settle re-checks); the scan
        runs before `lock` is taken."""
        found = scan_local(self.path(parts))
        with lock:
            self._graft(tree, parts, found)

    def _graft(self, tree: Tree, parts: Parts, result: ScanResult) -> None:
        for path, reason in result.errors:
            self._on_error("scan", path, reason)
            self.note_unreadable_path(path)
        if result.node is None:
            self.refresh_missing(tree, parts)
        else:
            tree.graft(parts, result.node)
            if len(parts) <= 1:
                self.restamp(tree, parts)

    def restamp(self, tree: Tree, parts: Parts = ()) -> None:
        """Give single-file models under `parts` their own times: one lstat each, O(models)."""
        for model in tree.single_file_models(parts):
            try:
                st = lstat(self.path(model))
            except OSError:
                continue  # gone or unreadable since the scan: its event follows
            if stat.S_ISREG(st.st_mode):
                tree.set_model_changed(model, stat_changed(st))

    def _set_file(self, tree: Tree, parts: Parts, st: os.stat_result) -> InodeKey | None:
        """Index a regular file; its inode when the lstat shows links the index does not know of
        (and it was not searched for in this state already)."""
        info = file_info(st)
        tree.set_file(parts, info)
        inode = info.inode
        if inode is not None and tree.link_count(inode) < st.st_nlink and self._searched.get(inode) != _link_state(st):
            return inode
        return None

    def links_pending(self, tree: Tree) -> bool:
        """Whether `resolve_links` has work: hard links the index may count twice or date wrongly."""
        if tree.suspects:
            self._wanted.update(dict.fromkeys(tree.take_suspects()))
        return bool(self._wanted)

    def resolve_links(self, tree: Tree, lock: Lock) -> int:
        """Make the index agree with the filesystem about the hard-linked inodes in question.

        link() reports only the new name: the old one, indexed as a plain file while it had one link,
        would stay counted as well. For each inode: lstat one link the index knows (its times are
        every link's, its st_nlink says how many there are); when the index knows fewer, lstat the
        plain files of the same size, where the others must be if they are in the tree. One walk of
        the index plus those lstats, instead of a rescan of every file. Runs on the updater thread,
        the index's only writer, so the walk and the lstats need not hold `lock`; changes do.
        Returns the number of lstat calls.
        """
        self.links_pending(tree)
        wanted, self._wanted = self._wanted, {}
        known, plain = tree.find_links(wanted)
        stats = 0
        seen: list[tuple[Parts, os.stat_result]] = []
        for parts in known.values():
            stats += 1
            try:
                seen.append((parts, lstat(self.path(parts))))
            except OSError:
                continue  # gone: its event follows
        missing: dict[InodeKey, tuple[int, int]] = {}
        for start in range(0, len(seen), LINK_SLICE):
            with lock:
                for parts, st in seen[start : start + LINK_SLICE]:
                    if not stat.S_ISREG(st.st_mode):
                        continue  # replaced: its event follows
                    inode = self._set_file(tree, parts, st)
                    if inode is not None:
                        missing[inode] = _link_state(st)
        if not missing:
            return stats
        sizes = {tree.inode_size(inode) for inode in missing}
        found: list[tuple[Parts, os.stat_result]] = []
        checked: set[Parts] = set()
        for parts, size in plain:
            if size not in sizes:
                continue
            checked.add(parts)
            stats += 1
            try:
                st = lstat(self.path(parts))
            except OSError:
                continue
            if (st.st_dev, st.st_ino) in missing and stat.S_ISREG(st.st_mode):
                found.append((parts, st))
        # cp -al, then a write through the new links before the index learnt of them: the old name is
        # indexed at its old size. Inodes still short of links are searched among every plain file,
        # once per state of the inode (`_searched`), so a link from outside costs one pass, not one per event.
        short = set(missing) - {(st.st_dev, st.st_ino) for _, st in found}
        if short:
            _, every = tree.find_links(short, any_size=True)
            for parts, _size in every:
                if parts in checked:
                    continue
                stats += 1
                try:
                    st = lstat(self.path(parts))
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) in short and stat.S_ISREG(st.st_mode):
                    found.append((parts, st))
        for start in range(0, len(found), LINK_SLICE):
            with lock:
                for parts, st in found[start : start + LINK_SLICE]:
                    tree.set_file(parts, file_info(st))
        if len(self._searched) + len(missing) > SEARCHED_LIMIT:
            self._searched.clear()
        # Links still missing are outside the tree (or their own events are on the way): not again,
        # until the inode's link count or ctime changes.
        self._searched.update(itertools.islice(missing.items(), SEARCHED_LIMIT))
        return stats

    def refresh_missing(self, tree: Tree, parts: Parts) -> None:
        try:
            st = lstat(self.path(parts))
        except OSError:
            tree.remove(parts)
            return
        if stat.S_ISREG(st.st_mode):
            tree.set_file(parts, file_info(st))
        else:
            tree.remove(parts)


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
