"""The Grafana dashboard: dashboard-linter's rules as tests, provisioning, every query against a real Prometheus."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import metric_names
from shared.cleanup_state import CleanupState, write_cleanup_state
from shared.config import load_settings
from shared.plan_summary import PlannedEviction, summarize, summary_path, write_plan_summary
from tests.support import (
    ROOT,
    Proc,
    have,
    http_json,
    prom_query,
    start_exporter,
    start_prometheus,
    wait_until,
    write_prometheus_config,
)
from tests.test_deploy import volumes

DASHBOARD_FILE = ROOT / "grafana" / "dashboards" / "model-storage.json"
DATASOURCES = ROOT / "grafana" / "provisioning" / "datasources"
PROVIDERS = ROOT / "grafana" / "provisioning" / "dashboards"
COMPOSE = ROOT / "docker-compose.yml"
RULES = ROOT / "rules"
DS = {"type": "prometheus", "uid": "${datasource}"}
INSTANCE_MATCHER = 'instance=~"$instance"'
RANGE_FUNCTIONS = ("rate", "irate", "increase", "changes", "deriv", "delta", "idelta", "resets")
# PromQL words that are not metric names.
KEYWORDS = {
    *RANGE_FUNCTIONS,
    "sum", "avg", "min", "max", "count", "topk", "bottomk", "quantile", "stddev", "group",
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
    "time", "vector", "scalar", "abs", "clamp_min", "clamp_max", "label_replace", "offset",
}  # fmt: skip
DASHBOARD: dict[str, Any] = json.loads(DASHBOARD_FILE.read_text())


def panels() -> list[dict[str, Any]]:
    """Every panel that shows data (rows are layout only), nested ones included."""
    found = []
    for panel in DASHBOARD["panels"]:
        if panel["type"] != "row":
            found.append(panel)
        found.extend(p for p in panel.get("panels", []) if p["type"] != "row")
    return found


def targets() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p['title']}/{t['refId']}", t) for p in panels() for t in p["targets"]]


def variables() -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = DASHBOARD["templating"]["list"]
    return result


def metric_selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, its matchers) of every selector in a PromQL expression."""

    def blank(match: re.Match[str]) -> str:
        return " " * len(match.group())

    # Blank out what is not a selector, keeping positions so matchers are read from the original.
    masked = re.sub(r'"(?:[^"\\]|\\.)*"', lambda m: '"' + "x" * (len(m.group()) - 2) + '"', expr)
    masked = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", blank, masked)
    masked = re.sub(r"\[[^\]]*\]", blank, masked)
    selectors = []
    pattern = r"\{[^}]*\}|([A-Za-z_:][A-Za-z0-9_:]*)(\s*\{[^}]*\})?(\s*\()?"
    for match in re.finditer(pattern, masked):
        name, braces, call = match.groups()
        if name is None or call or name in KEYWORDS:
            continue
        selectors.append((name, expr[match.start(2) : match.end(2)].strip() if braces else ""))
    return selectors


def known_metric_names() -> set[str]:
    names = {"up"}
    for value in vars(metric_names).values():
        if isinstance(value, str) and value.startswith("model_storage_"):
            names |= {value, value + "_total", value + "_info"}
    for rule_file in RULES.glob("*.rules.yml"):
        for group in yaml.safe_load(rule_file.read_text())["groups"]:
            names |= {rule["record"] for rule in group["rules"] if "record" in rule}
    return names


# dashboard-linter's rules, re-implemented on the JSON.


def test_dashboard_has_a_stable_uid_title_and_description() -> None:
    assert DASHBOARD["uid"] == "model-storage"
    assert DASHBOARD["title"] and DASHBOARD["description"]
    assert DASHBOARD["editable"] is False, "provisioned: changes belong in the repo"


def test_exactly_one_datasource_variable_of_type_prometheus() -> None:
    datasource_vars = [v for v in variables() if v["type"] == "datasource"]
    assert len(datasource_vars) == 1
    assert datasource_vars[0]["name"] == "datasource" and datasource_vars[0]["query"] == "prometheus"


