"""The acting commands of model-storage-cleaner: run, restore, purge, trash, audit verify.

Every changing command takes the cleaner lock, first recovers what a killed cleaner left
half-done, journals each step and audits each action. Exit codes: 0 done (skips included: a
model failing a check is the check doing its job), 1 unexpected error or a broken audit chain,
2 bad usage, 3 some eviction failed on an error (what was done is restorable), 4 precondition
failed and nothing was touched (lock held, Prometheus unreachable, restore target occupied, the
models path or a planned model's tier directory read-only or not writable).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from cleaner import apply, trash
from cleaner.journal import Journal, crash_point
from cleaner.lock import CleanerLock, lock_path
from cleaner.plan import Plan, audit_plan, load_plan, new_plan_id, save_plan
from cleaner.plan_record import record_plan
from cleaner.writable import places_to_check, require_writable
from shared.audit import AuditLog, verify_audit
from shared.cleanup_state import next_state, read_cleanup_state, write_cleanup_state
from shared.config import Settings
from shared.errors import ConfigError, FilesystemError, PreconditionError, StorageError
from shared.logs import get_logger
from shared.own_reads import own_reads

Command = Callable[[Settings, argparse.Namespace], int]
log = get_logger("cleaner.act")


def register(subparsers: Any) -> None:
    """Add run, restore, purge, trash and audit to the cleaner's argparse subcommands."""
    run = subparsers.add_parser("run", help="compute the plan (or load a saved one) and carry it out")
    run.add_argument("--dry-run", action="store_true", help="only show the plan, exactly as `plan` does")
    run.add_argument("--plan", metavar="PLAN_ID", help="carry out this saved plan and nothing beyond it")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--allow-large", action="store_true", help="lift the blast-radius cap for this run")
    run.set_defaults(func=cmd_run)

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

    audit = subparsers.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    audit_verify = audit_sub.add_parser("verify", help="check the audit log's hash chain")
    audit_verify.add_argument("--json", action="store_true")
    audit_verify.set_defaults(func=cmd_audit_verify)


def _actor(args: argparse.Namespace) -> str:
    return str(getattr(args, "actor", None) or "cli")


def _print(data: dict[str, Any], as_json: bool, lines: list[str]) -> None:
    if as_json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print("\n".join(lines))


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _refresh_trash_bytes(settings: Settings) -> None:
    """After a restore or purge the trash changed: the served trash gauge follows."""
    state = read_cleanup_state(settings.cleanup_state_file)
    if state is not None:
        write_cleanup_state(settings.cleanup_state_file, replace(state, trash_bytes=apply.trash_bytes(settings)))


def plan_usage_blind(evidence: dict[str, Any]) -> bool:
    coverage = evidence.get("usage_coverage") or {}
    return bool(coverage.get("blind", False))


def record_usage_blind(settings: Settings, usage_blind: bool) -> None:
    """A dry run changes no counters, but whether usage was blind is news: the served gauge follows.

    Only an existing state is updated: a state made by a plan would read as a finished run. Under
    the cleaner lock, so a run's counters are never overwritten; a running cleaner records its own.
    """
    try:
        lock = CleanerLock(lock_path(settings.state_path))
        lock.acquire()
    except PreconditionError:
        return
    try:
        state = read_cleanup_state(settings.cleanup_state_file)
        if state is not None and state.usage_blind != usage_blind:
            write_cleanup_state(settings.cleanup_state_file, replace(state, usage_blind=usage_blind))
    finally:
        lock.release()


# ---- run -------------------------------------------------------------------------------------


def _dry_run(settings: Settings, args: argparse.Namespace) -> int:
    from cleaner import cli  # the planning side's `plan`; imported late, it imports us

    plan_command: Command = cli.cmd_plan
    plan_args = argparse.Namespace(**{**vars(args), "explain": None})
    return plan_command(settings, plan_args)


def _build_plan(settings: Settings, now: float, allow_large: bool) -> Plan:
    from cleaner.planner import build_plan

    return build_plan(settings, now, allow_large=allow_large)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(settings, args)
    now = time.time()
    actor = _actor(args)
    audit = AuditLog(settings.audit_log_path)
    run_id = new_plan_id(now)
    with CleanerLock(lock_path(settings.state_path)):
        try:
            # Before recovery too: on a read-only models path even finishing a killed run's step
            # could only copy, never remove. The failure is still written down for the alerts.
            require_writable([settings.models_path])
            apply.recover(settings, audit, actor=actor, now=now)
            crash_point("run_started")
            report, exit_code = _run_locked(settings, args, audit, run_id=run_id, actor=actor, now=now)
        except BaseException as err:
            code = err.exit_code if isinstance(err, StorageError) else 1
            message = err.one_line() if isinstance(err, StorageError) else f"{type(err).__name__}: {err}"
            if isinstance(err, Exception):
                # Best effort: on a full or read-only state path these fail too, and the first
                # error is the one to report.
                with contextlib.suppress(OSError, StorageError):
                    _write_state(settings, run_id, code, message, apply.ApplyResult(), ())
                with contextlib.suppress(OSError):
                    audit.append("run", actor=actor, target=run_id, result="failure", error=message)
            raise
    _print(report, args.json, _run_lines(report))
    return exit_code


