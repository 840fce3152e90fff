"""deploy/kubernetes/ checked offline: it renders, validates, holds the repo's rules and dashboard, and is locked down.

- `kubectl kustomize` renders the base and the PodMonitor overlay (kubectl's built-in kustomize);
- `kubernetes-validate --strict` passes for every core kind;
- ServiceMonitor, PodMonitor and PrometheusRule validate against the prometheus-operator CRD schemas
  in tests/data/prometheus-operator/ (see its README for source and licence), unknown fields refused
  as the API server's strict field validation does;
- the PrometheusRule's groups are rules/'s, and promtool accepts them; the dashboard ConfigMap is
  grafana/'s file, byte for byte;
- the pod security settings docs/deployment.md promises.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.support import ROOT, VENV_BIN, have, wait_until

KUSTOMIZE = ROOT / "deploy" / "kubernetes"
CRDS = ROOT / "tests" / "data" / "prometheus-operator"
CORE_KINDS = {"Namespace", "ServiceAccount", "ConfigMap", "DaemonSet", "Service"}
OPERATOR_KINDS = {"ServiceMonitor": "servicemonitors", "PodMonitor": "podmonitors", "PrometheusRule": "prometheusrules"}


@cache
def render(overlay: str) -> str:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to render deploy/kubernetes (it has kustomize built in): install kubectl"
    done = subprocess.run([kubectl, "kustomize", str(KUSTOMIZE / overlay)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def objects(overlay: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(render(overlay)) if doc]


def one(overlay: str, kind: str) -> dict[str, Any]:
    (found,) = [o for o in objects(overlay) if o["kind"] == kind]
    return found


@pytest.mark.parametrize("overlay", ["base", "podmonitor"])
def test_kustomize_renders_everything_into_the_namespace(overlay: str) -> None:
    docs = objects(overlay)
    kinds = {o["kind"] for o in docs}
    monitor = "ServiceMonitor" if overlay == "base" else "PodMonitor"
    assert {"DaemonSet", "PrometheusRule", "ConfigMap", monitor} <= kinds
    assert ({"ServiceMonitor", "PodMonitor"} - {monitor}).isdisjoint(kinds)
    for o in docs:
        if o["kind"] != "Namespace":
            assert o["metadata"]["namespace"] == "model-storage", o["metadata"]["name"]
    assert "Secret" not in kinds, "tokens are created by whoever deploys, never committed"


@pytest.mark.parametrize("overlay", ["base", "podmonitor"])
def test_core_kinds_pass_kubernetes_validate_strict(overlay: str, tmp_path: Path) -> None:
    rendered = tmp_path / "rendered.yaml"
    rendered.write_text(render(overlay))
    done = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", str(rendered)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    passed = {line.split("resource ")[1].split("/")[0] for line in done.stdout.splitlines() if " passed " in line}
    expected = {o["kind"].lower() for o in objects(overlay) if o["kind"] in CORE_KINDS}
    assert passed == expected, done.stdout


def test_strict_validation_refuses_an_unknown_field(tmp_path: Path) -> None:
    """The validator can fail: a misspelt field in the DaemonSet is reported."""
    daemonset = one("base", "DaemonSet")
    daemonset["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(daemonset))
    done = subprocess.run(
        [str(VENV_BIN / "kubernetes-validate"), "--strict", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode != 0 and "readinesProbe" in done.stdout + done.stderr


@cache
def crd_schema(plural: str) -> dict[str, Any]:
    crd = yaml.safe_load((CRDS / f"monitoring.coreos.com_{plural}.yaml").read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]
    return schema


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Fields the schema does not declare, which the API server's strict validation refuses."""
    found = []
    if isinstance(value, dict) and "properties" in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        for key, item in value.items():
            if key in schema["properties"]:
                found += unknown_fields(item, schema["properties"][key], f"{path}.{key}")
            elif not schema.get("additionalProperties"):
                found.append(f"{path}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found


def validate_custom(obj: dict[str, Any]) -> list[str]:
    schema = crd_schema(OPERATOR_KINDS[obj["kind"]])
    # metadata is the API server's, not the CRD's, to check: the CRD leaves it open.
    errors = [e.message for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    return errors + [f"unknown field {f}" for f in unknown_fields(obj, schema) if not f.startswith(".metadata")]


@pytest.mark.parametrize(("overlay", "kind"), [("base", "ServiceMonitor"), ("podmonitor", "PodMonitor")])
def test_monitors_validate_against_the_operator_crds_and_attach_node_metadata(overlay: str, kind: str) -> None:
    monitor = one(overlay, kind)
    assert validate_custom(monitor) == []
    assert monitor["spec"]["attachMetadata"] == {"node": True}
    (endpoint,) = monitor["spec"]["endpoints" if kind == "ServiceMonitor" else "podMetricsEndpoints"]
    assert endpoint["port"] == "http-metrics" and endpoint["path"] == "/metrics"
    assert {r["targetLabel"] for r in endpoint["relabelings"]} >= {"node", "instance"}
    # The job label comes from this label's value; the rules and the dashboard select job="model-storage".
    assert monitor["spec"]["jobLabel"] == "app.kubernetes.io/name"
    target = one(overlay, "Service" if kind == "ServiceMonitor" else "DaemonSet")
    labels = (
        target["metadata"]["labels"] if kind == "ServiceMonitor" else target["spec"]["template"]["metadata"]["labels"]
    )
    assert labels["app.kubernetes.io/name"] == "model-storage"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_crd_validation_can_fail() -> None:
    monitor = one("base", "ServiceMonitor")
    monitor["spec"]["endpoints"][0]["interval"] = "thirty seconds"
    monitor["spec"]["attachMetadata"]["nodes"] = True
    errors = validate_custom(monitor)
    assert any("thirty seconds" in e for e in errors), errors
    assert "unknown field .spec.attachMetadata.nodes" in errors


def repo_rule_groups() -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = []
    for path in sorted((ROOT / "rules").glob("*.yml")):
        groups += yaml.safe_load(path.read_text())["groups"]
    return groups


def test_the_prometheus_rule_holds_exactly_the_repo_rule_groups() -> None:
    rule = one("base", "PrometheusRule")
    assert validate_custom(rule) == []
    assert rule["spec"]["groups"] == repo_rule_groups()
    done = subprocess.run(
        [sys.executable, str(KUSTOMIZE / "generate.py"), "--check"], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.skipif(not have("promtool"), reason="promtool not installed (make system-deps)")
def test_promtool_accepts_the_rules_extracted_from_the_prometheus_rule(tmp_path: Path) -> None:
    path = tmp_path / "extracted.rules.yml"
    path.write_text(yaml.safe_dump({"groups": one("base", "PrometheusRule")["spec"]["groups"]}))
    done = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    count = sum(len(g["rules"]) for g in repo_rule_groups())
    assert f"SUCCESS: {count} rules found" in done.stdout


def test_the_dashboard_config_map_is_the_repo_dashboard_for_the_grafana_sidecar() -> None:
    (config_map,) = [
        o for o in objects("base") if o["kind"] == "ConfigMap" and "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    source = ROOT / "grafana" / "dashboards" / "model-storage.json"
    assert config_map["data"] == {source.name: source.read_text()}
    json.loads(config_map["data"][source.name])


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = one("base", "DaemonSet")["spec"]["template"]["spec"]
    return spec


def test_the_pods_are_unprivileged_non_root_and_read_only() -> None:
    spec = pod_spec()
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert spec.get(key, False) is False, key
    assert spec["automountServiceAccountToken"] is False
    pod = spec["securityContext"]
    assert pod["runAsNonRoot"] is True and pod["runAsUser"] != 0 and pod["runAsGroup"] != 0
    assert pod["seccompProfile"] == {"type": "RuntimeDefault"}
    assert [c["name"] for c in spec["containers"]] == ["exporter", "cleaner"]
    for container in spec["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context.get("privileged", False) is False, container["name"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert "runAsUser" not in context or context["runAsUser"] != 0
        for kind in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][kind]), (container["name"], kind)
        assert not container.get("ports") or all("hostPort" not in p for p in container["ports"])


def test_the_exporter_reads_the_node_store_read_only_and_is_ready_on_readyz() -> None:
    spec = pod_spec()
    exporter = spec["containers"][0]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m for m in exporter["volumeMounts"]}
    models = mounts["/storage/models"]
    assert models["readOnly"] is True
    assert "hostPath" in volumes[models["name"]]
    assert volumes[models["name"]]["hostPath"]["path"].endswith("/models")
    assert exporter["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert exporter["readinessProbe"]["httpGet"]["port"] == "http-metrics"
    env = {e["name"]: e.get("value") for e in exporter["env"]}
    assert env["STORAGE_EXPORTER_LISTEN"] == "0.0.0.0:8470"
    token_mount = mounts[str(Path(env["STORAGE_ADMIN_TOKEN_FILE"]).parent)]
    secret = volumes[token_mount["name"]]["secret"]
    assert token_mount["readOnly"] is True and secret["secretName"] == "model-storage-tokens"
    assert not any("TOKEN" in e["name"] and "value" in e and not e["name"].endswith("_FILE") for e in exporter["env"])


def test_the_cleaner_runs_once_per_node_on_an_interval_with_the_store_writable() -> None:
    daemonset = one("base", "DaemonSet")
    strategy = daemonset["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    # No surge: during a rollout the old pod (and its cleaner) is gone before the new one starts.
    assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    spec = pod_spec()
    cleaner = spec["containers"][1]
    script = cleaner["command"][-1]
    assert "model-storage-cleaner --actor schedule run" in script and "while " in script
    assert "&" not in script.replace("& wait $!", ""), "a cleaner run is never sent to the background"
    env = {e["name"]: e for e in cleaner["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert env["STORAGE_PROMETHEUS_MATCHERS"]["value"] == 'node="$(NODE_NAME)"'
    assert int(env["CLEANER_INTERVAL_SECONDS"]["value"]) > 0
    store = next(m for m in cleaner["volumeMounts"] if m["mountPath"] == "/storage")
    assert not store.get("readOnly", False)
    assert all(m["mountPath"] != "/storage/models" for m in cleaner["volumeMounts"])


def test_gpu_nodes_are_tolerated_and_only_labelled_nodes_run_it() -> None:
    spec = pod_spec()
    tolerated = {(t["key"], t["operator"], t["effect"]) for t in spec["tolerations"]}
    assert ("nvidia.com/gpu", "Exists", "NoSchedule") in tolerated
    assert spec["nodeSelector"]["model-storage/store"] == "true"


def test_the_cleaner_loop_runs_one_at_a_time_survives_failures_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The DaemonSet's cleaner script itself, under /bin/sh, with a stand-in cleaner that records each run."""
    cleaner = pod_spec()["containers"][1]
    assert cleaner["command"][:2] == ["/bin/sh", "-c"]
    runs = tmp_path / "runs"
    stub = tmp_path / "bin" / "model-storage-cleaner"
    stub.parent.mkdir()
    # Each run holds a directory lock for 0.2 s: a second run while one is going fails to take it.
    # Every second run exits 4 (a failed precondition): the loop must go on.
    stub.write_text(
        "#!/bin/sh\n"
        f'mkdir "{tmp_path}/lock" || {{ echo overlap >> "{runs}"; exit 1; }}\n'
        f'echo "start $*" >> "{runs}"; sleep 0.2\n'
        f'n=$(grep -c start "{runs}"); rmdir "{tmp_path}/lock"\n'
        "[ $((n % 2)) -eq 0 ] && exit 4; exit 0\n"
    )
    stub.chmod(0o755)
    env = {
        "PATH": f"{stub.parent}:/usr/bin:/bin",
        "CLEANER_INTERVAL_SECONDS": "0.1",
        "CLEANER_START_DELAY_SECONDS": "0.1",
    }
    loop = subprocess.Popen(cleaner["command"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: runs.exists() and runs.read_text().count("start") >= 4, timeout=30, what="four runs")
    finally:
        loop.send_signal(signal.SIGTERM)
        out, _ = loop.communicate(timeout=10)
    assert loop.returncode == 0, "SIGTERM ends the loop cleanly"
    lines = runs.read_text().splitlines()
    assert "overlap" not in lines
    assert all(line == "start --actor schedule run" for line in lines)
    # The run under way when SIGTERM came finished and was logged; none started after it.
    assert len(lines) == 4, lines
    codes = [json.loads(line)["exit_code"] for line in out.splitlines() if line.startswith("{")]
    assert codes == [0, 4, 0, 4], out
