"""Every exporter operation is logged with its outcome: success, or failure with the error."""

from __future__ import annotations

import errno
import os
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from exporter.api.cleanup_runner import CleanupRunner
from exporter.index.scan import Progress, Scanner, ScanResult, WatchAhead
from exporter.index.service import ExporterService
from shared.logs import FAILURE, SUCCESS
from tests.oracle import assert_exact
from tests.support import make_service, wait_until

# Events that open an operation or report its progress; the event that ends it carries the outcome.
OPENING = (".started", ".progress")


def assert_outcomes(entries: list[MutableMapping[str, Any]]) -> None:
    for entry in entries:
        if entry["event"].endswith(OPENING) or entry["event"] == "library.logged":
            continue
        assert entry.get("outcome") in (SUCCESS, FAILURE), entry
        if entry["outcome"] == FAILURE:
            assert entry.get("error"), entry


def events(entries: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [entry for entry in entries if entry["event"] == name]


def test_a_service_lifetime_logs_each_operation_with_its_outcome(store: Path) -> None:
    with capture_logs() as entries:
        svc = make_service(store)
        svc.start()
        try:
            wait_until(svc.is_ready, timeout=10, what="initial scan")
            (store / "models" / "raw" / "m").mkdir()
            (store / "models" / "raw" / "m" / "w").write_bytes(b"w" * 10)
            assert_exact(svc)
            svc.reconcile("test")
        finally:
            svc.stop()
    names = {entry["event"] for entry in entries}
    assert {"watch.started", "scan.started", "scan.finished", "exporter.ready", "exporter.stopped"} <= names
    assert [(e["reason"], e["outcome"]) for e in events(entries, "scan.finished")] == [
        ("initial", SUCCESS),
        ("test", SUCCESS),
    ]
    assert_outcomes(entries)


class FailingScanner(Scanner):
    """The real scanner for the initial scan; every later scan fails as a vanished mount would."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.scans = 0

    def scan(
        self, path: str | Path, progress: Progress | None = None, *, watch: WatchAhead | None = None
    ) -> ScanResult:
        self.scans += 1
        if self.scans > 1:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return super().scan(path, progress, watch=watch)


def test_failures_are_logged_as_failures_with_their_error(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import exporter.index.scan as scan_module
    from exporter.index.scan import ScanFailedError

    locked = str(store / "models" / "raw" / "locked")
    real_open = os.open

    def open_(path: str, flags: int, *args: Any, **kwargs: Any) -> int:
        # As root nothing is unreadable: fail the scanner's one edge, opening a directory.
        if str(path) == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(scan_module.os, "open", open_)
    with capture_logs() as entries:
        svc = ExporterService(make_service(store).settings, scanner=FailingScanner())
        svc.start()
        try:
            wait_until(svc.is_ready, timeout=10, what="initial scan")
            os.mkdir(locked)
            wait_until(lambda: events(entries, "index.error"), timeout=5, what="unreadable directory logged")
            with pytest.raises(ScanFailedError):  # a failed scan is never answered as a result
                svc.reconcile("test")
            reader = svc._reader
            assert reader is not None

            def broken(**_kwargs: object) -> list[object]:
                raise OSError(errno.EIO, "Input/output error")

            reader._fd._read_event_buffer = broken  # type: ignore[method-assign,assignment]
            (store / "models" / "raw" / "wake-up").write_bytes(b"1")
            wait_until(lambda: svc.snapshot().polling, timeout=5, what="fell back to polling")
        finally:
            svc.stop()
    unreadable = [e for e in events(entries, "index.error") if e["path"] == locked]
    assert unreadable and all(
        (e["kind"], e["outcome"], e["error"]) == ("scan", FAILURE, "Permission denied") for e in unreadable
    )
    [failed_scan] = [e for e in events(entries, "scan.failed") if e["reason"] == "test"]
    assert failed_scan["outcome"] == FAILURE and "Input/output error" in failed_scan["error"]
    [polling] = events(entries, "watch.polling")
    assert polling["outcome"] == FAILURE and "inotify read failed" in polling["error"]
    assert_outcomes(entries)


def test_cleanup_runs_are_logged_with_their_outcome(tmp_path: Path) -> None:
    with capture_logs() as entries:
        CleanupRunner("true", timeout_seconds=10).policies()
        CleanupRunner("false", timeout_seconds=10).policies()
        CleanupRunner(str(tmp_path / "no-such-cleaner"), timeout_seconds=10).policies()
        CleanupRunner("sh -c 'exec sleep 30'", timeout_seconds=0.2).policies()
    assert [(e["exit_code"], e["outcome"]) for e in events(entries, "cleanup.finished")] == [
        (0, SUCCESS),
        (1, FAILURE),
    ]
    assert events(entries, "cleanup.finished")[1]["error"] == "exit code 1"
    assert [e["outcome"] for e in events(entries, "cleanup.start_failed")] == [FAILURE]
    assert [e["outcome"] for e in events(entries, "cleanup.timed_out")] == [FAILURE]
    assert_outcomes(entries)
