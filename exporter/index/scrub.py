"""The self-healing scrub: a paced background walk that re-verifies every indexed directory against the disk.

Events are the fast path; the scrub is the guarantee. One thread walks the index depth-first, lists
each directory (listdir + one lstat per name, relative to the directory's descriptor) at a budget of
`exporter.scrub_stats_per_second` (a directory's own visit counts as DIR_VISIT_STATS), compares the
listing with what the index holds for that directory (exporter/index/drift.py, pure), and hands
the names that differ to the updater thread. A cycle ends when every directory indexed at its start
(and every directory found meanwhile) was verified; `model_storage_scrub_cycle_seconds` is its
length.

Invariant: the scrub never installs a stale view, whatever the events do meanwhile.
- The scrub thread never writes to the index; it reads one directory at a time under the index
  lock (a copy of its names and sizes) and compares outside it.
- A difference is a name, not a value. The updater thread, the index's only writer, re-lstats the
  name (or scans it, when it is a directory new to the index) and the index takes what that lstat
  says, exactly as for an event. Whatever the index holds after a correction is therefore no older
  than the updater's own look; a change made after that look raises an event (or is seen at the
  next visit) that is applied after it. A listing that went stale before it was used costs one
  lstat and counts no correction: a correction is counted only when the bytes, allocated bytes or
  files the index holds at that name actually changed.
- A difference whose entry, or directory, changed less than GRACE_SECONDS ago may be an event
  still on its way: the directory is verified again after the grace (at most MAX_DEFERRALS times,
  then corrected anyway), so the corrections counter counts what the events missed, not what they
  had yet to apply. A cycle waits for its deferred directories before it ends.
- A correction of allocated bytes alone (same size, same files: `st_blocks` moved at writeback, as
  ext4 adding an extent block, btrfs compressing, XFS trimming speculative preallocation) is applied
  and logged (`scrub.allocation_corrected`) but not counted in `corrections_total` or drift: no
  event exists for it, so it is no miss of the event path, and counting it would make
  ModelStorageScrubFindingDrift fire on a healthy store that writes large files.
- A directory where drift was found has its watches re-added (a lost watch is the usual cause)
  before the updater looks at its names: later changes there are seen by events again.
"""

from __future__ import annotations

import errno
import heapq
import os
import stat
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, TypeVar

from exporter.index.drift import (
    BacklogYield,
    Difference,
    DirView,
    Listing,
    LogBudget,
    Pacer,
    compare,
    held,
    recent,
)
from exporter.index.events import RawEvent
from exporter.index.longpath import lstat, open_path
from exporter.index.status import ScrubFigures
from exporter.index.tree import DirNode, Parts, Tree
from exporter.index.updater import IndexUpdater
from shared.logs import FAILURE, SUCCESS, get_logger

log = get_logger("exporter.scrub")

T = TypeVar("T")
# A difference this fresh is left to the events for now (the updater applies them within a
# coalescing window, even under a burst within a second or two).
GRACE_SECONDS = 3.0
MAX_DEFERRALS = 3
# A cycle of a small store takes at least this long: an empty tree is not re-listed in a loop.
MIN_CYCLE_SECONDS = 1.0
# The scrub sleeps off its debt in naps of at least this long: fewer wake-ups, the same rate.
MIN_SLEEP_SECONDS = 0.2
# Correction and failure lines logged per minute; the rest are counted in the next line.
LOG_LINES_PER_MINUTE = 60
# What a directory's own visit costs the budget, in lstats: opening and listing it, the index's copy
# under its lock, the comparison. Measured at about 8 lstats' worth of CPU (35 us a visit against
# 4 us an lstat, on a store of one-file models); charged as 1 it let such a store's scrub take 3-7%
# of a core at the default budget. A directory costs this plus its own lstat in its parent's listing.
DIR_VISIT_STATS = 8
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE)


@dataclass(frozen=True, slots=True)
class Finding:
    """Names of one directory that differ from the index, for the updater thread."""

    parts: Parts
    differences: tuple[Difference, ...]


@dataclass(frozen=True, slots=True)
class Correction:
    path: str
    index: str
    disk: str
    bytes_delta: int
    files_delta: int
    allocated_delta: int = 0