def _run_locked(
    settings: Settings, args: argparse.Namespace, audit: AuditLog, *, run_id: str, actor: str, now: float
) -> tuple[dict[str, Any], int]:
    if args.plan:
        plan = load_plan(args.plan, settings.state_path)
    else:
        plan = _build_plan(settings, now, args.allow_large)
        save_plan(plan, settings.state_path)
        audit_plan(audit, plan, actor=actor, command="run", run_id=run_id)
    # Every tier directory and model the plan would change must be changeable, or none is touched.
    require_writable(places_to_check(settings.models_path, settings.layout, plan.evictions))
    audit.append(
        "run_started",
        actor=actor,
        target=run_id,
        bytes=plan.bytes_to_free,
        details={"plan_id": plan.plan_id, "evictions": len(plan.evictions), "mode": settings["cleaner.backup.mode"]},
    )
    journal = Journal(settings.state_path, run_id, command="run")
    ctx = apply.Context.from_settings(settings, run_id=run_id, actor=actor, now=now)
    # Its verification reads and copies are no use of the models (shared.own_reads).
    with own_reads(settings.state_path, (f"{e.tier}/{e.model}" for e in plan.evictions)):
        result = apply.apply_evictions(plan.evictions, ctx, journal, audit)
    record_plan(plan, settings.state_path, gone=[(d.tier, d.model) for d in result.done], applied_run_id=run_id)
    purge = apply.purge_trash(settings, journal, audit, actor=actor, now=now, purge_all=False, keep_run=run_id)
    purged = purge.entries
    journal.close()
    exit_code = apply.exit_code_for(result)
    error = f"{len(result.failed)} eviction(s) failed" if result.failed else None
    trash_total = _write_state(
        settings, run_id, exit_code, error, result, plan.kept, usage_blind=plan_usage_blind(plan.evidence)
    )
    audit.append(
        "run",
        actor=actor,
        target=run_id,
        result="success" if exit_code == 0 else "failure",
        bytes=sum(d.bytes for d in result.done),
        error=error,
        details={
            "plan_id": plan.plan_id,
            "done": len(result.done),
            "skipped": len(result.skipped),
            "failed": len(result.failed),
            "purged": len(purged),
            "exit_code": exit_code,
        },
    )
    if result.unreadable_processes:
        log.warning("run.processes_unreadable", processes=result.unreadable_processes)
    report = {
        "run_id": run_id,
        "plan_id": plan.plan_id,
        "plan": plan.to_json(),
        "mode": settings["cleaner.backup.mode"],
        **result.to_json(),
        "freed_bytes": sum(d.bytes for d in result.done),
        "purged": [{"run_id": e.run_id, "tier": e.tier, "model": e.model, "bytes": e.bytes} for e in purged],
        "trash_path": str(settings.trash_path / run_id),
        "trash_bytes": trash_total,
        "warnings": purge.warnings,
        "exit_code": exit_code,
    }
    return report, exit_code


def _write_state(
    settings: Settings,
    run_id: str,
    exit_code: int,
    error: str | None,
    result: apply.ApplyResult,
    kept: Any,
    *,
    usage_blind: bool = False,
) -> int:
    crash_point("before_state_written")
    total = apply.trash_bytes(settings)
    state = next_state(
        read_cleanup_state(settings.cleanup_state_file),
        # When the run finished, not `now` (its start): the "cleaner has not succeeded for N hours"
        # alert measures from here, and a long run would otherwise look older than it is.
        timestamp=time.time(),
        run_id=run_id,
        exit_code=exit_code,
        error=error,
        evicted_bytes=result.evicted_bytes(),
        evicted_models=result.evicted_models(),
        skipped=apply.skipped_counts(tuple(kept), result.skipped),
        trash_bytes=total,
        usage_blind=usage_blind,
    )
    try:
        write_cleanup_state(settings.cleanup_state_file, state)
    except OSError as err:
        raise FilesystemError.from_os(err, "write the state file", settings.cleanup_state_file) from None
    return total


def _run_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"run {report['run_id']} (plan {report['plan_id']}, mode {report['mode']}): "
        f"{len(report['done'])} evicted ({_fmt_bytes(report['freed_bytes'])}), "
        f"{len(report['skipped'])} skipped, {len(report['failed'])} failed"
    ]
    for item in report["done"]:
        where = f" -> {item['destination']}" if item["destination"] else " (deleted)"
        lines.append(f"  evicted {item['tier']}/{item['model']} {_fmt_bytes(item['bytes'])} [{item['policy']}]{where}")
    for item in report["skipped"]:
        lines.append(f"  skipped {item['tier']}/{item['model']}: {item['reason']} ({item['detail']})")
    for item in report["failed"]:
        lines.append(f"  FAILED  {item['tier']}/{item['model']}: {item['error']}")
    for item in report["purged"]:
        lines.append(f"  purged from trash {item['tier']}/{item['model']} of run {item['run_id']}")
    for warning in report["warnings"]:
        lines.append(f"  warning: {warning}")
    if report["done"] and report["mode"] != "none":
        lines.append(f"undo with: model-storage-cleaner restore {report['run_id']}")
    return lines


