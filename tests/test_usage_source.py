"""`STORAGE_USAGE_SOURCE` end to end: a real exporter whose model a child process opens and maps, a
stand-in model server's request counters, real Prometheus, and a real `plan` with each source.

The usage window is scaled down to seconds: every model is older than it, the exporter has tracked
opens for longer than it, and the child opens `opened` inside it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleaner.plan_values import ModelFacts
from cleaner.policies import Coverage, PolicyView
from cleaner.usage_source import Opens, choose
from tests.support import (
    make_model,
    prom_query,
    run_cleaner,
    start_exporter,
    start_prometheus,
    wait_until,
)
from tests.test_cleaner_plan import ModelServer, _write_config
from tests.test_opens import load_models

WINDOW = 25.0
DAY = 86400.0
MODELS = ("opened", "served", "stale", "idle")  # all in repository; 1000 bytes each


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("usage-source")
    base = root / "storage"
    models = base / "models"
    for name in MODELS:
        make_model(models, "repository", name, {"w.bin": b"x" * 1000})
    server = ModelServer({"served": 10.0, "stale": 0.0})
    exporter = start_exporter(models, base, root, STORAGE_OPENS_SWEEP_MODELS="0")
    prometheus = None
    try:
        config = _write_config(root / "prometheus.yml", exporter.url.removeprefix("http://"), server.address)
        prometheus = start_prometheus(config, root / "prom-data", root)
        started = time.time()
        wait_until(
            lambda: len(prom_query(prometheus.url, "model_storage_model_bytes")) == len(MODELS),
            timeout=30,
            what="models in Prometheus",
        )
        # History longer than the window for every source, then the load inside it.
        wait_until(lambda: time.time() >= started + WINDOW + 8, timeout=WINDOW + 15)
        load_models(models / "repository" / "opened")
        wait_until(
            lambda: prom_query(prometheus.url, "model_storage_model_last_opened_timestamp_seconds"),
            timeout=20,
            what="last opened in Prometheus",
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
        env.update(
            STORAGE_BASE_PATH=str(base),
            STORAGE_MODELS_PATH=str(models),
            STORAGE_PROMETHEUS_URL=prometheus.url,
            STORAGE_LOG_FORMAT="json",
            STORAGE_CLEANUP_GRACE_HOURS="0",
            STORAGE_CLEANUP_POLICIES="usage",
            STORAGE_MIN_REQUESTS="1",
            STORAGE_REQUEST_TIMEFRAME_DAYS=f"{WINDOW / DAY:.9f}",
            STORAGE_CLEANUP_MAX_EVICT_FRACTION="0.9",
        )
        yield {"env": env, "models": models}
    finally:
        if prometheus is not None:
            prometheus.stop()
        exporter.stop()
        server.stop()


def plan(stack: dict[str, Any], source: str) -> dict[str, Any]:
    done = run_cleaner(["plan", "--json"], {**stack["env"], "STORAGE_USAGE_SOURCE": source}, check=True)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def outcome(document: dict[str, Any]) -> dict[str, str]:
    out = {e["model"]: "evict: " + e["reason"] for e in document["evictions"]}
    out.update({k["model"]: "keep: " + k["reason"] for k in document["kept"]})
    return out


def explain(stack: dict[str, Any], source: str, model: str) -> dict[str, Any]:
    args = ["plan", "--json", "--explain", f"repository/{model}"]
    done = run_cleaner(args, {**stack["env"], "STORAGE_USAGE_SOURCE": source}, check=True)
    found: dict[str, Any] = json.loads(done.stdout)["explanations"][0]
    return found


@pytest.mark.parametrize(
    ("source", "evicted", "kept"),
    [
        # Request counters alone: models without series are unknown, so kept.
        ("requests", {"stale"}, {"opened": "no usage series", "idle": "no usage series"}),
        # Opens alone: only the model the child opened is used.
        ("opens", {"served", "stale", "idle"}, {}),
        # Counters where there are series, opens for the rest.
        ("auto", {"stale", "idle"}, {}),
        # Used if either says so; unused only when both know.
        ("both", {"stale"}, {"idle": "neither request counters nor last opened"}),
    ],
)
def test_each_usage_source_decides_from_its_own_signal_and_names_it(
    stack: dict[str, Any], source: str, evicted: set[str], kept: dict[str, str]
) -> None:
    document = plan(stack, source)
    result = outcome(document)
    evidence = (result, document["warnings"], document["evidence"]["usage_coverage"])
    assert {e["model"] for e in document["evictions"]} == evicted, evidence
    for model, words in kept.items():
        assert result[model].startswith("keep: ") and words in result[model], (model, evidence)
    if source == "requests":
        assert all("usage source" not in reason for reason in result.values()), result
        return
    names = [q["name"] for q in document["evidence"]["queries"]]
    assert "model_last_opened" in names and "opens_tracking_since" in names
    for model in evicted:
        assert "(usage source: " in result[model], result[model]
    if source == "opens":
        assert "not opened in" in result["idle"] and "requests" not in result["idle"]


def test_auto_explains_which_source_decided_each_model(stack: dict[str, Any]) -> None:
    served, opened = explain(stack, "auto", "served"), explain(stack, "auto", "opened")
    assert served["usage_source"] == "requests" and opened["usage_source"] == "opens"
    usage = {e["model"]: next(c for c in e["checks"] if c["check"] == "usage") for e in (served, opened)}
    assert usage["served"]["verdict"] == "pass" and "(usage source: requests)" in usage["served"]["detail"]
    assert usage["opened"]["verdict"] == "pass"
    assert usage["opened"]["detail"] == "opened in 25.0 s (usage source: last opened)"


def test_opens_not_tracked_over_the_window_leave_unopened_models_unknown() -> None:
    """Pure: tracking younger than the window says nothing about models not opened."""
    view = PolicyView(timeframe_seconds=100.0, usage_tiers=("repository",), min_requests=1.0)
    facts = [ModelFacts("repository", m, 10, 1, 0.0) for m in ("a", "b")]
    young = Opens(since=950.0, opened={("repository", "a"): 990.0})
    done, coverage = choose(facts, Coverage(100.0, 0.0, blind=True), young, "opens", view, 1000.0)
    assert [f.requests for f in done] == [1.0, None] and not coverage.complete
    old = Opens(since=800.0, opened={("repository", "a"): 850.0})  # opened before the window
    done, coverage = choose(facts, Coverage(100.0, 0.0, blind=True), old, "opens", view, 1000.0)
    assert [f.requests for f in done] == [0.0, 0.0] and coverage.complete
    nothing = Opens(since=None, opened={})
    done, coverage = choose(facts, Coverage(100.0, 100.0), nothing, "auto", view, 1000.0)
    assert [f.requests for f in done] == [None, None] and coverage.complete


def test_model_files_are_still_there(stack: dict[str, Any]) -> None:
    """Planning never touches the store."""
    assert sorted(os.listdir(Path(stack["models"]) / "repository")) == sorted(MODELS)


def test_both_is_used_if_either_says_so_and_unused_only_when_both_know() -> None:
    view = PolicyView(timeframe_seconds=100.0, usage_tiers=("repository",), min_requests=5.0)
    requests = {"used-req": 9.0, "unused-both": 1.0, "unused-req-only": 1.0, "no-series-opened": None}
    facts = [ModelFacts("repository", m, 10, 1, 0.0, requests=r) for m, r in requests.items()]
    opened = {("repository", "no-series-opened"): 990.0}
    # Tracked over the window: every model not opened is unused by opens.
    done, _ = choose(facts, Coverage(100.0, 100.0), Opens(800.0, opened), "both", view, 1000.0)
    got = {f.model: (f.requests, f.usage_source) for f in done}
    assert got == {
        "used-req": (9.0, "requests"),
        "unused-both": (1.0, "requests"),
        "unused-req-only": (1.0, "requests"),
        "no-series-opened": (5.0, "opens"),
    }
    # Tracking too young: requests alone cannot say unused.
    done, _ = choose(facts, Coverage(100.0, 100.0), Opens(950.0, opened), "both", view, 1000.0)
    got = {f.model: (f.requests, f.usage_source) for f in done}
    assert got["unused-both"] == (None, "requests+opens") and got["used-req"] == (9.0, "requests")


def test_an_eviction_by_opens_carries_no_request_count_and_names_its_source() -> None:
    from cleaner.policies import decide

    view = PolicyView(
        policies=("usage",), timeframe_seconds=100.0, usage_tiers=("repository",), grace_seconds=0.0,
        allow_large=True,
    )  # fmt: skip
    facts = [ModelFacts("repository", m, 10, 1, 0.0) for m in ("a", "b")]
    done, coverage = choose(facts, Coverage(100.0, 0.0, blind=True), Opens(0.0, {}), "opens", view, 1000.0)
    decision = decide(done, coverage, view, 1000.0)
    assert [(e.model, e.requests) for e in decision.evictions] == [("a", None), ("b", None)]
    assert all(e.reason == "not opened in 1.7 min (usage source: last opened)" for e in decision.evictions)
