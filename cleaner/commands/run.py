"""`run`: compute the plan (or load a saved one) and carry it out; `run --dry-run` is `plan`.

Every changing command (run, restore, purge) takes the cleaner lock, first recovers what a killed
cleaner left half-done, journals each step and audits each action. Skips are exit 0: a model
failing a check is the check doing its job. Exit codes: shared.exit_codes.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from cleaner import apply, restore_purge
from cleaner.commands.output import actor_of, emit, human_bytes
from cleaner.commands.plan import cmd_plan
from cleaner.commands.views import store_paths
from cleaner.crash_hook import crash_point
from cleaner.journal import Journal
from cleaner.lock import CleanerLock, lock_path
from cleaner.plan_build import build_plan
from cleaner.plan_record import record_plan
from cleaner.plan_store import audit_plan, load_plan, new_plan_id, save_plan
from cleaner.store_paths import StorePaths
from cleaner.usage_blind import plan_usage_blind
from cleaner.writable import places_to_check, require_writable
from shared.audit import AuditLog
from shared.cleanup_state import next_state, read_cleanup_state, write_cleanup_state
from shared.config import Settings
from shared.errors import FilesystemError, StorageError
from shared.exit_codes import ExitCode
from shared.logs import get_logger
from shared.own_reads import own_reads
from shared.typed_settings import CleanerSettings

log = get_logger("cleaner.act")


def register(subparsers: Any) -> None:
    """Add `run` to the cleaner's argparse subcommands."""
    run = subparsers.add_parser("run", help="compute the plan (or load a saved one) and carry it out")
    run.add_argument("--dry-run", action="store_true", help="only show the plan, exactly as `plan` does")
    run.add_argument("--plan", metavar="PLAN_ID", help="carry out this saved plan and nothing beyond it")
    run.add_argument("--json", action="store_true", help="print the report as JSON")
    run.add_argument("--allow-large", action="store_true", help="lift the blast-radius cap for this run")
    run.set_defaults(func=cmd_run)


def _dry_run(settings: Settings, args: argparse.Namespace) -> int:
    plan_args = argparse.Namespace(**{**vars(args), "explain": None})
    return cmd_plan(settings, plan_args)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    if args.dry_run:
        return _dry_run(settings, args)
    now = time.time()
    paths = store_paths(settings)
    actor = actor_of(args)
    audit = AuditLog(paths.audit_log_path)
    run_id = new_plan_id(now)
    with CleanerLock(lock_path(paths.state_path)):
        try:
            # Before recovery too: on a read-only models path even finishing a killed run's step
            # could only copy, never remove. The failure is still written down for the alerts.
            require_writable([paths.models_path])
            apply.recover(paths, audit, actor=actor, now=now)
            crash_point("run_started")
            report, exit_code = _run_locked(paths, settings.cleaner, args, audit, run_id=run_id, actor=actor, now=now)
        except BaseException as err:
            code = err.exit_code if isinstance(err, StorageError) else ExitCode.UNEXPECTED
            message = err.one_line() if isinstance(err, StorageError) else f"{type(err).__name__}: {err}"
            if isinstance(err, Exception):
                # Best effort: on a full or read-only state path these fail too, and the first
                # error is the one to report.
                with contextlib.suppress(OSError, StorageError):
                    _write_state(paths, run_id, code, message, apply.ApplyResult(), ())
                with contextlib.suppress(OSError):
                    audit.append("run", actor=actor, target=run_id, result="failure", error=message)
            raise
    emit(report, args.json, _run_lines(report))
    return exit_code


def _run_locked(
    paths: StorePaths,
    cleaner: CleanerSettings,
    args: argparse.Namespace,
    audit: AuditLog,
    *,
    run_id: str,
    actor: str,
    now: float,
) -> tuple[dict[str, Any], int]:
    if args.plan:
        plan = load_plan(args.plan, paths.state_path)
    else:
        plan = build_plan(paths, cleaner, now, allow_large=args.allow_large)
        save_plan(plan, paths.state_path)
        audit_plan(audit, plan, actor=actor, command="run", run_id=run_id)
    # Every tier directory and model the plan would change must be changeable, or none is touched.
    require_writable(places_to_check(paths.models_path, paths.layout, plan.evictions))
    audit.append(
        "run_started",
        actor=actor,
        target=run_id,
        bytes=plan.bytes_to_free,
        details={"plan_id": plan.plan_id, "evictions": len(plan.evictions), "mode": cleaner.backup.mode},
    )
    journal = Journal(paths.state_path, run_id, command="run")
    ctx = apply.Context.for_run(paths, cleaner, run_id=run_id, actor=actor, now=now)
    # Its verification reads and copies are no use of the models (shared.own_reads).
    with own_reads(paths.state_path, (f"{e.tier}/{e.model}" for e in plan.evictions)):
        result = apply.apply_evictions(plan.evictions, ctx, journal, audit)
    record_plan(plan, paths.state_path, gone=[(d.tier, d.model) for d in result.done], applied_run_id=run_id)
    purge = restore_purge.purge_trash(
        paths, cleaner.trash, journal, audit, actor=actor, now=now, purge_all=False, keep_run=run_id
    )
    purged = purge.entries
    journal.close()
    exit_code = apply.exit_code_for(result)
    error = f"{len(result.failed)} eviction(s) failed" if result.failed else None
    trash_total = _write_state(
        paths, run_id, exit_code, error, result, plan.kept, usage_blind=plan_usage_blind(plan.evidence)
    )
    audit.append(
        "run",
        actor=actor,
        target=run_id,
        result="success" if exit_code == ExitCode.OK else "failure",
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
        "mode": cleaner.backup.mode,
        **result.to_json(),
        "freed_bytes": sum(d.bytes for d in result.done),
        "purged": [{"run_id": e.run_id, "tier": e.tier, "model": e.model, "bytes": e.bytes} for e in purged],
        "trash_path": str(paths.trash_path / run_id),
        "trash_bytes": trash_total,
        "warnings": purge.warnings,
        "exit_code": exit_code,
    }
    return report, exit_code


def _write_state(
    paths: StorePaths,
    run_id: str,
    exit_code: int,
    error: str | None,
    result: apply.ApplyResult,
    kept: Any,
    *,
    usage_blind: bool = False,
) -> int:
    crash_point("before_state_written")
    total = restore_purge.trash_bytes(paths)
    state = next_state(
        read_cleanup_state(paths.cleanup_state_file),
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
        write_cleanup_state(paths.cleanup_state_file, state)
    except OSError as err:
        raise FilesystemError.from_os(err, "write the state file", paths.cleanup_state_file) from None
    return total


def _run_lines(report: dict[str, Any]) -> list[str]:
    lines = [
        f"run {report['run_id']} (plan {report['plan_id']}, mode {report['mode']}): "
        f"{len(report['done'])} evicted ({human_bytes(report['freed_bytes'])}), "
        f"{len(report['skipped'])} skipped, {len(report['failed'])} failed"
    ]
    for item in report["done"]:
        where = f" -> {item['destination']}" if item["destination"] else " (deleted)"
        lines.append(f"  evicted {item['tier']}/{item['model']} {human_bytes(item['bytes'])} [{item['policy']}]{where}")
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
