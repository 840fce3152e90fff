"""What the index reports, as plain values: a consistent snapshot for a scrape or an API call, a
reconcile's result, the scrub's figures. Pure: built by the lifecycle (service.py) under the index lock,
read by the metrics and API wings, which need nothing else of the lifecycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from exporter.index.tree import ModelStat


@dataclass(frozen=True, slots=True)
class ScrubFigures:
    """What /metrics says of the scrub (all zero while it is disabled)."""

    corrections_total: int = 0
    drift_bytes_total: int = 0
    cycle_seconds: float = 0.0
    last_cycle_timestamp: float = 0.0  # until the first cycle ends: when the scrub started
    expected_cycle_seconds: float = 0.0  # indexed files, plus 9 per directory, over the budget


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What a scrape or an API call sees: a consistent copy taken under the index lock."""

    tiers: dict[str, tuple[int, int, int]]
    models: list[ModelStat]
    ready: bool
    polling: bool
    events_total: int
    overflows_total: int
    errors_total: dict[str, int]
    scan_duration_seconds: float
    last_full_scan: float
    drift_bytes: int
    watches: int
    scrub: ScrubFigures = field(default_factory=ScrubFigures)
    scan_failures_total: int = 0
    allocated: dict[str, int] = field(default_factory=dict)  # tier -> allocated bytes
    # Last opened (exporter.index.opens): since when tracking has no gap (None: not tracked), and
    # (tier, model, timestamp) of the models in the index that were seen opened.
    opens_since: float | None = None
    last_opened: tuple[tuple[str, str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    seconds: float
    drift_bytes: int
    drift_models: int
    files: int
    reason: str
    error: str = ""  # the scan failed: nothing above is a finding, the index was kept as it was
