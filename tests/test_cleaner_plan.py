"""`model-storage-cleaner plan` end to end: real exporter, stand-in model server, Prometheus and VictoriaMetrics.

Ages cannot be faked (ctime), so the policies are scaled down to seconds: "old" models are written
when the module starts, "young" ones ~14 s later, and each test puts its age/window limits between.
"""

from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.audit import verify_audit
from tests.support import (
    Proc,
    free_port,
    have,
    make_model,
    prom_query,
    run_cleaner,
    start_exporter,
    start_prometheus,
    start_victoria_metrics,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    not (have("prometheus") and have("promtool") and have("victoria-metrics")), reason="needs the binaries"
)

DAY = 86400.0
HISTORY_SECONDS = 14.0  # how long before the young models appear
OLD_MODELS: dict[tuple[str, str], int] = {
    ("raw", "old-raw"): 4000,
    ("raw", "downloading"): 500,
    ("quantized", "q-big"): 3000,
    ("quantized", "q-small"): 1000,
    ("repository", "busy"): 2500,
    ("repository", "idle"): 1500,
    ("repository", "low"): 1200,
    ("repository", "silent"): 1100,
    ("repository", "prot-glob"): 900,
    ("repository", "marked"): 800,
}
YOUNG_MODELS: dict[tuple[str, str], int] = {("raw", "young-raw"): 700, ("repository", "young-idle"): 600}
# Requests per second the stand-in server counts for each model; `silent` has no series at all.
RATES = {"busy": 10.0, "idle": 0.0, "low": 0.2, "prot-glob": 0.0, "marked": 0.0, "young-idle": 0.0}


class ModelServer:
    """A Triton stand-in: success/failure counters per model, growing at rates the test sets."""

    def __init__(self, rates: dict[str, float]) -> None:
        self.rates = dict(rates)
        self.started = time.time()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = server.exposition().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)
        self.thread.start()
        self.address = f"127.0.0.1:{self.http.server_address[1]}"

    def exposition(self) -> str:
        elapsed = time.time() - self.started
        lines = ["# TYPE nv_inference_request_success counter", "# TYPE nv_inference_request_failure counter"]
        for model, rate in sorted(self.rates.items()):
            lines.append(f'nv_inference_request_success{{model="{model}",version="1"}} {int(rate * elapsed)}')
            lines.append(f'nv_inference_request_failure{{model="{model}",version="1"}} 0')
        return "\n".join(lines) + "\n"

    def stop(self) -> None:
        self.http.shutdown()
        self.http.server_close()
        self.thread.join()


