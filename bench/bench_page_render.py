"""Front page render time at 10,000 models: snapshot parts in, HTML out, against /storage/info's JSON.

What is timed is what a request to `/` costs after the snapshot is taken: picking the largest
models (`page_data`) and rendering (`render_page`), with a 200-eviction plan, a last run, allocated
bytes and last-opened times (the mapping built per request, as the route does). The
baseline, in the same run on the same snapshot, is `/storage/info?top=25`: `info_document` plus
`json.dumps`, the other per-request view of the same figures.
"""

from __future__ import annotations

import json
import statistics
import time

from bench.common import env_int, report, write_result
from exporter.api.documents import info_document
from exporter.api.page import render_page
from exporter.api.page_data import LARGEST_SHOWN, LastRun, page_data
from exporter.index.fsinfo import FsUsage
from exporter.index.status import Snapshot
from exporter.index.tree import ModelStat
from shared.cleanup_state import CleanupState
from shared.plan_summary import EVICTIONS_KEPT, PlannedEviction, summarize

TARGET_MS = 50.0
TIERS = ("raw", "quantized", "repository")


def _snapshot(n_models: int) -> Snapshot:
    sizes = [1000 + (i * 7919) % 100_003 for i in range(n_models)]
    models = [
        ModelStat(TIERS[i % 3], f"model-{i:05d}<&>", size, 3, 1.7e9 + i, -(-size // 4096) * 4096)
        for i, size in enumerate(sizes)
    ]
    tiers: dict[str, tuple[int, int, int]] = {}
    for s in models:
        b, f, m = tiers.get(s.tier, (0, 0, 0))
        tiers[s.tier] = (b + s.bytes, f + s.files, m + 1)
    allocated: dict[str, int] = {}
    for s in models:
        allocated[s.tier] = allocated.get(s.tier, 0) + s.allocated
    # Every other model seen opened, so the page's last-opened column is filled as in use.
    opened = tuple((s.tier, s.model, 1.7e9 + i) for i, s in enumerate(models) if i % 2)
    return Snapshot(
        tiers,
        models,
        True,
        False,
        0,
        0,
        {},
        1.0,
        1.7e9,
        0,
        10,
        allocated=allocated,
        opens_since=1.6e9,
        last_opened=opened,
    )


def _timed(fn: object, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> int:
    n_models = env_int("BENCH_MODELS", 10_000)
    runs = env_int("BENCH_PAGE_RUNS", 31)
    snap = _snapshot(n_models)
    now = time.time()
    plan = summarize(
        "bench", now - 60, [PlannedEviction(s.tier, s.model, s.bytes, "age") for s in snap.models[: EVICTIONS_KEPT * 2]]
    )
    run = LastRun(now - 3600, True, 0, None, {"age": 10**9}, {"age": 3}, {"in_use": 1})
    fs = FsUsage(10**12, 4 * 10**11)
    state = CleanupState(now - 3600, True, "r", 0, None, {"age": 10**9}, {"age": 3}, {"in_use": 1}, 123)

    def page() -> str:
        data = page_data(
            tiers=snap.tiers,
            models=snap.models,
            capacity_bytes=10**12,
            filesystem=fs,
            ready=True,
            polling=False,
            last_full_scan=snap.last_full_scan,
            show_details=True,
            now=now,
            last_run=run,
            trash_bytes=123,
            trash_limit_bytes=10**10,
            plan=plan,
            allocated=snap.allocated,
            last_opened={(t, m): ts for t, m, ts in snap.last_opened},
            opens_since=snap.opens_since,
        )
        return render_page(data)

    def info() -> str:
        document = info_document(snap, capacity_bytes=10**12, filesystem=fs, cleanup=state, top=LARGEST_SHOWN, now=now)
        return json.dumps(document)

    size = len(page().encode())
    assert page().count("class='model'") == LARGEST_SHOWN
    baseline = _timed(info, runs)
    timed = _timed(page, runs)
    page_ms, base_ms = statistics.median(timed), statistics.median(baseline)
    figures = {
        "models": n_models,
        "runs": runs,
        "page_ms_median": round(page_ms, 3),
        "page_ms_max": round(max(timed), 3),
        "storage_info_json_ms_median": round(base_ms, 3),
        "ratio_vs_storage_info": round(page_ms / base_ms, 3),
        "page_bytes": size,
        "target_ms": TARGET_MS,
        "met": page_ms <= TARGET_MS,
    }
    report(
        f"page at {n_models:,} models: {page_ms:.2f} ms median (max {max(timed):.2f}), /storage/info JSON "
        f"{base_ms:.2f} ms; ratio {page_ms / base_ms:.2f}; {size:,} bytes (target <= {TARGET_MS:g} ms)"
    )
    write_result("page_render", figures)
    return 0 if page_ms <= TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
