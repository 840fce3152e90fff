"""Last opened, per model: what the inotify reader's IN_OPEN events become. Pure: clock and pid checks passed in.

The reader hands over, in kernel order, a list of `OpenItem`s: the opens of regular files below the
models path (directories' own opens are dropped by the reader), the start and end of the cleaner's
own-reads sessions (shared.own_reads) and queue overflows.

Invariants:
- O1 (per model, never 0): `opened` holds a model only once an open of one of its files was
  accepted; the value is the wall-clock time the reader handled it (inotify carries no time).
- O2 (own reads): an open inside a model covered by a live own-reads session (started earlier in
  the stream, not ended, before its deadline, and `live`: its pid alive, or its process gone after
  ending it normally, its end being further down the stream) is not use; nor is an open inside
  the cleaner's staged models and copies in progress (shared.own_reads.is_cleaner_work).
- O3 (ignore): an open whose path relative to the models path matches a `STORAGE_OPENS_IGNORE` glob
  is not use.
- O4 (sweeps): with `sweep_models` N > 0, an accepted open is held back for `sweep_window` W seconds
  and only then counts. When more than N distinct models have opens held back at once, every held
  open is dropped as a sweep (a backup, an indexer), and so is every open until W seconds pass with
  none. With N = 0 opens count at once.
- O5 (coverage): `since` is when tracking began without a gap; a lost event queue (overflow) is a
  gap, so it moves `since` to that moment: "not opened since `since`" is then always true.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from exporter.index.events import OpenItem
from shared.layout import Layout
from shared.own_reads import Session, is_cleaner_work

ModelKey = tuple[str, str]  # (tier, model)


@dataclass
class OpenFigures:
    """Counts for logs and the benchmark."""

    seen: int = 0
    counted: int = 0
    own: int = 0
    ignored: int = 0
    swept: int = 0
    sweeps: int = 0


@dataclass
class _Held:
    first: float
    last: float


@dataclass
class OpensTracker:
    root: str
    layout: Layout
    since: float
    ignore: tuple[str, ...] = ()
    sweep_models: int = 0
    sweep_window: float = 60.0
    opened: dict[ModelKey, float] = field(default_factory=dict)
    figures: OpenFigures = field(default_factory=OpenFigures)

    def __post_init__(self) -> None:
        self._prefix = self.root.rstrip("/") + "/"
        self._ignore = re.compile("|".join(fnmatch.translate(g) for g in self.ignore)) if self.ignore else None
        self._held: dict[ModelKey, _Held] = {}
        self._sweep_until = 0.0
        self.sessions: dict[str, Session] = {}

    # ----- the stream -----

    def apply(
        self,
        items: Iterable[OpenItem],
        now: float,
        session: Callable[[str], Session | None],
        live: Callable[[str, Session], bool],
    ) -> None:
        """Apply one chunk in kernel order; `session(name)` reads a marker (None: unreadable),
        `live(name, session)` says whether a session not ended in the stream yet still covers."""
        for kind, value in items:
            if kind == "open":
                self._open(value, now, live)
            elif kind == "start":
                found = session(value)
                if found is not None:
                    self.sessions[value] = found
            elif kind == "end":
                self.sessions.pop(value, None)
            elif kind == "overflow":
                self._held.clear()
                self.since = now
        self.tick(now)

    def _open(self, path: str, now: float, live: Callable[[str, Session], bool]) -> None:
        self.figures.seen += 1
        if not path.startswith(self._prefix):
            return
        rel = path[len(self._prefix) :]
        tier, model = self.layout.classify(tuple(rel.split("/", 2)[:2]))
        if model is None:
            return
        if self._ignore is not None and self._ignore.fullmatch(rel):
            self.figures.ignored += 1
            return
        key = (tier, model)
        if model[0] == "." and is_cleaner_work(model):
            self.figures.own += 1
            return
        if self.sessions and self._own(f"{tier}/{model}", now, live):
            self.figures.own += 1
            return
        if self.sweep_models <= 0:
            self._count(key, now)
            return
        if now < self._sweep_until:
            self._sweep_until = now + self.sweep_window
            self.figures.swept += 1
            return
        held = self._held.get(key)
        if held is None:
            self._held[key] = _Held(now, now)
            if len(self._held) > self.sweep_models:
                self.figures.swept += len(self._held)
                self.figures.sweeps += 1
                self._held.clear()
                self._sweep_until = now + self.sweep_window
        else:
            held.last = now

    def _own(self, key: str, now: float, live: Callable[[str, Session], bool]) -> bool:
        for name, s in list(self.sessions.items()):
            if now > s.deadline or not live(name, s):
                del self.sessions[name]  # a killed or hung cleaner hides nothing more
                continue
            if key in s.models:
                return True
        return False

    def _count(self, key: ModelKey, when: float) -> None:
        self.figures.counted += 1
        if self.opened.get(key, 0.0) < when:
            self.opened[key] = when

    def tick(self, now: float) -> None:
        """Count the held opens whose window has passed without a sweep (O4)."""
        if not self._held:
            return
        due = [k for k, h in self._held.items() if h.first + self.sweep_window <= now]
        for key in due:
            self._count(key, self._held.pop(key).last)

    # ----- persistence and pruning -----

    def keep_only(self, present: Iterable[ModelKey]) -> None:
        """Forget models no longer in the store."""
        keep = set(present)
        gone = [k for k in self.opened if k not in keep]
        for key in gone:
            del self.opened[key]

    def to_json(self, saved_at: float) -> dict[str, object]:
        return {
            "version": 1,
            "since": self.since,
            "saved_at": saved_at,
            "opened": {f"{t}/{m}": ts for (t, m), ts in sorted(self.opened.items())},
        }


def parse_state(data: object) -> tuple[float, float, dict[ModelKey, float]]:
    """(since, saved_at, opened) of a saved state; ValueError when it is not one."""
    if not isinstance(data, Mapping) or data.get("version") != 1:
        raise ValueError("not a version 1 opens state")
    since, saved_at, opened = data.get("since"), data.get("saved_at"), data.get("opened")
    if not isinstance(since, int | float) or not isinstance(saved_at, int | float) or not isinstance(opened, Mapping):
        raise ValueError("since, saved_at, opened: wrong types")
    out: dict[ModelKey, float] = {}
    for key, ts in opened.items():
        tier, sep, model = str(key).partition("/")
        if not sep or not model or not isinstance(ts, int | float) or isinstance(ts, bool):
            raise ValueError(f"opened[{key!r}]: expected tier/model: timestamp")
        out[(tier, model)] = float(ts)
    return float(since), float(saved_at), out