def list_dir(path: str) -> Listing | None:
    """What the directory holds, one lstat per name relative to its descriptor; None when `path`
    is gone or no longer a directory. Other OSErrors (EACCES, EMFILE) propagate."""
    try:
        fd = open_path(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as err:
        if err.errno == errno.ELOOP:
            return None  # a symlink now: never followed, never counted
        raise
    files: dict[str, tuple[int, int]] = {}
    linked: list[str] = []
    dirs: list[str] = []
    others: list[str] = []
    statat = os.stat
    is_reg = stat.S_ISREG
    is_dir = stat.S_ISDIR
    try:
        own = os.fstat(fd)
        for name in os.listdir(fd):
            try:
                st = statat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if is_reg(mode):
                files[name] = (st.st_size, st.st_blocks)
                if st.st_nlink > 1:
                    linked.append(name)
            elif is_dir(mode):
                dirs.append(name)
            else:
                others.append(name)
    finally:
        os.close(fd)
    return Listing(files, frozenset(linked), frozenset(dirs), frozenset(others), max(own.st_mtime, own.st_ctime))


def entry_times(path: str, names: Iterable[str]) -> dict[str, float]:
    """max(mtime, ctime) of the names still there (only for names that differ: rare)."""
    times: dict[str, float] = {}
    for name in names:
        try:
            st = lstat(os.path.join(path, name))
        except OSError:
            continue
        times[name] = max(st.st_mtime, st.st_ctime)
    return times


def apply_finding(
    tree: Tree, updater: IndexUpdater, finding: Finding, lock: AbstractContextManager[Any]
) -> list[Correction]:
    """On the updater thread: let the updater look at each differing name again, and report the
    names whose counted bytes or files changed by it."""
    targets = [(*finding.parts, diff.name) for diff in finding.differences]
    with lock:
        before = [held(tree, parts) for parts in targets]
    # The directory too: a name that came or went moved its mtime, which is its model's newest change.
    hints = [RawEvent("modified", updater.path(parts)) for parts in (*targets, finding.parts)]
    updater.apply(tree, hints, lock)
    corrections: list[Correction] = []
    with lock:
        for parts, diff, old in zip(targets, finding.differences, before, strict=True):
            new = held(tree, parts)
            if new != old:
                corrections.append(
                    Correction(
                        updater.path(parts), diff.index, diff.disk, new[0] - old[0], new[1] - old[1], new[2] - old[2]
                    )
                )
    return corrections


class Scrubber:
    """The scrub thread and its figures. `with_tree` runs a function on the live tree under the
    index lock; `submit` hands a finding to the updater thread; `rewatch` re-adds a subtree's watches;
    `backlog` (set by the owner) counts the events waiting to be applied: they go first (BacklogYield)."""

    def __init__(
        self,
        root: str,
        per_second: float,
        with_tree: Callable[[Callable[[Tree], Any]], Any],
        submit: Callable[[Finding], None],
        rewatch: Callable[[str], None],
        ready: threading.Event,
        stop: threading.Event,
    ) -> None:
        self.root = root
        self.per_second = per_second
        self._with_tree = with_tree
        self._submit = submit
        self._rewatch = rewatch
        self._ready = ready
        self._stop = stop
        self._pacer = Pacer(per_second)
        self.backlog: Callable[[], int] = lambda: 0
        self._yield = BacklogYield()
        self._log_budget = LogBudget(LOG_LINES_PER_MINUTE)
        self._lock = threading.Lock()
        self._figures = ScrubFigures()
        self._rechecks: list[tuple[float, int, Parts, int]] = []
        self._sequence = 0
        self._submitted = 0
        self._applied = 0
        self._thread: threading.Thread | None = None
        self.cycles = 0

    # ----- figures -----

    def figures(self) -> ScrubFigures:
        with self._lock:
            return self._figures

    def _update(self, **changes: Any) -> None:
        with self._lock:
            values = {name: getattr(self._figures, name) for name in ScrubFigures.__slots__}
            values.update(changes)
            self._figures = ScrubFigures(**values)

    def record(self, corrections: list[Correction]) -> None:
        """Count and log a finding's corrections (the updater thread, after `apply_finding`)."""
        with self._lock:
            self._applied += 1
        if not corrections:
            return
        missed = [c for c in corrections if c.bytes_delta or c.files_delta]
        figures = self.figures()
        self._update(
            corrections_total=figures.corrections_total + len(missed),
            drift_bytes_total=figures.drift_bytes_total + sum(abs(c.bytes_delta) for c in missed),
        )
        for correction in corrections:
            allowed, suppressed = self._may_log()
            if allowed and not (correction.bytes_delta or correction.files_delta):
                log.info(
                    "scrub.allocation_corrected",
                    path=correction.path,
                    index=correction.index,
                    disk=correction.disk,
                    allocated_bytes_delta=correction.allocated_delta,
                    suppressed_lines=suppressed,
                    outcome=SUCCESS,
                )
            elif allowed:
                log.warning(
                    "scrub.corrected",
                    path=correction.path,
                    index=correction.index,
                    disk=correction.disk,
                    bytes_delta=correction.bytes_delta,
                    files_delta=correction.files_delta,
                    allocated_bytes_delta=correction.allocated_delta,
                    suppressed_lines=suppressed,
                    outcome=SUCCESS,
                )

    def _may_log(self) -> tuple[bool, int]:
        """Whether a line may be logged now, and how many were not since the last one (the scrub
        thread and the updater thread share the budget)."""
        with self._lock:
            if self._log_budget.allow(time.monotonic()):
                return True, self._log_budget.take_suppressed()
            return False, 0

    # ----- lifecycle -----

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="index-scrub", daemon=True)
        self._thread.start()

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _run(self) -> None:
        while not self._ready.wait(0.2):
            if self._stop.is_set():
                return
        self._update(last_cycle_timestamp=time.time())
        log.info("scrub.started", path=self.root, stats_per_second=self.per_second)
        try:
            while not self._stop.is_set():
                self.cycle()
        except Exception as err:  # a bug here must not go unseen: the cycle alert fires as well
            log.exception("scrub.crashed", error=str(err), outcome=FAILURE)

    # ----- one cycle -----

    def cycle(self) -> bool:
        """Verify every indexed directory once; False when stopped before the end."""
        started = time.monotonic()
        entries = self._with_tree(
            lambda tree: sum(v[1] for v in tree.tier_totals().values()) + tree.dirs * (1 + DIR_VISIT_STATS)
        )
        expected = max(entries / self.per_second, MIN_CYCLE_SECONDS)
        self._update(expected_cycle_seconds=expected)
        self._yield.start_cycle(expected)
        stack: list[Parts] = [()]
        while stack or self._rechecks:
            if self._stop.is_set():
                return False
            if self._rechecks and (self._rechecks[0][0] <= time.monotonic() or not stack):
                due, _, parts, deferrals = heapq.heappop(self._rechecks)
                if self._stop.wait(max(0.0, due - time.monotonic())):
                    return False
                self.visit(parts, deferrals)
                continue
            stack.extend(self.visit(stack.pop(), 0))
        # A cycle ends when the updater has looked again at every name it found.
        while not self._settled():
            if self._stop.wait(0.02):
                return False
        rest = MIN_CYCLE_SECONDS - (time.monotonic() - started)
        if rest > 0 and self._stop.wait(rest):
            return False
        self.cycles += 1
        self._update(cycle_seconds=time.monotonic() - started, last_cycle_timestamp=time.time())
        log.info("scrub.cycled", duration_seconds=round(time.monotonic() - started, 3), outcome=SUCCESS)
        return True

    def visit(self, parts: Parts, deferrals: int) -> list[Parts]:
        """Verify one directory; returns its indexed subdirectories, to be visited next."""
        path = os.path.join(self.root, *parts) if parts else self.root
        while (pause := self._yield.wait(self.backlog() > 0)) > 0:
            if self._stop.wait(pause):
                return []
        try:
            listed = list_dir(path)
            entries = len(listed.files) + len(listed.dirs) + len(listed.others) if listed is not None else 0
            stats = DIR_VISIT_STATS + entries
        except OSError as err:
            listed, stats = None, DIR_VISIT_STATS
            self._failed(path, err, parts, deferrals)
            self._pace(stats)
            return self._with_tree(lambda tree: _subdirs(tree, parts))  # type: ignore[no-any-return]
        self._pace(stats)

        def look(tree: Tree) -> DirView | None:
            node = tree.lookup(parts)
            return DirView.of(node) if isinstance(node, DirNode) else None

        view: DirView | None = self._with_tree(look)
        if view is None:
            return []  # left the index since it was queued: nothing to verify
        children = [(*parts, name) for name in view.dirs]
        if listed is None:
            if parts:
                self._found(parts[:-1], (Difference(parts[-1], "directory", "absent"),), deferrals, recent_=True)
            return []
        differences = compare(view, listed)
        if differences:
            times = entry_times(path, (d.name for d in differences))
            fresh = recent(times, listed.changed, time.time(), GRACE_SECONDS)
            self._found(parts, tuple(differences), deferrals, recent_=fresh)
        return children

    def _found(self, parts: Parts, differences: tuple[Difference, ...], deferrals: int, *, recent_: bool) -> None:
        if recent_ and deferrals < MAX_DEFERRALS:
            self._recheck(parts, deferrals + 1)
            return
        path = os.path.join(self.root, *parts) if parts else self.root
        self._rewatch(path)
        with self._lock:
            self._submitted += 1
        self._submit(Finding(parts, differences))

    def _settled(self) -> bool:
        with self._lock:
            return self._applied >= self._submitted

    def _recheck(self, parts: Parts, deferrals: int) -> None:
        self._sequence += 1
        heapq.heappush(self._rechecks, (time.monotonic() + GRACE_SECONDS, self._sequence, parts, deferrals))

    def _failed(self, path: str, err: OSError, parts: Parts, deferrals: int) -> None:
        if err.errno in _OUT_OF_DESCRIPTORS and deferrals < MAX_DEFERRALS:
            self._recheck(parts, deferrals + 1)  # out of descriptors: try this directory again soon
        allowed, suppressed = self._may_log()
        if allowed:
            log.warning(
                "scrub.failed", path=path, error=err.strerror or str(err), suppressed_lines=suppressed, outcome=FAILURE
            )

    def _pace(self, stats: int) -> None:
        delay = self._pacer.charge(stats, time.monotonic())
        if delay >= MIN_SLEEP_SECONDS:
            self._stop.wait(delay)


def _subdirs(tree: Tree, parts: Parts) -> list[Parts]:
    node = tree.lookup(parts)
    return [(*parts, name) for name in node.dirs] if isinstance(node, DirNode) else []
