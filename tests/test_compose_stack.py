"""The compose stack on a real Docker engine, brought up by docs/deployment.md's own steps.

The docker compose block of docs/deployment.md is extracted and run as it is, in a copy of the repository, so
the two cannot drift. Then every promise of that section is checked against the running stack:
the exporter healthy, Prometheus scraping its jobs with the rules loaded, Alertmanager active, an
alert delivered to the stack's webhook, the cleaner through `docker compose run`, the API's dry run
through the published port, secrets and read-only mounts, and `docker compose down` cleaning up.

It needs root (an engine, apt, chown to the containers' uid): without root it is skipped, saying so.
Engine, Compose v2 and the images come from tests/compose_engine.py. Grafana is not started: no
registry that can be reached here has its image, and nothing here pretends it ran.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import stat
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, wait_until

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0,
    reason="the compose stack test needs root (a Docker engine, apt, chown to uid 10001): "
    "skipped as a non-root user; CI runs it as root (make test-compose)",
)

DEPLOYMENT_DOC = (ROOT / "docs" / "deployment.md").read_text()
PUBLISHED = {"exporter": 8470, "prometheus": 9090, "alertmanager": 9093}
# ModelStorageExporterDown with the committed timings needs `for: 5m` plus Alertmanager's group_wait
# (30 s): the delivery check shortens only those numbers (see alert_override).
SHORT_FOR = "10s"
SHORT_INTERVAL = "2s"


def compose_section() -> str:
    return DEPLOYMENT_DOC.split("### docker compose\n", 1)[1].split("\n### ", 1)[0]


def shell_blocks(section: str) -> list[str]:
    blocks = re.findall(r"^( *)```sh\n(.*?)^\1```$", section, flags=re.MULTILINE | re.DOTALL)
    return [re.sub(rf"^{indent}", "", body, flags=re.MULTILINE) for indent, body in blocks]


def setup_block() -> str:
    """The section's first shell block: everything from a fresh checkout to a running stack."""
    block = shell_blocks(compose_section())[0]
    assert "docker compose up -d --build" in block
    return block


def command_in_readme(command: str) -> str:
    assert any(command in block for block in shell_blocks(compose_section())), (
        f"docs/deployment.md does not say `{command}`"
    )
    return command


