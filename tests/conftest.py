"""Shared fixtures: a temp store laid out like production, and the real processes the suite runs."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A base path with models/{raw,quantized,repository}; returns the base path."""
    for tier in ("raw", "quantized", "repository"):
        (tmp_path / "storage" / "models" / tier).mkdir(parents=True)
    return tmp_path / "storage"


@pytest.fixture
def logs_dir(tmp_path: Path) -> Path:
    path = tmp_path / "logs"
    path.mkdir()
    return path


# Threads a test may leave: process-wide pools of libraries, started once and kept on purpose.
LONG_LIVED_THREADS = ("asyncio_", "ThreadPoolExecutor-")
STOPPING_SECONDS = 5.0


def leaked_threads(before: set[threading.Thread], stopping_seconds: float = STOPPING_SECONDS) -> list[str]:
    """Threads started since `before` still alive after up to `stopping_seconds` (daemons included)."""
    deadline = time.monotonic() + stopping_seconds

    def leaked() -> list[threading.Thread]:
        return [
            t
            for t in threading.enumerate()
            if t not in before and t.is_alive() and not t.name.startswith(LONG_LIVED_THREADS)
        ]

    for thread in leaked():
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return [f"{t.name} (daemon)" if t.daemon else t.name for t in leaked()]


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """As watchdog's own suite does: a test that leaves threads running fails, daemon threads included
    (every exporter thread is one: a service started and never stopped must not pass). Threads that
    are stopping get a few seconds to end."""
    before = set(threading.enumerate())
    yield
    still = leaked_threads(before)
    assert not still, f"threads leaked: {still}"
