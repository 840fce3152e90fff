"""Full scans of a directory tree into detached `DirNode`s: listdir + lstat, iterative, on all cores.

One scanner serves the initial scan, reconcile scans, directories moved in from outside and
overflow recovery. Symlinks are never followed and never counted; unreadable directories are
reported, not fatal.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import stat
import threading
import time
from array import array
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType

from exporter.index.longpath import lstat, open_path
from exporter.index.tree import DirNode, FileInfo

_listing: ModuleType | None
try:
    from exporter.index import _listing
except ImportError:  # not built (no C compiler where it was installed): the plain loop does the work
    _listing = None


@dataclass(slots=True)
class ScanResult:
    """A scanned subtree, with what went wrong and how much was seen."""

    node: DirNode | None  # None when the path is not a directory (gone, a file, a symlink)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    files: int = 0
    dirs: int = 0
    seconds: float = 0.0


def file_info(st: os.stat_result) -> FileInfo:
    """What the index keeps of a regular file's lstat."""
    inode = (st.st_dev, st.st_ino) if st.st_nlink > 1 else None
    return FileInfo(st.st_size, max(st.st_mtime, st.st_ctime), inode, st.st_blocks)


def stat_changed(st: os.stat_result) -> float:
    return max(st.st_mtime, st.st_ctime)


Progress = Callable[[int], None]
# watch(directory, subtree): called by a scan before it lists a directory itself (subtree False) and
# before it hands a directory's subtree to a worker (subtree True). The initial scan watches the
# tree this way as it goes, so that every directory is watched before it is listed, in one pass
# over the tree instead of a watch walk first and the scan after it.
WatchAhead = Callable[[str, bool], None]


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


# The (st_dev, st_ino) of a directory and of each directory above it in this scan, innermost first:
# a bind mount of a directory into its own subtree would make a scan endless (paths past PATH_MAX
# no longer stop it), so a directory that is one of its own ancestors is reported, not descended.
Chain = tuple[int, int, "Chain"] | None
CYCLE = "directory cycle (a bind mount of a directory above it): not descended"


def _in_chain(dev: int, ino: int, chain: Chain) -> bool:
    while chain is not None:
        if chain[1] == ino and chain[0] == dev:
            return True
        chain = chain[2]
    return False


Pending = list[tuple[str, DirNode, Chain]]