class Stack:
    """The copy of the repository the docs' steps ran in, and `docker compose` in it."""

    def __init__(self, workdir: Path, env: dict[str, str]) -> None:
        self.workdir = workdir
        self.env = env
        self.timings: dict[str, float] = {}

    def sh(self, script: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["bash", "-euo", "pipefail", "-c", script],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["docker", "compose", *args],
            cwd=self.workdir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def container(self, service: str) -> dict[str, Any]:
        cid = self.compose("ps", "-q", service).stdout.strip()
        assert cid, f"no container for {service}"
        inspected = subprocess.run(
            ["docker", "inspect", cid], env=self.env, capture_output=True, text=True, check=True
        ).stdout
        data: dict[str, Any] = json.loads(inspected)[0]
        return data

    def token(self) -> str:
        return (self.workdir / "secrets" / "storage_admin_token").read_text().strip()


def copy_repository(target: Path) -> None:
    """The tracked and untracked-but-not-ignored files, as a fresh checkout (with local edits) has them."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
    ).stdout
    for name in filter(None, listed.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)


def port_free(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


def get_json(url: str, timeout: float = 5, **kwargs: Any) -> Any:
    request = urllib.request.Request(url, **kwargs)
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def prom_query(expr: str) -> list[dict[str, Any]]:
    url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    result: list[dict[str, Any]] = get_json(url)["data"]["result"]
    return result


def project_containers(env: dict[str, str], project: str) -> list[str]:
    out = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label=com.docker.compose.project={project}"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return out.split()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    from tests.compose_engine import engine, ensure_compose, ensure_images

    started = time.monotonic()
    for service, port in PUBLISHED.items():
        assert port_free(port), f"127.0.0.1:{port} ({service}) is taken: the stack publishes it"
    with engine() as env:
        timings = {"engine_seconds": time.monotonic() - started}
        version = ensure_compose(env)
        print(f"docker compose {version}")
        images = ensure_images(env)
        timings["images_seconds"] = time.monotonic() - started - timings["engine_seconds"]
        print(f"images: {images}")
        project = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["name"]
        assert not project_containers(env, project), f"a compose project `{project}` already has containers here"
        workdir = tmp_path_factory.mktemp("checkout") / "model-storage"
        workdir.mkdir()
        copy_repository(workdir)
        bin_dir = tmp_path_factory.mktemp("bin")
        if not shutil.which("sudo"):
            # The docs' `sudo chown`: this test runs as root, where sudo adds nothing.
            (bin_dir / "sudo").write_text('#!/bin/sh\nexec "$@"\n')
            (bin_dir / "sudo").chmod(0o755)
        stack_env = {
            **env,
            "PATH": f"{bin_dir}:{env['PATH']}",
            # pip inside the image build must trust this machine's egress CA; harmless elsewhere.
            "STORAGE_BUILD_CA": env.get("PIP_CERT") or env.get("SSL_CERT_FILE") or "/dev/null",
        }
        stack = Stack(workdir, stack_env)
        up_started = time.monotonic()
        try:
            done = stack.sh(setup_block(), timeout=900)
            assert done.returncode == 0, (
                f"the docs' compose block failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
            )
            timings["readme_block_seconds"] = time.monotonic() - up_started
            stack.timings = timings
            yield stack
        finally:
            logs = stack.compose("logs", "--no-color", "--tail", "40").stdout
            down = stack.compose("--profile", "*", "down", "--volumes", "--remove-orphans")
            if project_containers(env, project):
                print(logs)
            print(f"compose test timings: {json.dumps({k: round(v, 1) for k, v in timings.items()})}")
            print(f"total {time.monotonic() - started:.1f}s; down exited {down.returncode}")


@pytest.fixture(scope="module")
def healthy(stack: Stack) -> Stack:
    def health() -> bool:
        return bool(stack.container("exporter")["State"].get("Health", {}).get("Status") == "healthy")

    started = time.monotonic()
    wait_until(health, timeout=180, interval=1, what="the exporter container healthy")
    stack.timings["healthy_seconds"] = time.monotonic() - started
    return stack


def test_the_exporter_turns_healthy_and_answers_on_the_published_port(healthy: Stack) -> None:
    with urllib.request.urlopen("http://127.0.0.1:8470/readyz", timeout=5) as response:
        assert response.status == 200
    with urllib.request.urlopen("http://127.0.0.1:8470/metrics", timeout=5) as response:
        assert b"model_storage_" in response.read()


def test_prometheus_scrapes_every_job_of_its_config(healthy: Stack) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert "model-storage" in jobs

    def all_up() -> dict[str, str]:
        up = {r["metric"]["job"]: r["value"][1] for r in prom_query("up")}
        return up if set(up) == jobs and set(up.values()) == {"1"} else {}

    wait_until(all_up, timeout=90, interval=1, what=f"up == 1 for {sorted(jobs)}")


def test_prometheus_loaded_every_rule_group_without_errors(healthy: Stack) -> None:
    expected = set()
    for path in sorted((ROOT / "rules").glob("*.yml")):
        expected |= {g["name"] for g in yaml.safe_load(path.read_text())["groups"]}
    assert expected

    def evaluated() -> list[dict[str, Any]]:
        # Groups with a long interval (model-storage.usage: 5m) may not have run yet: the others must have.
        groups: list[dict[str, Any]] = get_json("http://127.0.0.1:9090/api/v1/rules")["data"]["groups"]
        frequent = [rule for group in groups if group["interval"] <= 60 for rule in group["rules"]]
        return groups if frequent and all(r.get("lastEvaluation", "0001").startswith("20") for r in frequent) else []

    groups = wait_until(evaluated, timeout=90, interval=1, what="every 15 s rule group evaluated once")
    assert {g["name"] for g in groups} == expected
    evaluated_rules = 0
    for group in groups:
        for rule in group["rules"]:
            assert not rule.get("lastError"), (rule["name"], rule["lastError"])
            assert rule["health"] in ({"ok"} if group["interval"] <= 60 else {"ok", "unknown"}), rule["name"]
            evaluated_rules += rule["health"] == "ok"
    assert evaluated_rules >= sum(len(g["rules"]) for g in groups if g["interval"] <= 60)


def test_alertmanager_is_active_and_prometheus_sends_to_it(healthy: Stack) -> None:
    status = wait_until(
        lambda: get_json("http://127.0.0.1:9093/api/v2/status"), timeout=60, interval=1, what="Alertmanager status"
    )
    assert status["versionInfo"]["version"]
    assert status["cluster"]["status"] == "disabled", "a single instance: no gossip"
    managers = wait_until(
        lambda: get_json("http://127.0.0.1:9090/api/v1/alertmanagers")["data"]["activeAlertmanagers"],
        timeout=60,
        interval=1,
        what="Prometheus discovering Alertmanager",
    )
    assert [m["url"] for m in managers] == ["http://alertmanager:9093/api/v2/alerts"]


def test_secrets_and_mounts_are_as_documented(healthy: Stack) -> None:
    token = healthy.token()
    assert len(token) >= 16
    secrets_dir = healthy.workdir / "secrets"
    for secret in secrets_dir.iterdir():
        info = secret.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600, secret
        assert (info.st_uid, info.st_gid) == (10001, 10001), secret
    exporter = healthy.container("exporter")
    config, host = exporter["Config"], exporter["HostConfig"]
    assert config["User"] == "10001:10001"
    assert host["ReadonlyRootfs"] is True
    assert host["CapDrop"] == ["ALL"]
    assert "no-new-privileges:true" in host["SecurityOpt"]
    assert not any(token in value for value in config["Env"]), "the token is in the container's environment"
    assert "STORAGE_ADMIN_TOKEN_FILE=/run/secrets/storage_admin_token" in config["Env"]
    mounts = {m["Destination"]: m for m in exporter["Mounts"]}
    assert mounts["/storage/models"]["RW"] is False
    assert mounts["/storage"]["RW"] is True
    assert mounts["/run/secrets/storage_admin_token"]["RW"] is False
    bindings = {port: [b["HostIp"] for b in bound] for port, bound in (host["PortBindings"] or {}).items()}
    assert bindings == {"8470/tcp": ["127.0.0.1"]}
    # The kernel, not only the flag: writing under the models mount is refused.
    write = healthy.compose(
        "exec", "-T", "exporter", "python", "-c", "open('/storage/models/raw/probe', 'w')", timeout=60
    )
    assert write.returncode != 0 and "Read-only file system" in write.stderr, write.stderr
    logs = healthy.compose("logs", "--no-color").stdout
    assert logs and token not in logs


def make_model(models: Path, tier: str, name: str, size: int) -> None:
    directory = models / tier / name
    directory.mkdir(parents=True)
    (directory / "weights.bin").write_bytes(os.urandom(size))
    for path in (directory, directory / "weights.bin"):
        os.chown(path, 10001, 10001)


def cleaner(stack: Stack, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    extra = [item for key, value in (env or {}).items() for item in ("-e", f"{key}={value}")]
    return stack.compose("run", "--rm", *extra, "cleaner", *args, timeout=180)


@pytest.fixture(scope="module")
def with_models(healthy: Stack) -> Path:
    """An old-looking raw checkpoint and a served model, seen by Prometheus."""
    models = healthy.workdir / "storage" / "models"
    make_model(models, "raw", "old-checkpoint", 1_000_000)
    make_model(models, "repository", "served-model", 3_000_000)
    wait_until(
        lambda: prom_query('model_storage_bytes{tier="raw"} >= 1000000'),
        timeout=90,
        interval=1,
        what="Prometheus seeing the new model",
    )
    return models


def test_the_cleaner_plans_on_a_fresh_stack_through_compose_run(healthy: Stack, with_models: Path) -> None:
    """No model server reports usage yet: a model with unknown usage is kept, and the plan succeeds."""
    plan = cleaner(healthy, *command_in_readme("docker compose run --rm cleaner plan").split()[5:], "--json")
    assert plan.returncode == 0, f"plan on a fresh stack exited {plan.returncode}: {plan.stderr[-2000:]}"
    assert json.loads(plan.stdout)["evictions"] == [], "nothing is older than the 30-day default"


def test_the_cleaner_runs_lists_the_trash_and_restores_through_compose_run(healthy: Stack, with_models: Path) -> None:
    before = set(project_containers(healthy.env, "model-storage"))
    # A model-storage.env made after `up` changes the exporter's configuration: a cleaner with
    # depends_on would make `compose run` recreate the exporter and Prometheus (checked at the end).
    with (healthy.workdir / "model-storage.env").open("a") as settings:
        settings.write("STORAGE_LOG_LEVEL=info\n")
    # Only the age threshold and grace are shortened, so that the model made a moment ago is old.
    young = {"STORAGE_CLEANUP_AGE_DAYS": "0.00001", "STORAGE_CLEANUP_GRACE_HOURS": "0"}
    command_in_readme("docker compose run --rm cleaner run")
    run = cleaner(healthy, "run", "--json", env=young)
    assert run.returncode == 0, f"run exited {run.returncode}: {run.stderr[-2000:]}"
    report = json.loads(run.stdout)
    assert [(d["tier"], d["model"]) for d in report["done"]] == [("raw", "old-checkpoint")]
    assert not (with_models / "raw" / "old-checkpoint").exists()
    assert (with_models / "repository" / "served-model").exists(), "usage unknown: kept"

    command_in_readme("docker compose run --rm cleaner trash")
    trash = cleaner(healthy, "trash", "--json")
    assert trash.returncode == 0, trash.stderr
    assert report["run_id"] in trash.stdout

    command_in_readme("docker compose run --rm cleaner restore RUN_ID")
    restore = cleaner(healthy, "restore", report["run_id"])
    assert restore.returncode == 0, restore.stderr
    assert (with_models / "raw" / "old-checkpoint" / "weights.bin").stat().st_size == 1_000_000

    # `compose run` leaves the running stack alone: no container recreated, none left behind.
    assert set(project_containers(healthy.env, "model-storage")) == before


def test_the_api_dry_run_answers_through_the_published_port(healthy: Stack) -> None:
    request = urllib.request.Request(
        "http://127.0.0.1:8470/storage/cleanup?dry_run=true",
        method="POST",
        headers={"Authorization": f"Bearer {healthy.token()}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, body = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, body = err.code, json.loads(err.read() or b"{}")
    assert status == 200, f"dry run answered {status}: {body}"
    assert "evictions" in json.dumps(body)
    anonymous = urllib.request.Request("http://127.0.0.1:8470/storage/cleanup?dry_run=true", method="POST")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(anonymous, timeout=30)
    assert refused.value.code == 401


def alert_override(stack: Stack) -> Path:
    """The committed rules and Alertmanager config with only the waiting shortened.

    The rule's `for` (5m) and group_wait (30s) would make the check take six minutes. Everything
    else, the expression, labels, routes and receiver URLs, is the committed files' own; the stack
    was first checked as docs/deployment.md brings it up.
    """
    rules_dir = stack.workdir / "ci-rules"
    rules_dir.mkdir()
    for path in (stack.workdir / "rules").glob("*.yml"):
        data = yaml.safe_load(path.read_text())
        for group in data["groups"]:
            group["interval"] = SHORT_INTERVAL
            for rule in group["rules"]:
                if rule.get("alert") == "ModelStorageExporterDown":
                    rule["for"] = SHORT_FOR
        (rules_dir / path.name).write_text(yaml.safe_dump(data, sort_keys=False))
    prometheus = yaml.safe_load((stack.workdir / "deploy/prometheus/prometheus.yml").read_text())
    prometheus["global"] = {"scrape_interval": SHORT_INTERVAL, "evaluation_interval": SHORT_INTERVAL}
    (stack.workdir / "ci-prometheus.yml").write_text(yaml.safe_dump(prometheus, sort_keys=False))
    alertmanager = yaml.safe_load((stack.workdir / "deploy/alertmanager/alertmanager.yml").read_text())
    for route in [alertmanager["route"], *alertmanager["route"]["routes"]]:
        if "group_wait" in route or route is alertmanager["route"]:
            route["group_wait"] = "1s"
    (stack.workdir / "ci-alertmanager.yml").write_text(yaml.safe_dump(alertmanager, sort_keys=False))
    override = stack.workdir / "ci-override.yml"
    override.write_text(
        yaml.safe_dump(
            {
                "services": {
                    "prometheus": {
                        "volumes": [
                            "./ci-prometheus.yml:/etc/prometheus/prometheus.yml:ro",
                            "./ci-rules:/etc/prometheus/rules:ro",
                        ]
                    },
                    "alertmanager": {"volumes": ["./ci-alertmanager.yml:/etc/alertmanager/alertmanager.yml:ro"]},
                }
            }
        )
    )
    return override


def delivered(stack: Stack, alertname: str) -> list[dict[str, Any]]:
    out = stack.compose("logs", "--no-color", "--no-log-prefix", "alert-webhook").stdout
    # Compose prefixes lines with an erase-line escape even without a TTY: a record starts at its "{".
    lines = [json.loads(line[line.index("{") :]) for line in out.splitlines() if "{" in line]
    return [
        line
        for line in lines
        if line.get("event") == "alert_webhook.received"
        and any(a["alertname"] == alertname and a["status"] == "firing" for a in line["alerts"])
    ]


def test_stopping_the_exporter_delivers_exporter_down_to_the_webhook(healthy: Stack) -> None:
    override = alert_override(healthy)
    files = ["-f", "docker-compose.yml", "-f", str(override)]
    # Volumes of the override are merged by container path: only the three files above change.
    up = healthy.compose(*files, "up", "-d", "prometheus", "alertmanager", timeout=180)
    assert up.returncode == 0, up.stderr
    wait_until(
        lambda: prom_query('up{job="model-storage"} == 1'), timeout=60, interval=1, what="scraping again after reload"
    )
    assert delivered(healthy, "ModelStorageExporterDown") == []
    # `docker stop` on the container, as if the exporter died: `compose stop exporter` would also
    # stop the services that depend on it (Prometheus, the webhook).
    exporter_id = healthy.container("exporter")["Id"]
    stop = subprocess.run(["docker", "stop", exporter_id], env=healthy.env, capture_output=True, text=True, check=False)
    assert stop.returncode == 0, stop.stderr
    stopped = time.monotonic()
    # for (10 s) + group_wait (1 s) + a scrape, an evaluation and a send (2 s each), with slack for a busy machine.
    try:
        (notification, *_) = wait_until(
            lambda: delivered(healthy, "ModelStorageExporterDown"),
            timeout=60,
            interval=1,
            what="ModelStorageExporterDown at the alert webhook",
        )
    except AssertionError as err:
        state = {
            "prometheus_alerts": get_json("http://127.0.0.1:9090/api/v1/alerts")["data"]["alerts"],
            "alertmanager_alerts": get_json("http://127.0.0.1:9093/api/v2/alerts"),
            "webhook_log": healthy.compose("logs", "--no-color", "alert-webhook").stdout[-2000:],
            "alertmanager_log": healthy.compose("logs", "--no-color", "alertmanager").stdout[-2000:],
        }
        raise AssertionError(f"{err}\n{json.dumps(state, indent=1)[:8000]}") from None
    healthy.timings["alert_delivered_after_stop_seconds"] = time.monotonic() - stopped
    assert notification["receiver_path"] == "/model-storage/team", "severity warning goes to the team receiver"
    (alert,) = [a for a in notification["alerts"] if a["alertname"] == "ModelStorageExporterDown"]
    assert alert["labels"]["job"] == "model-storage" and alert["labels"]["severity"] == "warning"


def test_compose_down_leaves_nothing_running(healthy: Stack) -> None:
    down = healthy.compose(command_in_readme("docker compose down").split()[2], timeout=180)
    assert down.returncode == 0, down.stderr
    assert project_containers(healthy.env, "model-storage") == []
    networks = subprocess.run(
        ["docker", "network", "ls", "-q", "--filter", "label=com.docker.compose.project=model-storage"],
        env=healthy.env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert networks.strip() == ""
    for port in PUBLISHED.values():
        assert port_free(port)
