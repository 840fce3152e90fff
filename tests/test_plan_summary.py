"""The last plan's figures: written by every plan, dry run and run, served by the exporter's /metrics.

End to end with the real cleaner CLI, the real exporter and a real Prometheus: a `plan` leaves its
per-policy figures, the exporter serves them (and promtool accepts the output), the API's dry run
writes them too, and a run leaves only what it did not evict.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import httpx
import pytest

from shared.plan_summary import (
    EVICTIONS_KEPT,
    PlannedEviction,
    PlanSummary,
    read_plan_summary,
    summarize,
    summary_path,
    write_plan_summary,
)
from tests.support import exporter_env, http_get, parse_metrics, run_cleaner, wait_until
from tests.test_api_cleanup import AUTH, MODELS, POLICY_ENV, api_stack, build_store, wait_scraped

HOSTILE = ["<script>alert(1)</script>", "quote\"and'apostrophe", "bad-\udcff-byte", "back\\slash"]


def test_summary_sums_each_policy_and_lists_every_known_policy_even_at_zero() -> None:
    evictions = [
        PlannedEviction("raw", "a", 100, "age"),
        PlannedEviction("raw", "b", 50, "age"),
        PlannedEviction("quantized", "c", 7, "size"),
    ]
    summary = summarize("p1", 1234.5, evictions)
    assert summary.bytes == {"age": 150, "usage": 0, "size": 7}
    assert summary.models == {"age": 2, "usage": 0, "size": 1}
    assert [e.model for e in summary.evictions] == ["a", "b", "c"]
    assert summary.evictions_total == 3 and summary.timestamp == 1234.5


def test_summary_after_a_run_leaves_out_what_the_run_evicted() -> None:
    evictions = [PlannedEviction("raw", "a", 100, "age"), PlannedEviction("raw", "b", 50, "usage")]
    summary = summarize("p1", 1.0, evictions, gone=[("raw", "a")], applied_run_id="r1")
    assert summary.bytes == {"age": 0, "usage": 50, "size": 0}
    assert summary.models == {"age": 0, "usage": 1, "size": 0}
    assert summary.applied_run_id == "r1" and summary.evictions_total == 1


def test_summary_keeps_only_the_largest_evictions_but_counts_them_all() -> None:
    evictions = [PlannedEviction("raw", f"m{i}", i, "size") for i in range(EVICTIONS_KEPT + 50)]
    summary = summarize("p", 1.0, evictions)
    assert len(summary.evictions) == EVICTIONS_KEPT and summary.evictions_total == EVICTIONS_KEPT + 50
    assert summary.evictions[0].bytes == EVICTIONS_KEPT + 49
    assert summary.bytes["size"] == sum(range(EVICTIONS_KEPT + 50))


def test_summary_round_trips_hostile_model_names_and_leaves_no_temp_file(tmp_path: Path) -> None:
    summary = summarize("p", 2.0, [PlannedEviction("raw", name, 1, "age") for name in HOSTILE])
    path = summary_path(tmp_path / "state")
    write_plan_summary(path, summary)
    assert read_plan_summary(path) == summary
    assert [p.name for p in path.parent.iterdir()] == ["last-plan.json"]


@pytest.mark.parametrize("content", [b"", b"{not json", b'{"plan_id": "x"}', b"[]", b'{"plan_id":1,"timestamp":"x"}'])
def test_a_corrupt_summary_reads_as_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "last-plan.json"
    path.write_bytes(content)
    assert read_plan_summary(path) is None
    assert read_plan_summary(tmp_path / "missing.json") is None


def planned(url: str) -> dict[tuple[str, str], float]:
    status, body = http_get(url + "/metrics")
    assert status == 200
    samples = parse_metrics(body.decode())
    out: dict[tuple[str, str], float] = {}
    for (name, labels), value in samples.items():
        if name.startswith("model_storage_cleanup_plan"):
            out[(name, dict(labels).get("policy", ""))] = value
    return out


def test_a_plan_saved_by_the_cleaner_cli_is_served_by_the_exporter_and_a_run_leaves_the_rest(
    store: Path, logs_dir: Path
) -> None:
    build_store(store)
    with api_stack(store, logs_dir, **POLICY_ENV) as stack:
        wait_scraped(stack)
        url = stack.exporter.url
        assert planned(url) == {}, "no plan yet: no plan series"

        env = exporter_env(store / "models", store, STORAGE_PROMETHEUS_URL=stack.prometheus.url, **POLICY_ENV)
        done = run_cleaner(["plan", "--json"], env, check=True)
        plan = json.loads(done.stdout)
        size_bytes = sum(e["bytes"] for e in plan["evictions"])
        assert {(e["tier"], e["model"]) for e in plan["evictions"]} == {("raw", "big-a"), ("raw", "big-b")}
        assert size_bytes == MODELS[("raw", "big-a")] + MODELS[("raw", "big-b")]
        expected = {
            ("model_storage_cleanup_planned_bytes", "age"): 0,
            ("model_storage_cleanup_planned_bytes", "usage"): 0,
            ("model_storage_cleanup_planned_bytes", "size"): size_bytes,
            ("model_storage_cleanup_planned_models", "age"): 0,
            ("model_storage_cleanup_planned_models", "usage"): 0,
            ("model_storage_cleanup_planned_models", "size"): 2,
            ("model_storage_cleanup_plan_timestamp_seconds", ""): plan["created_at"],
        }
        assert planned(url) == expected

        _status, body = http_get(url + "/metrics")
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr

        # The API's dry run is a plan too: a newer timestamp, the same figures.
        response = httpx.post(url + "/storage/cleanup?dry_run=true", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        dry = response.json()["report"]
        after_dry = planned(url)
        assert after_dry[("model_storage_cleanup_plan_timestamp_seconds", "")] == dry["created_at"]
        assert dry["created_at"] > plan["created_at"]
        assert {k: v for k, v in after_dry.items() if "timestamp" not in k[0]} == {
            k: v for k, v in expected.items() if "timestamp" not in k[0]
        }

        # A run evicts the plan: what the last plan would still free drops to nothing.
        response = httpx.post(url + "/storage/cleanup", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        run = response.json()["report"]
        assert run["freed_bytes"] == size_bytes
        after_run = planned(url)
        assert after_run[("model_storage_cleanup_plan_timestamp_seconds", "")] == run["plan"]["created_at"]
        assert after_run[("model_storage_cleanup_planned_bytes", "size")] == 0
        assert after_run[("model_storage_cleanup_planned_models", "size")] == 0
        summary = read_plan_summary(summary_path(store / "state"))
        assert isinstance(summary, PlanSummary) and summary.applied_run_id == run["run_id"]


def test_a_corrupt_summary_file_leaves_the_plan_series_out_and_metrics_served(store: Path, logs_dir: Path) -> None:
    from tests.support import make_model, running, start_exporter

    make_model(store / "models", "raw", "m", {"w.bin": b"x" * 10})
    (store / "state").mkdir(parents=True, exist_ok=True)
    (store / "state" / "last-plan.json").write_bytes(os.urandom(64))
    with running(start_exporter(store / "models", store, logs_dir)) as exporter:
        assert planned(exporter.url) == {}
        write_plan_summary(summary_path(store / "state"), summarize("p", 5.0, [PlannedEviction("raw", "m", 10, "age")]))
        wait_until(lambda: planned(exporter.url).get(("model_storage_cleanup_planned_bytes", "age")) == 10)


def test_a_reader_sees_one_whole_summary_or_the_other_while_another_process_rewrites_it(tmp_path: Path) -> None:
    """Atomic replacement under contention: a writer process alternates two summaries 400 times while
    this process reads as fast as it can; every read is exactly one of the two, never half or None."""
    import sys

    path = summary_path(tmp_path / "state")
    first = summarize("plan-a", 1.0, [PlannedEviction("raw", f"a{i}", i, "age") for i in range(150)])
    second = summarize("plan-b", 2.0, [PlannedEviction("raw", f"b{i}", i, "size") for i in range(3)])
    write_plan_summary(path, first)
    code = (
        "import sys\n"
        "from shared.plan_summary import PlannedEviction, summarize, write_plan_summary\n"
        "a = summarize('plan-a', 1.0, [PlannedEviction('raw', f'a{i}', i, 'age') for i in range(150)])\n"
        "b = summarize('plan-b', 2.0, [PlannedEviction('raw', f'b{i}', i, 'size') for i in range(3)])\n"
        "for n in range(400):\n"
        "    write_plan_summary(sys.argv[1], b if n % 2 == 0 else a)\n"
    )
    writer = subprocess.Popen([sys.executable, "-c", code, str(path)], cwd=Path(__file__).resolve().parent.parent)
    reads = 0
    seen: set[str] = set()
    try:
        while writer.poll() is None:
            got = read_plan_summary(path)
            assert got in (first, second), got
            assert got is not None
            seen.add(got.plan_id)
            reads += 1
    finally:
        writer.wait(60)
    assert writer.returncode == 0
    assert read_plan_summary(path) == first
    assert reads > 0 and seen, (reads, seen)
    assert not [p for p in path.parent.iterdir() if p.name != path.name], "a temp file was left behind"
