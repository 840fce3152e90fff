"""Runs `model-storage-cleaner` as the separate process it is, one API-started run at a time.

The exporter never imports the cleaner: it runs the same command the timer runs, so the cleaner's
own lock, journal and audit apply. `interpret_run` and `interpret_policies` turn what the process
did into the API's answer and are pure.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import LockHeldError, read_error_line
from shared.exit_codes import ExitCode
from shared.logs import FAILURE, SUCCESS, get_logger

log = get_logger("exporter.cleanup")

PROG = "model-storage-cleaner"
_MESSAGE_LIMIT = 500
_TERMINATE_GRACE_SECONDS = 10.0


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


def error_body(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, **extra}}


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


def resolve_command(command: str) -> list[str]:
    """`command` split like a shell would (never run by one); a bare name missing from PATH is looked
    up next to this interpreter, where the same package installs `model-storage-cleaner`."""
    argv = shlex.split(command) or [PROG]
    if "/" not in argv[0] and shutil.which(argv[0]) is None:
        sibling = Path(sys.executable).parent / argv[0]
        if sibling.is_file() and os.access(sibling, os.X_OK):
            argv[0] = str(sibling)
    return argv


class CleanupRunner:
    """Starts cleaner processes: at most one API cleanup at a time (`BusyError` otherwise)."""

    def __init__(
        self,
        command: str,
        *,
        timeout_seconds: float,
        config_file: str | None = None,
        env: Mapping[str, str] | None = None,
        policies_ttl_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = [*resolve_command(command), *(["--config", config_file] if config_file else [])]
        self.timeout = timeout_seconds
        self.env = dict(os.environ if env is None else env)
        self._run_lock = threading.Lock()
        self._holder: Holder | None = None
        self._policies_lock = threading.Lock()
        self._policies: tuple[float, CleanerResult] | None = None
        self._policies_ttl = policies_ttl_seconds
        self._clock = clock

    def run_argv(self, actor: str, dry_run: bool) -> list[str]:
        # `--actor=NAME` keeps a name that starts with '-' from being read as an option.
        return [*self.base, f"--actor={actor}", "run", "--json", *(["--dry-run"] if dry_run else [])]

    def holder(self) -> Holder | None:
        return self._holder

    def run(self, actor: str, dry_run: bool) -> CleanerResult:
        """Run one cleanup and wait for it; raises `BusyError` when one started here is running."""
        if not self._run_lock.acquire(blocking=False):
            holder = self._holder
            raise BusyError(holder or Holder(source="api", pid=None))
        try:
            self._holder = Holder(source="api", pid=None, actor=actor, started_at=time.time(), dry_run=dry_run)
            return self._execute(self.run_argv(actor, dry_run), self.timeout, actor=actor, dry_run=dry_run)
        finally:
            self._holder = None
            self._run_lock.release()

    def policies(self) -> CleanerResult:
        """`policies --json`, cached briefly when it succeeded (it only reads settings)."""
        with self._policies_lock:
            cached = self._policies
            if cached is not None and self._clock() - cached[0] < self._policies_ttl:
                return cached[1]
            result = self._execute([*self.base, "policies", "--json"], min(self.timeout, 60.0))
            if result.exit_code == ExitCode.OK:
                self._policies = (self._clock(), result)
            return result

    def _execute(self, argv: Sequence[str], timeout: float, **context: Any) -> CleanerResult:
        started = time.monotonic()
        try:
            proc = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=self.env,
                text=True,
                errors="replace",
            )
        except OSError as err:
            log.error("cleanup.start_failed", command=argv[0], error=err.strerror or str(err), outcome=FAILURE)
            return CleanerResult(tuple(argv), None, start_error=f"{argv[0]}: {err.strerror or err}")
        if context and self._holder is not None:
            self._holder = Holder(
                source="api",
                pid=proc.pid,
                actor=self._holder.actor,
                started_at=self._holder.started_at,
                dry_run=self._holder.dry_run,
            )
        log.info("cleanup.started", pid=proc.pid, argv=" ".join(argv), **context)
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            stdout, stderr = self._stop(proc)
            seconds = time.monotonic() - started
            log.error(
                "cleanup.timed_out",
                pid=proc.pid,
                seconds=round(seconds, 3),
                outcome=FAILURE,
                error=f"no exit within {timeout:g} s; stopped",
                **context,
            )
            return CleanerResult(tuple(argv), None, stdout, stderr, seconds, timed_out=True)
        seconds = time.monotonic() - started
        outcome: dict[str, Any] = {"outcome": SUCCESS}
        if proc.returncode != 0:
            outcome = {"outcome": FAILURE, "error": last_message(stderr) or f"exit code {proc.returncode}"}
        log.info(
            "cleanup.finished", pid=proc.pid, exit_code=proc.returncode, seconds=round(seconds, 3), **outcome, **context
        )
        return CleanerResult(tuple(argv), proc.returncode, stdout, stderr, seconds)

    @staticmethod
    def _stop(proc: subprocess.Popen[str]) -> tuple[str, str]:
        # SIGTERM first: the cleaner journals every step, so a stop is recovered on its next run.
        proc.terminate()
        try:
            return proc.communicate(timeout=_TERMINATE_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.communicate()
