"""Test helpers shared by the suite: deadlines instead of sleeps, free ports, real processes.

Every process started here listens on 127.0.0.1 only, keeps its data in a temp directory and is
stopped by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from exporter.index.service import ExporterService

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> T:
    """Poll `predicate` until it returns a truthy value or the deadline passes (then fail)."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (AssertionError, OSError, ValueError, KeyError) as err:
            last_error = err
        if time.monotonic() > deadline:
            message = f"condition not met within {timeout:g}s: {what or predicate!r}"
            if last_error is not None:
                message += f" (last error: {last_error!r})"
            raise AssertionError(message)
        time.sleep(interval)


def make_service(base: Path, **env: str) -> ExporterService:
    """An in-process exporter service on `base`/models, not started, with short windows for tests."""
    from exporter.index.service import ExporterService
    from shared.config import load_settings

    values = {
        "STORAGE_BASE_PATH": str(base),
        "STORAGE_SCAN_WORKERS": "1",
        "STORAGE_COALESCE_WINDOW_SECONDS": "0.05",
        "STORAGE_SETTLE_SECONDS": "0.2",
        "STORAGE_LOG_FORMAT": "json",
        # Off unless a test asks: it would hide a miss of the event path that the test is there to see.
        "STORAGE_SCRUB_STATS_PER_SECOND": "0",
        **env,
    }
    return ExporterService(load_settings(env=values))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


def http_json(url: str, timeout: float = 5.0, **kwargs: Any) -> Any:
    status, body = http_get(url, timeout=timeout, **kwargs)
    assert status == 200, (url, status, body[:300])
    return json.loads(body)


def parse_metrics(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Exposition text -> {(name, labels): value}, through prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


@dataclass
class Proc:
    """A started process with the URL it serves and where its log goes."""

    popen: subprocess.Popen[bytes]
    url: str
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 10.0) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        return int(self.popen.returncode)


def start_process(
    argv: list[str],
    log_path: Path,
    url: str,
    ready_path: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    cwd: Path | None = None,
) -> Proc:
    log_file = open(log_path, "wb")  # noqa: SIM115 - owned by the process for its lifetime
    popen = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    log_file.close()
    proc = Proc(popen, url, log_path)

    def ready() -> bool:
        if popen.poll() is not None:
            raise RuntimeError(f"{argv[0]} exited with {popen.returncode}:\n{proc.log()[-3000:]}")
        status, _ = http_get(url + ready_path, timeout=2)
        return status == 200

    try:
        wait_until(ready, timeout=timeout, interval=0.05, what=f"{argv[0]} ready at {url}{ready_path}")
    except BaseException:
        proc.stop()
        raise
    return proc


def exporter_env(models_path: Path, base_path: Path, **overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORAGE_")}
    env.update(
        STORAGE_BASE_PATH=str(base_path),
        STORAGE_MODELS_PATH=str(models_path),
        STORAGE_LOG_FORMAT="json",
        STORAGE_SCAN_WORKERS="1",
    )
    env.update(overrides)
    return env


def start_exporter(models_path: Path, base_path: Path, log_dir: Path, **overrides: str) -> Proc:
    """Run the real `model-storage-exporter` on a free loopback port; returns once /readyz is 200."""
    port = free_port()
    env = exporter_env(models_path, base_path, STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}", **overrides)
    argv = [str(VENV_BIN / "model-storage-exporter")]
    return start_process(argv, log_dir / f"exporter-{port}.log", f"http://127.0.0.1:{port}", "/readyz", env=env)


def have(binary: str) -> bool:
    return shutil.which(binary) is not None


def write_prometheus_config(
    path: Path,
    targets: dict[str, list[str]],
    *,
    scrape_interval: str = "1s",
    evaluation_interval: str = "1s",
    rule_files: list[str] | None = None,
    alertmanagers: list[str] | None = None,
) -> Path:
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "scrape_configs": [{"job_name": job, "static_configs": [{"targets": hosts}]} for job, hosts in targets.items()],
    }
    if rule_files:
        config["rule_files"] = rule_files
    if alertmanagers:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": alertmanagers}]}]}
    path.write_text(yaml.safe_dump(config))
    return path


