"""Restore and purge: put a run's models back from trash (or backup), delete trash past retention or the cap.

Both are journaled (cleaner.journal) and audited step by step, like evictions (cleaner.apply).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cleaner import fileops, trash, verify
from cleaner import journal as jr
from cleaner.apply import error_text
from cleaner.store_paths import StorePaths
from shared.audit import AuditLog
from shared.errors import PreconditionError
from shared.layout import Layout
from shared.logs import get_logger
from shared.typed_settings import TrashSettings
from shared.units import GB

log = get_logger("cleaner.restore_purge")


# ---- restore ---------------------------------------------------------------------------------


def find_run_entries(paths: StorePaths, run_id: str) -> tuple[Path, list[trash.TrashEntry]]:
    """The area (trash, else archive) holding a run, and its models."""
    for root in (paths.trash_path, paths.backup_path):
        entries = [e for e in trash.list_entries(root) if e.run_id == run_id]
        if entries:
            return root, entries
    return paths.trash_path, []


def restore_conflicts(entries: Sequence[trash.TrashEntry], models_path: Path, layout: Layout) -> list[str]:
    """Why each entry cannot go back (its original path is occupied, or leads outside)."""
    problems: list[str] = []
    for entry in entries:
        dst = verify.model_location(models_path, layout, entry.tier, entry.model)
        if dst is None:
            problems.append(f"{entry.key}: not a valid tier/model")
        elif os.path.lexists(dst):
            problems.append(f"{entry.key}: {dst} is occupied again")
        elif dst.parent.exists() and not verify.tier_dir_inside(models_path, layout, entry.tier, dst):
            problems.append(f"{entry.key}: {dst.parent} resolves outside {models_path}")
    return problems


def restore_entries(
    root: Path,
    entries: Sequence[trash.TrashEntry],
    paths: StorePaths,
    journal: jr.Journal,
    audit: AuditLog,
    *,
    actor: str,
    now: float,
) -> list[trash.TrashEntry]:
    """Put models back where they were; refuses, changing nothing, if any original path is taken."""
    problems = restore_conflicts(entries, paths.models_path, paths.layout)
    if problems:
        for problem in problems:
            audit.append("restore", actor=actor, target=problem.split(":")[0], result="failure", error=problem)
        raise PreconditionError(
            f"restore refused, nothing changed: {problems[0]}"
            + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
            hint="move the new model away first",
        )
    restored: list[trash.TrashEntry] = []
    for entry in entries:
        dst = verify.model_location(paths.models_path, paths.layout, entry.tier, entry.model)
        assert dst is not None  # checked by restore_conflicts
        fileops.make_dirs(dst.parent)
        meta = {"run_id": entry.run_id, "tier": entry.tier, "model": entry.model, "root": str(root)}
        try:
            how = jr.transfer(journal, entry.path, dst, purpose="restore", meta=meta)
        except (OSError, jr.TransferError) as err:
            audit.append(
                "restore", actor=actor, target=entry.key, result="failure", bytes=entry.bytes, error=error_text(err)
            )
            raise
        trash.mark_entry(root, entry.run_id, entry.key, "restored", now)
        audit.append(
            "restore",
            actor=actor,
            target=entry.key,
            bytes=entry.bytes,
            details={"run_id": entry.run_id, "how": how, "destination": str(dst)},
        )
        restored.append(entry)
    for run_id in {e.run_id for e in entries}:
        trash.remove_run_if_empty(root, run_id)
    return restored


# ---- purge -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Purged:
    entries: list[trash.TrashEntry]
    warnings: list[str]


def purge_trash(
    paths: StorePaths,
    trash_settings: TrashSettings,
    journal: jr.Journal,
    audit: AuditLog,
    *,
    actor: str,
    now: float,
    purge_all: bool,
    keep_run: str | None = None,
) -> Purged:
    """Delete expired trash entries, then the oldest while over the cap (everything with purge_all).

    `keep_run`'s entries are never deleted: the purge that ends a run must not take back what that
    run just evicted, or a run evicting more than the cap would leave nothing to restore.
    """
    root = paths.trash_path
    entries = trash.list_entries(root)
    cap = trash_cap_bytes(trash_settings)
    chosen = trash.select_for_purge(
        entries,
        now,
        trash_settings.retention_days,
        cap,
        purge_all=purge_all,
        keep_runs=frozenset() if keep_run is None else frozenset({keep_run}),
    )
    warnings: list[str] = []
    over = None if keep_run is None else trash.over_cap_warning(entries, keep_run, cap)
    if keep_run is not None and over is not None:
        warnings.append(over)
        held = trash.run_bytes(entries, keep_run)
        log.warning("trash.cap_exceeded", run_id=keep_run, run_bytes=held, cap_bytes=cap)
        audit.append(
            "purge",
            actor=actor,
            target=keep_run,
            result="skipped",
            bytes=held,
            error=over,
            details={"run_id": keep_run, "reason": "current_run_over_cap", "cap_bytes": cap},
        )
    for entry in chosen:
        meta = {"run_id": entry.run_id, "tier": entry.tier, "model": entry.model, "root": str(root)}
        try:
            jr.delete(journal, entry.path, purpose="purge", meta=meta)
        except OSError as err:
            audit.append(
                "purge", actor=actor, target=entry.key, result="failure", bytes=entry.bytes, error=error_text(err)
            )
            raise
        trash.mark_entry(root, entry.run_id, entry.key, "purged", now)
        audit.append(
            "purge",
            actor=actor,
            target=entry.key,
            bytes=entry.bytes,
            details={"run_id": entry.run_id, "age_seconds": round(now - entry.moved_at, 3), "all": purge_all},
        )
    for run_id in sorted({e.run_id for e in chosen}):
        trash.remove_run_if_empty(root, run_id)
    return Purged(chosen, warnings)


def trash_cap_bytes(trash_settings: TrashSettings) -> int:
    cap_gb = trash_settings.max_gb
    return round(cap_gb * GB)


def trash_bytes(paths: StorePaths) -> int:
    return sum(e.bytes for e in trash.list_entries(paths.trash_path))
