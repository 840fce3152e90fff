"""The exporter's lifecycle: watch, scan, apply events, reconcile; threads and the one index lock."""

from __future__ import annotations

import contextlib
import errno
import os
import queue
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from exporter.index.events import RawEvent
from exporter.index.fsinfo import network_filesystem, watch_limit
from exporter.index.full_scan import drift, replayed, scan_while_applying
from exporter.index.mounts import MountWatcher
from exporter.index.opens import ModelKey
from exporter.index.opens_store import OpensRecorder
from exporter.index.reader import Handoff, InotifyReader
from exporter.index.retries import SettleQueue, retry_delay
from exporter.index.scan import SCAN_LOOP, ScanFailedError, Scanner
from exporter.index.scrub import Finding, Scrubber, apply_finding
from exporter.index.status import ReconcileResult, ScrubFigures, Snapshot
from exporter.index.tree import Parts, Tree
from exporter.index.updater import IndexUpdater, OverflowFlag
from exporter.index.watch_start import start_reader
from shared.config import Settings
from shared.errors import ConfigError
from shared.logs import FAILURE, SUCCESS, get_logger

log = get_logger("exporter.service")

BATCH_LIMIT = 50_000
# Events applied per hold of the index lock: about 10 ms of lstat work.
APPLY_SLICE = 500
SWITCH_INTERVAL = 0.001
# Hard-link checks (IndexUpdater.resolve_links) walk the index: at most one per this many seconds,
# and never more than a tenth of the updater's time.
LINK_PASS_INTERVAL = 0.5
# How scans report running out of file descriptors (ScanResult.errors carry strerror): a directory
# not read for that reason is scanned again, with its watches, once descriptors may be back.
_OUT_OF_DESCRIPTORS = frozenset({os.strerror(errno.EMFILE), os.strerror(errno.ENFILE)})
T = TypeVar("T")
# The opens store's (tracking since, last opened per model); (None, {}) when opens are not tracked.
_OpensView = tuple[float | None, dict[ModelKey, float]]


@dataclass
class _Counters:
    events: int = 0
    overflows: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    scan_duration: float = 0.0
    last_full_scan: float = 0.0
    drift_bytes: int = 0
    scan_failures: int = 0