def start_prometheus(config_file: Path, data_dir: Path, log_dir: Path, *extra_args: str) -> Proc:
    """The real Debian `prometheus` on a free loopback port with a temp TSDB."""
    port = free_port()
    argv = [
        "prometheus",
        f"--config.file={config_file}",
        f"--storage.tsdb.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
        *extra_args,
    ]
    return start_process(argv, log_dir / f"prometheus-{port}.log", f"http://127.0.0.1:{port}", "/-/ready")


def start_alertmanager(config_file: Path, data_dir: Path, log_dir: Path) -> Proc:
    """Debian's `prometheus-alertmanager`, with clustering off so it binds nothing but loopback."""
    port = free_port()
    argv = [
        "prometheus-alertmanager",
        f"--config.file={config_file}",
        f"--storage.path={data_dir}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    return start_process(argv, log_dir / f"alertmanager-{port}.log", f"http://127.0.0.1:{port}", "/-/ready")


def prom_query(prom_url: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    query = {"query": expr}
    if at is not None:
        query["time"] = f"{at:.3f}"
    url = f"{prom_url}/api/v1/query?" + urllib.parse.urlencode(query)
    data = http_json(url)
    assert data["status"] == "success", data
    result: list[dict[str, Any]] = data["data"]["result"]
    return result


@contextlib.contextmanager
def running(proc: Proc) -> Iterator[Proc]:
    try:
        yield proc
    finally:
        proc.stop()


def make_model(models_path: Path, tier: str, name: str, files: dict[str, bytes]) -> Path:
    """A model directory under models/<tier>/<name> holding `files` (relative path -> content)."""
    root = models_path / tier / name
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    root.mkdir(parents=True, exist_ok=True)
    return root


def run_cleaner(
    args: list[str], env: dict[str, str], timeout: float = 60.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """The real `python -m cleaner` with `args`; output captured as text."""
    done = subprocess.run(
        [sys.executable, "-m", "cleaner", *args],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check:
        assert done.returncode == 0, (args, done.returncode, done.stdout[-2000:], done.stderr[-2000:])
    return done


def start_victoria_metrics(data_dir: Path, log_dir: Path, scrape_config: Path | None = None, *extra_args: str) -> Proc:
    """Debian's single-node `victoria-metrics` on a free loopback port, optionally scraping like Prometheus.

    Results are not cached and recent points are not held back, so tests see samples as they land.
    """
    port = free_port()
    argv = [
        "victoria-metrics",
        f"-httpListenAddr=127.0.0.1:{port}",
        f"-storageDataPath={data_dir}",
        "-search.latencyOffset=0s",
        "-search.disableCache",
        "-loggerLevel=ERROR",
        *extra_args,
    ]
    if scrape_config is not None:
        # Prometheus configs carry keys VictoriaMetrics ignores (evaluation_interval, rule_files).
        argv += [f"-promscrape.config={scrape_config}", "-promscrape.config.strictParse=false"]
    return start_process(argv, log_dir / f"victoria-metrics-{port}.log", f"http://127.0.0.1:{port}", "/health")


def save_age_plan(env: dict[str, str], keys: Iterable[str]) -> str:
    """A saved plan evicting each `tier/model` in `keys` by age, at its size on disk now; its id."""
    from cleaner import verify  # imported here, as in make_service: support stays light to import
    from cleaner.plan_store import new_plan_id, save_plan
    from cleaner.plan_values import Eviction, Plan
    from shared.config import load_settings

    settings = load_settings(env=env)
    now = time.time()
    evictions = []
    for key in keys:
        tier, model = key.split("/")
        snap = verify.snapshot(settings.models_path / key)
        evictions.append(Eviction(tier, model, snap.bytes, snap.files, snap.newest_change, 9e6, None, "age", "t"))
    plan = Plan(new_plan_id(now), now, tuple(evictions), (), sum(e.bytes for e in evictions))
    save_plan(plan, settings.state_path)
    return plan.plan_id
