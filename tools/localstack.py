"""`make run`: the exporter, plus Prometheus and Alertmanager when installed, on loopback with the repo's configs."""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import yaml

from shared.config import Settings, load_settings
from shared.errors import StorageError
from shared.exit_codes import ExitCode

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
RULES_DIR = ROOT / "rules"
# Where deploy/prometheus/prometheus.yml expects the rules inside the Prometheus container.
CONTAINER_RULES_DIR = "/etc/prometheus/rules"
# The compose service names that prometheus.yml uses as scrape and alerting targets.
SERVICES = ("exporter", "prometheus", "alertmanager")
PROMETHEUS_BINARIES = ("prometheus",)
ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")
LOOPBACK = "127.0.0.1"
READY_TIMEOUT_SECONDS = 120.0
STOP_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class Component:
    """One process of the local stack: how to start it, where it is ready and what to show."""

    name: str
    argv: tuple[str, ...]
    ready_url: str
    show_url: str
    env: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class StackPlan:
    """Everything `make run` will start, and what it skips with the reason why."""

    components: tuple[Component, ...]
    prometheus_config: dict[str, Any] | None
    skipped: tuple[str, ...] = field(default=())


def _retarget(targets: Sequence[str], addresses: Mapping[str, str]) -> list[str]:
    """Compose service targets become loopback addresses; services not running are dropped."""
    result: list[str] = []
    for target in targets:
        host = target.rsplit(":", 1)[0]
        if host in addresses:
            result.append(addresses[host])
        elif host not in SERVICES:
            result.append(target)
    return result


def _retarget_static(static_configs: Sequence[Mapping[str, Any]], addresses: Mapping[str, str]) -> list[Any]:
    kept = []
    for static in static_configs:
        targets = _retarget(static.get("targets", []), addresses)
        if targets:
            kept.append({**static, "targets": targets})
    return kept


def loopback_prometheus_config(
    config: Mapping[str, Any], addresses: Mapping[str, str], rules_dir: Path, interval: str | None = None
) -> dict[str, Any]:
    """The compose Prometheus config turned local: service names -> loopback, rules from the repo. Pure.

    `addresses` maps each running service (exporter, prometheus, alertmanager) to HOST:PORT; targets
    of services that are not running are dropped, with any job or alerting block left empty.
    `interval`, when given, replaces the scrape and evaluation intervals.
    """
    result = copy.deepcopy(dict(config))
    if interval is not None:
        result["global"] = {**result.get("global", {}), "scrape_interval": interval, "evaluation_interval": interval}
    rule_files = []
    for pattern in result.get("rule_files", []):
        text = str(pattern)
        if text.startswith(CONTAINER_RULES_DIR + "/"):
            text = str(rules_dir / text[len(CONTAINER_RULES_DIR) + 1 :])
        rule_files.append(text)
    if rule_files:
        result["rule_files"] = rule_files
    jobs = []
    for job in result.get("scrape_configs", []):
        statics = _retarget_static(job.get("static_configs", []), addresses)
        if statics or "static_configs" not in job:
            jobs.append({**job, "static_configs": statics} if statics else job)
    result["scrape_configs"] = jobs
    alerting = result.get("alerting")
    if alerting:
        managers = []
        for manager in alerting.get("alertmanagers", []):
            statics = _retarget_static(manager.get("static_configs", []), addresses)
            if statics:
                managers.append({**manager, "static_configs": statics})
        if managers:
            result["alerting"] = {**alerting, "alertmanagers": managers}
        else:
            del result["alerting"]
    return result


def exporter_argv(venv_bin: Path) -> list[str]:
    return [str(venv_bin / "model-storage-exporter")]


def prometheus_argv(binary: str, config_file: Path, data_dir: Path, listen: str) -> list[str]:
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address={listen}",
        "--log.level=warn",
    ]


def alertmanager_argv(binary: str, config_file: Path, data_dir: Path, listen: str) -> list[str]:
    return [
        binary,
        f"--config.file={config_file}",
        f"--storage.path={data_dir}",
        f"--web.listen-address={listen}",
        # Clustering off: otherwise Alertmanager also binds a gossip port on every interface.
        "--cluster.listen-address=",
        "--log.level=warn",
    ]


