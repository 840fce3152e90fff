"""End to end: exporter -> Prometheus with rules/ -> Alertmanager -> a webhook in this test, all on loopback.

The recording rules file is loaded as it is. The alerts file is loaded with every `for:` shortened
to 2s (the only rewrite), and Alertmanager runs the deployment's routing and inhibition tree with
only the receiver URLs and the group timings rewritten, so the test runs in seconds.
"""

from __future__ import annotations

import json
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import (
    ROOT,
    Proc,
    have,
    http_json,
    prom_query,
    start_alertmanager,
    start_exporter,
    start_prometheus,
    wait_until,
    write_prometheus_config,
)

pytestmark = pytest.mark.skipif(
    not (have("prometheus") and have("prometheus-alertmanager")),
    reason="prometheus and prometheus-alertmanager are needed (make system-deps)",
)

SHORT_FOR = "2s"
JOB = "model-storage"
BLOCK = 4096


@dataclass
class Webhook:
    """Alertmanager's webhook payloads as received, with the path (= which receiver) they came to."""

    url: str
    received: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def alerts(self, path: str) -> list[dict[str, Any]]:
        with self.lock:
            return [alert for got, payload in self.received if got == path for alert in payload["alerts"]]

    def all_alertnames(self) -> set[str]:
        with self.lock:
            return {a["labels"]["alertname"] for _, p in self.received for a in p["alerts"]}


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook(url="")

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with hook.lock:
                hook.received.append((self.path, json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    hook.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="webhook", kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield hook
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def alertmanager_config_for_test(source: Path, target: Path, webhook_url: str) -> Path:
    """The deployment's config with receivers pointed at the test webhook and timings in seconds."""
    config = yaml.safe_load(source.read_text())
    for receiver in config["receivers"]:
        for hook in receiver.get("webhook_configs", []):
            hook["url"] = webhook_url + urllib.parse.urlparse(hook["url"]).path
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        for key, value in (("group_wait", "1s"), ("group_interval", "1s"), ("repeat_interval", "2s")):
            if key in route or route is config["route"]:
                route[key] = value
    target.write_text(yaml.safe_dump(config))
    return target


def short_for_rules(rules_dir: Path, target_dir: Path) -> list[str]:
    """rules/*.yml for Prometheus: recording rules untouched, alerts with every `for:` at SHORT_FOR."""
    files = []
    for path in sorted(rules_dir.glob("*.yml")):
        spec = yaml.safe_load(path.read_text())
        for group in spec["groups"]:
            for rule in group["rules"]:
                if "alert" in rule and "for" in rule:
                    rule["for"] = SHORT_FOR
        out = target_dir / path.name
        if any("alert" in rule for group in spec["groups"] for rule in group["rules"]):
            out.write_text(yaml.safe_dump(spec))
        else:
            out.write_text(path.read_text())
        files.append(str(out))
    return files


@pytest.fixture
def stack(tmp_path: Path, store: Path, logs_dir: Path, webhook: Webhook) -> Iterator[dict[str, Proc]]:
    (store / "models" / "quantized" / "small").mkdir()
    # Capacity counts allocated bytes: whole 4 KiB blocks, written (not sparse), so allocated = apparent.
    (store / "models" / "quantized" / "small" / "w.bin").write_bytes(b"q" * 4 * BLOCK)
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    rule_files = short_for_rules(ROOT / "rules", rules_dir)
    am_config = alertmanager_config_for_test(
        ROOT / "deploy" / "alertmanager" / "alertmanager.yml", tmp_path / "alertmanager.yml", webhook.url
    )
    (tmp_path / "am").mkdir()
    (tmp_path / "prom").mkdir()
    procs: dict[str, Proc] = {}
    try:
        procs["alertmanager"] = start_alertmanager(am_config, tmp_path / "am", logs_dir)
        # STORAGE_MAX_SIZE_GB=0.00016384: a capacity of 40 blocks of 4 KiB (163,840 bytes).
        procs["exporter"] = start_exporter(store / "models", store, logs_dir, STORAGE_MAX_SIZE_GB="0.00016384")
        exporter_target = procs["exporter"].url.removeprefix("http://")
        prom_config = write_prometheus_config(
            tmp_path / "prometheus.yml",
            {JOB: [exporter_target]},
            scrape_interval="1s",
            evaluation_interval="1s",
            rule_files=rule_files,
            alertmanagers=[procs["alertmanager"].url.removeprefix("http://")],
        )
        procs["prometheus"] = start_prometheus(prom_config, tmp_path / "prom", logs_dir)
        yield procs
    finally:
        for proc in reversed(list(procs.values())):
            proc.stop()


def test_filling_past_90_percent_pages_critical_and_inhibits_high(
    stack: dict[str, Proc], store: Path, webhook: Webhook
) -> None:
    prom, am = stack["prometheus"].url, stack["alertmanager"].url
    instance = stack["exporter"].url.removeprefix("http://")

    def usage() -> float | None:
        result = prom_query(prom, f'instance:model_storage_usage:ratio{{job="{JOB}"}}')
        return float(result[0]["value"][1]) if result else None

    assert wait_until(usage, timeout=20, what="the usage ratio recorded") == pytest.approx(0.1)
    assert webhook.alerts("/model-storage/pager") == []

    model = store / "models" / "raw" / "big"
    model.mkdir()
    (model / "weights.bin").write_bytes(b"w" * 34 * BLOCK)  # 38 of 40 blocks with the quantized model
    allocated = [p.lstat().st_blocks * 512 for p in (model / "weights.bin", store / "models/quantized/small/w.bin")]
    assert allocated == [34 * BLOCK, 4 * BLOCK], "the test filesystem allocates in 4 KiB blocks"
    wait_until(lambda: usage() == pytest.approx(0.95), timeout=20, what="95% usage seen by Prometheus")

    def paged() -> list[dict[str, Any]]:
        return [
            a
            for a in webhook.alerts("/model-storage/pager")
            if a["labels"]["alertname"] == "ModelStorageSpaceCritical" and a["status"] == "firing"
        ]

    (critical, *_) = wait_until(paged, timeout=30, what="the critical notification at the pager webhook")
    assert critical["labels"] == {
        "alertname": "ModelStorageSpaceCritical",
        "severity": "critical",
        "job": JOB,
        "instance": instance,
    }
    assert critical["annotations"]["runbook_url"] == "docs/runbook.md#modelstoragespacecritical"
    assert critical["annotations"]["description"].startswith(
        "Models have 152kiB allocated of the 160kiB capacity (95%);"
    )

    def suppressed(alertname: str) -> dict[str, Any] | None:
        for alert in http_json(f"{am}/api/v2/alerts"):
            if alert["labels"]["alertname"] == alertname and alert["status"]["state"] == "suppressed":
                return dict(alert)
        return None

    for alertname in ("ModelStorageSpaceHigh", "ModelStorageTierImbalance"):
        held = wait_until(lambda: suppressed(alertname), timeout=20, what=f"{alertname} held, suppressed")  # noqa: B023
        assert held is not None
        assert held["labels"]["instance"] == instance
        assert held["status"]["inhibitedBy"], held["status"]

    # A repeat of the page (repeat_interval 2s) proves Alertmanager flushed again since both alerts
    # arrived; the inhibited alert must still not have reached any receiver.
    wait_until(lambda: len(paged()) >= 2, timeout=20, what="a repeated critical notification")
    assert "ModelStorageSpaceHigh" not in webhook.all_alertnames()
    assert "ModelStorageTierImbalance" not in webhook.all_alertnames()
