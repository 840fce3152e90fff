"""/readyz: 503 until the initial scan is done, and again whenever the index can no longer be kept current."""

from __future__ import annotations

import errno
import threading
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from structlog.testing import capture_logs

from exporter.api.server import build_app
from exporter.cli import exporter_routes, storage_api
from exporter.index.scan import Progress, Scanner, ScanResult, WatchAhead
from exporter.index.service import ExporterService
from tests.oracle import assert_exact
from tests.support import make_service, parse_metrics, wait_until


class Client:
    """The exporter's own routes, as `main` serves them, called in-process (no socket, no server thread)."""

    def __init__(self, svc: ExporterService) -> None:
        self.app = build_app(exporter_routes(svc, svc.settings, storage_api(svc, svc.settings, None)))

    def get(self, path: str) -> httpx.Response:
        async def fetch() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exporter") as client:
                return await client.get(path)

        return anyio.run(fetch)


def client_for(svc: ExporterService) -> Client:
    return Client(svc)


def ready_gauge(client: Client) -> float:
    return parse_metrics(client.get("/metrics").text)[("model_storage_ready", frozenset())]


class GatedScanner(Scanner):
    """The real scanner, held at a gate until the test opens it: the initial scan becomes observable."""

    def __init__(self) -> None:
        super().__init__(workers=1)
        self.waiting = threading.Event()
        self.gate = threading.Event()

    def scan(
        self, path: str | Path, progress: Progress | None = None, *, watch: WatchAhead | None = None
    ) -> ScanResult:
        self.waiting.set()
        self.gate.wait(timeout=30)
        return super().scan(path, progress, watch=watch)


def test_readyz_is_503_until_the_initial_scan_is_done(store: Path) -> None:
    (store / "models" / "raw" / "m").mkdir()
    (store / "models" / "raw" / "m" / "w").write_bytes(b"w" * 10)
    scanner = GatedScanner()
    svc = ExporterService(make_service(store).settings, scanner=scanner)
    svc.start()
    try:
        client = client_for(svc)
        wait_until(scanner.waiting.is_set, timeout=10, what="initial scan under way")
        response = client.get("/readyz")
        assert (response.status_code, response.json()) == (503, {"status": "scanning"})
        assert ready_gauge(client) == 0
        assert client.get("/healthz").status_code == 200  # alive, just not ready
        scanner.gate.set()
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=10, what="ready after the scan")
        assert client.get("/readyz").json() == {"status": "ready"}
        assert ready_gauge(client) == 1
        assert_exact(svc)
    finally:
        scanner.gate.set()
        svc.stop()


class ShutDownUnderTheScan(GatedScanner):
    """A scan still running when the service stops: closing the pool makes its next submit raise,
    as concurrent.futures does."""

    def scan(
        self, path: str | Path, progress: Progress | None = None, *, watch: WatchAhead | None = None
    ) -> ScanResult:
        self.waiting.set()
        self.gate.wait(timeout=30)
        raise RuntimeError("cannot schedule new futures after shutdown")

    def close(self) -> None:
        self.gate.set()
        super().close()


def test_stopping_during_the_initial_scan_is_no_scan_failure(store: Path) -> None:
    # Seen as `systemctl stop` during a long first scan, or a port already taken: the log said
    # scan.failed at error level and the failure was counted, though nothing had failed.
    scanner = ShutDownUnderTheScan()
    svc = ExporterService(make_service(store).settings, scanner=scanner)
    with capture_logs() as entries:
        svc.start()
        wait_until(scanner.waiting.is_set, timeout=10, what="initial scan under way")
        svc.stop()
    events = [e["event"] for e in entries]
    assert "scan.stopped" in events
    assert "scan.failed" not in events
    assert svc.counters.scan_failures == 0


def fail_reads(svc: ExporterService, how: str) -> None:
    """Break the inotify reader at its one edge, the kernel read, and wake it so it meets the break."""
    reader = svc._reader
    assert reader is not None

    def broken(**_kwargs: object) -> list[object]:
        if how == "read_error":
            raise OSError(errno.EIO, "Input/output error")
        return []  # what watchdog's read gives, at once and forever, once the descriptor is closed

    reader._fd._read_event_buffer = broken  # type: ignore[method-assign,assignment]
    # The read in progress returns this create; the next read is the broken one.
    (Path(svc.root) / "raw" / "wake-up").write_bytes(b"1")


