"""Events against a real exporter process: burst throughput, time to exact gauges, latency at a steady
rate, /metrics (and /storage/info) while a burst is applied, idle CPU.

Sizes by environment: BENCH_MODELS (10,000), BENCH_BURST_FILES (100,000), BENCH_SUSTAINED_RATE (20,000
files/s) for BENCH_SUSTAINED_SECONDS (5), BENCH_LATENCY_WRITES (1,000 at 100/s), BENCH_IDLE_SECONDS (10);
BENCH_OPENS_TRACKING=false measures without last-opened tracking (every create is also an IN_OPEN);
BENCH_SCRUB_STATS_PER_SECOND sets the scrub's budget (0: off; unset: the default).
BENCH_EVENTS_DIR picks the filesystem (default: the temp dir; a disk mounted with `discard` creates
files at a varying 5,000-25,000/s, so the same writer is first timed alone, unwatched, as the baseline).
"""

from __future__ import annotations

import itertools
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import env_float, env_int, percentile, report, write_result
from tests.support import Proc, http_get, parse_metrics, start_exporter

TOKEN = "bench-read-token-0123456789"
WRITER = r"""
import json, os, sys, time
root, count, rate, tag = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
per_dir = 1000
started = time.time()
made = 0
for d in range((count + per_dir - 1) // per_dir):
    p = os.path.join(root, 'd%d' % d)
    os.makedirs(p)
    for i in range(min(per_dir, count - made)):
        fd = os.open(os.path.join(p, tag + '%d' % i), os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b'x')
        os.close(fd)
        made += 1
        if rate and made % 200 == 0:
            ahead = started + made / rate - time.time()
            if ahead > 0:
                time.sleep(ahead)
ended = time.time()
print(json.dumps({"files": made, "started": started, "ended": ended}))
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


def metric(proc: Proc, name: str, **labels: str) -> float | None:
    _, body = http_get(proc.url + "/metrics", timeout=30)
    return parse_metrics(body.decode()).get((name, frozenset(labels.items())))


class Poller:
    """Scrapes /metrics (and /storage/info when served) in a loop, recording each latency."""

    def __init__(self, proc: Proc, with_info: bool) -> None:
        self.proc = proc
        self.with_info = with_info
        self.metrics_ms: list[float] = []
        self.info_ms: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for path, sink in (("/metrics", self.metrics_ms), ("/storage/info", self.info_ms)):
                if path == "/storage/info" and not self.with_info:
                    continue
                started = time.perf_counter()
                status, _ = http_get(self.proc.url + path, timeout=30, headers={"Authorization": f"Bearer {TOKEN}"})
                if status == 200:
                    sink.append((time.perf_counter() - started) * 1000)
                else:
                    self.failures += 1
            self._stop.wait(0.02)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def run_writer(root: Path, count: int, rate: float, tag: str) -> dict[str, float]:
    root.mkdir(parents=True)
    out = subprocess.run(
        [sys.executable, "-c", WRITER, str(root), str(count), str(rate), tag],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def model_sample(body: bytes, family: str, model: str) -> float | None:
    """The raw/<model> sample of a per-model family, found by its line rather than by parsing the
    whole exposition: at 10,000 models the parser takes 0.5-0.8 s, so a wait that parsed every
    scrape measured its own parser (and a larger body made the exporter look slower)."""
    line = re.escape(f'{family}{{tier="raw",model="{model}"}} '.encode())
    match = re.search(rb"^" + line + rb"(\S+)$", body, re.MULTILINE)
    return float(match[1]) if match else None


def wait_exact(proc: Proc, model: str, files: int, timeout: float, scrapes: list[int] | None = None) -> float:
    """time.time() when /metrics first shows exactly `files` files (and bytes) for raw/<model>;
    `scrapes` (one counter) counts the scrapes it took."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        _, body = http_get(proc.url + "/metrics", timeout=30)
        if scrapes is not None:
            scrapes[0] += 1
        now = time.time()
        if (
            model_sample(body, "model_storage_model_files", model) == files
            and model_sample(body, "model_storage_model_bytes", model) == files
        ):
            return now
        time.sleep(0.01)
    raise TimeoutError(f"raw/{model} never reached {files} files")


def scrape_cpu(proc: Proc, scrapes: int = 30) -> float:
    """The exporter's CPU seconds per /metrics scrape, at rest: to take the scrapes' share out of a
    phase's CPU (the exact-wait alone scrapes every 10 ms, and a scrape costs milliseconds)."""
    before = cpu_seconds(proc.popen.pid)
    for _ in range(scrapes):
        http_get(proc.url + "/metrics", timeout=30)
    return (cpu_seconds(proc.popen.pid) - before) / scrapes


