"""Plans on disk: random sortable ids, saving once and read-only, loading by id, the audit line of a plan made.

A saved plan is never edited: `run --plan ID` carries out exactly what was saved.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import time
from pathlib import Path

from cleaner.plan_values import Plan
from shared.audit import AuditLog
from shared.errors import ConfigError, FilesystemError


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
