"""Shared fixtures: a temp store laid out like production, and the real processes the suite runs."""

from __future__ import annotations

import threading
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


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """As watchdog's own suite does: a test that leaves threads running fails."""
    before = set(threading.enumerate())
    yield
    leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
    for thread in leaked:
        thread.join(timeout=5)
    still = [t.name for t in leaked if t.is_alive()]
    assert not still, f"threads leaked: {still}"
