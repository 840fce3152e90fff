"""Prometheus rules and Alertmanager configuration: promtool, amtool and a real Alertmanager."""

from __future__ import annotations

import datetime as dt
import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared import metric_names
from tests.support import ROOT, Proc, have, http_json, start_alertmanager, wait_until

RULES = ROOT / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
TEST_FILES = sorted((RULES / "tests").glob("*.yml"))
ALERTMANAGER_YML = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTING_DOC = ROOT / "docs" / "alerting.md"
RUNBOOK = ROOT / "docs" / "runbook.md"
SEVERITIES = {"critical", "warning", "info"}
CONTRACT_RECORDS = {
    "instance:model_storage_bytes:sum",
    "instance:model_storage_usage:ratio",
    "instance:model_storage_filesystem_usage:ratio",
    "instance_tier:model_storage_bytes:share",
    "instance:model_storage_bytes:deriv1h",
    "model:model_storage_requests:increase7d",
}

needs_promtool = pytest.mark.skipif(not have("promtool"), reason="promtool not installed (make system-deps)")
needs_amtool = pytest.mark.skipif(not have("amtool"), reason="amtool not installed (make system-deps)")
needs_alertmanager = pytest.mark.skipif(
    not have("prometheus-alertmanager"), reason="prometheus-alertmanager not installed (make system-deps)"
)


def rules() -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            found.extend(group["rules"])
    return found


def alerts() -> list[dict[str, Any]]:
    return [rule for rule in rules() if "alert" in rule]


def alert_names() -> list[str]:
    return [rule["alert"] for rule in alerts()]


def run(*argv: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=120, check=False)


# ---- promtool ------------------------------------------------------------------------------


@needs_promtool
def test_promtool_check_rules_passes_without_lint_findings() -> None:
    result = run("promtool", "check", "rules", "--lint=all", "--lint-fatal", *map(str, RULE_FILES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_FILES), result.stdout


@needs_promtool
@pytest.mark.parametrize("test_file", TEST_FILES, ids=[p.name for p in TEST_FILES])
def test_promtool_unit_tests_pass(test_file: Path) -> None:
    result = run("promtool", "test", "rules", str(test_file))
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_unit_tests_can_fail(tmp_path: Path) -> None:
    """A wrong expectation must turn promtool red, or the unit tests above prove nothing."""
    spec = yaml.safe_load((RULES / "tests" / "space.test.yml").read_text())
    spec["rule_files"] = [str(RULES / Path(f).name) for f in spec["rule_files"]]
    first = spec["tests"][0]["alert_rule_test"]
    firing = next(case for case in first if case["exp_alerts"])
    firing["exp_alerts"][0]["exp_annotations"]["description"] += " (wrong)"
    broken = tmp_path / "broken.test.yml"
    broken.write_text(yaml.safe_dump(spec))
    result = run("promtool", "test", "rules", str(broken))
    assert result.returncode != 0
    assert "(wrong)" in result.stdout + result.stderr


def test_7_day_tests_evaluate_every_5_minutes_and_others_every_minute() -> None:
    for path in TEST_FILES:
        spec = yaml.safe_load(path.read_text())
        expected = "5m" if "7d" in path.name else "1m"
        assert spec["evaluation_interval"] == expected, path.name
        for test in spec["tests"]:
            # Input samples further apart than 5m go stale and `for:` alerts never fire.
            assert test["interval"] in ("1m", "5m"), (path.name, test["name"])


# ---- the rules' shape ------------------------------------------------------------------------


def test_contract_recording_rules_exist_with_contract_names() -> None:
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    assert recorded >= CONTRACT_RECORDS
    pattern = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
    assert all(pattern.match(name) for name in recorded), recorded


def test_every_alert_has_severity_summary_description_and_runbook() -> None:
    names = alert_names()
    assert len(names) == len(set(names)), "duplicate alert names"
    for rule in alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        assert annotations["runbook_url"] == f"docs/runbook.md#{name.lower()}", name
        assert name.startswith("ModelStorage"), name


def test_every_alert_has_a_for_duration_so_spikes_do_not_notify() -> None:
    for rule in alerts():
        assert re.fullmatch(r"\d+[mh]", rule.get("for", "")), rule["alert"]


def test_rules_only_use_metric_names_from_the_contract() -> None:
    counters = {metric_names.EVENTS, metric_names.EVENT_OVERFLOWS, metric_names.ERRORS}
    counters |= {metric_names.CLEANUP_EVICTED_BYTES, metric_names.CLEANUP_EVICTED_MODELS}
    counters |= {metric_names.SCRUB_CORRECTIONS, metric_names.SCRUB_DRIFT_BYTES, metric_names.SCAN_FAILURES}
    exposed = {
        value
        for key, value in vars(metric_names).items()
        if key.isupper() and isinstance(value, str) and value.startswith("model_storage_")
    }
    exposed = {f"{name}_total" if name in counters else name for name in exposed}
    exposed.add(f"{metric_names.BUILD_INFO}_info")
    recorded = {rule["record"] for rule in rules() if "record" in rule}
    for rule in rules():
        for name in re.findall(r"[a-z_:]*model_storage[a-z0-9_:]*", rule["expr"]):
            assert name in exposed or name in recorded, (rule.get("alert") or rule["record"], name)


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case["exp_alerts"] else quiet).add(case["alertname"])
                for alert in case["exp_alerts"]:
                    # promtool compares annotations only when they are given.
                    assert set(alert.get("exp_annotations", {})) == {"summary", "description", "runbook_url"}, (
                        path.name,
                        case["alertname"],
                    )
    assert set(alert_names()) <= fired, set(alert_names()) - fired
    assert set(alert_names()) <= quiet, set(alert_names()) - quiet


