"""Markers by which model-storage tells the exporter "these opens are mine, not use".

inotify names no process, so the cleaner announces what it is about to read (or write) before it
does, in a file the exporter watches on the same inotify descriptor as the models: the kernel
queues the marker's arrival before the opens it covers and its end after them, so the exporter
attributes every open exactly, however late it reads its queue.

Invariants:
- A session is one file `<state>/reading/<host>-<pid>-<n>.json`, written whole (temporary name,
  then rename) before the first open it covers; its end is a rename to `.done`, after the last one.
  The content never changes, so a late reader of either name sees what the session covered.
- A session also covers nothing after its `deadline`, nor (on the same host) once its pid is gone:
  a killed cleaner never hides use for longer than that.
- `.done` files are removed by the next session, once older than `DONE_KEEP_SECONDS`.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.atomic_json import write_json_atomically

MARKER_DIR = "reading"
ACTIVE_SUFFIX = ".json"
DONE_SUFFIX = ".done"
# A session lasting longer than this is no longer believed (a hung cleaner must not hide use forever).
DEFAULT_DEADLINE_SECONDS = 6 * 3600.0
# Long enough for an exporter far behind on its queue to read a finished session's content.
DONE_KEEP_SECONDS = 3600.0
_counter = itertools.count()
# The cleaner stages a model it copies (`.NAME.model-storage-cleaner-OP.staged`) and builds a copy
# (`.NAME.model-storage-cleaner-OP.partial`) under names of its own, beside the model (cleaner.staged,
# cleaner.journal): what is opened there is the cleaner's work by its name alone.
WORK_TAG = ".model-storage-cleaner-"
WORK_SUFFIXES = (".partial", ".staged")


def is_cleaner_work(model: str) -> bool:
    """Whether a first-level name is one of the cleaner's staged models or copies in progress."""
    return model.startswith(".") and WORK_TAG in model and model.endswith(WORK_SUFFIXES)


@dataclass(frozen=True, slots=True)
class Session:
    """Who reads which models until when."""

    host: str
    pid: int
    deadline: float
    models: frozenset[str]  # "tier/model"

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "pid": self.pid, "deadline": self.deadline, "models": sorted(self.models)}

    @classmethod
    def from_json(cls, data: Any) -> Session:
        """Raises ValueError on anything but a well-formed marker."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        models = data.get("models")
        pid, deadline, host = data.get("pid"), data.get("deadline"), data.get("host")
        if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
            raise ValueError("models: expected a list of strings")
        if not isinstance(pid, int) or isinstance(pid, bool) or not isinstance(deadline, int | float):
            raise ValueError("pid, deadline: expected numbers")
        if not isinstance(host, str):
            raise ValueError("host: expected a string")
        return cls(host, pid, float(deadline), frozenset(models))


def marker_dir(state_path: Path) -> Path:
    return state_path / MARKER_DIR


def read_session(directory: Path, name: str) -> Session:
    """The session of marker `name` (`*.json`), read under its active or its done name."""
    stem = name[: -len(ACTIVE_SUFFIX)]
    last: OSError | None = None
    for candidate in (name, stem + DONE_SUFFIX):
        try:
            text = (directory / candidate).read_text(encoding="utf-8")
        except OSError as err:
            last = err
            continue
        return Session.from_json(json.loads(text))
    assert last is not None
    raise last


def _prune(directory: Path, now: float) -> None:
    with contextlib.suppress(OSError), os.scandir(directory) as entries:
        for entry in entries:
            if entry.name.endswith(DONE_SUFFIX):
                with contextlib.suppress(OSError):
                    if now - entry.stat(follow_symlinks=False).st_mtime > DONE_KEEP_SECONDS:
                        os.unlink(entry.path)


@contextlib.contextmanager
def own_reads(
    state_path: Path, models: Iterable[str], deadline_seconds: float = DEFAULT_DEADLINE_SECONDS
) -> Iterator[None]:
    """Announce that this process reads `models` ("tier/model") for the duration of the block.

    Best effort: a state path that cannot be written only means these opens may count as use.
    """
    keys = frozenset(models)
    if not keys:
        yield
        return
    directory = marker_dir(state_path)
    now = time.time()
    session = Session(socket.gethostname(), os.getpid(), now + deadline_seconds, keys)
    name = f"{session.host}-{session.pid}-{next(_counter)}-{int(now * 1000)}{ACTIVE_SUFFIX}"
    path = directory / name
    try:
        _prune(directory, now)
        write_json_atomically(path, session.to_json())
    except OSError:
        path = Path()
    try:
        yield
    finally:
        if path != Path():
            with contextlib.suppress(OSError):
                os.replace(path, path.with_name(name[: -len(ACTIVE_SUFFIX)] + DONE_SUFFIX))
