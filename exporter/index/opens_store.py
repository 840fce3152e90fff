"""The shell around exporter.index.opens: the state file, marker reads, pid checks, the clock and a lock.

The state file (`<state>/opens.json`) is replaced atomically once per save interval (also when
nothing changed: its `saved_at` is what tells a restart there was no gap) and on a clean stop; a
SIGKILL loses at most the opens of the last interval, plus those still held back by the sweep
window (exporter.index.opens, O4).
On start it is loaded; a file that cannot be read or parsed is logged (one line, its path) and
tracking starts afresh. Tracking continues from the saved `since` only when the exporter was
down for less than `gap_tolerance` (two save intervals plus a minute): a longer gap may have hidden
opens, so `since` restarts at now.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from exporter.index.events import OpenItem
from exporter.index.opens import ModelKey, OpensTracker, parse_state
from shared.atomic_json import write_json_atomically
from shared.layout import Layout
from shared.logs import FAILURE, SUCCESS, get_logger
from shared.own_reads import ACTIVE_SUFFIX, DONE_SUFFIX, Session, marker_dir, read_session

log = get_logger("exporter.opens")
STATE_NAME = "opens.json"


def pid_alive(session: Session) -> bool:
    """A session of another host (another pid namespace) is believed until its deadline."""
    if session.host != socket.gethostname():
        return True
    try:
        os.kill(session.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def session_live(markers: Path, name: str, session: Session) -> bool:
    """Whether a session whose end is not in the stream yet still covers its models.

    The stream can be read long after the cleaner exited: a session renamed to `.done` ended
    normally, so its end is further down the stream and it covers until then. Its process gone
    with no `.done` is a killed cleaner: it covers nothing more."""
    return pid_alive(session) or (markers / (name[: -len(ACTIVE_SUFFIX)] + DONE_SUFFIX)).exists()


class OpensRecorder:
    """Owns the tracker; `handle` runs on the inotify reader thread, the rest on others."""

    def __init__(
        self,
        root: str,
        layout: Layout,
        state_path: Path,
        *,
        ignore: tuple[str, ...],
        sweep_models: int,
        sweep_window: float,
        save_interval: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.state_file = state_path / STATE_NAME
        self.markers = marker_dir(state_path)
        self.save_interval = save_interval
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self.tracker = OpensTracker(
            root, layout, now, ignore=ignore, sweep_models=sweep_models, sweep_window=sweep_window
        )
        self._load(now)
        self._last_save = now

    def _load(self, now: float) -> None:
        try:
            text = self.state_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as err:
            log.warning("opens.state_unreadable", path=str(self.state_file), error=err.strerror, outcome=FAILURE)
            return
        try:
            since, saved_at, opened = parse_state(json.loads(text))
        except ValueError as err:  # json.JSONDecodeError is one
            log.warning("opens.state_corrupt", path=str(self.state_file), error=str(err)[:200], outcome=FAILURE)
            return
        self.tracker.opened = opened
        if 0 <= now - saved_at <= self.gap_tolerance:
            self.tracker.since = min(since, now)
        else:
            log.info("opens.tracking_gap", path=str(self.state_file), gap_seconds=round(now - saved_at, 1))
        log.info("opens.state_loaded", path=str(self.state_file), models=len(opened), outcome=SUCCESS)

    @property
    def gap_tolerance(self) -> float:
        return 2 * self.save_interval + 60.0

    def prepare(self) -> None:
        """Make the marker directory, so its watch can be added (best effort)."""
        try:
            self.markers.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            log.warning("opens.markers_unavailable", path=str(self.markers), error=err.strerror, outcome=FAILURE)

    def adopt(self) -> None:
        """Take up the sessions under way when the watch was added (a cleaner that started before
        this exporter). Called after the watch: a session still active under the lock (which the
        reader's `handle` also takes) has its end further down the stream."""
        try:
            names = sorted(n for n in os.listdir(self.markers) if n.endswith(ACTIVE_SUFFIX))
        except OSError:
            return
        with self._lock:
            for name in names:
                if (self.markers / name).exists():
                    session = self._session(name)
                    if session is not None:
                        self.tracker.sessions[name] = session

    def _session(self, name: str) -> Session | None:
        try:
            return read_session(self.markers, name)
        except (OSError, ValueError) as err:
            log.warning("opens.marker_unreadable", path=str(self.markers / name), error=str(err)[:200])
            return None

    def _live(self, name: str, session: Session) -> bool:
        return session_live(self.markers, name, session)

    def handle(self, items: list[OpenItem]) -> None:
        now = self._clock()
        with self._lock:
            self.tracker.apply(items, now, self._session, self._live)

    def view(self) -> tuple[float, dict[ModelKey, float]]:
        """(tracking since, last opened per model) for a scrape."""
        with self._lock:
            return self._view()

    def view_now(self) -> tuple[float, dict[ModelKey, float]] | None:
        """`view`, or None rather than wait for the reader's `handle` (it reads marker files under the lock)."""
        if not self._lock.acquire(blocking=False):
            return None
        try:
            return self._view()
        finally:
            self._lock.release()

    def _view(self) -> tuple[float, dict[ModelKey, float]]:
        self.tracker.tick(self._clock())
        return self.tracker.since, dict(self.tracker.opened)

    def due(self) -> bool:
        return self._clock() - self._last_save >= self.save_interval

    def maybe_save(self, present: Iterable[ModelKey] | None, *, force: bool = False) -> None:
        """Save when the interval has passed (or `force`); `present`, when
        given, is every model in the store (the others are forgotten first)."""
        now = self._clock()
        if not force and now - self._last_save < self.save_interval:
            return
        with self._lock:
            self.tracker.tick(now)
            if present is not None:
                self.tracker.keep_only(present)
            # Saved also unchanged once per interval: `saved_at` is what tells a restart there was no gap.
            data = self.tracker.to_json(now)
        self._last_save = now
        try:
            write_json_atomically(self.state_file, data)
        except OSError as err:
            log.warning("opens.save_failed", path=str(self.state_file), error=err.strerror, outcome=FAILURE)
