"""Runs `model-storage-cleaner` as the separate process it is, one API-started run at a time.

The exporter never imports the cleaner: it runs the same command the timer runs, so the cleaner's
own lock, journal and audit apply. What the process did becomes the API's answer in the pure
exporter/api/cleanup_answers.py.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from exporter.api.cleanup_answers import PROG, BusyError, CleanerResult, Holder, last_message
from shared.exit_codes import ExitCode
from shared.logs import FAILURE, SUCCESS, get_logger

log = get_logger("exporter.cleanup")

_TERMINATE_GRACE_SECONDS = 10.0


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
