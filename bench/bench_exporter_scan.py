"""Initial scan of a generated tree (1,000,000 files by default) against `du -sb`, warm cache."""

from __future__ import annotations

import compileall
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.common import ROOT, env_int, generated_tree, report, warm, write_result
from exporter.index.scan import Scanner, scan_local
from exporter.index.tree import Tree
from shared.layout import Layout
from tests.support import VENV_BIN, exporter_env, free_port, start_process

TARGET_RATIO = 1.2


def _du(path: str) -> float:
    started = time.perf_counter()
    subprocess.run(["du", "-sb", path], check=True, capture_output=True)
    return time.perf_counter() - started


def _daemon_to_ready(models: Path) -> float:
    """The whole start-up as an operator sees it: process start, imports, watches, scan, until /readyz."""
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as tmp:
        port = free_port()
        env = exporter_env(
            models,
            Path(tmp),
            STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}",
            STORAGE_SCAN_WORKERS="0",
            STORAGE_LOG_LEVEL="warning",
        )
        argv = [str(VENV_BIN / "model-storage-exporter")]
        started = time.perf_counter()
        proc = start_process(
            argv, Path(tmp) / "exporter.log", f"http://127.0.0.1:{port}", "/readyz", env=env, timeout=300
        )
        ready = time.perf_counter() - started
        proc.stop()
        return ready


def _compile_bytecode() -> None:
    """The daemon's own modules compiled, as pip leaves an installed package: run from a checkout
    with PYTHONDONTWRITEBYTECODE set, each start would compile them again (about half a CPU second)."""
    for package in ("exporter", "shared"):
        compileall.compile_dir(ROOT / package, quiet=1)


def main() -> dict[str, object]:
    _compile_bytecode()
    files = env_int("BENCH_FILES", 1_000_000)
    runs = env_int("BENCH_SCAN_RUNS", 3)
    workers = env_int("BENCH_SCAN_WORKERS", os.cpu_count() or 1)
    models = generated_tree(files)
    path = str(models)
    warm(models)

    du_times, scan_times, index_times, single_times = [], [], [], []
    scanner = Scanner(workers)
    scanner.start()
    try:
        for _ in range(runs):
            # Interleaved so that drifting background load hits both sides alike.
            du_times.append(_du(path))
            started = time.perf_counter()
            result = scanner.scan(path)
            scanned = time.perf_counter()
            tree = Tree(Layout())
            assert result.node is not None
            tree.graft((), result.node)
            indexed = time.perf_counter()
            scan_times.append(scanned - started)
            index_times.append(indexed - started)
            assert result.files == files, (result.files, files)
            del tree, result
    finally:
        scanner.close()
    daemon_times = [_daemon_to_ready(models) for _ in range(env_int("BENCH_SCAN_DAEMON_RUNS", runs))]
    if env_int("BENCH_SCAN_SINGLE", 1):
        started = time.perf_counter()
        single = scan_local(path)
        single_times.append(time.perf_counter() - started)
        del single

    du_s = statistics.median(du_times)
    scan_s = statistics.median(scan_times)
    index_s = statistics.median(index_times)
    daemon_s = statistics.median(daemon_times) if daemon_times else float("nan")
    figures: dict[str, object] = {
        "files": files,
        "runs": runs,
        "workers": workers,
        "du_sb_seconds_median": round(du_s, 3),
        "scan_seconds_median": round(scan_s, 3),
        "scan_and_index_seconds_median": round(index_s, 3),
        "single_process_scan_seconds": round(single_times[0], 3) if single_times else None,
        "ratio_scan_vs_du": round(scan_s / du_s, 3),
        "ratio_scan_and_index_vs_du": round(index_s / du_s, 3),
        "target_ratio": TARGET_RATIO,
        "met": index_s / du_s <= TARGET_RATIO,
        "daemon_start_to_ready_seconds_median": round(daemon_s, 3),
        "ratio_daemon_start_to_ready_vs_du": round(daemon_s / du_s, 3),
        "daemon_start_to_ready_seconds": [round(x, 3) for x in daemon_times],
        "du_sb_seconds": [round(x, 3) for x in du_times],
        "scan_and_index_seconds": [round(x, 3) for x in index_times],
    }
    report(
        f"scan {files:,} files on {workers} processes: {index_s:.2f} s to a ready index "
        f"({scan_s:.2f} s scanning) vs du -sb {du_s:.2f} s: ratio {index_s / du_s:.2f} "
        f"(target <= {TARGET_RATIO}); one process {single_times[0] if single_times else float('nan'):.2f} s"
    )
    report(
        f"the exporter daemon, process start to /readyz 200 (imports, watches, scan): {daemon_s:.2f} s, "
        f"ratio {daemon_s / du_s:.2f} vs du -sb"
    )
    write_result("exporter_scan", figures)
    return figures


if __name__ == "__main__":
    main()
