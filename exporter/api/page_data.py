"""What the front page shows, picked from a snapshot's parts: frozen rows and one PageData. Pure.

Invariants:
- No I/O, no clock: the caller passes `now`, the snapshot's parts, and what the caller may see
  (`show_details`); exporter/api/page.py renders the result, exporter/api/page_route.py gathers it.
- The page costs O(rows shown), not O(models): `page_data` picks the LARGEST_SHOWN largest models
  in O(models log k), and only when `show_details` is set (otherwise only their count travels).
- A figure the exporter does not measure is None here (allocated bytes without `allocated`, last
  opened without `opens_since`), so the page can mark the gap instead of showing a made-up zero.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from exporter.index.fsinfo import FsUsage
from exporter.index.tree import ModelStat
from shared.plan_summary import PlanSummary

LARGEST_SHOWN = 25


@dataclass(frozen=True, slots=True)
class TierRow:
    tier: str
    bytes: int
    files: int
    models: int
    allocated_bytes: int | None = None  # None: not measured by this exporter (yet)


@dataclass(frozen=True, slots=True)
class ModelRow:
    tier: str
    model: str
    bytes: int
    files: int
    last_changed: float | None
    last_opened: float | None = None  # None: not tracked (yet)


@dataclass(frozen=True, slots=True)
class ScrubView:
    """The scrub's figures as /metrics serves them (`model_storage_scrub_*`)."""

    corrections_total: int
    drift_bytes_total: int
    last_cycle_seconds: float  # 0 until the first full cycle ends
    last_cycle_timestamp: float
    expected_cycle_seconds: float


@dataclass(frozen=True, slots=True)
class LastRun:
    """The cleaner's last run, as its state file says (shared/cleanup_state.py)."""

    timestamp: float
    success: bool
    exit_code: int
    error: str | None
    evicted_bytes_total: Mapping[str, int]
    evicted_models_total: Mapping[str, int]
    skipped: Mapping[str, int]


@dataclass(frozen=True, slots=True)
class PageData:
    generated_at: float
    tiers: tuple[TierRow, ...]
    capacity_bytes: int
    filesystem: FsUsage | None
    ready: bool
    polling: bool
    last_full_scan: float | None
    models_total: int
    largest: tuple[ModelRow, ...]
    show_details: bool  # per-model rows and error text; False: only their counts
    token_rejected: bool = False  # a token was sent and not accepted
    last_run: LastRun | None = None
    trash_bytes: int | None = None
    trash_limit_bytes: int = 0
    plan: PlanSummary | None = None
    scrub: ScrubView | None = None  # None: the scrub is off (STORAGE_SCRUB_STATS_PER_SECOND=0)
    allocated_tracked: bool = False
    last_opened_tracked: bool = False
    opens_since: float | None = None  # since when opens are tracked without a gap (exporter/index/opens.py)
    links: tuple[tuple[str, str], ...] = field(default_factory=tuple)  # (path, label): fixed by the caller

    @property
    def total_bytes(self) -> int:
        return sum(t.bytes for t in self.tiers)

    @property
    def total_allocated_bytes(self) -> int:
        return sum(t.allocated_bytes or 0 for t in self.tiers)


def page_data(
    *,
    tiers: Mapping[str, tuple[int, int, int]],
    models: Sequence[ModelStat],
    capacity_bytes: int,
    filesystem: FsUsage | None,
    ready: bool,
    polling: bool,
    last_full_scan: float,
    show_details: bool,
    now: float,
    last_run: LastRun | None = None,
    trash_bytes: int | None = None,
    trash_limit_bytes: int = 0,
    plan: PlanSummary | None = None,
    token_rejected: bool = False,
    links: tuple[tuple[str, str], ...] = (),
    scrub: ScrubView | None = None,
    allocated: Mapping[str, int] | None = None,
    last_opened: Mapping[tuple[str, str], float] | None = None,
    opens_since: float | None = None,
) -> PageData:
    """The page's data from a snapshot's parts: the largest models picked in O(models log k). Pure."""
    largest = heapq.nsmallest(LARGEST_SHOWN, models, key=lambda s: (-s.bytes, s.tier, s.model)) if show_details else []
    return PageData(
        generated_at=now,
        tiers=tuple(
            TierRow(t, b, f, m, None if allocated is None else allocated.get(t, 0))
            for t, (b, f, m) in sorted(tiers.items(), key=lambda kv: _tier_order(kv[0]))
        ),
        capacity_bytes=capacity_bytes,
        filesystem=filesystem,
        ready=ready,
        polling=polling,
        last_full_scan=last_full_scan if last_full_scan > 0 else None,
        models_total=len(models),
        largest=tuple(
            ModelRow(
                s.tier,
                s.model,
                s.bytes,
                s.files,
                s.changed if s.changed > 0 else None,
                (last_opened or {}).get((s.tier, s.model)),
            )
            for s in largest
        ),
        show_details=show_details,
        token_rejected=token_rejected,
        last_run=last_run,
        trash_bytes=trash_bytes,
        trash_limit_bytes=trash_limit_bytes,
        plan=plan,
        links=links,
        scrub=scrub,
        allocated_tracked=allocated is not None,
        last_opened_tracked=opens_since is not None,
        opens_since=opens_since,
    )


def _tier_order(tier: str) -> tuple[int, str]:
    order = ("raw", "quantized", "repository")
    return (order.index(tier), tier) if tier in order else (len(order) + (tier == "other"), tier)
