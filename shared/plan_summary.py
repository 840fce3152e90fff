"""The last plan's summary file: what a cleanup would free per policy, written by the cleaner, served by the exporter.

Invariants:
- One file, `<state path>/last-plan.json`, replaced atomically (temp file, fsync, rename): a reader
  sees the previous summary or the next one, never half of either.
- `bytes`/`models` hold every policy the code knows (age, usage, size), 0 when the plan selects
  nothing by it, so a series never vanishes because a policy happened to select nothing.
- The figures are what applying the plan would still free: a `plan` (or a dry run) writes the
  whole plan; a `run` writes it again after applying, less what it evicted, so a forecast net of
  "what the last plan would free" does not count the same bytes twice once they are gone.
- `evictions` lists the plan's models still to go, largest first, at most EVICTIONS_KEPT of them,
  for the exporter's page; `evictions_total` says how many there were.
- Reading never raises: a missing, unreadable or malformed file is None (the reader logs nothing,
  the metrics are simply absent).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic_json import write_json_atomically

SUMMARY_SCHEMA_VERSION = 1
SUMMARY_FILE = "last-plan.json"
POLICIES = ("age", "usage", "size")  # cleaner/policies.py names; served as the `policy` label
EVICTIONS_KEPT = 200


@dataclass(frozen=True, slots=True)
class PlannedEviction:
    tier: str
    model: str
    bytes: int
    policy: str


@dataclass(frozen=True, slots=True)
class PlanSummary:
    plan_id: str
    timestamp: float  # when the plan was made (Unix seconds): the plan's own `created_at`
    bytes: dict[str, int] = field(default_factory=dict)  # policy -> bytes the plan would still free
    models: dict[str, int] = field(default_factory=dict)  # policy -> models the plan would still evict
    evictions: tuple[PlannedEviction, ...] = ()  # largest first, at most EVICTIONS_KEPT
    evictions_total: int = 0
    applied_run_id: str | None = None  # set once a run applied the plan: the figures are what it left

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SUMMARY_SCHEMA_VERSION,
            "plan_id": self.plan_id,
            "timestamp": self.timestamp,
            "bytes": dict(self.bytes),
            "models": dict(self.models),
            "evictions": [
                {"tier": e.tier, "model": e.model, "bytes": e.bytes, "policy": e.policy} for e in self.evictions
            ],
            "evictions_total": self.evictions_total,
            "applied_run_id": self.applied_run_id,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> PlanSummary:
        def counts(name: str) -> dict[str, int]:
            value = data[name]
            if not isinstance(value, Mapping):
                raise TypeError(name)
            return {str(key): int(count) for key, count in value.items()}

        applied = data.get("applied_run_id")
        return cls(
            plan_id=str(data["plan_id"]),
            timestamp=float(data["timestamp"]),
            bytes=counts("bytes"),
            models=counts("models"),
            evictions=tuple(
                PlannedEviction(str(e["tier"]), str(e["model"]), int(e["bytes"]), str(e["policy"]))
                for e in data.get("evictions", ())
            ),
            evictions_total=int(data.get("evictions_total", 0)),
            applied_run_id=None if applied is None else str(applied),
        )


def summarize(
    plan_id: str,
    timestamp: float,
    evictions: Iterable[PlannedEviction],
    *,
    gone: Iterable[tuple[str, str]] = (),
    applied_run_id: str | None = None,
) -> PlanSummary:
    """The summary of a plan's evictions, less the (tier, model) pairs in `gone`. Pure."""
    removed = set(gone)
    left = [e for e in evictions if (e.tier, e.model) not in removed]
    freed = dict.fromkeys(POLICIES, 0)
    models = dict.fromkeys(POLICIES, 0)
    for e in left:
        freed[e.policy] = freed.get(e.policy, 0) + e.bytes
        models[e.policy] = models.get(e.policy, 0) + 1
    largest = sorted(left, key=lambda e: (-e.bytes, e.tier, e.model))[:EVICTIONS_KEPT]
    return PlanSummary(
        plan_id=plan_id,
        timestamp=timestamp,
        bytes=freed,
        models=models,
        evictions=tuple(largest),
        evictions_total=len(left),
        applied_run_id=applied_run_id,
    )


def summary_path(state_path: Path | str) -> Path:
    return Path(state_path) / SUMMARY_FILE


def read_plan_summary(path: Path | str) -> PlanSummary | None:
    """The summary, or None when there is none yet or it cannot be read (a reader must never crash on it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8", errors="surrogateescape"))
        return PlanSummary.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_plan_summary(path: Path | str, summary: PlanSummary) -> None:
    """Atomically replace the summary file; model names that are not UTF-8 survive the round trip."""
    write_json_atomically(path, summary.to_json())
