"""The cleaner's last-run state file: written by the one-shot cleaner, served as metrics by the exporter."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shared.atomic_json import write_json_atomically

STATE_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class CleanupState:
    """The last run. The evicted_* counters are cumulative across runs; `skipped` is this run's only."""

    timestamp: float  # when the run finished (Unix seconds); served as the last-run timestamp
    success: bool
    run_id: str
    exit_code: int
    error: str | None = None
    evicted_bytes_total: dict[str, int] = field(default_factory=dict)  # policy -> bytes, cumulative
    evicted_models_total: dict[str, int] = field(default_factory=dict)  # policy -> models, cumulative
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> models, last run
    trash_bytes: int = 0
    # 1 when the latest plan (a run's or a dry run's) found no usage series at all: the usage policy
    # kept everything it would have judged. Served as model_storage_cleanup_usage_blind.
    usage_blind: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": STATE_SCHEMA_VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CleanupState:
        def counts(name: str) -> dict[str, int]:
            value = data.get(name) or {}
            if not isinstance(value, Mapping):
                raise TypeError(name)
            return {str(key): int(count) for key, count in value.items()}

        error = data.get("error")
        return cls(
            timestamp=float(data["timestamp"]),
            success=bool(data["success"]),
            run_id=str(data.get("run_id", "")),
            exit_code=int(data.get("exit_code", 0)),
            error=None if error is None else str(error),
            evicted_bytes_total=counts("evicted_bytes_total"),
            evicted_models_total=counts("evicted_models_total"),
            skipped=counts("skipped"),
            trash_bytes=int(data.get("trash_bytes", 0)),
            usage_blind=bool(data.get("usage_blind", False)),
        )


def add_counts(previous: Mapping[str, int], new: Mapping[str, int]) -> dict[str, int]:
    """Cumulative counters: previous totals plus this run's, per label value. Pure."""
    total = dict(previous)
    for key, value in new.items():
        total[key] = total.get(key, 0) + value
    return total


def next_state(
    previous: CleanupState | None,
    *,
    timestamp: float,
    run_id: str,
    exit_code: int,
    error: str | None,
    evicted_bytes: Mapping[str, int],
    evicted_models: Mapping[str, int],
    skipped: Mapping[str, int],
    trash_bytes: int,
    usage_blind: bool = False,
) -> CleanupState:
    """The state after a run: counters carried over from `previous` and increased. Pure."""
    return CleanupState(
        timestamp=timestamp,
        success=exit_code == 0,
        run_id=run_id,
        exit_code=exit_code,
        error=error,
        evicted_bytes_total=add_counts(previous.evicted_bytes_total if previous else {}, evicted_bytes),
        evicted_models_total=add_counts(previous.evicted_models_total if previous else {}, evicted_models),
        skipped=dict(skipped),
        trash_bytes=trash_bytes,
        usage_blind=usage_blind,
    )


def read_cleanup_state(path: Path | str) -> CleanupState | None:
    """The state, or None when there is none yet or it cannot be read (a reader must never crash on it)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return CleanupState.from_json(data)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def write_cleanup_state(path: Path | str, state: CleanupState) -> None:
    """Atomically replace the state file: a reader sees the old state or the new one, never half."""
    write_json_atomically(path, state.to_json())
