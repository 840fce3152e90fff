"""`plan` and `policies`: decide what a cleanup would evict and save the plan (a dry run); list the policies."""

from __future__ import annotations

import argparse
import time
from typing import Any

from cleaner.commands.views import shown_settings, store_paths
from cleaner.explain import explain, find_models
from cleaner.plan_build import build
from cleaner.plan_record import record_plan
from cleaner.plan_store import audit_plan, save_plan
from cleaner.report import dumps, policies_document, render_explain, render_plan, render_policies
from cleaner.usage_blind import plan_usage_blind, record_usage_blind
from shared.audit import AuditLog
from shared.config import Settings
from shared.errors import ConfigError
from shared.exit_codes import ExitCode


def register(subparsers: Any) -> None:
    """Add `plan` and `policies` to the cleaner's argparse subcommands."""
    plan = subparsers.add_parser("plan", help="decide what a cleanup would evict and save the plan (dry run)")
    plan.add_argument("--json", action="store_true", help="print the plan as a stable JSON document")
    plan.add_argument("--explain", metavar="TIER/MODEL", help="show why one model is kept or evicted")
    plan.add_argument("--allow-large", action="store_true", help="ignore the blast-radius caps")
    plan.set_defaults(func=cmd_plan)

    policies = subparsers.add_parser("policies", help="list the policies and their effective settings")
    policies.add_argument("--json", action="store_true", help="print as JSON")
    policies.set_defaults(func=cmd_policies)


def cmd_plan(settings: Settings, args: argparse.Namespace) -> int:
    """Build and save a plan; print it, or explain one model's fate in it."""
    paths = store_paths(settings)
    planned = build(paths, settings.cleaner, time.time(), allow_large=args.allow_large)
    plan = planned.plan
    if args.explain:
        matches = find_models(planned.facts, args.explain)
        if not matches:
            raise ConfigError(
                f"plan --explain: no model {args.explain!r} among the {len(planned.facts)} models Prometheus reports",
                hint="name it as TIER/MODEL or MODEL",
            )
    path = save_plan(plan, paths.state_path)
    record_plan(plan, paths.state_path)
    record_usage_blind(paths, plan_usage_blind(plan.evidence))
    audit_plan(
        AuditLog(paths.audit_log_path),
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
        return ExitCode.OK
    print(dumps(plan.to_json()) if args.json else render_plan(plan, str(path)), end="\n" if args.json else "")
    return ExitCode.OK


def cmd_policies(settings: Settings, args: argparse.Namespace) -> int:
    """The policies with their effective settings and where each value came from."""
    shown = shown_settings(settings)
    print(dumps(policies_document(shown)) if args.json else render_policies(shown), end="\n" if args.json else "")
    return ExitCode.OK