@dataclass
class Stack:
    base: Path
    models: Path
    prometheus: Proc
    vm: Proc
    old_at: float
    young_at: float

    def env(self, url: str | None = None, **settings: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
        env.update(
            STORAGE_BASE_PATH=str(self.base),
            STORAGE_MODELS_PATH=str(self.models),
            STORAGE_PROMETHEUS_URL=url or self.prometheus.url,
            STORAGE_LOG_FORMAT="json",
            STORAGE_CLEANUP_GRACE_HOURS="0",
            STORAGE_CLEANUP_PROTECT="repository/prot-*",
        )
        env.update(settings)
        return env

    def between_days(self) -> str:
        """An age (in days) between the young and the old models' ages, right now."""
        return f"{(time.time() - (self.old_at + self.young_at) / 2) / DAY:.9f}"

    def window_days(self) -> str:
        """A usage window just longer than the young models' age, well inside the recorded history."""
        # 6 s: more than a loaded machine takes to start the cleaner, less than the 14 s of history.
        return f"{max(time.time() - self.young_at + 6, 10) / DAY:.9f}"

    def between_hours(self) -> str:
        return f"{(time.time() - (self.old_at + self.young_at) / 2) / 3600:.9f}"


def _write_config(path: Path, exporter: str, model_server: str) -> Path:
    config = {
        "global": {"scrape_interval": "500ms", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"job_name": "models", "static_configs": [{"targets": [exporter], "labels": {"host": "a"}}]},
            {"job_name": "triton", "static_configs": [{"targets": [model_server], "labels": {"host": "a"}}]},
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


def _has_models(url: str, count: int) -> bool:
    return len(prom_query(url, "max by (tier, model) (model_storage_model_bytes)")) == count


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("plan")
    base = root / "storage"
    models = base / "models"
    for tier in ("raw", "quantized", "repository"):
        (models / tier).mkdir(parents=True)
    old_at = time.time()
    for (tier, name), size in OLD_MODELS.items():
        make_model(models, tier, name, {"1/model.bin": b"x" * size})
    (models / "raw" / "downloading" / "weights.safetensors.incomplete").write_bytes(b"")
    (models / "repository" / "marked" / ".keep").write_bytes(b"")
    server = ModelServer(RATES)
    exporter = start_exporter(models, base, root)
    procs: list[Proc] = [exporter]
    try:
        config = _write_config(root / "prometheus.yml", exporter.url.removeprefix("http://"), server.address)
        prometheus = start_prometheus(config, root / "prom-data", root)
        procs.append(prometheus)
        vm = start_victoria_metrics(root / "vm-data", root, config)
        procs.append(vm)
        for url in (prometheus.url, vm.url):
            wait_until(partial(_has_models, url, len(OLD_MODELS)), timeout=20, what="old models in " + url)
        wait_until(lambda: time.time() >= old_at + HISTORY_SECONDS, timeout=HISTORY_SECONDS + 1)
        young_at = time.time()
        for (tier, name), size in YOUNG_MODELS.items():
            make_model(models, tier, name, {"model.bin": b"y" * size})
        total = len(OLD_MODELS) + len(YOUNG_MODELS)
        for url in (prometheus.url, vm.url):
            wait_until(partial(_has_models, url, total), timeout=20, what="young models in " + url)
        yield Stack(base, models, prometheus, vm, old_at, young_at)
    finally:
        for proc in reversed(procs):
            proc.stop()
        server.stop()


def plan_json(stack: Stack, *args: str, url: str | None = None, **settings: str) -> dict[str, Any]:
    done = run_cleaner(["plan", "--json", *args], stack.env(url, **settings), check=True)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def brief(plan: dict[str, Any]) -> str:
    """What a failed assertion shows: the reasons and the coverage."""
    return json.dumps(
        {"kept": kept(plan), "warnings": plan["warnings"], "coverage": plan["evidence"]["usage_coverage"]}
    )


def evictions(plan: dict[str, Any]) -> list[str]:
    return [f"{e['tier']}/{e['model']}" for e in plan["evictions"]]


def kept(plan: dict[str, Any]) -> dict[str, str]:
    return {f"{k['tier']}/{k['model']}": k["reason"] for k in plan["kept"]}


def tree_snapshot(root: Path) -> list[tuple[str, int, float]]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            st = os.lstat(os.path.join(dirpath, name))
            found.append((os.path.relpath(os.path.join(dirpath, name), root), st.st_size, st.st_mtime))
    return sorted(found)


AGE_EVICTIONS = {"raw/old-raw", "quantized/q-big", "quantized/q-small", "repository/idle", "repository/low"}


def age_settings(stack: Stack) -> dict[str, str]:
    between = stack.between_days()
    return {
        "STORAGE_CLEANUP_POLICIES": "age",
        "STORAGE_CLEANUP_AGE_DAYS": between,
        "STORAGE_REQUEST_TIMEFRAME_DAYS": stack.window_days(),
        "STORAGE_CLEANUP_MAX_EVICT_FRACTION": "0.9",
    }


def test_age_evicts_old_models_except_served_protected_and_partial_ones(stack: Stack) -> None:
    plan = plan_json(stack, **age_settings(stack))
    assert set(evictions(plan)) == AGE_EVICTIONS, brief(plan)
    assert all(e["policy"] == "age" for e in plan["evictions"])
    why = kept(plan)
    assert why["repository/busy"].startswith("in use:")
    assert "usage unknown: no usage series" in why["repository/silent"]
    assert why["repository/prot-glob"] == "protected: matches protect glob 'repository/prot-*'"
    assert why["repository/marked"] == "protected: .keep marker in the model directory"
    assert why["raw/downloading"].startswith("partial download in progress")
    low = next(e for e in plan["evictions"] if e["model"] == "low")
    assert 0 < low["requests"] < 10
    assert plan["bytes_to_free"] == sum(e["bytes"] for e in plan["evictions"]) == 10_700
    assert plan["total_bytes_after"] == plan["total_bytes_before"] - 10_700
    assert plan["evidence"]["usage_coverage"]["complete"] is True
    assert {q["name"] for q in plan["evidence"]["queries"]} >= {"model_bytes", "usage", "usage_coverage"}


def test_usage_evicts_idle_models_but_never_young_or_unknown_ones(stack: Stack) -> None:
    plan = plan_json(stack, STORAGE_CLEANUP_POLICIES="usage", STORAGE_REQUEST_TIMEFRAME_DAYS=stack.window_days())
    assert evictions(plan) == ["repository/idle", "repository/low"], brief(plan)  # fewest requests first
    why = kept(plan)
    assert "younger than the usage window" in why["repository/young-idle"]
    assert "usage unknown" in why["repository/silent"]
    assert not any(key.startswith(("raw/", "quantized/")) for key in why)


def test_usage_is_skipped_when_the_data_is_shorter_than_the_window(stack: Stack) -> None:
    window = 120.0  # longer than the ~20 s of history the module's Prometheus has
    plan = plan_json(stack, STORAGE_CLEANUP_POLICIES="usage", STORAGE_REQUEST_TIMEFRAME_DAYS=f"{window / DAY:.9f}")
    assert plan["evictions"] == []
    coverage = plan["evidence"]["usage_coverage"]
    history = time.time() - stack.old_at
    assert coverage["complete"] is False
    assert history - 2 * coverage["resolution_seconds"] - 2 < coverage["covered_seconds"] <= history
    assert any(
        w.startswith("usage policy skipped: usage data covers") and "2.0 min window" in w for w in plan["warnings"]
    )


SIZE = {"STORAGE_CLEANUP_POLICIES": "size", "STORAGE_CLEANUP_SIZE_TIERS": "repository"}


def test_size_evicts_least_used_then_largest_down_to_the_low_watermark(stack: Stack) -> None:
    # repository holds 8600 B; limit 6000 B, low mark 5400 B.
    plan = plan_json(stack, STORAGE_CLEANUP_MAX_SIZE_GB="0.000006", **SIZE)
    assert evictions(plan) == ["repository/idle", "repository/young-idle", "repository/low"]
    assert "usage unknown" in kept(plan)["repository/silent"]
    assert plan["evidence"]["size"]["after_bytes"] == 5300


def test_grace_keeps_recently_changed_models_out_of_every_policy(stack: Stack) -> None:
    plan = plan_json(
        stack, STORAGE_CLEANUP_MAX_SIZE_GB="0.000006", STORAGE_CLEANUP_GRACE_HOURS=stack.between_hours(), **SIZE
    )
    assert evictions(plan) == ["repository/idle", "repository/low", "repository/busy"]
    assert kept(plan)["repository/young-idle"].startswith("grace: changed")


def test_blast_radius_caps_a_run_unless_allow_large(stack: Stack) -> None:
    settings = {**age_settings(stack), "STORAGE_CLEANUP_MAX_EVICT_FRACTION": "0.3"}
    capped = plan_json(stack, **settings)
    assert capped["bytes_to_free"] <= 0.3 * capped["total_bytes_before"]
    assert set(evictions(capped)) < AGE_EVICTIONS
    assert any("blast radius" in reason for reason in kept(capped).values())
    assert any("--allow-large" in w for w in capped["warnings"])
    large = plan_json(stack, "--allow-large", **settings)
    assert set(evictions(large)) == AGE_EVICTIONS


def test_plan_prints_a_table_and_saves_the_same_plan_read_only(stack: Stack) -> None:
    done = run_cleaner(["plan"], stack.env(**age_settings(stack)), check=True)
    out = done.stdout
    assert "Would evict 5 models:" in out and "TIER" in out and "REQUESTS" in out
    assert "Would free 10.7 kB: models total" in out
    assert "protected: .keep marker" in out
    plan_id = out.split()[1].rstrip(",")
    saved = stack.base / "state" / "plans" / f"{plan_id}.json"
    assert stat.S_IMODE(saved.stat().st_mode) == 0o444
    document = json.loads(saved.read_text())
    assert document["plan_id"] == plan_id and len(document["evictions"]) == 5


def test_plan_and_dry_run_are_each_audited_with_actor_plan_id_and_bytes(stack: Stack, tmp_path: Path) -> None:
    audit_log = tmp_path / "audit.log"
    env = stack.env(STORAGE_AUDIT_LOG=str(audit_log), **age_settings(stack))
    before = tree_snapshot(stack.models)

    plan = json.loads(run_cleaner(["--actor", "ops", "plan", "--json"], env, check=True).stdout)
    dry = json.loads(run_cleaner(["run", "--dry-run", "--json"], env, check=True).stdout)

    records = [json.loads(line) for line in audit_log.read_text().splitlines()]
    assert [(r["operation"], r["actor"], r["target"], r["bytes"], r["result"]) for r in records] == [
        ("plan", "ops", plan["plan_id"], plan["bytes_to_free"], "success"),
        ("plan", "cli", dry["plan_id"], dry["bytes_to_free"], "success"),
    ]
    assert records[0]["details"]["command"] == "plan" and records[1]["details"]["command"] == "run --dry-run"
    assert records[0]["details"]["bytes_to_free"] == plan["bytes_to_free"] > 0
    assert verify_audit(audit_log).ok
    assert tree_snapshot(stack.models) == before


def test_plan_and_dry_run_work_on_a_read_only_models_path(stack: Stack) -> None:
    from tests.test_cleaner_apply import read_only_bind

    env = stack.env(**age_settings(stack))
    with read_only_bind(stack.models):
        plan = json.loads(run_cleaner(["plan", "--json"], env, check=True).stdout)
        dry = json.loads(run_cleaner(["run", "--dry-run", "--json"], env, check=True).stdout)
    assert set(evictions(plan)) == set(evictions(dry)) == AGE_EVICTIONS, brief(plan)


def test_explain_says_why_one_model_is_kept_or_evicted(stack: Stack) -> None:
    env = stack.env(**age_settings(stack))
    text = run_cleaner(["plan", "--explain", "repository/busy"], env, check=True).stdout
    assert "=> KEEP (age): in use:" in text
    document = json.loads(run_cleaner(["plan", "--json", "--explain", "idle"], env, check=True).stdout)
    [idle] = document["explanations"]
    assert idle["outcome"]["action"] == "evict" and idle["outcome"]["policy"] == "age"
    missing = run_cleaner(["plan", "--explain", "nope"], env)
    assert missing.returncode == 2 and "no model 'nope'" in missing.stderr


def test_policies_lists_effective_values_and_their_source(stack: Stack, tmp_path: Path) -> None:
    config = tmp_path / "cleaner.yml"
    config.write_text("cleaner:\n  min_requests: 25\n")
    env = stack.env(STORAGE_CLEANUP_AGE_DAYS="12.5")
    document = json.loads(run_cleaner(["--config", str(config), "policies", "--json"], env, check=True).stdout)
    settings = {s["key"]: s for p in document["policies"] for s in p["settings"]}
    assert settings["cleaner.age_days"]["value"] == 12.5 and settings["cleaner.age_days"]["source"] == "env"
    assert settings["cleaner.min_requests"]["value"] == 25 and settings["cleaner.min_requests"]["source"] == "file"
    assert settings["cleaner.max_size_gb"]["source"] == "default"
    text = run_cleaner(["policies"], env, check=True).stdout
    assert "cleaner.age_days" in text and "STORAGE_CLEANUP_AGE_DAYS" in text


def test_extra_matchers_restrict_every_query_to_one_host(stack: Stack) -> None:
    plan = plan_json(stack, STORAGE_PROMETHEUS_MATCHERS='host="a"', **age_settings(stack))
    assert set(evictions(plan)) == AGE_EVICTIONS
    assert all('host="a"' in q["query"] for q in plan["evidence"]["queries"])
    other = run_cleaner(["plan"], stack.env(STORAGE_PROMETHEUS_MATCHERS='host="b"'))
    assert other.returncode == 4
    assert 'no exporter series model_storage_ready matching {host="b"}' in other.stderr


def test_victoria_metrics_gives_the_same_plan_as_prometheus(stack: Stack) -> None:
    settings = age_settings(stack)
    from_prometheus = plan_json(stack, **settings)
    from_vm = plan_json(stack, url=stack.vm.url, **settings)
    assert set(evictions(from_prometheus)) == AGE_EVICTIONS, brief(from_prometheus)
    assert set(evictions(from_vm)) == AGE_EVICTIONS, brief(from_vm)
    assert kept(from_vm).keys() == kept(from_prometheus).keys()
    usage = {"STORAGE_CLEANUP_POLICIES": "usage", "STORAGE_REQUEST_TIMEFRAME_DAYS": stack.window_days()}
    assert evictions(plan_json(stack, url=stack.vm.url, **usage)) == evictions(plan_json(stack, **usage))


def test_prometheus_down_exits_4_and_touches_nothing(stack: Stack) -> None:
    before = tree_snapshot(stack.base)
    url = f"http://127.0.0.1:{free_port()}"
    done = run_cleaner(["plan"], stack.env(url))
    assert done.returncode == 4
    assert done.stderr.strip().count("\n") == 0
    assert f"prometheus {url}: unreachable" in done.stderr
    assert tree_snapshot(stack.base) == before


def test_a_query_prometheus_rejects_exits_4_with_its_error(stack: Stack) -> None:
    done = run_cleaner(["plan"], stack.env(STORAGE_USAGE_QUERY="sum(increase(x[$window])"))
    assert done.returncode == 4
    assert "bad_data" in done.stderr and stack.prometheus.url in done.stderr


NO_USAGE_SERIES = "sum by (model) (increase(vllm_no_such_requests_total{$matchers}[$window]))"


def test_no_usage_series_at_all_plans_with_age_and_size_and_keeps_what_usage_would_judge(stack: Stack) -> None:
    """Issue 13 case 5: a fresh install (no model server reporting) used to exit 2 here."""
    settings = {
        **age_settings(stack),
        "STORAGE_CLEANUP_POLICIES": "age,usage,size",
        "STORAGE_USAGE_QUERY": NO_USAGE_SERIES,
    }
    done = run_cleaner(["plan", "--json"], stack.env(**settings))
    assert done.returncode == 0, done.stderr
    plan = json.loads(done.stdout)
    assert plan["evidence"]["usage_coverage"]["blind"] is True, brief(plan)
    # Age still evicts the unserved tiers; every served model is kept: usage would judge it.
    assert set(evictions(plan)) == {"raw/old-raw", "quantized/q-big", "quantized/q-small"}, brief(plan)
    why = kept(plan)
    for model in ("busy", "idle", "low", "silent"):
        assert "usage unknown" in why[f"repository/{model}"], brief(plan)
    blind = [w for w in plan["warnings"] if w.startswith("usage blind:")]
    assert len(blind) == 1 and "vllm_no_such_requests_total" in blind[0], plan["warnings"]
    assert any(w.startswith("usage policy skipped") for w in plan["warnings"])
    text = run_cleaner(["plan"], stack.env(**settings))
    assert text.returncode == 0 and "usage blind" in text.stdout


def test_no_usage_series_at_all_still_lets_size_evict_unserved_tiers(stack: Stack) -> None:
    plan = plan_json(
        stack,
        STORAGE_CLEANUP_POLICIES="size",
        STORAGE_CLEANUP_MAX_SIZE_GB="0.000008",  # 8 kB: the store holds ~16.6 kB
        STORAGE_CLEANUP_MAX_EVICT_FRACTION="0.9",
        STORAGE_USAGE_QUERY=NO_USAGE_SERIES,
    )
    assert plan["evictions"], brief(plan)
    assert all(not e.startswith("repository/") for e in evictions(plan)), brief(plan)
    assert plan["evidence"]["usage_coverage"]["blind"] is True


def test_a_usage_query_that_errors_is_still_an_error_not_blindness(stack: Stack) -> None:
    done = run_cleaner(["plan"], stack.env(STORAGE_USAGE_QUERY="sum by (model) (increase(x[$window])"))
    assert done.returncode == 4, done.stderr
    assert "usage blind" not in done.stderr + done.stdout


@pytest.mark.parametrize(
    ("setting", "value", "message"),
    [
        ("STORAGE_CLEANUP_AGE_DAYS", "0", "STORAGE_CLEANUP_AGE_DAYS"),
        ("STORAGE_CLEANUP_MAX_EVICT_FRACTION", "1", "evict the whole store"),
        ("STORAGE_CLEANUP_POLICIES", "age,everything", "STORAGE_CLEANUP_POLICIES"),
    ],
)
def test_configurations_that_could_empty_the_store_are_refused(
    stack: Stack, setting: str, value: str, message: str
) -> None:
    done = run_cleaner(["plan"], stack.env(**{setting: value}))
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr


# ---- seven days of history, backfilled with promtool ----


def _openmetrics(now: float) -> str:
    lines: list[str] = []
    step = 300.0
    changed = {"hot": now - 20 * DAY, "cold": now - 20 * DAY, "new": now - 1 * DAY}
    for model, changed_at in changed.items():
        for i in range(20):  # the inventory: the last few minutes, as a scraped exporter leaves it
            t = now - 30 - (19 - i) * 15
            labels = f'tier="repository",model="{model}"'
            lines.append(f"model_storage_model_bytes{{{labels}}} 1000 {t:.3f}")
            lines.append(f"model_storage_model_files{{{labels}}} 1 {t:.3f}")
            lines.append(f"model_storage_model_last_changed_timestamp_seconds{{{labels}}} {changed_at:.3f} {t:.3f}")
    for i in range(20):
        lines.append(f"model_storage_ready 1 {now - 30 - (19 - i) * 15:.3f}")
    for history, days in (("8d", 8), ("2d", 2)):
        count = int(days * DAY / step)
        for i in range(count + 1):
            t = now - 30 - (count - i) * step
            for model, per_step in (("hot", 1), ("cold", 0), ("new", 0)):
                value = i * per_step
                lines.append(f'nv_inference_request_success{{model="{model}",history="{history}"}} {value} {t:.3f}')
    lines.sort(key=lambda line: line.split("{")[0].split(" ")[0])  # one metric family together
    return "\n".join(lines) + "\n# EOF\n"


@pytest.fixture(scope="module")
def backfilled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path, float]]:
    root = tmp_path_factory.mktemp("backfill")
    data = root / "data"
    data.mkdir()
    source = root / "history.om"
    written_at = time.time()  # the history ends here; the window the cleaner sees slides on from it
    source.write_text(_openmetrics(written_at))
    subprocess.run(
        ["promtool", "tsdb", "create-blocks-from", "openmetrics", str(source), str(data)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    config = root / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "15s"}}))
    prometheus = start_prometheus(config, data, root)
    (root / "storage" / "models" / "repository").mkdir(parents=True)
    yield prometheus, root / "storage", written_at
    prometheus.stop()


