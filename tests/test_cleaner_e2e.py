"""End to end: exporter + real Prometheus + cleaner. `run` lowers the gauges by exactly what it evicted,
`restore` brings them back, and the cleaner's state file shows up as the exporter's cleanup series."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleaner.fileops import tree_manifest
from tests.support import (
    exporter_env,
    have,
    http_get,
    make_model,
    parse_metrics,
    prom_query,
    run_cleaner,
    running,
    start_exporter,
    start_prometheus,
    wait_until,
    write_prometheus_config,
)

pytestmark = pytest.mark.skipif(not have("prometheus"), reason="needs the prometheus binary")

OLD = {("raw", "llama-7b"): 40_000, ("raw", "mistral"): 25_000, ("quantized", "llama-q4"): 12_000}
YOUNG = {("raw", "fresh"): 7_000, ("quantized", "fresh-q8"): 3_000}
SERVED = {("repository", "bert"): 9_000}


def gauges(exporter_url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    status, body = http_get(exporter_url + "/metrics")
    assert status == 200
    return parse_metrics(body.decode())


def tier_bytes(exporter_url: str) -> dict[str, float]:
    samples = gauges(exporter_url)
    return {dict(labels)["tier"]: v for (name, labels), v in samples.items() if name == "model_storage_bytes"}


def prom_total(prom_url: str) -> float:
    result = prom_query(prom_url, "sum(model_storage_bytes)")
    return float(result[0]["value"][1]) if result else -1.0


def series(exporter_url: str, name: str, **labels: str) -> float | None:
    return gauges(exporter_url).get((name, frozenset(labels.items())))


@pytest.fixture
def reader() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)  # also closes the pipes: an unclosed one warns when collected


def test_run_drops_the_gauges_by_exactly_the_evicted_bytes_and_restore_brings_them_back(
    store: Path, logs_dir: Path, tmp_path: Path, reader: list[subprocess.Popen[str]]
) -> None:
    models = store / "models"
    for (tier, name), size in OLD.items():
        make_model(models, tier, name, {"config.json": b"{}", "weights.bin": os.urandom(size)})
    make_model(models, "raw", "busy", {"weights.bin": os.urandom(5_000)})
    old_at = time.time()
    # The young ones must be measurably younger: by more than a loaded machine takes to start a cleaner.
    wait_until(lambda: time.time() > old_at + 8, timeout=9)
    for (tier, name), size in {**YOUNG, **SERVED}.items():
        make_model(models, tier, name, {"weights.bin": os.urandom(size)})
    before = {f"{t}/{m}": tree_manifest(models / t / m) for (t, m) in OLD}

    with running(start_exporter(models, store, logs_dir)) as exporter:
        config = write_prometheus_config(tmp_path / "prometheus.yml", {"models": [exporter.url[len("http://") :]]})
        with running(start_prometheus(config, tmp_path / "prom-data", logs_dir)) as prometheus:
            expected_total = sum(tier_bytes(exporter.url).values())
            wait_until(lambda: prom_total(prometheus.url) == expected_total, timeout=20, what="Prometheus scraped")

            def env_now() -> dict[str, str]:
                # An age limit between the old models' age and the young ones', as of this command.
                age_days = (time.time() - old_at - 4) / 86400
                return exporter_env(
                    models,
                    store,
                    STORAGE_PROMETHEUS_URL=prometheus.url,
                    STORAGE_CLEANUP_POLICIES="age",
                    STORAGE_CLEANUP_AGE_DAYS=f"{age_days:.9f}",
                    STORAGE_CLEANUP_AGE_TIERS="raw,quantized",
                    STORAGE_CLEANUP_GRACE_HOURS="0",
                    STORAGE_CLEANUP_MAX_EVICT_FRACTION="0.95",
                )

            # --dry-run is `plan`: the same evictions, nothing touched.
            dry = run_cleaner(["run", "--dry-run", "--json"], env_now(), check=True)
            plan = run_cleaner(["plan", "--json"], env_now(), check=True)
            dry_evictions = sorted((e["tier"], e["model"]) for e in json.loads(dry.stdout)["evictions"])
            assert dry_evictions == sorted((e["tier"], e["model"]) for e in json.loads(plan.stdout)["evictions"])
            assert dry_evictions == sorted([*OLD, ("raw", "busy")])
            assert all((models / t / m).exists() for t, m in dry_evictions)

            proc = subprocess.Popen(
                [sys.executable, "-c", f"f = open({str(models / 'raw/busy/weights.bin')!r}, 'rb'); input()"],
                stdin=subprocess.PIPE,
                text=True,
            )
            reader.append(proc)
            wait_until(
                lambda: any(
                    "busy" in os.readlink(f"/proc/{proc.pid}/fd/{n}") for n in os.listdir(f"/proc/{proc.pid}/fd")
                )
            )
            tiers_before = tier_bytes(exporter.url)

            done = run_cleaner(["--actor", "timer", "run", "--json"], env_now(), check=True)
            report = json.loads(done.stdout)

            evicted = {(d["tier"], d["model"]): d["bytes"] for d in report["done"]}
            assert sorted(evicted) == sorted(OLD)
            assert [(s["model"], s["reason"]) for s in report["skipped"]] == [("busy", "in_use")]
            freed = {tier: sum(b for (t, _), b in evicted.items() if t == tier) for tier in tiers_before}
            expected = {tier: tiers_before[tier] - freed[tier] for tier in tiers_before}
            wait_until(lambda: tier_bytes(exporter.url) == expected, timeout=10, what="exporter gauges dropped")
            wait_until(
                lambda: prom_total(prometheus.url) == expected_total - sum(evicted.values()),
                timeout=20,
                what="Prometheus saw the drop",
            )
            assert series(exporter.url, "model_storage_cleanup_last_success") == 1
            assert series(exporter.url, "model_storage_cleanup_evicted_bytes_total", policy="age") == sum(
                evicted.values()
            )
            assert series(exporter.url, "model_storage_cleanup_evicted_models_total", policy="age") == len(OLD)
            assert series(exporter.url, "model_storage_cleanup_skipped_models", reason="in_use") == 1
            assert series(exporter.url, "model_storage_trash_bytes") == sum(evicted.values())

            restored = run_cleaner(["restore", report["run_id"]], env_now(), check=True)
            assert restored.stdout.count("restored") == len(OLD)
            wait_until(lambda: tier_bytes(exporter.url) == tiers_before, timeout=10, what="gauges restored")
            wait_until(lambda: prom_total(prometheus.url) == expected_total, timeout=20, what="Prometheus restored")
            assert series(exporter.url, "model_storage_trash_bytes") == 0
            for key, manifest in before.items():
                assert tree_manifest(models / key) == manifest

    audit = run_cleaner(["audit", "verify"], exporter_env(models, store), check=True)
    assert "chain intact" in audit.stdout
    records = [json.loads(line) for line in (store / "audit.log").read_text().splitlines()]
    operations = {r["operation"] for r in records}
    assert {"plan", "run_started", "move", "skip", "run", "restore"} <= operations
    assert {r["actor"] for r in records if r["operation"] == "move"} == {"timer"}
