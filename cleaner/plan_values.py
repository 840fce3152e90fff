"""The plan's values: what a cleanup would evict and keep, and why. Frozen and pure (no disk, no clock).

Deciding (policies) and acting (apply) both speak this model; neither touches the other's code.
Saving, loading and ids are cleaner.plan_store's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shared.errors import ConfigError

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