def _backfill_plan(backfilled: tuple[Proc, Path, float], history: str) -> dict[str, Any]:
    prometheus, base, _ = backfilled
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    env.update(
        STORAGE_BASE_PATH=str(base),
        STORAGE_PROMETHEUS_URL=prometheus.url,
        STORAGE_LOG_FORMAT="json",
        STORAGE_CLEANUP_POLICIES="usage",
        STORAGE_USAGE_QUERY="sum by (model) (increase(nv_inference_request_success"
        f'{{history="{history}"$matchers}}[$window]))',
    )
    done = run_cleaner(["plan", "--json"], env, check=True)
    document: dict[str, Any] = json.loads(done.stdout)
    return document


def test_seven_days_of_real_history_drive_the_usage_policy(backfilled: tuple[Proc, Path, float]) -> None:
    plan = _backfill_plan(backfilled, "8d")
    assert plan["evidence"]["usage_coverage"]["complete"] is True
    assert evictions(plan) == ["repository/cold"]
    assert plan["evictions"][0]["requests"] == 0
    assert "younger than the usage window" in kept(plan)["repository/new"]
    query = next(q for q in plan["evidence"]["queries"] if q["name"] == "usage")
    assert "[7d]" in query["query"]


def test_two_days_of_history_skip_the_usage_policy_and_say_so(backfilled: tuple[Proc, Path, float]) -> None:
    plan = _backfill_plan(backfilled, "2d")
    # The two days end when the fixture wrote them; on a loaded machine the plan can run minutes later.
    since_written = time.time() - backfilled[2]
    assert plan["evictions"] == []
    coverage = plan["evidence"]["usage_coverage"]
    assert coverage["complete"] is False
    # Measured on a grid of 1/20 of the window, rounded down, and ending now: a little under the two days.
    assert 2 * DAY - coverage["resolution_seconds"] - since_written < coverage["covered_seconds"] <= 2 * DAY
    assert any(
        w.startswith("usage policy skipped: usage data covers") and "days of the 7.0 days window" in w
        for w in plan["warnings"]
    )
