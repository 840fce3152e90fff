"""Pure request/response documents of the storage API: query parsing and the /storage/* answers.

Invariants:
- No I/O, no clock, no threads: values in, values out (the pure-modules import contract holds it).
  The route handlers in exporter/api/routes.py read the request and the clock and pass them in.
- A query is read strictly: an unknown or repeated parameter, or a value out of range, is a
  BadRequestError (a 400 with a one-line message), never silently ignored.
- Model names reach the documents through shared.names.name_text, the one encoding of odd names.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Sequence
from typing import Any

from exporter.index.fsinfo import FsUsage
from exporter.index.status import ReconcileResult, Snapshot
from shared.cleanup_state import CleanupState
from shared.names import name_text

TOP_DEFAULT, TOP_MIN, TOP_MAX = 10, 1, 1000


class BadRequestError(Exception):
    def __init__(self, message: str, code: str = "bad_request", status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.status = status


_DIGITS = re.compile(r"[0-9]{1,7}")


def _one_value(params: Sequence[tuple[str, str]], allowed: Sequence[str]) -> dict[str, str]:
    """The query as name -> value: unknown or repeated parameters are rejected, not ignored."""
    seen: dict[str, str] = {}
    for name, value in params:
        if name not in allowed:
            shown = name[:40]
            expected = ", ".join(allowed) if allowed else "none"
            raise BadRequestError(f"unknown query parameter {shown!r} (this endpoint takes: {expected})")
        if name in seen:
            raise BadRequestError(f"query parameter {name!r} given more than once")
        seen[name] = value
    return seen


def parse_top(params: Sequence[tuple[str, str]]) -> int:
    """`?top=N` of /storage/info, 1..1000, default 10."""
    value = _one_value(params, ("top",)).get("top")
    if value is None:
        return TOP_DEFAULT
    if not _DIGITS.fullmatch(value) or not TOP_MIN <= int(value) <= TOP_MAX:
        raise BadRequestError(f"top={value[:20]!r}: expected a whole number from {TOP_MIN} to {TOP_MAX}")
    return int(value)


def parse_dry_run(params: Sequence[tuple[str, str]]) -> bool:
    """`?dry_run=true|false` of /storage/cleanup; false when absent, as the spec says."""
    value = _one_value(params, ("dry_run",)).get("dry_run")
    if value is None:
        return False
    lowered = value.lower()
    if lowered not in ("true", "false"):
        raise BadRequestError(f"dry_run={value[:20]!r}: expected true or false")
    return lowered == "true"


def parse_none(params: Sequence[tuple[str, str]]) -> None:
    _one_value(params, ())


def _ratio(used: int, of: int) -> float | None:
    return round(used / of, 6) if of > 0 else None


def info_document(
    snap: Snapshot,
    *,
    capacity_bytes: int,
    filesystem: FsUsage | None,
    cleanup: CleanupState | None,
    top: int,
    now: float,
) -> dict[str, Any]:
    """What GET /storage/info answers, from one snapshot. Pure."""
    tiers = {
        tier: {"bytes": b, "files": f, "models": m, "allocated_bytes": snap.allocated.get(tier, 0)}
        for tier, (b, f, m) in sorted(snap.tiers.items())
    }
    total = {key: sum(t[key] for t in tiers.values()) for key in ("bytes", "files", "models", "allocated_bytes")}
    largest = heapq.nsmallest(top, snap.models, key=lambda s: (-s.bytes, s.tier, s.model))
    fs: dict[str, Any] | None = None
    if filesystem is not None:
        fs = {
            "size_bytes": filesystem.size_bytes,
            "avail_bytes": filesystem.avail_bytes,
            "usage_ratio": _ratio(filesystem.size_bytes - filesystem.avail_bytes, filesystem.size_bytes),
        }
    return {
        "tiers": tiers,
        "total": total,
        "capacity_bytes": capacity_bytes,
        # Capacity is what fills the disk: allocated bytes. The apparent figure is given beside it.
        "usage_ratio": _ratio(total["allocated_bytes"], capacity_bytes),
        "apparent_usage_ratio": _ratio(total["bytes"], capacity_bytes),
        "filesystem": fs,
        "largest_models": [
            {
                "tier": s.tier,
                "model": name_text(s.model),
                "bytes": s.bytes,
                "allocated_bytes": s.allocated,
                "files": s.files,
                "last_changed": s.changed if s.changed > 0 else None,
            }
            for s in largest
        ],
        "scan": {
            "ready": snap.ready,
            "polling": snap.polling,
            "last_full_scan": snap.last_full_scan if snap.last_full_scan > 0 else None,
            "scan_duration_seconds": round(snap.scan_duration_seconds, 6),
            "drift_bytes": snap.drift_bytes,
            "events_total": snap.events_total,
            "overflows_total": snap.overflows_total,
            "errors_total": dict(sorted(snap.errors_total.items())),
            "watches": snap.watches,
        },
        "cleanup": None if cleanup is None else cleanup.to_json(),
        "generated_at": round(now, 3),
    }


def collect_document(result: ReconcileResult, *, coalesced: bool) -> dict[str, Any]:
    return {
        "seconds": round(result.seconds, 6),
        "drift_bytes": result.drift_bytes,
        "drift_models": result.drift_models,
        "files": result.files,
        "coalesced": coalesced,
    }


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}