def test_deployment_prometheus_loads_every_rule_file() -> None:
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    globs = [Path(pattern).name for pattern in config["rule_files"]]
    for path in RULE_FILES:
        assert any(path.match(glob) for glob in globs), f"{path.name} matches none of {globs}"
    jobs = [scrape["job_name"] for scrape in config["scrape_configs"]]
    assert "model-storage" in jobs, 'the exporter alerts select job="model-storage"'


def test_runbook_has_one_section_per_alert_and_nothing_else() -> None:
    runbook = RUNBOOK.read_text()
    assert runbook.startswith("# Runbook\n")
    headings = re.findall(r"^## (\S+)\s*$", runbook, flags=re.MULTILINE)
    assert sorted(headings) == sorted(alert_names())


def test_usage_rule_is_the_triton_default_over_7_days() -> None:
    (rule,) = [r for r in rules() if r.get("record") == "model:model_storage_requests:increase7d"]
    expr = " ".join(rule["expr"].split())
    assert "nv_inference_request_success[7d]" in expr
    assert "nv_inference_request_failure[7d]" in expr
    assert "sum by (model)" in expr


@needs_promtool
def test_cleaner_default_usage_query_agrees_with_the_recording_rule(tmp_path: Path) -> None:
    from cleaner.inventory import usage_query
    from shared.settings_table import DEFAULT_USAGE_QUERY

    cleaner_expr = usage_query(DEFAULT_USAGE_QUERY, 7 * 86400, "")
    spec = yaml.safe_load((RULES / "tests" / "recording.test.yml").read_text())
    spec["rule_files"] = [str(RULES / "model-storage.rules.yml")]
    usage_test = spec["tests"][1]
    case = usage_test["promql_expr_test"][0]
    cleaner_case = dict(case, expr=cleaner_expr)
    cleaner_case["exp_samples"] = [{**s, "labels": "{" + s["labels"].split("{", 1)[1]} for s in case["exp_samples"]]
    usage_test["promql_expr_test"] = [case, cleaner_case]
    spec["tests"] = [usage_test]
    path = tmp_path / "agree.test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run("promtool", "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# ---- Alertmanager ----------------------------------------------------------------------------


@needs_amtool
def test_amtool_check_config_passes() -> None:
    result = run("amtool", "check-config", str(ALERTMANAGER_YML))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


