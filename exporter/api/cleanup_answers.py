"""What a cleaner process did, as the API's answer: status, JSON body and audit outcome. Pure.

Invariants:
- Every exit code of `model-storage-cleaner` maps to one status (see `interpret_run`); never a 500.
- A lock held by another cleaner is read from the cleaner's structured JSON error line (`lock_held`),
  never from its English message.
- Error bodies are documents.error_body's shape: {"error": {"code": ..., "message": ..., ...}}.
- No process, clock or disk here: exporter/api/cleanup_runner.py runs the process and hands over
  a CleanerResult.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from exporter.api.documents import error_body
from shared.errors import LockHeldError, read_error_line
from shared.exit_codes import ExitCode

PROG = "model-storage-cleaner"
_MESSAGE_LIMIT = 500


@dataclass(frozen=True, slots=True)
class CleanerResult:
    """What one cleaner process did. `exit_code` is None when it could not start or was stopped."""

    argv: tuple[str, ...]
    exit_code: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    timed_out: bool = False
    start_error: str | None = None


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds the cleanup: a run this API started, or another cleaner process holding its lock."""

    source: str  # "api" or "cleaner_lock"
    pid: int | None
    actor: str | None = None
    started_at: float | None = None
    dry_run: bool | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "pid": self.pid,
            "actor": self.actor,
            "started_at": self.started_at,
            "dry_run": self.dry_run,
        }


class BusyError(Exception):
    """A cleanup started by this API is still running."""

    def __init__(self, holder: Holder) -> None:
        super().__init__(f"a cleanup is already running (pid {holder.pid})")
        self.holder = holder


@dataclass(frozen=True, slots=True)
class Answer:
    """The HTTP status and JSON body the API gives for a cleaner result."""

    status: int
    body: dict[str, Any]
    result: str = "success"  # for the audit log: success or failure
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def last_message(stderr: str) -> str:
    """The cleaner's one-line error (`model-storage-cleaner: ...`), else its last non-empty stderr line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith(f"{PROG}:")]
    chosen = ours[-1] if ours else (lines[-1] if lines else "")
    return chosen[:_MESSAGE_LIMIT]


def parse_holder(stderr: str) -> Holder | None:
    """The lock's holder from the cleaner's JSON error line (`lock_held`); None for any other error."""
    error = read_error_line(stderr)
    if error is None or error.get("code") != LockHeldError.code:
        return None
    pid = error.get("holder_pid")
    return Holder(source="cleaner_lock", pid=pid if isinstance(pid, int) and not isinstance(pid, bool) else None)


def _report(stdout: str) -> dict[str, Any] | None:
    try:
        data = json.loads(stdout)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _failure(status: int, code: str, message: str, **extra: Any) -> Answer:
    return Answer(status, error_body(code, message, **extra), result="failure", error=message)


def _not_run(result: CleanerResult) -> Answer | None:
    if result.start_error is not None:
        return _failure(503, "cleaner_unavailable", f"cannot start the cleaner: {result.start_error}")
    if result.timed_out:
        return _failure(
            504, "cleaner_timeout", f"the cleaner did not finish within {result.seconds:.0f}s and was stopped"
        )
    return None


def interpret_run(result: CleanerResult, *, dry_run: bool, actor: str) -> Answer:
    """Exit code and output of `cleaner run --json` -> the API's answer. Pure.

    0 -> 200 with the report; 3 (some evictions failed, the rest done) -> 207 with the report;
    4 with the lock held -> 409 naming the holder; 4 otherwise (Prometheus unreachable) -> 503;
    2 (the cleaner rejects the configuration) -> 503; 5 (the filesystem refused an operation: no
    space, read-only, no permission; the message names the operation and the path) -> 503;
    1 or anything else -> 502; never a 500.
    """
    early = _not_run(result)
    if early is not None:
        return early
    code = result.exit_code
    message = last_message(result.stderr)
    if code in (ExitCode.OK, ExitCode.PARTIAL):
        report = _report(result.stdout)
        if report is None:
            return _failure(
                502, "bad_cleaner_output", "the cleaner finished but printed no JSON report", exit_code=code
            )
        outcome = "dry_run" if dry_run else ("done" if code == ExitCode.OK else "partial")
        body = {
            "outcome": outcome,
            "dry_run": dry_run,
            "actor": actor,
            "exit_code": code,
            "seconds": round(result.seconds, 3),
            "report": report,
        }
        if code == ExitCode.OK:
            return Answer(200, body)
        return Answer(207, body, result="failure", error=message or "some evictions failed")
    if code == ExitCode.PRECONDITION:
        holder = parse_holder(result.stderr)
        if holder is not None:
            return _failure(409, "cleanup_running", message, holder=holder.to_json(), exit_code=code)
        return _failure(503, "precondition_failed", message or "the cleaner's precondition failed", exit_code=code)
    if code == ExitCode.CONFIG:
        return _failure(503, "cleaner_config", message or "the cleaner rejected its configuration", exit_code=code)
    if code == ExitCode.FILESYSTEM:
        return _failure(503, "filesystem_error", message or "the filesystem refused an operation", exit_code=code)
    return _failure(502, "cleaner_failed", message or f"the cleaner exited with {code}", exit_code=code)


def interpret_policies(result: CleanerResult) -> Answer:
    """`cleaner policies --json` -> the API's answer. Pure."""
    early = _not_run(result)
    if early is not None:
        return early
    message = last_message(result.stderr)
    if result.exit_code == ExitCode.OK:
        report = _report(result.stdout)
        if report is None or not isinstance(report.get("policies"), list):
            return _failure(
                502, "bad_cleaner_output", "the cleaner printed no policies document", exit_code=ExitCode.OK
            )
        return Answer(200, report)
    if result.exit_code == ExitCode.CONFIG:
        return _failure(
            503, "cleaner_config", message or "the cleaner rejected its configuration", exit_code=ExitCode.CONFIG
        )
    return _failure(502, "cleaner_failed", message or f"the cleaner exited with {result.exit_code}")