def test_instance_variable_lists_every_exporter_and_uses_the_datasource_variable() -> None:
    (instance,) = [v for v in variables() if v["name"] == "instance"]
    assert instance["type"] == "query" and instance["datasource"] == DS
    assert instance["query"]["query"] == "label_values(model_storage_build_info, instance)"
    assert instance["multi"] and instance["includeAll"] and instance["allValue"] == ".*"


def test_every_panel_and_target_uses_the_datasource_variable() -> None:
    for panel in panels():
        assert panel["datasource"] == DS, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DS, panel["title"]
    for annotation in DASHBOARD["annotations"]["list"]:
        assert annotation["datasource"] == DS, annotation["name"]


def test_every_panel_has_a_title_a_description_and_a_unit() -> None:
    for panel in panels():
        assert panel["title"].strip() and panel["description"].strip(), panel["id"]
        assert panel["fieldConfig"]["defaults"].get("unit"), panel["title"]
        assert panel["targets"], panel["title"]
    for panel in DASHBOARD["panels"]:
        assert panel["title"].strip(), panel["id"]


def test_units_match_what_the_query_measures() -> None:
    for panel in panels():
        unit = panel["fieldConfig"]["defaults"]["unit"]
        exprs = [t["expr"] for t in panel["targets"]]
        names = [name for expr in exprs for name, _ in metric_selectors(expr)]
        if any(name.endswith((":ratio", ":share")) for name in names) or all(" / " in e for e in exprs):
            assert unit == "percentunit", panel["title"]
            assert panel["fieldConfig"]["defaults"].get("max", 1) == 1, panel["title"]
        elif all(e.startswith("time() - ") for e in exprs):
            assert unit == "s", panel["title"]
        elif all(n.endswith(("_bytes", "_bytes_total", "_bytes:sum")) for n in names):
            assert unit == "bytes", panel["title"]


def test_no_panel_adds_up_ratios_across_instances() -> None:
    # With several hosts selected, a sum of per-host shares or usage ratios exceeds 100%: aggregate
    # the bytes and let the panel (or a division after the sum) make the ratio.
    for _, target in targets():
        aggregation = r"\b(sum|avg)\s*(?:(?:by|without)\s*\([^)]*\)\s*)?\("
        for call in re.finditer(aggregation, target["expr"]):
            inner = target["expr"][call.end() :].split(")", 1)[0]
            assert not re.search(r":(ratio|share)\b", inner), target["expr"]


def test_every_range_uses_rate_interval() -> None:
    exprs = [t["expr"] for _, t in targets()] + [a["expr"] for a in DASHBOARD["annotations"]["list"]]
    for expr in exprs:
        for window in re.findall(r"\[([^\]]*)\]", expr):
            assert window == "$__rate_interval", expr
        for function in RANGE_FUNCTIONS:
            for call in re.finditer(rf"\b{function}\(", expr):
                assert "[$__rate_interval]" in expr[call.end() :], expr


def test_every_selector_filters_the_instance_variable_and_names_a_known_metric() -> None:
    known = known_metric_names()
    exprs = [t["expr"] for _, t in targets()] + [a["expr"] for a in DASHBOARD["annotations"]["list"]]
    for expr in exprs:
        selectors = metric_selectors(expr)
        assert selectors, expr
        for name, matchers in selectors:
            assert name in known, f"{name} in {expr!r} is neither a metric nor a recording rule"
            assert INSTANCE_MATCHER in matchers, f"{name} in {expr!r} does not filter $instance"


def test_selector_parser_sees_unfiltered_metrics() -> None:
    """The instance check must be able to fail: a bare selector inside a function is found."""
    selectors = metric_selectors('sum by (tier) (rate(model_storage_events_total[5m])) / up{instance=~"$instance"}')
    assert selectors == [("model_storage_events_total", ""), ("up", '{instance=~"$instance"}')]


def test_panel_ids_are_unique_and_the_grid_has_no_overlaps() -> None:
    all_panels = DASHBOARD["panels"]
    ids = [p["id"] for p in all_panels]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in all_panels:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[(x, y)]}"
                cells[(x, y)] = panel["title"]