def _first(which: Callable[[str], str | None], names: Sequence[str]) -> str | None:
    for name in names:
        found = which(name)
        if found:
            return found
    return None


def run_dir(settings: Settings) -> Path:
    """Generated files of the local stack (the loopback prometheus.yml)."""
    return settings.base_path / "run"


def alertmanager_data_dir(settings: Settings) -> Path:
    return settings.base_path / "alertmanager"


def plan_stack(
    settings: Settings,
    *,
    venv_bin: Path,
    which: Callable[[str], str | None],
    prometheus_port: int,
    alertmanager_port: int,
    base_env: Mapping[str, str],
    prometheus_config: Mapping[str, Any],
    alertmanager_config_exists: bool,
    interval: str | None = None,
) -> StackPlan:
    """What to start, with which arguments: decided from settings and what is installed. Pure."""
    exporter_port = settings.exporter.listen[1]
    exporter_addr = f"{LOOPBACK}:{exporter_port}"
    prom_addr = f"{LOOPBACK}:{prometheus_port}"
    am_addr = f"{LOOPBACK}:{alertmanager_port}"
    skipped: list[str] = []
    components: list[Component] = []

    exporter_env = {**base_env, "STORAGE_EXPORTER_LISTEN": exporter_addr}
    components.append(
        Component(
            "exporter",
            tuple(exporter_argv(venv_bin)),
            f"http://{exporter_addr}/healthz",
            f"http://{exporter_addr}/metrics",
            exporter_env,
        )
    )
    addresses = {"exporter": exporter_addr}

    am_binary = _first(which, ALERTMANAGER_BINARIES)
    if am_binary is None:
        skipped.append("alertmanager: not installed (apt-get install prometheus-alertmanager)")
    elif not alertmanager_config_exists:
        skipped.append(f"alertmanager: no config at {ALERTMANAGER_CONFIG}")
    else:
        argv = alertmanager_argv(am_binary, ALERTMANAGER_CONFIG, alertmanager_data_dir(settings), am_addr)
        components.append(Component("alertmanager", tuple(argv), f"http://{am_addr}/-/ready", f"http://{am_addr}"))
        addresses["alertmanager"] = am_addr

    prom_binary = _first(which, PROMETHEUS_BINARIES)
    config: dict[str, Any] | None = None
    if prom_binary is None:
        skipped.append("prometheus: not installed (apt-get install prometheus)")
    else:
        addresses["prometheus"] = prom_addr
        config = loopback_prometheus_config(prometheus_config, addresses, RULES_DIR, interval)
        config_file = run_dir(settings) / "prometheus.yml"
        argv = prometheus_argv(prom_binary, config_file, settings.metrics_path, prom_addr)
        components.append(Component("prometheus", tuple(argv), f"http://{prom_addr}/-/ready", f"http://{prom_addr}"))
    return StackPlan(tuple(components), config, tuple(skipped))


def cleaner_hint(plan: StackPlan, venv_bin: Path, configured_url: str) -> str | None:
    """The command that plans a cleanup against this stack's Prometheus. Pure."""
    prometheus = next((c for c in plan.components if c.name == "prometheus"), None)
    if prometheus is None:
        return None
    # No model server reports requests here: without usage tiers the usage policy has nothing to ask.
    env = ["STORAGE_USAGE_TIERS="]
    if prometheus.show_url != configured_url.rstrip("/"):
        env.insert(0, f"STORAGE_PROMETHEUS_URL={prometheus.show_url}")
    try:
        command = str((venv_bin / "model-storage-cleaner").relative_to(Path.cwd()))
    except ValueError:
        command = str(venv_bin / "model-storage-cleaner")
    return " ".join([*env, command, "plan"])


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m tools.localstack", description=__doc__)
    parser.add_argument("--prometheus-port", type=int, default=9090, help="loopback port for Prometheus")
    parser.add_argument("--alertmanager-port", type=int, default=9093, help="loopback port for Alertmanager")
    parser.add_argument(
        "--interval", metavar="DURATION", help="scrape and rule evaluation interval (default: as in prometheus.yml)"
    )
    return parser.parse_args(argv)


