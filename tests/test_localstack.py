"""`make run`'s local stack: the pure config and argv builders, then the real thing started and stopped."""

from __future__ import annotations

import copy
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from shared.config import load_settings
from tests.support import ROOT, VENV_BIN, free_port, have, http_get, http_json, prom_query, wait_until
from tools.localstack import (
    ALERTMANAGER_CONFIG,
    PROMETHEUS_CONFIG,
    RULES_DIR,
    cleaner_hint,
    loopback_prometheus_config,
    plan_stack,
)

COMPOSE_CONFIG: dict[str, Any] = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
ALL = {"exporter": "127.0.0.1:1001", "prometheus": "127.0.0.1:1002", "alertmanager": "127.0.0.1:1003"}


def targets_of(config: dict[str, Any]) -> dict[str, list[str]]:
    return {
        job["job_name"]: [t for static in job["static_configs"] for t in static["targets"]]
        for job in config["scrape_configs"]
    }


# Pure parts


def test_loopback_config_scrapes_the_services_on_loopback() -> None:
    config = loopback_prometheus_config(COMPOSE_CONFIG, ALL, RULES_DIR)
    assert targets_of(config) == {
        "model-storage": ["127.0.0.1:1001"],
        "prometheus": ["127.0.0.1:1002"],
        "alertmanager": ["127.0.0.1:1003"],
    }
    assert config["alerting"]["alertmanagers"][0]["static_configs"] == [{"targets": ["127.0.0.1:1003"]}]
    assert config["global"] == COMPOSE_CONFIG["global"]


def test_loopback_config_reads_the_rules_from_the_repo() -> None:
    config = loopback_prometheus_config(COMPOSE_CONFIG, ALL, Path("/repo/rules"))
    assert config["rule_files"] == [
        p.replace("/etc/prometheus/rules", "/repo/rules") for p in COMPOSE_CONFIG["rule_files"]
    ]
    assert all(Path(p).parent == Path("/repo/rules") for p in config["rule_files"])


def test_loopback_config_drops_services_that_do_not_run() -> None:
    config = loopback_prometheus_config(COMPOSE_CONFIG, {"exporter": "127.0.0.1:1001"}, RULES_DIR)
    assert targets_of(config) == {"model-storage": ["127.0.0.1:1001"]}
    assert "alerting" not in config


def test_loopback_config_can_shorten_the_intervals() -> None:
    config = loopback_prometheus_config(COMPOSE_CONFIG, ALL, RULES_DIR, "1s")
    assert config["global"] == {"scrape_interval": "1s", "evaluation_interval": "1s"}
    assert COMPOSE_CONFIG["global"]["scrape_interval"] != "1s"


def test_loopback_config_keeps_targets_that_are_not_compose_services_and_leaves_its_input_alone() -> None:
    original = copy.deepcopy(COMPOSE_CONFIG)
    original["scrape_configs"].append({"job_name": "triton", "static_configs": [{"targets": ["gpu-1:8002"]}]})
    before = copy.deepcopy(original)
    config = loopback_prometheus_config(original, ALL, RULES_DIR)
    assert targets_of(config)["triton"] == ["gpu-1:8002"]
    assert original == before


def plan(which: dict[str, str], env: dict[str, str] | None = None, *, am_config: bool = True) -> Any:
    settings = load_settings(env={"STORAGE_BASE_PATH": "/tmp/base", **(env or {})})
    return plan_stack(
        settings,
        venv_bin=Path("/venv/bin"),
        which=which.get,
        prometheus_port=19090,
        alertmanager_port=19093,
        base_env={"PATH": "/usr/bin", **(env or {})},
        prometheus_config=COMPOSE_CONFIG,
        alertmanager_config_exists=am_config,
    )


INSTALLED = {"prometheus": "/usr/bin/prometheus", "prometheus-alertmanager": "/usr/bin/prometheus-alertmanager"}


