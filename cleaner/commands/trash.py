"""`restore`, `purge` and `trash`: put models back from trash, delete what is past retention, list it."""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from typing import Any

from cleaner import apply, restore_purge, trash
from cleaner.commands.output import actor_of, emit, human_bytes
from cleaner.commands.views import store_paths
from cleaner.journal import Journal
from cleaner.lock import CleanerLock, lock_path
from cleaner.plan_store import new_plan_id
from cleaner.store_paths import StorePaths
from shared.audit import AuditLog
from shared.cleanup_state import read_cleanup_state, write_cleanup_state
from shared.config import Settings
from shared.errors import ConfigError, PreconditionError
from shared.exit_codes import ExitCode
from shared.own_reads import own_reads
from shared.typed_settings import TrashSettings


def register(subparsers: Any) -> None:
    """Add `restore`, `purge` and `trash` to the cleaner's argparse subcommands."""
    restore = subparsers.add_parser("restore", help="put a run's models (or one model) back from trash")
    restore.add_argument("run_id", metavar="RUN_ID")
    restore.add_argument("target", metavar="TIER/MODEL", nargs="?")
    restore.add_argument("--json", action="store_true")
    restore.set_defaults(func=cmd_restore)

    purge = subparsers.add_parser("purge", help="delete trash entries past retention or beyond the cap")
    purge.add_argument("--all", action="store_true", help="empty the whole trash")
    purge.add_argument("--json", action="store_true")
    purge.set_defaults(func=cmd_purge)

    listing = subparsers.add_parser("trash", help="list what is in trash and when it will be purged")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(func=cmd_trash)


def _refresh_trash_bytes(paths: StorePaths) -> None:
    """After a restore or purge the trash changed: the served trash gauge follows."""
    state = read_cleanup_state(paths.cleanup_state_file)
    if state is not None:
        write_cleanup_state(paths.cleanup_state_file, replace(state, trash_bytes=restore_purge.trash_bytes(paths)))


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    run_id: str = args.run_id
    if not trash.valid_run_id(run_id):
        raise ConfigError(f"restore: {run_id!r} is not a run id")
    target: str | None = args.target
    if target is not None and (target.count("/") != 1 or not all(trash.valid_name(p) for p in target.split("/"))):
        raise ConfigError(f"restore: {target!r}: expected TIER/MODEL")
    now = time.time()
    paths = store_paths(settings)
    actor = actor_of(args)
    audit = AuditLog(paths.audit_log_path)
    with CleanerLock(lock_path(paths.state_path)):
        apply.recover(paths, audit, actor=actor, now=now)
        root, entries = restore_purge.find_run_entries(paths, run_id)
        if target is not None:
            entries = [e for e in entries if e.key == target]
        if not entries:
            what = f"{target} of run {run_id}" if target else f"run {run_id}"
            raise ConfigError(f"restore: nothing of {what} is in {paths.trash_path} or {paths.backup_path}")
        journal = Journal(paths.state_path, new_plan_id(now), command="restore")
        try:
            with own_reads(paths.state_path, (e.key for e in entries)):
                restored = restore_purge.restore_entries(root, entries, paths, journal, audit, actor=actor, now=now)
        except PreconditionError:
            journal.close()  # refused before anything was done: nothing for recovery to look at
            raise
        journal.close()
        _refresh_trash_bytes(paths)
    data = {
        "run_id": run_id,
        "restored": [{"tier": e.tier, "model": e.model, "bytes": e.bytes} for e in restored],
        "restored_bytes": sum(e.bytes for e in restored),
    }
    lines = [f"restored {e.key} ({human_bytes(e.bytes)})" for e in restored]
    emit(data, getattr(args, "json", False), lines)
    return ExitCode.OK


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    now = time.time()
    paths = store_paths(settings)
    actor = actor_of(args)
    audit = AuditLog(paths.audit_log_path)
    with CleanerLock(lock_path(paths.state_path)):
        apply.recover(paths, audit, actor=actor, now=now)
        journal = Journal(paths.state_path, new_plan_id(now), command="purge")
        purged = restore_purge.purge_trash(
            paths, settings.cleaner.trash, journal, audit, actor=actor, now=now, purge_all=args.all
        ).entries
        journal.close()
        _refresh_trash_bytes(paths)
    data = {
        "purged": [{"run_id": e.run_id, "tier": e.tier, "model": e.model, "bytes": e.bytes} for e in purged],
        "purged_bytes": sum(e.bytes for e in purged),
    }
    lines = [f"purged {e.key} of run {e.run_id} ({human_bytes(e.bytes)})" for e in purged] or ["nothing to purge"]
    emit(data, getattr(args, "json", False), lines)
    return ExitCode.OK


def trash_listing(paths: StorePaths, trash_settings: TrashSettings, now: float) -> dict[str, Any]:
    entries = trash.list_entries(paths.trash_path)
    retention = trash_settings.retention_days
    cap = restore_purge.trash_cap_bytes(trash_settings)
    over_cap = {(e.run_id, e.key) for e in trash.select_for_purge(entries, now, retention, cap)}
    rows = [
        {
            "run_id": e.run_id,
            "tier": e.tier,
            "model": e.model,
            "bytes": e.bytes,
            "files": e.files,
            "moved_at": e.moved_at,
            "age_seconds": round(now - e.moved_at, 3),
            "purge_at": trash.expires_at(e.moved_at, retention),
            "purge_due": (e.run_id, e.key) in over_cap,
            "original_path": e.original_path,
            "policy": e.policy,
            "path": str(e.path),
        }
        for e in entries
    ]
    return {
        "trash_path": str(paths.trash_path),
        "entries": rows,
        "total_bytes": sum(e.bytes for e in entries),
        "cap_bytes": cap,
        "retention_days": retention,
    }


def cmd_trash(settings: Settings, args: argparse.Namespace) -> int:
    now = time.time()
    data = trash_listing(store_paths(settings), settings.cleaner.trash, now)
    lines = [f"{'RUN':<24} {'TIER/MODEL':<40} {'SIZE':>10} {'AGE':>8}  PURGED"]
    for row in data["entries"]:
        when = "next purge" if row["purge_due"] else time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["purge_at"]))
        age_days = row["age_seconds"] / 86400
        key = f"{row['tier']}/{row['model']}"
        lines.append(f"{row['run_id']:<24} {key:<40} {human_bytes(row['bytes']):>10} {age_days:>7.1f}d  {when}")
    lines.append(
        f"{len(data['entries'])} in trash, {human_bytes(data['total_bytes'])} of {human_bytes(data['cap_bytes'])} cap, "
        f"retention {data['retention_days']:g} days"
    )
    emit(data, args.json, lines)
    return ExitCode.OK