def _is_up(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310 - our own loopback URL
            return int(response.status) == 200
    except (urllib.error.URLError, OSError):
        return False


class Stack:
    """The running processes; stops them all, newest first."""

    def __init__(self) -> None:
        self.running: list[tuple[Component, subprocess.Popen[bytes]]] = []

    def start(self, component: Component) -> subprocess.Popen[bytes]:
        env = dict(component.env) if component.env is not None else None
        popen = subprocess.Popen(component.argv, env=env)
        self.running.append((component, popen))
        return popen

    def exited(self) -> list[tuple[Component, int]]:
        return [(c, p.returncode) for c, p in self.running if p.poll() is not None]

    def stop(self) -> None:
        for _component, popen in reversed(self.running):
            if popen.poll() is None:
                popen.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for _component, popen in reversed(self.running):
            try:
                popen.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()


def _wait_ready(component: Component, popen: subprocess.Popen[bytes], stop: threading.Event) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while not stop.is_set():
        if popen.poll() is not None:
            print(f"localstack: {component.name} exited with {popen.returncode}", file=sys.stderr)
            return False
        if _is_up(component.ready_url):
            return True
        if time.monotonic() > deadline:
            print(f"localstack: {component.name} not ready at {component.ready_url}", file=sys.stderr)
            return False
        stop.wait(0.1)
    return False


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        settings = load_settings()
    except StorageError as err:
        print(f"localstack: {err.one_line()}", file=sys.stderr)
        return err.exit_code
    try:
        prometheus_config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        print(f"localstack: cannot read {PROMETHEUS_CONFIG}: {err}", file=sys.stderr)
        return ExitCode.CONFIG
    plan = plan_stack(
        settings,
        venv_bin=Path(sys.executable).parent,
        which=shutil.which,
        prometheus_port=args.prometheus_port,
        alertmanager_port=args.alertmanager_port,
        base_env=dict(os.environ),
        prometheus_config=prometheus_config,
        alertmanager_config_exists=ALERTMANAGER_CONFIG.is_file(),
        interval=args.interval,
    )
    for directory in settings.layout.tier_dirs:
        (settings.models_path / directory).mkdir(parents=True, exist_ok=True)
    if plan.prometheus_config is not None:
        run_dir(settings).mkdir(parents=True, exist_ok=True)
        settings.metrics_path.mkdir(parents=True, exist_ok=True)
        text = "# Generated by `make run` from deploy/prometheus/prometheus.yml: do not edit.\n"
        text += yaml.safe_dump(plan.prometheus_config, sort_keys=False)
        (run_dir(settings) / "prometheus.yml").write_text(text, encoding="utf-8")
    alertmanager_data_dir(settings).mkdir(parents=True, exist_ok=True)

    stop = threading.Event()

    def on_signal(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    for reason in plan.skipped:
        print(f"localstack: skipping {reason}", flush=True)

    stack = Stack()
    code: int = ExitCode.OK
    try:
        for component in plan.components:
            if not _wait_ready(component, stack.start(component), stop):
                return ExitCode.OK if stop.is_set() else ExitCode.UNEXPECTED
        lines = [f"  {c.name:<13} {c.show_url}" for c in plan.components]
        hint = cleaner_hint(plan, Path(sys.executable).parent, settings.cleaner.prometheus.url)
        if hint:
            lines.append(f"  try the cleaner: {hint}")
        # One write, so whoever sees "running" sees the whole block, the cleaner hint included.
        print("localstack: running (Ctrl-C stops all):\n" + "\n".join(lines), flush=True)
        while not stop.wait(0.5):
            exited = stack.exited()
            if exited:
                component, returncode = exited[0]
                print(f"localstack: {component.name} exited with {returncode}; stopping", file=sys.stderr)
                code = ExitCode.UNEXPECTED
                break
    finally:
        stack.stop()
        print("localstack: stopped", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