def test_plan_starts_exporter_alertmanager_then_prometheus_all_on_loopback() -> None:
    stack = plan(INSTALLED)
    assert [c.name for c in stack.components] == ["exporter", "alertmanager", "prometheus"]
    exporter, alertmanager, prometheus = stack.components
    assert exporter.argv == ("/venv/bin/model-storage-exporter",)
    assert exporter.env["STORAGE_EXPORTER_LISTEN"] == "127.0.0.1:8470"
    assert alertmanager.argv == (
        "/usr/bin/prometheus-alertmanager",
        f"--config.file={ALERTMANAGER_CONFIG}",
        "--storage.path=/tmp/base/alertmanager",
        "--web.listen-address=127.0.0.1:19093",
        "--cluster.listen-address=",
        "--log.level=warn",
    )
    assert prometheus.argv[:4] == (
        "/usr/bin/prometheus",
        "--config.file=/tmp/base/run/prometheus.yml",
        "--storage.tsdb.path=/tmp/base/metrics",
        "--web.listen-address=127.0.0.1:19090",
    )
    for component in stack.components:
        assert component.show_url.startswith("http://127.0.0.1:")
        listen = [a for a in component.argv if "listen-address=" in a and a != "--cluster.listen-address="]
        assert all(a.split("=", 1)[1].startswith("127.0.0.1:") for a in listen)
    assert targets_of(stack.prometheus_config)["model-storage"] == ["127.0.0.1:8470"]
    assert stack.skipped == ()


def test_plan_keeps_the_exporter_on_loopback_whatever_the_environment_says() -> None:
    stack = plan(INSTALLED, {"STORAGE_EXPORTER_LISTEN": "0.0.0.0:9999"})
    exporter = stack.components[0]
    assert exporter.env["STORAGE_EXPORTER_LISTEN"] == "127.0.0.1:9999"
    assert targets_of(stack.prometheus_config)["model-storage"] == ["127.0.0.1:9999"]


def test_plan_puts_the_tsdb_under_the_metrics_path() -> None:
    stack = plan(INSTALLED, {"STORAGE_METRICS_PATH": "/data/tsdb"})
    assert "--storage.tsdb.path=/data/tsdb" in stack.components[-1].argv


def test_plan_without_prometheus_or_alertmanager_runs_the_exporter_alone_and_says_why() -> None:
    stack = plan({})
    assert [c.name for c in stack.components] == ["exporter"]
    assert stack.prometheus_config is None
    assert len(stack.skipped) == 2 and all("not installed" in reason for reason in stack.skipped)


def test_plan_finds_upstream_alertmanager_name_and_skips_it_without_a_config() -> None:
    upstream = {"prometheus": "/usr/bin/prometheus", "alertmanager": "/opt/bin/alertmanager"}
    assert plan(upstream).components[1].argv[0] == "/opt/bin/alertmanager"
    stack = plan(upstream, am_config=False)
    assert [c.name for c in stack.components] == ["exporter", "prometheus"]
    assert "alerting" not in stack.prometheus_config
    assert "no config" in stack.skipped[0]


def test_cleaner_hint_points_at_this_stacks_prometheus_only_when_it_is_not_the_default() -> None:
    stack = plan(INSTALLED)
    venv = Path("/venv/bin")
    hint = cleaner_hint(stack, venv, "http://127.0.0.1:9090")
    assert (
        hint
        == "STORAGE_PROMETHEUS_URL=http://127.0.0.1:19090 STORAGE_USAGE_TIERS= /venv/bin/model-storage-cleaner plan"
    )
    assert (
        cleaner_hint(stack, venv, "http://127.0.0.1:19090/")
        == "STORAGE_USAGE_TIERS= /venv/bin/model-storage-cleaner plan"
    )
    assert cleaner_hint(plan({}), venv, "http://127.0.0.1:9090") is None


# The real stack


def _children(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(child) for child in text.split()]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")