class ExporterService:
    """Owns the index and the threads that keep it exact."""

    def __init__(self, settings: Settings, scanner: Scanner | None = None) -> None:
        self.settings = settings
        self.root = str(Path(settings.models_path).resolve())
        self.tree = Tree(settings.layout)
        self.lock = threading.Lock()
        self.scanner = scanner or Scanner(settings.exporter.scan_workers)
        self.events = Handoff(settings.exporter.queue_size)
        self.overflow = OverflowFlag()
        self.updater = IndexUpdater(self.root, self._record_error, self._moved_dir)
        self.counters = _Counters()
        self.ready = threading.Event()
        self.polling = settings.exporter.force_polling
        self.polling_reason = "forced by configuration" if self.polling else ""
        self._stop = threading.Event()
        # Why the initial scan has not made the index ready yet, when it failed ("" otherwise).
        self._scan_failure = ""
        self._reader: InotifyReader | None = None
        self._thread: threading.Thread | None = None
        self._settle = SettleQueue()  # moved directories and descriptor retries (exporter.index.retries)
        self._next_link_pass = 0.0
        self._rescan_requests: queue.Queue[tuple[str, queue.Queue[ReconcileResult]]] = queue.Queue()
        # Names the scrub found different from the disk, for the updater thread (the only writer).
        self._scrub_findings: queue.Queue[Finding] = queue.Queue()
        budget = settings.exporter.scrub_stats_per_second
        self.mounts = MountWatcher(self.root, self._mount_changed, self._stop)
        self.updater.inner_mounts = self.mounts.has_inner
        self.opens: OpensRecorder | None = None
        if settings.exporter.opens_tracking and not self.polling:
            self.opens = OpensRecorder(
                self.root,
                settings.layout,
                settings.state_path,
                ignore=settings.exporter.opens_ignore,
                sweep_models=settings.exporter.opens_sweep_models,
                sweep_window=settings.exporter.opens_sweep_window_seconds,
                save_interval=settings.exporter.opens_save_interval_seconds,
            )
        self.scrubber: Scrubber | None = None
        if budget > 0:
            found = self._scrub_findings.put
            self.scrubber = Scrubber(self.root, budget, self._with_tree, found, self._rewatch, self.ready, self._stop)
            self.scrubber.backlog = self.events.pending

    # ----- lifecycle -----

    def start(self) -> None:
        """Check the models path, start watching, then scan in the background (ready when done)."""
        if not os.path.isdir(self.root):
            raise ConfigError(
                f"config: storage.models.path={self.settings.models_path!s}: expected an existing directory",
                hint="create it or set STORAGE_MODELS_PATH",
            )
        self.scanner.start()
        # The reader, the updater and the HTTP workers share one GIL: hand it over every 1 ms rather
        # than 5 ms, so a scrape waits less behind a burst being applied.
        sys.setswitchinterval(SWITCH_INTERVAL)
        if not self.polling:
            fstype = network_filesystem(self.root)
            if fstype:
                self.polling = True
                self.polling_reason = f"{fstype} filesystem: inotify cannot see other clients' writes"
        if not self.polling:
            self._start_reader()
        if self.polling:
            # Chosen (configuration, a network filesystem) or forced on us (no watches left).
            failed = self._reader is None and bool(self.counters.errors["watch"])
            outcome = {"outcome": FAILURE, "error": self.polling_reason} if failed else {"outcome": SUCCESS}
            log.warning("watch.polling", path=self.root, reason=self.polling_reason, **outcome)
        self._thread = threading.Thread(target=self._run, name="index-updater", daemon=True)
        self._thread.start()
        self.mounts.start()
        if self.scrubber is not None:
            self.scrubber.start()  # it waits for the initial scan

    def _start_reader(self) -> None:
        started = start_reader(self.root, self.events, self._on_overflow, self._on_watch_error, self.opens)
        if isinstance(started, OSError):
            # Usually ENOSPC: fs.inotify.max_user_watches is exhausted. Poll rather than be wrong.
            self._record_error("watch", self.root, started.strerror or str(started))
            self.polling = True
            self.polling_reason = f"cannot add inotify watches: {started.strerror or started}"
            return
        self._reader = started

    def stop(self) -> None:
        self._stop.set()
        if self._reader is not None:
            self._reader.stop()
            self._reader = None
        self.scanner.close()
        self.mounts.join(timeout=30)
        if self.scrubber is not None:
            self.scrubber.join(timeout=30)
        if self._thread is not None:
            self._thread.join(timeout=30)
            # After the updater (which saves on its interval): one writer of the state file at a time.
            self._save_opens(force=True)
            log.info("exporter.stopped", outcome=SUCCESS)

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def readiness(self) -> str:
        """ "ready" once the initial scan is done while the index can still be kept current: the
        updater runs, and so does the inotify reader unless polling has taken over. Otherwise why not."""
        if not self.ready.is_set():
            return self._scan_failure or "scanning"
        if not self.is_alive():
            return "updater stopped"
        reader = self._reader
        if not self.polling and (reader is None or not reader.is_alive()):
            return "watcher stopped"
        return "ready"

    def is_ready(self) -> bool:
        return self.readiness() == "ready"

    # ----- what readers see -----

    def snapshot(self, *, models: bool = True) -> Snapshot:
        """A consistent copy; `models=False` skips the per-model list (O(models) allocations)."""
        opens = self._opens_view(wait=True)
        assert opens is not None  # waited for
        with self.lock:
            return self._snapshot_locked(models, opens)

    def read_index(self, fn: Callable[[Tree], T], *, wait: bool = True) -> tuple[Snapshot, T] | None:
        """A snapshot without the model list, and `fn` run on the live tree under the same lock;
        with `wait` False, None instead of waiting for a lock."""
        opens = self._opens_view(wait=wait)
        if opens is None or not self.lock.acquire(blocking=wait):
            return None
        try:
            return self._snapshot_locked(False, opens), fn(self.tree)
        finally:
            self.lock.release()

    def _opens_view(self, *, wait: bool) -> _OpensView | None:
        # Taken before the index lock, never under it: the reader holds the opens lock while it
        # reads marker files, and the index lock is what the updater and the scrapes contend for.
        opens = self.opens
        if opens is None or self.polling:
            return None, {}
        return opens.view() if wait else opens.view_now()

    def _snapshot_locked(self, models: bool, opens: _OpensView) -> Snapshot:
        c = self.counters
        opens_since, opened = opens
        last_opened: tuple[tuple[str, str, float], ...] = ()
        if opened:
            present = self.tree.models
            last_opened = tuple((t, m, ts) for (t, m), ts in opened.items() if (t, m) in present)
        return Snapshot(
            tiers=self.tree.tier_totals(),
            allocated=self.tree.tier_allocated(),
            models=self.tree.model_stats() if models else [],
            ready=self.is_ready(),
            polling=self.polling,
            events_total=c.events,
            overflows_total=c.overflows,
            errors_total=dict(c.errors),
            scan_duration_seconds=c.scan_duration,
            last_full_scan=c.last_full_scan,
            drift_bytes=c.drift_bytes,
            watches=self._reader.watches if self._reader is not None else 0,
            scan_failures_total=c.scan_failures,
            scrub=self.scrubber.figures() if self.scrubber is not None else ScrubFigures(),
            opens_since=opens_since,
            last_opened=last_opened,
        )

    def watch_limit(self) -> int | None:
        return watch_limit()

    def reconcile(self, reason: str = "api", timeout: float = 600.0) -> ReconcileResult:
        """Ask the updater thread for a full reconcile scan and wait for its result."""
        answer: queue.Queue[ReconcileResult] = queue.Queue(maxsize=1)
        self._rescan_requests.put((reason, answer))
        result = answer.get(timeout=timeout)
        if result.error:
            raise ScanFailedError(f"the reconcile scan failed: {result.error}; the index was kept as it was")
        return result

    # ----- the updater thread -----

    def _run(self) -> None:
        try:
            attempt = 0
            while error := self._full_scan("initial").error:
                # Never ready on a failed scan: an empty index would say every gauge is 0.
                delay = retry_delay(attempt)
                attempt += 1
                self._scan_failure = f"initial scan failed: {error}; retry {attempt} in {delay:g} s"
                if self._stop.wait(delay):
                    return
            self._scan_failure = ""
            if self._reader is not None and self._reader.failed:
                # A watch the initial scan needed could not be added (R8): poll before saying ready,
                # never "watcher stopped" in between.
                self._fall_back_to_polling()
            self.ready.set()
            log.info("exporter.ready", path=self.root, outcome=SUCCESS)
            self._loop()
        except Exception as err:  # never silently: the error is counted and /healthz, /readyz say 503
            log.exception("updater.crashed", error=str(err), outcome=FAILURE)
            with self.lock:
                self._record_error("updater", self.root, str(err))

    def _interval(self) -> float:
        if self.polling:
            return self.settings.exporter.poll_interval_seconds
        return self.settings.exporter.reconcile_interval_seconds

    def _loop(self) -> None:
        interval = self._interval()
        next_reconcile = time.monotonic() + interval if interval else float("inf")
        failures = 0

        def scanned(result: ReconcileResult) -> None:
            # A failed scan changed nothing: try again soon (after an overflow the index is incomplete).
            nonlocal next_reconcile, failures
            if result.error:
                next_reconcile = min(next_reconcile, time.monotonic() + retry_delay(failures))
                failures += 1
            else:
                failures = 0

        window = self.settings.exporter.coalesce_window_seconds
        while not self._stop.is_set():
            if self._reader is not None and self._reader.failed:
                self._fall_back_to_polling()
                interval = self._interval()
                next_reconcile = time.monotonic()
            reasons = self.overflow.take()
            if reasons:
                self._note_overflow(reasons)
                scanned(self._full_scan("overflow"))
                continue
            with contextlib.suppress(queue.Empty):
                reason, answer = self._rescan_requests.get_nowait()
                result = self._full_scan(reason)
                answer.put(result)
                scanned(result)
                continue
            now = time.monotonic()
            if now >= next_reconcile:
                result = self._full_scan("poll" if self.polling else "reconcile")
                next_reconcile = time.monotonic() + interval
                scanned(result)
                continue
            links = self.updater.links_pending(self.tree)
            wait = min(
                0.5,
                next_reconcile - now,
                due - now if (due := self._settle.next_due()) is not None else 0.5,
                self._next_link_pass - now if links else 0.5,
            )
            batch = self.events.get(max(wait, 0.0), window, BATCH_LIMIT)
            if batch:
                self._apply(self.tree, batch)
            self._run_due_settles()
            self._apply_scrub_findings()
            self._save_opens()
            if self.updater.links_pending(self.tree) and time.monotonic() >= self._next_link_pass:
                self._resolve_links()

    def _save_opens(self, *, force: bool = False) -> None:
        """Save the last-opened state when due (models gone from the index are forgotten first)."""
        opens = self.opens
        if opens is None or not (force or opens.due()):
            return
        with self.lock:
            present = list(self.tree.models) if self.ready.is_set() else None
        opens.maybe_save(present, force=True)

    def _resolve_links(self) -> None:
        started = time.monotonic()
        stats = self.updater.resolve_links(self.tree, self.lock)
        seconds = time.monotonic() - started
        self._next_link_pass = time.monotonic() + max(LINK_PASS_INTERVAL, 10 * seconds)
        log.debug("links.resolved", lstat_calls=stats, duration_seconds=round(seconds, 4), outcome=SUCCESS)

    def _with_tree(self, fn: Callable[[Tree], T]) -> T:
        """For the scrub thread: `fn` on the live tree under the index lock (reads only)."""
        with self.lock:
            return fn(self.tree)

    def _rewatch(self, path: str) -> None:
        reader = self._reader
        if reader is not None:
            reader.rewatch(path)

    def _mount_changed(self, path: str) -> None:
        """A mount at or under the models path appeared or went (from the mount watcher's thread):
        the directory there is another one; watch it, then have it scanned from scratch (U1)."""
        log.info("mount.changed", path=path, outcome=SUCCESS)
        reader = self._reader
        if reader is not None:
            reader.remount(path)
        if path == self.root:
            # The whole tree is another one: a full scan, as an operator's reconcile would.
            self._rescan_requests.put(("mount", queue.Queue(maxsize=1)))
            return
        # The whole model is scanned again, not only the mount point: its last change is the newest
        # time of what it holds now, which an unmount can make older (no event raises it).
        parts = self.updater.parts(path) or ()
        if not self.events.put([RawEvent("created", self.updater.path(parts[:2]))]):
            self._on_overflow("handoff_queue_full")

    def _apply_scrub_findings(self) -> None:
        scrubber = self.scrubber
        while scrubber is not None:
            try:
                finding = self._scrub_findings.get_nowait()
            except queue.Empty:
                return
            scrubber.record(apply_finding(self.tree, self.updater, finding, self.lock))

    def _fall_back_to_polling(self) -> None:
        reader = self._reader
        assert reader is not None
        with self.lock:
            # Polling first, then the reader goes: readiness never sees neither.
            self.polling = True
            self.polling_reason = reader.failure or "inotify reader stopped"
        reader.stop()
        self._reader = None
        # Opens are no longer seen: the last save's time is where tracking stopped, so a restart
        # after a longer gap starts `since` afresh (exporter.index.opens_store).
        self._save_opens(force=True)
        self.opens = None
        log.warning("watch.polling", path=self.root, reason=self.polling_reason, outcome=FAILURE, error=reader.failure)

    def _apply(self, tree: Tree, batch: list[RawEvent]) -> None:
        # A burst drains as one big batch; holding the lock for all of it stalled scrapes for
        # seconds. Slices keep each hold to a few milliseconds (coalescing works per slice), and
        # the updater takes the lock only to change the index, not for its lstats.
        for start in range(0, len(batch), APPLY_SLICE):
            piece = batch[start : start + APPLY_SLICE]
            self.updater.apply(tree, piece, self.lock)
            with self.lock:
                self.counters.events += len(piece)
            # Let a waiting scrape take the GIL and the lock before the next slice.
            time.sleep(0)

    def _run_due_settles(self) -> None:
        now = time.monotonic()
        while (parts := self._settle.pop_due(now)) is not None:
            if self._reader is not None:
                self._reader.rewatch(self.updater.path(parts))  # watches before the scan
            self.updater.rescan(self.tree, parts, self.lock)
        self._settle.drained()

    def _moved_dir(self, parts: Parts) -> None:
        settle = self.settings.exporter.settle_seconds
        if settle > 0:
            self._settle.moved(parts, time.monotonic() + settle)

    def _full_scan(self, reason: str) -> ReconcileResult:
        """Scan everything while events keep being applied; replay them on the scan, then swap."""
        log.info("scan.started", reason=reason, path=self.root, loop=SCAN_LOOP)
        started = time.monotonic()

        def progress(files: int) -> None:
            elapsed = time.monotonic() - started
            log.info("scan.progress", files_scanned=files, files_per_second=round(files / max(elapsed, 1e-6)))

        # The initial scan watches each directory before it lists it (R8); later ones find the tree
        # watched (an overflow re-watches it before its scan).
        reader = self._reader
        watch = reader.watch_ahead if reason == "initial" and reader is not None else None

        window = self.settings.exporter.coalesce_window_seconds
        outcome, replay, lost = scan_while_applying(
            lambda: self.scanner.scan(self.root, progress, watch=watch),
            lambda: self.events.get(0.05, window, BATCH_LIMIT),
            lambda batch: self._apply(self.tree, batch),
            self.settings.exporter.queue_size,
        )
        if isinstance(outcome, BaseException):
            if self._stop.is_set():
                # Stopping shuts the scan's pool down under it: nothing failed, nothing to retry.
                log.info("scan.stopped", reason=reason, outcome=SUCCESS)
                return ReconcileResult(time.monotonic() - started, 0, 0, 0, reason, error="stopped")
            with self.lock:
                self._record_error("scan", self.root, str(outcome))
                self.counters.scan_failures += 1
            log.error("scan.failed", reason=reason, error=str(outcome), outcome=FAILURE)
            return ReconcileResult(time.monotonic() - started, 0, 0, 0, reason, error=str(outcome))
        for path, why in outcome.errors:
            self._record_error("scan", path, why)
            self.updater.note_unreadable_path(path)
        fresh = replayed(Tree(self.settings.layout), outcome, replay, self.updater, BATCH_LIMIT)
        with self.lock:
            drift_bytes, drift_models = drift(self.tree, fresh)
            self.tree = fresh
            seconds = time.monotonic() - started
            self.counters.scan_duration = seconds
            self.counters.last_full_scan = time.time()
            if reason != "initial":
                self.counters.drift_bytes = drift_bytes
        if lost:
            self.overflow.raise_("replay_limit")
        log.info(
            "scan.finished",
            reason=reason,
            files=outcome.files,
            dirs=outcome.dirs,
            duration_seconds=round(seconds, 3),
            drift_bytes=drift_bytes if reason != "initial" else 0,
            drift_models=drift_models if reason != "initial" else 0,
            outcome=SUCCESS,
        )
        return ReconcileResult(seconds, drift_bytes if reason != "initial" else 0, drift_models, outcome.files, reason)

    # ----- failures -----

    def _on_overflow(self, reason: str) -> None:
        self.overflow.raise_(reason)

    def _on_watch_error(self, path: str, err: OSError) -> None:
        # Runs on the reader thread, which then sets `failed`; the updater sees it and polls.
        with self.lock:
            self._record_error("watch", path, err.strerror or str(err))

    def _note_overflow(self, reasons: list[str]) -> None:
        with self.lock:
            self.counters.overflows += 1
        log.warning(
            "events.overflowed",
            reasons=sorted(set(reasons)),
            count=len(reasons),
            outcome=FAILURE,
            error="filesystem events were lost; rescanning",
        )

    def _record_error(self, kind: str, path: str, reason: str) -> None:
        self.counters.errors[kind] += 1
        log.warning("index.error", kind=kind, path=path, error=reason, outcome=FAILURE)
        if kind == "scan" and reason in _OUT_OF_DESCRIPTORS:
            self._retry_for_descriptors(path)

    def _retry_for_descriptors(self, path: str) -> None:
        """A directory a scan could not open for want of descriptors is missing from the index:
        re-watch and scan it again later (the settle queue does both), backing off while it fails.
        Runs on the updater thread, like every scan that reports errors."""
        parts = self.updater.parts(path)
        if parts is None:
            return
        self._settle.descriptor_retry(parts, time.monotonic())