# ---- restore, purge, trash ---------------------------------------------------------------------


def cmd_restore(settings: Settings, args: argparse.Namespace) -> int:
    run_id: str = args.run_id
    if not trash.valid_run_id(run_id):
        raise ConfigError(f"restore: {run_id!r} is not a run id")
    target: str | None = args.target
    if target is not None and (target.count("/") != 1 or not all(trash.valid_name(p) for p in target.split("/"))):
        raise ConfigError(f"restore: {target!r}: expected TIER/MODEL")
    now = time.time()
    actor = _actor(args)
    audit = AuditLog(settings.audit_log_path)
    with CleanerLock(lock_path(settings.state_path)):
        apply.recover(settings, audit, actor=actor, now=now)
        root, entries = apply.find_run_entries(settings, run_id)
        if target is not None:
            entries = [e for e in entries if e.key == target]
        if not entries:
            what = f"{target} of run {run_id}" if target else f"run {run_id}"
            raise ConfigError(f"restore: nothing of {what} is in {settings.trash_path} or {settings.backup_path}")
        journal = Journal(settings.state_path, new_plan_id(now), command="restore")
        try:
            with own_reads(settings.state_path, (e.key for e in entries)):
                restored = apply.restore_entries(root, entries, settings, journal, audit, actor=actor, now=now)
        except PreconditionError:
            journal.close()  # refused before anything was done: nothing for recovery to look at
            raise
        journal.close()
        _refresh_trash_bytes(settings)
    data = {
        "run_id": run_id,
        "restored": [{"tier": e.tier, "model": e.model, "bytes": e.bytes} for e in restored],
        "restored_bytes": sum(e.bytes for e in restored),
    }
    lines = [f"restored {e.key} ({_fmt_bytes(e.bytes)})" for e in restored]
    _print(data, getattr(args, "json", False), lines)
    return 0


def cmd_purge(settings: Settings, args: argparse.Namespace) -> int:
    now = time.time()
    actor = _actor(args)
    audit = AuditLog(settings.audit_log_path)
    with CleanerLock(lock_path(settings.state_path)):
        apply.recover(settings, audit, actor=actor, now=now)
        journal = Journal(settings.state_path, new_plan_id(now), command="purge")
        purged = apply.purge_trash(settings, journal, audit, actor=actor, now=now, purge_all=args.all).entries
        journal.close()
        _refresh_trash_bytes(settings)
    data = {
        "purged": [{"run_id": e.run_id, "tier": e.tier, "model": e.model, "bytes": e.bytes} for e in purged],
        "purged_bytes": sum(e.bytes for e in purged),
    }
    lines = [f"purged {e.key} of run {e.run_id} ({_fmt_bytes(e.bytes)})" for e in purged] or ["nothing to purge"]
    _print(data, getattr(args, "json", False), lines)
    return 0


def trash_listing(settings: Settings, now: float) -> dict[str, Any]:
    entries = trash.list_entries(settings.trash_path)
    retention: float = settings["cleaner.trash.retention_days"]
    cap = apply.trash_cap_bytes(settings)
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
        "trash_path": str(settings.trash_path),
        "entries": rows,
        "total_bytes": sum(e.bytes for e in entries),
        "cap_bytes": cap,
        "retention_days": retention,
    }


def cmd_trash(settings: Settings, args: argparse.Namespace) -> int:
    now = time.time()
    data = trash_listing(settings, now)
    lines = [f"{'RUN':<24} {'TIER/MODEL':<40} {'SIZE':>10} {'AGE':>8}  PURGED"]
    for row in data["entries"]:
        when = "next purge" if row["purge_due"] else time.strftime("%Y-%m-%d %H:%M", time.gmtime(row["purge_at"]))
        age_days = row["age_seconds"] / 86400
        key = f"{row['tier']}/{row['model']}"
        lines.append(f"{row['run_id']:<24} {key:<40} {_fmt_bytes(row['bytes']):>10} {age_days:>7.1f}d  {when}")
    lines.append(
        f"{len(data['entries'])} in trash, {_fmt_bytes(data['total_bytes'])} of {_fmt_bytes(data['cap_bytes'])} cap, "
        f"retention {data['retention_days']:g} days"
    )
    _print(data, args.json, lines)
    return 0


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    result = verify_audit(settings.audit_log_path)
    data = {"path": str(settings.audit_log_path), "ok": result.ok, "lines": result.lines}
    if result.ok:
        _print(data, getattr(args, "json", False), [f"audit log OK: {result.lines} lines, chain intact"])
        return 0
    data.update(problem=result.problem, line_no=result.line_no)
    if getattr(args, "json", False):
        _print(data, True, [])
    else:
        print(f"audit log {settings.audit_log_path}: line {result.line_no}: {result.problem}", file=sys.stderr)
    return 1