@pytest.fixture
def localstack(tmp_path: Path) -> Iterator[dict[str, Any]]:
    if not (have("prometheus") and have("prometheus-alertmanager")):
        pytest.skip("prometheus and prometheus-alertmanager not installed (make system-deps)")
    ports = {"exporter": free_port(), "prometheus": free_port(), "alertmanager": free_port()}
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    env.update(
        STORAGE_BASE_PATH=str(tmp_path / "storage"),
        STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{ports['exporter']}",
        STORAGE_LOG_FORMAT="json",
        STORAGE_SCAN_WORKERS="1",
        # The launcher is a repository tool, not an installed module: `make run` starts it from the root.
        PYTHONPATH=str(ROOT),
    )
    out = tmp_path / "localstack.out"
    argv = [
        str(VENV_BIN / "python"),
        "-m",
        "tools.localstack",
        f"--prometheus-port={ports['prometheus']}",
        f"--alertmanager-port={ports['alertmanager']}",
        "--interval=1s",
    ]
    with open(out, "wb") as handle:
        # A session of its own, so a test can send Ctrl-C to the whole group as a terminal does.
        popen = subprocess.Popen(
            argv, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, start_new_session=True
        )
    info = {"popen": popen, "ports": ports, "out": out, "base": tmp_path / "storage"}
    try:
        wait_until(
            lambda: "localstack: running" in out.read_text() or popen.poll() is not None,
            timeout=60,
            what="localstack running",
        )
        assert popen.poll() is None, out.read_text()
        yield info
    finally:
        if popen.poll() is None:
            os.killpg(popen.pid, signal.SIGKILL)
            popen.wait()


def test_make_run_starts_the_stack_on_loopback_with_the_repo_configs(localstack: dict[str, Any]) -> None:
    ports, base = localstack["ports"], localstack["base"]
    output = localstack["out"].read_text()
    for name in ("exporter", "prometheus", "alertmanager"):
        assert re.search(rf"{name}\s+http://127\.0\.0\.1:{ports[name]}", output), output
    assert "model-storage-cleaner plan" in output
    assert all((base / "models" / tier).is_dir() for tier in ("raw", "quantized", "repository"))
    assert (base / "run" / "prometheus.yml").is_file()
    prom = f"http://127.0.0.1:{ports['prometheus']}"
    up = wait_until(lambda: prom_query(prom, 'up{job="model-storage"} == 1'), timeout=60, what="exporter scraped")
    assert up[0]["metric"]["instance"] == f"127.0.0.1:{ports['exporter']}"
    wait_until(lambda: prom_query(prom, "instance:model_storage_bytes:sum"), timeout=60, what="recording rules")
    managers = wait_until(lambda: http_json(f"{prom}/api/v1/alertmanagers")["data"]["activeAlertmanagers"], timeout=30)
    assert managers[0]["url"].startswith(f"http://127.0.0.1:{ports['alertmanager']}/")
    assert (base / "metrics" / "wal").is_dir(), "the TSDB lives under STORAGE_METRICS_PATH"
    for port in ports.values():
        status, _ = http_get(f"http://127.0.0.1:{port}/")
        assert status < 500


@pytest.mark.parametrize("how", ["sigterm", "ctrl-c"])
def test_make_run_stops_every_process_it_started(localstack: dict[str, Any], how: str) -> None:
    popen = localstack["popen"]
    children = _children(popen.pid)
    assert len(children) == 3
    if how == "sigterm":
        popen.send_signal(signal.SIGTERM)
    else:
        os.killpg(popen.pid, signal.SIGINT)
    assert popen.wait(timeout=30) == 0
    assert all(_gone(child) for child in children), children
    assert localstack["out"].read_text().rstrip().endswith("localstack: stopped")
    for port in localstack["ports"].values():
        with pytest.raises(OSError):
            http_get(f"http://127.0.0.1:{port}/", timeout=1)


def test_make_run_with_bad_config_says_so_in_one_line_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    env.update(STORAGE_BASE_PATH=str(tmp_path / "storage"), STORAGE_MAX_SIZE_GB="-1")
    result = subprocess.run(
        [sys.executable, "-m", "tools.localstack"], env=env, capture_output=True, text=True, cwd=ROOT, check=False
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "STORAGE_MAX_SIZE_GB" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "storage").exists()