@needs_amtool
@pytest.mark.parametrize(
    ("labels", "receiver"),
    [
        (["alertname=ModelStorageSpaceCritical", "severity=critical"], "pager"),
        (["alertname=ModelStorageSpaceHigh", "severity=warning"], "team"),
        (["alertname=ModelStorageModelUsageUnknown", "severity=info"], "digest"),
        (["alertname=SomethingElse"], "team"),
    ],
)
def test_routing_by_severity(labels: list[str], receiver: str) -> None:
    result = run("amtool", "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [receiver]


def test_every_rule_severity_has_a_route() -> None:
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    routed = {m.split("=", 1)[1].strip('"') for route in config["route"]["routes"] for m in route["matchers"]}
    assert {rule["labels"]["severity"] for rule in alerts()} <= routed


@pytest.fixture
def alertmanager(tmp_path: Path, logs_dir: Path) -> Iterator[Proc]:
    if not have("prometheus-alertmanager"):
        pytest.skip("prometheus-alertmanager not installed (make system-deps)")
    data = tmp_path / "am-data"
    data.mkdir()
    proc = start_alertmanager(ALERTMANAGER_YML, data, logs_dir)
    try:
        yield proc
    finally:
        proc.stop()


def post_alerts(am: Proc, alerts: list[dict[str, str]]) -> None:
    import urllib.request

    now = dt.datetime.now(dt.UTC)
    body = [
        {
            "labels": labels,
            "annotations": {"summary": "test"},
            "startsAt": now.isoformat(),
            "endsAt": (now + dt.timedelta(minutes=10)).isoformat(),
        }
        for labels in alerts
    ]
    request = urllib.request.Request(
        f"{am.url}/api/v2/alerts",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200


@needs_alertmanager
def test_critical_inhibits_lesser_space_alerts_for_the_same_exporter_only(alertmanager: Proc) -> None:
    job = {"job": "model-storage"}
    post_alerts(
        alertmanager,
        [
            {"alertname": "ModelStorageSpaceCritical", "severity": "critical", "instance": "a:8470", **job},
            {"alertname": "ModelStorageSpaceHigh", "severity": "warning", "instance": "a:8470", **job},
            {"alertname": "ModelStorageGrowthRateHigh", "severity": "warning", "instance": "a:8470", **job},
            {"alertname": "ModelStorageSpaceHigh", "severity": "warning", "instance": "b:8470", **job},
            {"alertname": "ModelStorageTrashOverLimit", "severity": "warning", "instance": "a:8470", **job},
        ],
    )

    def states() -> dict[tuple[str, str], str] | None:
        found = http_json(f"{alertmanager.url}/api/v2/alerts")
        result = {(a["labels"]["alertname"], a["labels"]["instance"]): a["status"]["state"] for a in found}
        # Inhibition is computed as alerts arrive; wait until all five have a settled state.
        return result if len(result) == 5 and "unprocessed" not in result.values() else None

    got = wait_until(states, timeout=10, what="alertmanager has processed the alerts")
    assert got == {
        ("ModelStorageSpaceCritical", "a:8470"): "active",
        ("ModelStorageSpaceHigh", "a:8470"): "suppressed",
        ("ModelStorageGrowthRateHigh", "a:8470"): "suppressed",
        ("ModelStorageSpaceHigh", "b:8470"): "active",
        ("ModelStorageTrashOverLimit", "a:8470"): "active",
    }


@needs_alertmanager
def test_alerts_are_grouped_per_alert_name_and_exporter(alertmanager: Proc) -> None:
    job = {"job": "model-storage", "instance": "a:8470", "tier": "repository"}
    post_alerts(
        alertmanager,
        [
            {"alertname": "ModelStorageModelUnused", "severity": "warning", "model": "m1", **job},
            {"alertname": "ModelStorageModelUnused", "severity": "warning", "model": "m2", **job},
            {"alertname": "ModelStorageModelUsageUnknown", "severity": "info", "model": "m3", **job},
            {
                "alertname": "ModelStorageModelUsageUnknown",
                "severity": "info",
                "model": "m4",
                **{**job, "instance": "b"},
            },
        ],
    )

    def groups() -> dict[tuple[str, frozenset[tuple[str, str]]], int] | None:
        found = http_json(f"{alertmanager.url}/api/v2/alerts/groups")
        result = {
            (g["receiver"]["name"], frozenset(g["labels"].items())): len(g["alerts"]) for g in found if g["alerts"]
        }
        return result if sum(result.values()) == 4 else None

    got = wait_until(groups, timeout=10, what="four alerts in groups")
    unused = frozenset({"alertname": "ModelStorageModelUnused", "job": "model-storage", "instance": "a:8470"}.items())
    unknown = frozenset({"alertname": "ModelStorageModelUsageUnknown"}.items())
    assert got == {("team", unused): 2, ("digest", unknown): 2}


@needs_promtool
def test_documented_usage_expressions_for_other_servers_count_per_model(tmp_path: Path) -> None:
    """docs/alerting.md's vLLM, TorchServe and generic expressions parse and yield `model` labels."""
    rows = re.findall(r"^\| [^|]+ \| [^|]+ \| `(sum by \(model\) .+)` \|$", ALERTING_DOC.read_text(), re.MULTILINE)
    assert len(rows) == 3, rows
    counters = {"vllm:request_success_total", "ts_inference_requests_total", "app_requests_total"}
    source_label = {"vllm:request_success_total": "model_name", "ts_inference_requests_total": "model_name"}
    series = []
    for counter in counters:
        label = source_label.get(counter, "served_model")
        for other in ("a", "b"):  # two series per model: the sum must add them
            series.append({"series": f'{counter}{{{label}="m1",other="{other}"}}', "values": "0+1x20"})
    spec = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "promql_expr_test": [
                    {"expr": expr, "eval_time": "20m", "exp_samples": [{"labels": '{model="m1"}', "value": 40}]}
                    for expr in rows
                ],
            }
        ],
    }
    path = tmp_path / "other-servers.test.yml"
    path.write_text(yaml.safe_dump(spec))
    result = run("promtool", "test", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
