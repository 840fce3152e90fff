"""A scan worker killed mid-scan (what the OOM killer does): the failed scan is never served as a
result; the pool is rebuilt, the scan retried, and the failure counted and reported."""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest

from exporter.api.server import build_app
from exporter.cli import exporter_routes, storage_api
from exporter.index.scan import Scanner
from exporter.index.service import ExporterService
from tests.oracle import assert_exact
from tests.support import http_get, make_service, parse_metrics, start_exporter, wait_until

ADMIN = "scan-faults-admin-token-0123456789"


class Client:
    """The exporter's routes as `main` serves them, in-process."""

    def __init__(self, svc: ExporterService) -> None:
        self.app = build_app(exporter_routes(svc, svc.settings, storage_api(svc, svc.settings, None)))

    def request(self, method: str, path: str, **kwargs: object) -> httpx.Response:
        async def fetch() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://exporter", timeout=120) as client:
                return await client.request(method, path, **kwargs)  # type: ignore[arg-type]

        return anyio.run(fetch)

    def metric(self, name: str) -> float:
        return parse_metrics(self.request("GET", "/metrics").text).get((name, frozenset()), -1.0)


def workers_of(scanner: Scanner) -> list[int]:
    """Start every worker of the scanner's pool (they start on demand) and return their PIDs."""
    pool = scanner._pool
    assert pool is not None

    def all_running() -> bool:
        for future in [pool.submit(os.getpid) for _ in range(4 * scanner.workers)]:
            future.result(timeout=30)
        return len(pool._processes) >= scanner.workers

    wait_until(all_running, timeout=60, what="every scan worker running")
    return list(pool._processes)


def scan_held(scanner: Scanner) -> bool:
    pool = scanner._pool
    return pool is not None and bool(pool._pending_work_items)


@pytest.fixture
def two_models(store: Path) -> Path:
    """Models two levels deep, so that the scan hands subtrees to the pool's workers."""
    for tier, name in (("raw", "a"), ("quantized", "b")):
        shard = store / "models" / tier / name / "shard"
        shard.mkdir(parents=True)
        (shard / "w").write_bytes(b"w" * 100)
    return store


@pytest.fixture
def pooled(two_models: Path) -> Iterator[tuple[ExporterService, Client, list[int]]]:
    """A service whose scanner has two worker processes, both stopped (SIGSTOP): a scan waits."""
    scanner = Scanner(2)
    svc = ExporterService(make_service(two_models, STORAGE_ADMIN_TOKEN=f"ops:{ADMIN}").settings, scanner=scanner)
    scanner.start()
    pids = workers_of(scanner)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield svc, Client(svc), pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        svc.stop()


def kill_one(scanner: Scanner, pids: list[int]) -> None:
    """SIGKILL the first worker; once the pool knows, let the others go on (a stopped process
    cannot be terminated, and one let go early could finish the scan first)."""
    pool = scanner._pool
    os.kill(pids[0], signal.SIGKILL)
    wait_until(lambda: pool is None or pool._broken, timeout=30, what="the pool sees its worker die")
    for pid in pids[1:]:
        os.kill(pid, signal.SIGCONT)


def test_a_worker_killed_during_the_initial_scan_is_retried_and_never_served_as_ready(
    pooled: tuple[ExporterService, Client, list[int]],
) -> None:
    svc, client, pids = pooled
    svc.start()
    wait_until(lambda: scan_held(svc.scanner), timeout=30, what="the initial scan waits for its workers")
    kill_one(svc.scanner, pids)

    # Not ready, with the reason, and counted, until a retry on a new pool succeeds.
    response = wait_until(
        lambda: (r := client.request("GET", "/readyz")).json()["status"].startswith("initial scan failed") and r,
        timeout=30,
        what="/readyz names the failed scan",
    )
    assert response.status_code == 503
    assert "worker" in response.json()["status"]
    wait_until(lambda: client.request("GET", "/readyz").status_code == 200, timeout=60, what="ready after a retry")
    assert client.metric("model_storage_scan_failures_total") == 1
    assert client.metric("model_storage_ready") == 1
    assert_exact(svc)
    assert svc.snapshot().tiers["raw"][:2] == (100, 1)


def test_a_worker_killed_during_a_later_scan_fails_the_collect_and_keeps_the_index(
    pooled: tuple[ExporterService, Client, list[int]],
) -> None:
    svc, client, pids = pooled
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    svc.start()
    wait_until(svc.is_ready, timeout=60, what="initial scan")
    assert_exact(svc)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    answers: list[httpx.Response] = []
    collect = threading.Thread(
        target=lambda: answers.append(
            client.request("POST", "/storage/collect", headers={"Authorization": f"Bearer {ADMIN}"})
        )
    )
    collect.start()
    wait_until(lambda: scan_held(svc.scanner), timeout=30, what="the collect's scan waits for its workers")
    kill_one(svc.scanner, pids)
    collect.join(timeout=120)

    assert len(answers) == 1
    assert answers[0].status_code == 503, answers[0].text
    assert answers[0].json()["error"]["code"] == "scan_failed"
    # The index was not replaced by an empty scan, and the next collect works on a new pool.
    assert svc.snapshot().tiers["raw"][:2] == (100, 1)
    assert client.metric("model_storage_scan_failures_total") == 1
    again = client.request("POST", "/storage/collect", headers={"Authorization": f"Bearer {ADMIN}"})
    assert again.status_code == 200, again.text
    assert again.json()["files"] == 2
    assert svc.is_ready()
    assert_exact(svc)


# ----- out of file descriptors (EMFILE) -----------------------------------------------------------


def open_descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_model_moved_in_while_the_exporter_is_out_of_descriptors_ends_counted(store: Path, logs_dir: Path) -> None:
    """Case 9: the scan of a directory new to the index meets EMFILE; once descriptors are back,
    the directory is scanned again (the scrub is off: the event path alone must get there)."""
    staged = store.parent / "staging" / "big"
    for shard in range(3):
        (staged / f"shard-{shard}" / "deep").mkdir(parents=True)
        for i in range(4):
            (staged / f"shard-{shard}" / "deep" / f"w{i}").write_bytes(b"w" * (100 + i))
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_SCRUB_STATS_PER_SECOND="0")
    try:
        pid = proc.popen.pid
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        # No descriptor left: the next open() in the exporter fails with EMFILE.
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_descriptors(pid), hard))
        try:
            os.rename(staged, store / "models" / "raw" / "big")
            wait_until(lambda: "Too many open files" in proc.log(), timeout=30, what="the exporter meets EMFILE")
        finally:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))

        def counted() -> bool:
            metrics = parse_metrics(http_get(proc.url + "/metrics")[1].decode())
            key = frozenset({("tier", "raw"), ("model", "big")})
            return metrics.get(("model_storage_model_files", key)) == 12

        wait_until(counted, timeout=60, what="the model counted once descriptors are back")
        metrics = parse_metrics(http_get(proc.url + "/metrics")[1].decode())
        assert metrics[("model_storage_bytes", frozenset({("tier", "raw")}))] == 3 * (100 + 101 + 102 + 103)
    finally:
        proc.stop()
