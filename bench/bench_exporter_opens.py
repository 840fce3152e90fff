"""The cost of tracking opens: a model server's load of one model, with last-opened tracking on and off.

A child process opens every file of a model, reads it in 1 MiB chunks, maps it and touches one byte
per 64 KiB, then closes it: what a server loading safetensors or GGUF weights does. The exporter
(the real service, in this process) watches the store; the benchmark reports per load the events
it received (index hints and opens) and the CPU seconds of this process (the exporter's threads)
from the child's start until 0.5 s after it exited, with tracking on against the same load with
tracking off (STORAGE_OPENS_TRACKING=false), alternating, in the same run.

A second phase measures the event path itself: a writer creates BENCH_OPENS_BURST_FILES (20,000)
files in one model (each create is also an IN_OPEN when opens are tracked), and the exporter's CPU
seconds until its index holds them all are compared the same way.

Sizes by environment: BENCH_OPENS_FILES (50) of BENCH_OPENS_FILE_MB (40, sparse: 2 GB apparent),
BENCH_OPENS_ROUNDS (5 loads and bursts per mode).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BENCH_DIR, env_int, report, write_result
from tests.support import make_service, wait_until

LOADER = r"""
import mmap, os, sys
top = sys.argv[1]
for name in sorted(os.listdir(top)):
    with open(os.path.join(top, name), "rb", buffering=0) as f:
        while f.read(1 << 20):
            pass
        m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        for i in range(0, len(m), 1 << 16):
            m[i]
        m.close()
"""


def build(base: Path, files: int, file_mb: int) -> Path:
    model = base / "models" / "repository" / "big"
    if base.exists():
        shutil.rmtree(base)
    model.mkdir(parents=True)
    for i in range(files):
        with open(model / f"model-{i:05d}-of-{files:05d}.safetensors", "wb") as f:
            f.truncate(file_mb << 20)
    return model


WRITER = r"""
import os, sys
top, count = sys.argv[1], int(sys.argv[2])
os.makedirs(top)
for i in range(count):
    fd = os.open(os.path.join(top, "f%d" % i), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"x")
    os.close(fd)
"""


def one_burst(base: Path, files: int, tracking: bool, tag: int) -> dict[str, float]:
    svc = make_service(
        base,
        STORAGE_OPENS_TRACKING="true" if tracking else "false",
        STORAGE_RECONCILE_INTERVAL_SECONDS="0",
    )
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=120)
        time.sleep(0.5)
        target = base / "models" / "raw" / f"burst-{tag}"
        cpu0 = time.process_time()
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", WRITER, str(target), str(files)], check=True, timeout=600)

        def indexed() -> bool:
            return any(m.model == target.name and m.files == files for m in svc.snapshot().models)

        wait_until(indexed, timeout=300, interval=0.05)
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu0
        opens = svc.opens.tracker.figures.seen if svc.opens is not None else 0
        return {"cpu_seconds": cpu, "seconds": seconds, "opens_received": float(opens)}
    finally:
        svc.stop()
        shutil.rmtree(base / "models" / "raw" / f"burst-{tag}", ignore_errors=True)


def one_load(base: Path, model: Path, tracking: bool) -> dict[str, float]:
    svc = make_service(
        base,
        STORAGE_OPENS_TRACKING="true" if tracking else "false",
        STORAGE_OPENS_SWEEP_MODELS="0",
        STORAGE_RECONCILE_INTERVAL_SECONDS="0",
    )
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=120)
        time.sleep(0.5)  # let the initial scan's aftermath settle before measuring
        events0 = svc.counters.events
        cpu0 = time.process_time()
        started = time.monotonic()
        subprocess.run([sys.executable, "-c", LOADER, str(model)], check=True, timeout=600)
        load_seconds = time.monotonic() - started
        time.sleep(0.5)
        cpu = time.process_time() - cpu0
        opens = svc.opens.tracker.figures.seen if svc.opens is not None else 0
        return {
            "cpu_seconds": cpu,
            "index_events": float(svc.counters.events - events0),
            "opens_received": float(opens),
            "load_seconds": load_seconds,
        }
    finally:
        svc.stop()


def main() -> dict[str, Any]:
    files = env_int("BENCH_OPENS_FILES", 50)
    file_mb = env_int("BENCH_OPENS_FILE_MB", 40)
    rounds = env_int("BENCH_OPENS_ROUNDS", 5)
    base = BENCH_DIR / "opens"
    model = build(base, files, file_mb)
    burst_files = env_int("BENCH_OPENS_BURST_FILES", 20_000)
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    bursts: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for i in range(rounds):
        for mode in ("off", "on"):
            runs[mode].append(one_load(base, model, mode == "on"))
            bursts[mode].append(one_burst(base, burst_files, mode == "on", i))

    def med(mode: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[mode])

    on_cpu, off_cpu = med("on", "cpu_seconds"), med("off", "cpu_seconds")
    report(
        f"  load of {files} files, {files * file_mb / 1000:.1f} GB apparent (sparse), {rounds} loads per mode (median):"
    )
    for mode in ("off", "on"):
        report(
            f"    tracking {mode:>3}: exporter CPU {med(mode, 'cpu_seconds') * 1000:.1f} ms, "
            f"events received {med(mode, 'index_events') + med(mode, 'opens_received'):.0f} "
            f"(index {med(mode, 'index_events'):.0f}, opens {med(mode, 'opens_received'):.0f}), "
            f"load {med(mode, 'load_seconds'):.2f} s"
        )
    ratio = on_cpu / off_cpu if off_cpu else float("inf")
    report(
        f"  ratio on/off: CPU {ratio:.2f}x (+{(on_cpu - off_cpu) * 1000:.1f} ms per load); "
        f"all on: {[round(r['cpu_seconds'] * 1000, 1) for r in runs['on']]} ms, "
        f"off: {[round(r['cpu_seconds'] * 1000, 1) for r in runs['off']]} ms"
    )
    on_b = statistics.median(r["cpu_seconds"] for r in bursts["on"])
    off_b = statistics.median(r["cpu_seconds"] for r in bursts["off"])
    report(
        f"  burst of {burst_files:,} creates in one model (median): exporter CPU until indexed "
        f"{on_b:.2f} s on, {off_b:.2f} s off: ratio {on_b / off_b:.2f}x; "
        f"opens received {statistics.median(r['opens_received'] for r in bursts['on']):.0f}; "
        f"all on {[round(r['cpu_seconds'], 2) for r in bursts['on']]}, "
        f"off {[round(r['cpu_seconds'], 2) for r in bursts['off']]}"
    )
    figures = {
        "files": files,
        "file_mb": file_mb,
        "rounds": rounds,
        "runs": runs,
        "cpu_ratio": ratio,
        "bursts": bursts,
        "burst_cpu_ratio": on_b / off_b,
    }
    write_result("exporter_opens", figures)
    shutil.rmtree(base, ignore_errors=True)
    return figures


if __name__ == "__main__":
    os.environ.setdefault("STORAGE_LOG_LEVEL", "warning")
    main()