def test_dashboard_shows_what_the_spec_and_the_issue_ask_for() -> None:
    shown = {name for _, t in targets() for name, _ in metric_selectors(t["expr"])}
    wanted = {
        "model_storage_bytes",  # usage trends per tier
        "model_storage_model_bytes",  # largest models
        "instance:model_storage_usage:ratio",  # capacity gauge
        "instance:model_storage_filesystem_usage:ratio",  # filesystem gauge
        "model_storage_models",  # model counts
        "up",
        "model_storage_events_total",
        "model_storage_event_overflows_total",
        "model_storage_reconcile_drift_bytes",
        "model_storage_scan_duration_seconds",
        "model_storage_cleanup_last_run_timestamp_seconds",
        "model_storage_cleanup_last_success",
        "model_storage_trash_bytes",
        "model_storage_trash_limit_bytes",
        "instance:model_storage_full_after_cleanup:seconds",  # time to full net of the last plan
        "model_storage_cleanup_planned_bytes",
        "model_storage_cleanup_plan_timestamp_seconds",
        "model_storage_cleanup_usage_blind",  # issue 13: usage policy without data
    }
    assert wanted <= shown, wanted - shown
    kinds = {p["type"] for p in panels()}
    assert {"gauge", "stat", "timeseries"} <= kinds
    assert any("topk(" in t["expr"] for _, t in targets())


# Provisioning


def grafana_mounts() -> dict[str, Path]:
    """Container path -> repo path of the Grafana service's bind mounts (deploy-time storage excluded)."""
    service = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    return {
        container: ROOT / host
        for host, container, _mode in volumes(service)
        if not host.startswith(("./storage", "./secrets"))
    }


def to_repo(container_path: str) -> Path | None:
    for container, host in grafana_mounts().items():
        if container_path == container or container_path.startswith(container + "/"):
            return host / container_path[len(container) :].lstrip("/")
    return None


def test_provisioning_is_mounted_where_grafana_reads_it() -> None:
    assert grafana_mounts()["/etc/grafana/provisioning"] == ROOT / "grafana" / "provisioning"


def test_datasource_provisioning_points_at_the_compose_prometheus() -> None:
    files = sorted(DATASOURCES.glob("*.yml"))
    assert files
    sources = [s for f in files for s in yaml.safe_load(f.read_text())["datasources"]]
    assert [s["type"] for s in sources] == ["prometheus"]
    url = urllib.parse.urlsplit(sources[0]["url"])
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    assert url.hostname in services
    assert any(f"{url.port}" in arg for arg in services[url.hostname]["command"]), "port Prometheus listens on"


def test_dashboard_provisioning_points_at_files_that_exist() -> None:
    providers = [p for f in sorted(PROVIDERS.glob("*.yml")) for p in yaml.safe_load(f.read_text())["providers"]]
    in_repo = 0
    for provider in providers:
        assert provider["type"] == "file"
        repo_path = to_repo(provider["options"]["path"])
        if repo_path is None:
            # Users' own dashboards: STORAGE_GRAFANA_PATH/dashboards, created at deploy time.
            service = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
            hosts = {container: host for host, container, _mode in volumes(service)}
            assert hosts[provider["options"]["path"]] == "./storage/grafana/dashboards", provider
            continue
        assert repo_path.is_dir(), repo_path
        assert DASHBOARD_FILE in repo_path.glob("*.json")
        in_repo += 1
    assert in_repo == 1


def test_grafana_home_dashboard_is_the_provisioned_file() -> None:
    env = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]["environment"]
    assert to_repo(env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]) == DASHBOARD_FILE


# Every query against a real Prometheus scraping a real exporter over a temp model tree.

RATE_WINDOW = "4s"  # with a 1 s scrape interval: several samples per window within seconds


