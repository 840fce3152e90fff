"""Whether the last plan's usage data was blind, for the served gauge: read from a plan, recorded in the state file.

A dry run changes no counters, but blind usage is news; a plan and a run both record it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from cleaner.lock import CleanerLock, lock_path
from cleaner.store_paths import StorePaths
from shared.cleanup_state import read_cleanup_state, write_cleanup_state
from shared.errors import PreconditionError


def plan_usage_blind(evidence: dict[str, Any]) -> bool:
    coverage = evidence.get("usage_coverage") or {}
    return bool(coverage.get("blind", False))


def record_usage_blind(paths: StorePaths, usage_blind: bool) -> None:
    """A dry run changes no counters, but whether usage was blind is news: the served gauge follows.

    Only an existing state is updated: a state made by a plan would read as a finished run. Under
    the cleaner lock, so a run's counters are never overwritten; a running cleaner records its own.
    """
    try:
        lock = CleanerLock(lock_path(paths.state_path))
        lock.acquire()
    except PreconditionError:
        return
    try:
        state = read_cleanup_state(paths.cleanup_state_file)
        if state is not None and state.usage_blind != usage_blind:
            write_cleanup_state(paths.cleanup_state_file, replace(state, usage_blind=usage_blind))
    finally:
        lock.release()
