"""/metrics render time at 10,000 models: the cached renderer against plain prometheus_client."""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from bench.common import env_int, report, write_result
from exporter.index.service import ExporterService
from exporter.index.tree import FileInfo
from exporter.metrics.endpoint import MetricsRenderer, build_registry
from shared.config import load_settings

TARGET_MS = 50.0


def _samples(text: bytes) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            if "filesystem" not in sample.name:  # the disk keeps changing under a benchmark
                out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def _timed(fn: object, runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()  # type: ignore[operator]
        times.append((time.perf_counter() - started) * 1000)
    return times


def main() -> dict[str, object]:
    n_models = env_int("BENCH_MODELS", 10_000)
    runs = env_int("BENCH_RENDER_RUNS", 15)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        (base / "models").mkdir()
        settings = load_settings(env={"STORAGE_BASE_PATH": str(base), "STORAGE_SCAN_WORKERS": "1"})
        service = ExporterService(settings)  # never started: the index is filled by hand
        tree = service.tree
        tiers = ("raw", "quantized", "repository")
        for i in range(n_models):
            tree.set_file((tiers[i % 3], f"model-{i:05d}", "weights.bin"), FileInfo(1000 + i, 1.7e9 + i))
        registry = build_registry(service, settings)
        render = MetricsRenderer(service, settings).render

        baseline = _timed(lambda: generate_latest(registry), runs)
        cold_started = time.perf_counter()
        first = render()
        cold_ms = (time.perf_counter() - cold_started) * 1000
        steady = _timed(render, runs)
        # 1% of the models change between scrapes, as under steady writes.
        changed_runs = []
        for run in range(runs):
            with service.lock:
                for i in range(run, n_models, 100):
                    tree.set_file((tiers[i % 3], f"model-{i:05d}", "weights.bin"), FileInfo(2000 + run, 1.8e9 + run))
            changed_runs.extend(_timed(render, 1))
        equal = _samples(render()) == _samples(generate_latest(registry))
        assert equal, "cached renderer and prometheus_client disagree"
        assert len(first) > 0

    base_ms = statistics.median(baseline)
    steady_ms = statistics.median(steady)
    changed_ms = statistics.median(changed_runs)
    figures: dict[str, object] = {
        "models": n_models,
        "series": sum(1 for line in first.splitlines() if not line.startswith(b"#")),
        "runs": runs,
        "prometheus_client_ms_median": round(base_ms, 2),
        "cached_cold_ms": round(cold_ms, 2),
        "cached_unchanged_ms_median": round(steady_ms, 2),
        "cached_1pct_changed_ms_median": round(changed_ms, 2),
        "ratio_vs_prometheus_client": round(changed_ms / base_ms, 3),
        "target_ms": TARGET_MS,
        "met": changed_ms <= TARGET_MS and cold_ms <= 4 * TARGET_MS,
        "same_samples_as_prometheus_client": equal,
    }
    report(
        f"render {n_models:,} models: cached {changed_ms:.1f} ms (1% changed), {steady_ms:.1f} ms unchanged, "
        f"cold {cold_ms:.1f} ms; prometheus_client {base_ms:.1f} ms; ratio {changed_ms / base_ms:.3f} "
        f"(target <= {TARGET_MS:g} ms)"
    )
    write_result("exporter_render", figures)
    return figures


if __name__ == "__main__":
    main()