def write_models(models: Path) -> None:
    sizes = {
        "raw/llama-7b": 300_000,
        "raw/mistral": 120_000,
        "quantized/llama-7b-q4": 80_000,
        "repository/bert": 50_000,
    }
    for name, size in sizes.items():
        (models / name).mkdir(parents=True)
        (models / name / "weights.bin").write_bytes(b"\0" * size)
        (models / name / "config.json").write_text("{}")
    (models / "README").write_text("outside the tiers")


def grow(models: Path, prometheus: Proc, instance: str) -> None:
    """A store that grows, seen by Prometheus at each step: the time-to-full rule needs a positive trend."""
    total = f'instance:model_storage_bytes:sum{{instance="{instance}"}}'
    wait_until(lambda: prom_query(prometheus.url, total), timeout=30, what="the recording rule has a first value")
    for step in range(3):
        before = float(prom_query(prometheus.url, total)[0]["value"][1])
        (models / "raw" / "llama-7b" / f"shard-{step}.bin").write_bytes(b"\0" * 10_000)

        def seen(before: float = before) -> bool:
            result = prom_query(prometheus.url, total)
            return bool(result) and float(result[0]["value"][1]) >= before + 10_000

        wait_until(seen, timeout=30, what=f"Prometheus recorded growth step {step}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, str]]:
    if not have("prometheus"):
        pytest.skip("prometheus not installed (make system-deps)")
    tmp = tmp_path_factory.mktemp("dashboard")
    base, logs = tmp / "storage", tmp / "logs"
    logs.mkdir()
    write_models(base / "models")
    settings = load_settings(env={"STORAGE_BASE_PATH": str(base)})
    state = CleanupState(
        timestamp=time.time() - 3600,
        success=True,
        run_id="run-1",
        exit_code=0,
        evicted_bytes_total={"age": 1000, "size": 5000},
        evicted_models_total={"age": 1, "size": 2},
        skipped={"protected": 1, "grace": 2},
        trash_bytes=6000,
    )
    write_cleanup_state(settings.cleanup_state_file, state)
    plan = summarize("plan-1", time.time() - 600, [PlannedEviction("raw", "mistral", 120_000, "age")])
    write_plan_summary(summary_path(settings.state_path), plan)
    exporter = start_exporter(base / "models", base, logs)
    try:
        instance = exporter.url.removeprefix("http://")
        rule_files = [str(p) for p in sorted(RULES.glob("*.rules.yml"))]
        assert rule_files, "the recording rules (rules/*.rules.yml) are missing"
        config = write_prometheus_config(tmp / "prometheus.yml", {"model-storage": [instance]}, rule_files=rule_files)
        prometheus = start_prometheus(config, tmp / "tsdb", logs)
        try:
            grow(base / "models", prometheus, instance)
            yield prometheus, instance
        finally:
            prometheus.stop()
    finally:
        exporter.stop()


def substitute(expr: str, instance: str) -> str:
    return expr.replace("$__rate_interval", RATE_WINDOW).replace("$instance", re.escape(instance).replace("\\", "\\\\"))


@pytest.mark.parametrize("target", [t for _, t in targets()], ids=[name for name, _ in targets()])
def test_panel_query_returns_data_from_a_real_prometheus(target: dict[str, Any], stack: tuple[Proc, str]) -> None:
    prometheus, instance = stack
    expr = substitute(target["expr"], instance)
    result = wait_until(lambda: prom_query(prometheus.url, expr), timeout=30, interval=0.25, what=expr)
    assert all(sample["metric"].get("instance", instance) == instance for sample in result), result


def test_annotation_queries_parse(stack: tuple[Proc, str]) -> None:
    prometheus, instance = stack
    for annotation in DASHBOARD["annotations"]["list"]:
        prom_query(prometheus.url, substitute(annotation["expr"], instance))


def test_instance_variable_finds_the_exporter(stack: tuple[Proc, str]) -> None:
    prometheus, instance = stack
    url = f"{prometheus.url}/api/v1/label/instance/values?" + urllib.parse.urlencode(
        {"match[]": "model_storage_build_info"}
    )
    values = wait_until(lambda: http_json(url)["data"], timeout=30, what="instance label values")
    assert values == [instance]
