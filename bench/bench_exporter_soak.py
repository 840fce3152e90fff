"""Soak: churn (create+delete, rewrite, rename) at a constant file count against a real exporter; RSS must hold.

BENCH_SOAK_SECONDS (default 1800, the issue's 30 minutes), BENCH_SOAK_WARMUP_SECONDS (60),
BENCH_SOAK_RATE operations per second (500), BENCH_SOAK_FILES live files kept around (20,000).
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from pathlib import Path

from bench.common import env_float, env_int, report, write_result
from tests.support import http_get, parse_metrics, start_exporter, wait_until


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def main() -> dict[str, object]:
    seconds = env_float("BENCH_SOAK_SECONDS", 1800)
    warmup = env_float("BENCH_SOAK_WARMUP_SECONDS", 60)
    rate = env_float("BENCH_SOAK_RATE", 500)
    live = env_int("BENCH_SOAK_FILES", 20_000)
    rng = random.Random(7)
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        base = Path(tmp) / "storage"
        logs = Path(tmp) / "logs"
        logs.mkdir()
        models = base / "models"
        dirs = [
            models / tier / f"model-{i:03d}" / "shard"
            for tier in ("raw", "quantized", "repository")
            for i in range(100)
        ]
        for d in dirs:
            d.mkdir(parents=True)
        files: list[Path] = []
        proc = start_exporter(models, base, logs, STORAGE_SCAN_WORKERS="1", STORAGE_LOG_LEVEL="warning")
        try:
            pid = proc.popen.pid
            counter = 0
            samples: list[tuple[float, int]] = []
            started = time.monotonic()
            baseline: int | None = None
            live_at_warmup = 0
            ops = 0
            while (now := time.monotonic()) - started < warmup + seconds:
                for _ in range(max(1, int(rate / 10))):
                    ops += 1
                    roll = rng.random()
                    if len(files) < live or roll < 0.4:
                        # Once `live` files exist every create also deletes one, so the data stays
                        # the same size and RSS growth means a leak (round 1's mix grew the live
                        # files 20,000 -> 32,700 in 3 minutes and read that as +7.9% RSS).
                        if len(files) >= live:
                            files.pop(rng.randrange(len(files))).unlink()
                        counter += 1
                        path = rng.choice(dirs) / f"f{counter}"
                        path.write_bytes(b"c" * rng.randrange(4096))
                        files.append(path)
                    elif roll < 0.75:
                        rng.choice(files).write_bytes(b"r" * rng.randrange(4096))
                    else:
                        at = rng.randrange(len(files))
                        counter += 1
                        target = rng.choice(dirs) / f"m{counter}"
                        os.rename(files[at], target)
                        files[at] = target
                time.sleep(max(0.0, 0.1 - (time.monotonic() - now)))
                if baseline is None and now - started >= warmup:
                    baseline = rss(pid)
                    live_at_warmup = len(files)
                    report(f"soak: warm-up done, RSS {baseline / 1e6:.1f} MB, {live_at_warmup:,} live files")
                if int(now - started) % 30 == 0 and (not samples or now - samples[-1][0] > 20):
                    samples.append((now, rss(pid)))
            total = sum(p.stat().st_size for p in files)

            def exact() -> bool:
                body = parse_metrics(http_get(proc.url + "/metrics")[1].decode())
                got = sum(
                    body.get(("model_storage_bytes", frozenset({("tier", t)})), 0)
                    for t in ("raw", "quantized", "repository")
                )
                return got == total

            wait_until(exact, timeout=30, what="gauges exact after the soak")
            end_rss = rss(pid)
        finally:
            proc.stop()
    assert baseline is not None
    growth = (end_rss - baseline) / baseline
    figures = {
        "seconds": seconds,
        "warmup_seconds": warmup,
        "operations": ops,
        "operations_per_second": round(ops / (warmup + seconds)),
        "live_files_after_warmup": live_at_warmup,
        "live_files_at_end": len(files),
        "rss_after_warmup_bytes": baseline,
        "rss_end_bytes": end_rss,
        "rss_growth_ratio": round(growth, 4),
        "rss_samples_bytes": [r for _, r in samples],
        "exact_at_end": True,
        "met": growth <= 0.05,
    }
    report(
        f"soak {seconds:g} s after {warmup:g} s warm-up, {ops:,} operations: RSS {baseline / 1e6:.1f} -> "
        f"{end_rss / 1e6:.1f} MB ({growth * 100:+.1f}%, target within 5%), gauges exact"
    )
    write_result("exporter_soak", figures)
    return figures


if __name__ == "__main__":
    main()
