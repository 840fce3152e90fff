"""Shared pieces of the exporter benchmarks: the generated tree, timing, medians, JSON results."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Reused across benchmarks and runs: generating a million files takes a minute or two.
BENCH_DIR = Path(os.environ.get("BENCH_DIR", "/tmp/model-storage-bench"))
TIERS = ("raw", "quantized", "repository")
FILES_PER_DIR = 100
DIRS_PER_MODEL = 10


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "python": platform.python_version(), "kernel": platform.release()}


def write_result(name: str, figures: dict[str, Any]) -> Path:
    """bench/results/<name>.json, with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "when": time.time(), "machine": machine(), **figures}
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    print(f"  -> {path.relative_to(ROOT)}")
    return path


def report(line: str) -> None:
    print(line, flush=True)


def median_of(runs: int, fn: Callable[[], float]) -> tuple[float, list[float]]:
    values = [fn() for _ in range(runs)]
    return statistics.median(values), values


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _make_model(args: tuple[str, int, int]) -> int:
    model_dir, dirs, files = args
    made = 0
    for d in range(dirs):
        sub = os.path.join(model_dir, f"shard-{d:03d}")
        os.makedirs(sub, exist_ok=True)
        for f in range(files):
            fd = os.open(os.path.join(sub, f"part-{f:05d}.bin"), os.O_WRONLY | os.O_CREAT, 0o644)
            # Sparse: apparent size without writing the bytes (du -b and the exporter count st_size).
            os.ftruncate(fd, (d * 7919 + f * 104_729) % 65_536)
            os.close(fd)
            made += 1
    return made


def generated_tree(files: int) -> Path:
    """models/<tier>/model-N/shard-D/part-F.bin with `files` files, made once and reused."""
    models = BENCH_DIR / f"tree-{files}" / "models"
    stamp = models.parent / ".complete"
    if stamp.exists():
        return models
    per_model = FILES_PER_DIR * DIRS_PER_MODEL
    n_models = max(1, files // per_model)
    report(f"generating {files:,} files in {models} (once; reused by later runs)")
    started = time.monotonic()
    jobs = []
    for i in range(n_models):
        tier = TIERS[i % len(TIERS)]
        jobs.append((str(models / tier / f"model-{i:05d}"), DIRS_PER_MODEL, FILES_PER_DIR))
    for tier in TIERS:
        (models / tier).mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        made = sum(pool.map(_make_model, jobs, chunksize=4))
    stamp.write_text(str(made))
    report(f"  generated {made:,} files in {time.monotonic() - started:.1f} s")
    return models


def warm(path: Path) -> None:
    """Warm the dentry/inode caches so every contender sees the same warm cache."""
    subprocess.run(["du", "-sb", str(path)], check=True, capture_output=True)


def python() -> str:
    return sys.executable