def burst(
    proc: Proc, models: Path, name: str, count: int, rate: float, poll: bool, per_scrape: float
) -> dict[str, Any]:
    before_events = metric(proc, "model_storage_events_total") or 0.0
    before_overflows = metric(proc, "model_storage_event_overflows_total") or 0.0
    poller = Poller(proc, with_info=True)
    cpu_before = cpu_seconds(proc.popen.pid)
    if poll:
        poller.__enter__()
    try:
        written = run_writer(models / "raw" / name, count, rate, "f")
        waits = [0]
        exact_at = wait_exact(proc, name, count, timeout=120, scrapes=waits)
        # The exporter's CPU (every thread, scrapes included) from the first write to exact: on a
        # shared machine this moves far less with the load than the wall-clock figures do.
        cpu_used = cpu_seconds(proc.popen.pid) - cpu_before
    finally:
        if poll:
            poller.__exit__()
    scrapes = waits[0] + (len(poller.metrics_ms) if poll else 0)
    writer_seconds = written["ended"] - written["started"]
    events = (metric(proc, "model_storage_events_total") or 0.0) - before_events
    overflows = (metric(proc, "model_storage_event_overflows_total") or 0.0) - before_overflows
    result: dict[str, Any] = {
        "files": count,
        "writer_files_per_second": round(count / writer_seconds),
        "writer_seconds": round(writer_seconds, 3),
        "seconds_from_last_write_to_exact": round(exact_at - written["ended"], 3),
        "seconds_from_first_write_to_exact": round(exact_at - written["started"], 3),
        "files_applied_per_second": round(count / (exact_at - written["started"])),
        "events_applied": int(events),
        "exporter_cpu_seconds": round(cpu_used, 3),
        "exporter_cpu_microseconds_per_file": round(cpu_used / count * 1e6, 1),
        # Less the scrapes' share (each at the at-rest cost): what the events cost.
        "scrapes_during_phase": scrapes,
        "exporter_cpu_less_scrapes_microseconds_per_file": round(
            max(0.0, cpu_used - scrapes * per_scrape) / count * 1e6, 1
        ),
        "overflows": int(overflows),
    }
    if poll:
        result.update(
            metrics_scrapes=len(poller.metrics_ms),
            metrics_p50_ms=round(percentile(poller.metrics_ms, 50), 1),
            metrics_p99_ms=round(percentile(poller.metrics_ms, 99), 1),
            info_requests=len(poller.info_ms),
            info_p50_ms=round(percentile(poller.info_ms, 50), 1) if poller.info_ms else None,
            info_p99_ms=round(percentile(poller.info_ms, 99), 1) if poller.info_ms else None,
            poll_failures=poller.failures,
        )
    return result


def latency(base: Path, logs: Path, writes: int) -> dict[str, float]:
    """Event-to-gauge latency at 100 writes/s on a small tree, so a scrape takes about a millisecond."""
    models = base / "models"
    model = models / "raw" / "steady"
    model.mkdir(parents=True)
    proc = start_exporter(models, base, logs, STORAGE_SCAN_WORKERS="1")
    try:
        seen: list[tuple[float, float]] = []  # (time, bytes seen)
        stop = threading.Event()

        def scrape() -> None:
            key = ("model_storage_model_bytes", frozenset({("tier", "raw"), ("model", "steady")}))
            while not stop.is_set():
                _, body = http_get(proc.url + "/metrics")
                seen.append((time.monotonic(), parse_metrics(body.decode()).get(key, 0.0)))

        scraper = threading.Thread(target=scrape, daemon=True)
        scraper.start()
        written: list[tuple[float, int]] = []
        started = time.monotonic()
        with open(model / "log.bin", "ab") as handle:
            for i in range(writes):
                target = started + i / 100
                time.sleep(max(0.0, target - time.monotonic()))
                handle.write(b"x")
                handle.flush()
                written.append((time.monotonic(), i + 1))
        time.sleep(1.0)
        stop.set()
        scraper.join()
        delays = []
        j = 0
        for at, size in written:
            while j < len(seen) and (seen[j][0] < at or seen[j][1] < size):
                j += 1
            if j < len(seen):
                delays.append((seen[j][0] - at) * 1000)
        scrape_gaps = [b[0] - a[0] for a, b in itertools.pairwise(seen)]
        return {
            "writes": writes,
            "p50_ms": round(percentile(delays, 50), 1),
            "p99_ms": round(percentile(delays, 99), 1),
            "max_ms": round(max(delays), 1),
            "scrape_interval_ms_median": round(statistics.median(scrape_gaps) * 1000, 2),
            "matched": len(delays),
        }
    finally:
        proc.stop()


