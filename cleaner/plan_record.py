"""Leaves the last plan's per-policy figures in the state path (shared/plan_summary.py) for the exporter.

A summary that cannot be written is a warning, never a failed plan or run: it only feeds metrics
and the exporter's page, and a run that already moved models must still report what it did.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from cleaner.plan_values import Plan
from shared.logs import FAILURE, get_logger
from shared.plan_summary import PlannedEviction, summarize, summary_path, write_plan_summary

log = get_logger("cleaner.plan_record")


def record_plan(
    plan: Plan, state_path: Path, *, gone: Iterable[tuple[str, str]] = (), applied_run_id: str | None = None
) -> None:
    """Write what `plan` would still free, per policy, less the models in `gone` (already evicted)."""
    summary = summarize(
        plan.plan_id,
        plan.created_at,
        (PlannedEviction(e.tier, e.model, e.bytes, e.policy) for e in plan.evictions),
        gone=gone,
        applied_run_id=applied_run_id,
    )
    path = summary_path(state_path)
    try:
        write_plan_summary(path, summary)
    except OSError as err:
        log.warning("plan.summary_not_written", path=str(path), error=err.strerror or str(err), outcome=FAILURE)