def _scan_one_plain(path: str, node: DirNode, result: ScanResult, pending: Pending, chain: Chain) -> None:
    # The plain loop: the fallback when exporter/index/_listing.c is not built, and the oracle the
    # tests hold the C loop to. listdir + fstatat on the directory's descriptor is about a quarter
    # faster than scandir (no DirEntry objects, no path joins, one stat per entry which also tells
    # directories apart). Appending straight to the table is safe: listdir never repeats a name
    # and a fresh node has no name index yet.
    files = node.files
    add_name = files.names.append
    add_size = files.sizes.append
    add_blocks = files.blocks.append
    statat = os.stat
    is_dir = stat.S_ISDIR
    is_reg = stat.S_ISREG
    changed = node.changed
    count = 0
    try:
        fd = open_path(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return  # removed (or replaced) while we looked: its event follows
    except OSError as err:
        result.errors.append((path, err.strerror or type(err).__name__))
        return
    try:
        for name in os.listdir(fd):
            try:
                st = statat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            mode = st.st_mode
            if is_reg(mode):
                add_name(name)
                add_size(st.st_size)
                try:
                    add_blocks(st.st_blocks)
                except OverflowError:  # 2 TiB or more allocated: rare, so off the hot path
                    files.widen()
                    add_blocks = files.blocks.append
                    add_blocks(st.st_blocks)
                if st.st_nlink > 1:
                    if node.hard is None:
                        node.hard = {}
                    node.hard[name] = (st.st_dev, st.st_ino)
                stamp = st.st_ctime
                if stamp > changed:
                    changed = stamp
                stamp = st.st_mtime
                if stamp > changed:
                    changed = stamp
                count += 1
            elif is_dir(mode):
                child = DirNode(max(st.st_mtime, st.st_ctime))
                node.dirs[name] = child
                if _in_chain(st.st_dev, st.st_ino, chain):
                    result.errors.append((os.path.join(path, name), CYCLE))
                    continue
                pending.append((os.path.join(path, name), child, (st.st_dev, st.st_ino, chain)))
    except OSError as err:
        result.errors.append((path, err.strerror or type(err).__name__))
    finally:
        os.close(fd)
        node.changed = changed
        result.files += count


def _scan_one_fast(path: str, node: DirNode, result: ScanResult, pending: Pending, chain: Chain) -> None:
    # The same as _scan_one_plain, with the listing and the lstat calls in C (_listing.list_dir):
    # about half the scan's CPU time is Python's per-entry work, a stat_result and its fields.
    assert _listing is not None
    try:
        fd = open_path(path, _DIR_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        return
    except OSError as err:
        result.errors.append((path, err.strerror or type(err).__name__))
        return
    try:
        joined, count, sizes, blocks, wide, hard, changed, subdirs, error = _listing.list_dir(fd, node.changed)
    finally:
        os.close(fd)
    files = node.files
    files.extend_joined(joined)
    files.sizes.frombytes(sizes)
    if wide:
        files.widen()
    if wide or files.blocks.typecode == "I":
        files.blocks.frombytes(blocks)
    else:
        files.blocks.fromlist(array("I", blocks).tolist())
    if hard:
        if node.hard is None:
            node.hard = {}
        names = joined.split("\0")
        for at, dev, ino in hard:
            node.hard[names[at]] = (dev, ino)
    node.changed = changed
    result.files += count
    for name, child_changed, dev, ino in subdirs:
        child = DirNode(child_changed)
        node.dirs[name] = child
        if _in_chain(dev, ino, chain):
            result.errors.append((os.path.join(path, name), CYCLE))
            continue
        pending.append((os.path.join(path, name), child, (dev, ino, chain)))
    if error:
        result.errors.append((path, os.strerror(error)))


_scan_one = _scan_one_plain if _listing is None else _scan_one_fast
# For the log: "c", or "python" where the C loop was not built (the scan takes about twice as long).
SCAN_LOOP = "python" if _listing is None else "c"


def ancestors(root: str, path: str) -> Chain:
    """The chain of the directories from `root` down to `path`'s parent (one lstat each): what a
    scan of `path` needs to tell a cycle through a mount above it. None when one is gone."""
    chain: Chain = None
    current = root
    rest = path[len(root) :].strip("/").split("/")[:-1] if path.startswith(root + "/") else []
    for name in ["", *rest]:
        current = current + "/" + name if name else current
        try:
            st = lstat(current)
        except OSError:
            return None
        chain = (st.st_dev, st.st_ino, chain)
    return chain


def scan_local(
    path: str, progress: Progress | None = None, *, progress_every: int = 200_000, above: Chain = None
) -> ScanResult:
    """Scan `path` in this process. The root's own times count as changes of its subtree. `above`:
    the chain of the directories above `path` (see `ancestors`), where a mount could make a cycle."""
    started = time.monotonic()
    try:
        root_stat = lstat(path)
    except OSError:
        return ScanResult(None, seconds=time.monotonic() - started)
    if not stat.S_ISDIR(root_stat.st_mode):
        return ScanResult(None, seconds=time.monotonic() - started)
    root = DirNode(stat_changed(root_stat))
    result = ScanResult(root)
    if _in_chain(root_stat.st_dev, root_stat.st_ino, above):
        return ScanResult(DirNode(stat_changed(root_stat)), [(path, CYCLE)], seconds=time.monotonic() - started)
    pending: Pending = [(path, root, (root_stat.st_dev, root_stat.st_ino, above))]
    next_report = progress_every
    while pending:
        current_path, node, chain = pending.pop()
        result.dirs += 1
        _scan_one(current_path, node, result, pending, chain)
        if progress is not None and result.files >= next_report:
            progress(result.files)
            next_report += progress_every
    result.seconds = time.monotonic() - started
    return result


class ScanFailedError(Exception):
    """A scan that did not complete: its result must never be used (an empty or partial tree)."""


def _scan_in_worker(subtrees: list[tuple[str, Chain]]) -> list[ScanResult]:
    return [scan_local(path, above=above) for path, above in subtrees]


# Batches of subtrees per worker process in a pooled scan (see Scanner._gather).
BATCHES_PER_WORKER = 8


def _start_workers(pool: ProcessPoolExecutor, workers: int) -> None:
    # A pool broken already (a worker that could not start) raises here and again at the first
    # scan's submit, which handles it.
    with contextlib.suppress(BrokenProcessPool, RuntimeError):
        for _ in range(workers):
            pool.submit(os.getpid)


class Scanner:
    """Scans subtrees, splitting large ones over a pool of worker processes (the syscalls are the floor)."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1
        self._pool: ProcessPoolExecutor | None = None
        self._starting: threading.Thread | None = None

    def start(self) -> None:
        """Start the pool's worker processes in the background: the caller goes on (watching the
        tree) while the forkserver boots; the first scan waits for them. The forkserver is a fresh
        interpreter, not a fork of this process, so its children are clean whatever threads run
        here, and a pool rebuilt later forks from the same server."""
        if self.workers > 1 and self._pool is None:
            context = multiprocessing.get_context("forkserver")
            # The server imports only what the workers run, not the daemon's __main__ (its default):
            # that is the whole HTTP stack, about a CPU second competing with the first scan.
            context.set_forkserver_preload([__name__])
            pool = self._pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=context)
            # Workers start on demand: start them now, not when the first scan hands them work.
            # The first submit waits for the forkserver (about 0.2 s): not on the caller's time.
            self._starting = threading.Thread(target=_start_workers, args=(pool, self.workers), name="scan-pool-start")
            self._starting.start()

    def _started(self) -> None:
        starting, self._starting = self._starting, None
        if starting is not None:
            starting.join()

    def _rebuild(self) -> None:
        """A worker died (SIGKILL, the OOM killer): the pool is unusable for good; start a new one."""
        self._started()
        broken, self._pool = self._pool, None
        if broken is not None:
            broken.shutdown(wait=False, cancel_futures=True)
        self.start()

    def close(self) -> None:
        self._started()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def scan(
        self, path: str | Path, progress: Progress | None = None, *, watch: WatchAhead | None = None
    ) -> ScanResult:
        """Scan `path`; with a pool, the top two levels are read here and the subtrees farmed out.
        `watch`: see WatchAhead; every directory of the tree passes through it before it is listed."""
        path = os.fspath(path)
        self._started()
        if self._pool is None:
            if watch is not None:
                watch(path, True)
            return scan_local(path, progress)
        started = time.monotonic()
        try:
            root_stat = lstat(path)
        except OSError:
            return ScanResult(None)
        if not stat.S_ISDIR(root_stat.st_mode):
            return ScanResult(None)
        root = DirNode(stat_changed(root_stat))
        result = ScanResult(root)
        # Breadth-first until there are enough subtrees to keep every worker busy.
        frontier: Pending = [(path, root, (root_stat.st_dev, root_stat.st_ino, None))]
        for _level in range(2):
            next_frontier: Pending = []
            for current_path, node, chain in frontier:
                result.dirs += 1
                if watch is not None:
                    watch(current_path, False)
                _scan_one(current_path, node, result, next_frontier, chain)
            frontier = next_frontier
            if len(frontier) >= 4 * self.workers:
                break
        try:
            self._gather(frontier, result, progress, watch)
        except BrokenProcessPool as err:
            self._rebuild()
            raise ScanFailedError("a scan worker process died (killed, or out of memory)") from err
        result.seconds = time.monotonic() - started
        return result

    def _gather(self, jobs: Pending, result: ScanResult, progress: Progress | None, watch: WatchAhead | None) -> None:
        assert self._pool is not None
        next_report = 200_000
        # Subtrees go out in batches, a few per worker: each job costs the daemon a round trip
        # through the pool (about 0.2 ms), and a store of small models has thousands of subtrees.
        # Dealt round-robin, so that a run of large neighbours is spread over the batches.
        count = max(1, min(len(jobs), BATCHES_PER_WORKER * self.workers))
        batches = [jobs[first::count] for first in range(count)]
        futures: list[tuple[Pending, Future[list[ScanResult]]]] = []
        for batch in batches:
            if watch is not None:
                # The workers scan the batches handed out so far while the next one is watched.
                for job_path, _placeholder, _chain in batch:
                    watch(job_path, True)
            args = [(job_path, chain[2] if chain else None) for job_path, _placeholder, chain in batch]
            futures.append((batch, self._pool.submit(_scan_in_worker, args)))
        for batch, future in futures:
            for (_path, placeholder, _chain), sub in zip(batch, future.result(), strict=True):
                result.errors.extend(sub.errors)
                result.files += sub.files
                result.dirs += sub.dirs
                if sub.node is not None:
                    placeholder.dirs = sub.node.dirs
                    placeholder.files = sub.node.files
                    placeholder.hard = sub.node.hard
                    placeholder.changed = sub.node.changed
            if progress is not None and result.files >= next_report:
                progress(result.files)
                next_report = result.files + 200_000