def main() -> dict[str, object]:
    n_models = env_int("BENCH_MODELS", 10_000)
    burst_files = env_int("BENCH_BURST_FILES", 100_000)
    sustained_rate = env_float("BENCH_SUSTAINED_RATE", 20_000)
    sustained_seconds = env_float("BENCH_SUSTAINED_SECONDS", 5)
    idle_seconds = env_float("BENCH_IDLE_SECONDS", 10)
    latency_writes = env_int("BENCH_LATENCY_WRITES", 1000)
    with tempfile.TemporaryDirectory(prefix="bench-events-", dir=os.environ.get("BENCH_EVENTS_DIR")) as tmp:
        alone = run_writer(Path(tmp) / "unwatched", burst_files, 0.0, "f")
        alone_rate = round(burst_files / (alone["ended"] - alone["started"]))
        report(f"baseline: the same writer alone, unwatched: {alone_rate:,} files/s")
        base = Path(tmp) / "storage"
        logs = Path(tmp) / "logs"
        logs.mkdir()
        models = base / "models"
        tiers = ("raw", "quantized", "repository")
        for tier in tiers:
            (models / tier).mkdir(parents=True)
        for i in range(n_models):
            model = models / tiers[i % 3] / f"model-{i:05d}"
            model.mkdir()
            (model / "w.bin").write_bytes(b"w" * (i % 100))
        proc = start_exporter(
            models,
            base,
            logs,
            STORAGE_SCAN_WORKERS="0",
            STORAGE_READ_TOKEN=TOKEN,
            STORAGE_LOG_LEVEL="warning",
            STORAGE_OPENS_TRACKING=os.environ.get("BENCH_OPENS_TRACKING", "true"),
            # Unset: the product's default budget; 0 turns the scrub off (to tell its share of a figure).
            **(
                {"STORAGE_SCRUB_STATS_PER_SECOND": scrub}
                if (scrub := os.environ.get("BENCH_SCRUB_STATS_PER_SECOND"))
                else {}
            ),
        )
        try:
            pid = proc.popen.pid
            time.sleep(2.0)  # let the start-up settle before measuring idle
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(idle_seconds)
            idle_cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            report(f"idle: {idle_cpu * 100:.2f}% of a core over {idle_seconds:g} s")

            per_scrape = scrape_cpu(proc)
            report(f"a /metrics scrape at rest: {per_scrape * 1000:.1f} ms of exporter CPU")
            full = burst(proc, models, "burst", burst_files, 0.0, poll=True, per_scrape=per_scrape)
            report(
                f"burst {burst_files:,} files: writer {full['writer_files_per_second']:,}/s, applied "
                f"{full['files_applied_per_second']:,}/s (ratio applied/writer "
                f"{full['files_applied_per_second'] / full['writer_files_per_second']:.2f}, writer watched/alone "
                f"{full['writer_files_per_second'] / alone_rate:.2f}), "
                f"exact {full['seconds_from_last_write_to_exact']:.2f} s after "
                f"the last write, overflows {full['overflows']}, exporter CPU "
                f"{full['exporter_cpu_microseconds_per_file']} us/file "
                f"({full['exporter_cpu_less_scrapes_microseconds_per_file']} "
                f"less {full['scrapes_during_phase']} scrapes); /metrics p50 {full['metrics_p50_ms']} ms "
                f"p99 {full['metrics_p99_ms']} ms, /storage/info p99 {full['info_p99_ms']} ms"
            )
            sustained_count = int(sustained_rate * sustained_seconds)
            steady = burst(
                proc, models, "sustained", sustained_count, sustained_rate, poll=False, per_scrape=per_scrape
            )
            report(
                f"sustained {sustained_rate:,.0f}/s target: writer {steady['writer_files_per_second']:,}/s for "
                f"{steady['writer_seconds']:.1f} s, overflows {steady['overflows']}, exporter CPU "
                f"{steady['exporter_cpu_microseconds_per_file']} us/file "
                f"({steady['exporter_cpu_less_scrapes_microseconds_per_file']} "
                f"less {steady['scrapes_during_phase']} scrapes), exact "
                f"{steady['seconds_from_last_write_to_exact']:.2f} s after the last write"
            )
        finally:
            proc.stop()
        lat = latency(Path(tmp) / "latency", logs, latency_writes)
        report(f"latency at 100 writes/s: p50 {lat['p50_ms']} ms, p99 {lat['p99_ms']} ms (target p99 < 250 ms)")
    figures = {
        "models": n_models,
        "filesystem_dir": tmp,
        "writer_alone_files_per_second": alone_rate,
        "ratio_applied_vs_writer": round(full["files_applied_per_second"] / full["writer_files_per_second"], 3),
        "ratio_watched_writer_vs_alone": round(full["writer_files_per_second"] / alone_rate, 3),
        "idle_cpu_fraction_of_a_core": round(idle_cpu, 5),
        "scrape_cpu_seconds_at_rest": round(per_scrape, 5),
        "burst": full,
        "sustained": steady,
        "latency_100_per_second": lat,
        "targets": {
            "sustained_20000_per_second_without_overflow": steady["overflows"] == 0
            and steady["writer_files_per_second"] >= 0.95 * sustained_rate,
            "exact_within_2s_after_burst": full["seconds_from_last_write_to_exact"] <= 2.0,
            "latency_p99_under_250ms": lat["p99_ms"] < 250,
            "metrics_p99_under_100ms_during_burst": full["metrics_p99_ms"] < 100,
        },
    }
    write_result("exporter_events", figures)
    return figures


if __name__ == "__main__":
    main()
