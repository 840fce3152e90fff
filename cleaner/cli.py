"""`model-storage-cleaner`: decide (`plan`, `policies`) here; acting commands plug in from `cleaner.act_cli`.

Exit codes shared by every command: 0 done (also nothing to do), 1 unexpected error, 2 bad config or
usage, 3 partial apply, 4 precondition failed with nothing touched (Prometheus, the lock), 5 the
filesystem refused an operation (ENOSPC, EDQUOT, EACCES, EPERM, EROFS): the message names it and the path.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback
from collections.abc import Sequence
from types import ModuleType

from cleaner.plan_build import build
from cleaner.plan_record import record_plan
from cleaner.plan_store import audit_plan, save_plan
from cleaner.policies import explain, find_models, validate
from cleaner.report import dumps, policies_document, render_explain, render_plan, render_policies
from shared.audit import AuditLog
from shared.config import Settings, load_settings
from shared.errors import FILESYSTEM_ERRNOS, ConfigError, StorageError, unplaced_filesystem_error
from shared.logs import configure_logging

PROG = "model-storage-cleaner"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # One line and exit code 2 instead of argparse's usage block.
        print(f"{PROG}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    """Build and save a plan; print it, or explain one model's fate in it."""
    planned = build(settings, time.time(), allow_large=args.allow_large)
    plan = planned.plan
    if args.explain:
        matches = find_models(planned.facts, args.explain)
        if not matches:
            raise ConfigError(
                f"plan --explain: no model {args.explain!r} among the {len(planned.facts)} models Prometheus reports",
                hint="name it as TIER/MODEL or MODEL",
            )
    path = save_plan(plan, settings.state_path)
    record_plan(plan, settings.state_path)
    act = _act_cli()
    if act is not None:
        act.record_usage_blind(settings, act.plan_usage_blind(plan.evidence))
    audit_plan(
        AuditLog(settings.audit_log_path),
        plan,
        actor=str(getattr(args, "actor", None) or "cli"),
        command="run --dry-run" if getattr(args, "dry_run", False) else "plan",
    )
    if args.explain:
        now = plan.created_at
        explanations = [explain(f, planned.coverage, planned.view, now, plan) for f in matches]
        if args.json:
            print(dumps({"plan_id": plan.plan_id, "explanations": explanations}))
        else:
            print("\n".join(render_explain(e) for e in explanations), end="")
        return 0
    print(dumps(plan.to_json()) if args.json else render_plan(plan, str(path)), end="\n" if args.json else "")
    return 0


def cmd_policies(settings: Settings, args: argparse.Namespace) -> int:
    """The policies with their effective settings and where each value came from."""
    print(dumps(policies_document(settings)) if args.json else render_policies(settings), end="\n" if args.json else "")
    return 0


def _act_cli() -> ModuleType | None:
    try:
        return importlib.import_module("cleaner.commands.run")
    except ModuleNotFoundError as err:
        if err.name != "cleaner.commands.run":
            raise
        return None


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Decide and apply evictions for a model store, from Prometheus data.")
    parser.add_argument("--config", metavar="FILE", help="YAML settings file (or STORAGE_CONFIG)")
    parser.add_argument("--actor", metavar="NAME", default="cli", help="who runs this, for the audit log")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")

    plan = subparsers.add_parser("plan", help="decide what a cleanup would evict and save the plan (dry run)")
    plan.add_argument("--json", action="store_true", help="print the plan as a stable JSON document")
    plan.add_argument("--explain", metavar="TIER/MODEL", help="show why one model is kept or evicted")
    plan.add_argument("--allow-large", action="store_true", help="ignore the blast-radius caps")
    plan.set_defaults(func=cmd_plan)

    policies = subparsers.add_parser("policies", help="list the policies and their effective settings")
    policies.add_argument("--json", action="store_true", help="print as JSON")
    policies.set_defaults(func=cmd_policies)

    act = _act_cli()
    if act is not None:
        act.register(subparsers)
    return parser


def _fail(message: str) -> None:
    print(f"{PROG}: {' '.join(message.split())}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    debug = False
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            parser.error("a command is required")
        settings = load_settings(args.config)
        validate(settings)
        debug = settings["log.level"] == "debug"
        configure_logging(settings["log.format"], settings["log.level"])
        code: int = args.func(settings, args)
        return code
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else 2
    except StorageError as err:
        _fail(err.one_line())
        return err.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return 130
    except OSError as err:
        if err.errno not in FILESYSTEM_ERRNOS:
            if debug:
                traceback.print_exc()
            _fail(f"unexpected error: {type(err).__name__}: {err}")
            return 1
        fs_error = unplaced_filesystem_error(err)
        _fail(fs_error.one_line())
        return fs_error.exit_code
    except Exception as err:
        if debug:
            traceback.print_exc()
        _fail(f"unexpected error: {type(err).__name__}: {err}")
        return 1
