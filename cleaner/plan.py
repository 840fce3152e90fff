"""The plan: what a cleanup would evict and keep, and why. Frozen values, saved as immutable JSON.

Deciding (policies) and acting (apply) both speak this model; neither touches the other's code.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.audit import AuditLog
from shared.errors import ConfigError, FilesystemError

PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class ModelFacts:
    """One model as the inventory saw it (from Prometheus), plus its usage when known."""

    tier: str
    model: str
    bytes: int
    files: int
    last_changed: float  # newest mtime/ctime inside the model, seconds since the epoch
    requests: float | None = None  # requests in the usage window; None = unknown
    partial: bool = False  # holds *.incomplete/*.partial/*.tmp/*.lock: a download in progress
    hold: str = ""  # why the filesystem check keeps it (a `.keep` marker, unreadable); empty = nothing
    hold_code: str = ""  # the shared.reasons.Reason of `hold`
    usage_source: str = ""  # which signal gave `requests` (cleaner.usage_source); "" = requests, as always

    @property
    def key(self) -> str:
        return f"{self.tier}/{self.model}"


@dataclass(frozen=True, slots=True)
class Eviction:
    tier: str
    model: str
    bytes: int
    files: int
    last_changed: float  # the snapshot apply re-checks: a newer change means "changed since the plan"
    age_seconds: float
    requests: float | None
    policy: str  # age | usage | size
    reason: str  # one line, for people


@dataclass(frozen=True, slots=True)
class Kept:
    tier: str
    model: str
    bytes: int
    reason: str  # the sentence, derived from `code` (shared.reasons)
    policy: str | None = None  # the policy that would have evicted it, if any
    code: str = ""  # a shared.reasons.Reason; "" in plans saved before codes existed


@dataclass(frozen=True, slots=True)
class Plan:
    plan_id: str
    created_at: float
    evictions: tuple[Eviction, ...]
    kept: tuple[Kept, ...]
    total_bytes_before: int
    evidence: dict[str, Any] = field(default_factory=dict)  # queries, evaluation time, coverage, settings
    warnings: tuple[str, ...] = ()

    @property
    def bytes_to_free(self) -> int:
        return sum(e.bytes for e in self.evictions)

    @property
    def total_bytes_after(self) -> int:
        return self.total_bytes_before - self.bytes_to_free

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": PLAN_SCHEMA_VERSION,
            "plan_id": self.plan_id,
            "created_at": self.created_at,
            "evictions": [asdict(e) for e in self.evictions],
            "kept": [asdict(k) for k in self.kept],
            "bytes_to_free": self.bytes_to_free,
            "total_bytes_before": self.total_bytes_before,
            "total_bytes_after": self.total_bytes_after,
            "evidence": self.evidence,
            "warnings": list(self.warnings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Plan:
        try:
            return cls(
                plan_id=str(data["plan_id"]),
                created_at=float(data["created_at"]),
                evictions=tuple(Eviction(**e) for e in data["evictions"]),
                kept=tuple(Kept(**k) for k in data["kept"]),
                total_bytes_before=int(data["total_bytes_before"]),
                evidence=dict(data.get("evidence", {})),
                warnings=tuple(data.get("warnings", ())),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"plan: not a valid plan document ({err})") from None


def new_plan_id(now: float) -> str:
    """Sortable by time, unique without coordination: 20261125T190501Z-3f9a1c."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + secrets.token_hex(3)


def plans_dir(state_path: Path) -> Path:
    return state_path / "plans"


def save_plan(plan: Plan, state_path: Path) -> Path:
    """Write the plan once, atomically, read-only: a saved plan is never edited."""
    directory = plans_dir(state_path)
    path = directory / f"{plan.plan_id}.json"
    tmp = path.with_suffix(".json.tmp")
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(plan.to_json(), handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o444)
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise FilesystemError.from_os(err, "save the plan", path) from None
    return path


def load_plan(plan_id: str, state_path: Path) -> Plan:
    if not plan_id or "/" in plan_id or plan_id.startswith("."):
        raise ConfigError(f"plan: {plan_id!r} is not a plan id")
    path = plans_dir(state_path) / f"{plan_id}.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"plan: no saved plan {plan_id!r} under {plans_dir(state_path)}") from None
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f"plan: cannot read {path}: {err}") from None
    return Plan.from_json(data)


def audit_plan(audit: AuditLog, plan: Plan, *, actor: str, command: str, run_id: str | None = None) -> None:
    """The audit line of a plan made: every action is audited, a preview too (who looked at what would go)."""
    details: dict[str, object] = {
        "plan_id": plan.plan_id,
        "bytes_to_free": plan.bytes_to_free,
        "evictions": len(plan.evictions),
        "kept": len(plan.kept),
        "dry_run": run_id is None,
        "command": command,
    }
    if run_id is not None:
        details["run_id"] = run_id
    audit.append("plan", actor=actor, target=plan.plan_id, bytes=plan.bytes_to_free, details=details)
