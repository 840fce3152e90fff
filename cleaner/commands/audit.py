"""`audit verify`: check the audit log's hash chain (exit 1 when it is broken)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cleaner.commands.output import emit
from shared.audit import verify_audit
from shared.config import Settings
from shared.exit_codes import ExitCode


def register(subparsers: Any) -> None:
    """Add `audit verify` to the cleaner's argparse subcommands."""
    audit = subparsers.add_parser("audit", help="the audit log")
    audit_sub = audit.add_subparsers(dest="audit_command", metavar="COMMAND", required=True)
    audit_verify = audit_sub.add_parser("verify", help="check the audit log's hash chain")
    audit_verify.add_argument("--json", action="store_true")
    audit_verify.set_defaults(func=cmd_audit_verify)


def cmd_audit_verify(settings: Settings, args: argparse.Namespace) -> int:
    result = verify_audit(settings.audit_log_path)
    data = {"path": str(settings.audit_log_path), "ok": result.ok, "lines": result.lines}
    if result.ok:
        emit(data, getattr(args, "json", False), [f"audit log OK: {result.lines} lines, chain intact"])
        return ExitCode.OK
    data.update(problem=result.problem, line_no=result.line_no)
    if getattr(args, "json", False):
        emit(data, True, [])
    else:
        print(f"audit log {settings.audit_log_path}: line {result.line_no}: {result.problem}", file=sys.stderr)
    return ExitCode.UNEXPECTED