@pytest.mark.parametrize("how", ["read_error", "descriptor_closed"])
def test_a_dead_reader_falls_back_to_polling_and_stays_exact(store: Path, how: str) -> None:
    svc = make_service(store, STORAGE_POLL_INTERVAL_SECONDS="1")
    svc.start()
    try:
        wait_until(svc.is_ready, timeout=10, what="initial scan")
        assert not svc.snapshot().polling
        fail_reads(svc, how)
        wait_until(lambda: svc.snapshot().polling, timeout=5, what="fell back to polling")
        snap = svc.snapshot()
        assert snap.errors_total.get("watch", 0) >= 1
        assert "inotify read failed" in svc.polling_reason
        assert svc.readiness() == "ready"  # polling keeps the index current
        # Polling, not events, now sees new files.
        (store / "models" / "quantized" / "after").mkdir()
        (store / "models" / "quantized" / "after" / "w").write_bytes(b"a" * 42)
        assert_exact(svc, timeout=10)
    finally:
        svc.stop()


def test_readyz_is_503_while_the_reader_is_dead_and_nothing_polls(store: Path) -> None:
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.is_ready, timeout=10, what="initial scan")
        client = client_for(svc)
        # Holding the index lock keeps the updater from switching to polling: the moment in between.
        with svc.lock:
            fail_reads(svc, "read_error")
            reader = svc._reader
            assert reader is not None
            wait_until(lambda: reader.failed, timeout=5, what="reader failed")
            response = client.get("/readyz")
            assert (response.status_code, response.json()) == (503, {"status": "watcher stopped"})
        wait_until(lambda: client.get("/readyz").status_code == 200, timeout=5, what="ready again, polling")
        assert svc.snapshot().polling
    finally:
        svc.stop()


def test_readyz_and_healthz_are_503_once_the_updater_has_died(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.is_ready, timeout=10, what="initial scan")
        client = client_for(svc)

        def boom(*_args: object, **_kwargs: object) -> int:
            raise RuntimeError("injected bug in applying events")

        monkeypatch.setattr(svc.updater, "apply", boom)
        (store / "models" / "raw" / "trigger").write_bytes(b"t")
        wait_until(lambda: not svc.is_alive(), timeout=5, what="updater died")
        response = client.get("/readyz")
        assert (response.status_code, response.json()) == (503, {"status": "updater stopped"})
        assert client.get("/healthz").status_code == 503
        assert ready_gauge(client) == 0
        assert svc.snapshot().errors_total["updater"] == 1
    finally:
        svc.stop()


@pytest.mark.parametrize("held", ["index", "opens"])
def test_a_scrape_waiting_for_a_lock_leaves_the_event_loop_free(
    store: Path, monkeypatch: pytest.MonkeyPatch, held: str
) -> None:
    """/metrics renders on the event loop only when it need not wait: with the index lock held (the
    updater applying a slice) or the opens store's (the reader reading marker files), the scrape
    waits in the thread pool and /healthz still answers."""
    svc = make_service(store, STORAGE_OPENS_TRACKING="true")
    svc.start()
    try:
        wait_until(svc.is_ready, timeout=10, what="initial scan")
        assert svc.opens is not None
        lock = svc.lock if held == "index" else svc.opens._lock
        client = client_for(svc)
        assert client.get("/metrics").status_code == 200  # a warm cache: the next scrape may go inline
        waiting = threading.Event()
        real_read_index = svc.read_index

        def spy(fn: Any, *, wait: bool = True) -> Any:
            if wait:
                waiting.set()
            return real_read_index(fn, wait=wait)

        monkeypatch.setattr(svc, "read_index", spy)
        guard = threading.Lock()
        released = threading.Event()

        def release() -> None:
            with guard:
                if not released.is_set():
                    released.set()
                    lock.release()

        async def scenario() -> tuple[httpx.Response, bool, httpx.Response]:
            transport = httpx.ASGITransport(app=client.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exporter") as http:
                scraped: list[httpx.Response] = []

                async def scrape() -> None:
                    scraped.append(await http.get("/metrics"))

                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(scrape)
                    with anyio.fail_after(10):
                        while not waiting.is_set():
                            await anyio.sleep(0.01)
                    health = await http.get("/healthz")
                    answered_while_held = not released.is_set()
                    release()
                return health, answered_while_held, scraped[0]

        lock.acquire()
        # A loop blocked on the lock could never release it: this timer does, and the test fails.
        timer = threading.Timer(10, release)
        timer.start()
        try:
            health, answered_while_held, scrape = anyio.run(scenario)
        finally:
            timer.cancel()
            release()
        assert health.status_code == 200 and answered_while_held
        assert scrape.status_code == 200
        assert parse_metrics(scrape.text)[("model_storage_ready", frozenset())] == 1
    finally:
        svc.stop()
