"""Deployment files checked without a Docker engine: compose schema and mounts, promtool, amtool, systemd."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from shared.config import load_settings
from shared.settings_table import FIELDS
from tests.support import ROOT, VENV_BIN, free_port, have, start_exporter
from tools.localstack import RULES_DIR, loopback_prometheus_config

COMPOSE = ROOT / "docker-compose.yml"
SCHEMA = ROOT / "tests" / "data" / "compose-spec.schema.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
ALERTMANAGER = ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
DOCKERFILE = ROOT / "Dockerfile"
SYSTEMD = ROOT / "deploy" / "systemd"
UNITS = ("model-storage-exporter.service", "model-storage-cleaner.service", "model-storage-cleaner.timer")
# Created by whoever deploys (see docs/deployment.md), never committed.
DEPLOY_TIME_DIRS = ("storage", "secrets")
# Variables the compose file reads for itself (host paths, uid), besides the settings' own.
COMPOSE_VARS = {"STORAGE_UID", "STORAGE_GID", "PROMETHEUS_RETENTION", "STORAGE_BUILD_CA"}
CONFIG_ENV = {f.env for f in FIELDS} | {f"{f.env}_FILE" for f in FIELDS if f.secret}


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return data


_VAR = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>(?:[^{}]|\{[^{}]*\})*))?\}")


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's `${VAR:-default}`, nested defaults included, for the paths this file uses."""
    while True:
        replaced = _VAR.sub(lambda m: env.get(m["name"]) or (m["default"] or ""), text)
        if replaced == text:
            return replaced
        text = replaced


def volumes(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(host, container, mode) of each short-syntax bind mount, host paths interpolated with defaults."""
    mounts = []
    for volume in service.get("volumes", []):
        parts = interpolate(volume, {}).split(":")
        mode = parts[2] if len(parts) > 2 else "rw"
        mounts.append((parts[0], parts[1], mode))
    return mounts


def test_compose_file_is_valid_against_the_compose_specification() -> None:
    schema = json.loads(SCHEMA.read_text())
    jsonschema.Draft7Validator(schema).validate(compose())


def test_the_schema_check_rejects_a_broken_compose_file() -> None:
    schema = json.loads(SCHEMA.read_text())
    broken = compose()
    broken["services"]["exporter"]["healthcheck"] = {"retries": "many"}
    broken["services"]["exporter"]["restart_policy"] = "always"
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(broken))
    assert errors


def test_compose_file_passes_check_jsonschema_builtin_compose_schema() -> None:
    result = subprocess.run(
        [str(VENV_BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_has_the_stack_and_the_cleaner_as_a_one_shot() -> None:
    services = compose()["services"]
    assert set(services) == {"exporter", "prometheus", "alertmanager", "alert-webhook", "grafana", "cleaner"}
    cleaner = services["cleaner"]
    assert cleaner["entrypoint"] == ["model-storage-cleaner"]
    assert cleaner["profiles"], "`docker compose up` must not start the cleaner"
    assert cleaner["restart"] == "no"
    assert cleaner["environment"]["STORAGE_PROMETHEUS_URL"] == "http://prometheus:9090"
    assert services["exporter"]["environment"]["STORAGE_EXPORTER_LISTEN"] == "0.0.0.0:8470"
    assert services["exporter"]["build"]["context"] == "."
    assert "depends_on" not in cleaner, "`compose run cleaner` must not start or recreate the stack"
    assert (ROOT / "Dockerfile").is_file()


def test_every_path_compose_mounts_exists_in_the_repo() -> None:
    data = compose()
    checked = 0
    for name, service in data["services"].items():
        for host, _container, _mode in volumes(service):
            relative = Path(host).relative_to(".") if not Path(host).is_absolute() else Path(host)
            assert not relative.is_absolute(), f"{name}: absolute host path {host}"
            if relative.parts[0] in DEPLOY_TIME_DIRS:
                continue
            assert (ROOT / relative).exists(), f"{name} mounts {host}, which is not in the repo"
            checked += 1
    for name, secret in data["secrets"].items():
        if name == "build_ca":  # optional, outside the repo: empty unless STORAGE_BUILD_CA names a file
            assert secret["file"] == "${STORAGE_BUILD_CA:-/dev/null}"
            continue
        assert Path(secret["file"]).parts[0] in DEPLOY_TIME_DIRS
    assert checked >= 5


def test_storage_is_read_only_where_a_service_only_reads_it() -> None:
    services = compose()["services"]
    exporter = {container: mode for _host, container, mode in volumes(services["exporter"])}
    assert exporter["/storage/models"] == "ro"
    assert exporter["/storage"] == "rw", "the exporter writes plans and the audit log through the API"
    cleaner = {container: mode for _host, container, mode in volumes(services["cleaner"])}
    assert cleaner == {"/storage": "rw"}
    for service in ("prometheus", "alertmanager", "grafana"):
        for host, container, mode in volumes(services[service]):
            if not host.startswith("./storage"):
                assert mode == "ro", f"{service}: repo file {host} -> {container} must be read-only"


def test_compose_data_paths_follow_the_storage_settings() -> None:
    services = compose()["services"]
    prometheus = {container: host for host, container, _ in volumes(services["prometheus"])}
    assert prometheus["/prometheus"] == "./storage/metrics"
    assert prometheus["/etc/prometheus/rules"] == "./rules"
    raw = " ".join(services["prometheus"]["volumes"] + services["grafana"]["volumes"])
    assert "${STORAGE_METRICS_PATH:-" in raw and "${STORAGE_GRAFANA_PATH:-" in raw
    grafana = {container: host for host, container, _ in volumes(services["grafana"])}
    assert grafana["/var/lib/grafana"] == "./storage/grafana/data"
    assert grafana["/etc/grafana/provisioning"] == "./grafana/provisioning"
    assert "--storage.tsdb.path=/prometheus" in services["prometheus"]["command"]


def test_ports_are_published_on_loopback_only() -> None:
    published = 0
    for service in compose()["services"].values():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), port
            published += 1
    assert published == 4


def test_tokens_come_from_docker_secrets_and_never_from_the_compose_file() -> None:
    data = compose()
    for name, service in data["services"].items():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"TOKEN|PASSWORD|SECRET", key):
                assert key.endswith("_FILE") or key.endswith("__FILE"), f"{name}: {key} set inline"
                assert str(value).startswith("/run/secrets/"), f"{name}: {key}={value}"
                secret = str(value).removeprefix("/run/secrets/")
                assert secret in service["secrets"] and secret in data["secrets"]
    exporter_env = data["services"]["exporter"]["environment"]
    assert exporter_env["STORAGE_ADMIN_TOKEN_FILE"] == "/run/secrets/storage_admin_token"
    tracked = subprocess.run(["git", "ls-files", "secrets", ".env"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == "", f"secrets committed: {tracked.stdout}"


def test_compose_sets_only_known_settings() -> None:
    for name, service in compose()["services"].items():
        for key in service.get("environment") or {}:
            if key.startswith("STORAGE_"):
                assert key in CONFIG_ENV, f"{name}: {key} is not a setting in shared/settings_table.py"
    used = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    assert used <= CONFIG_ENV | COMPOSE_VARS, used - CONFIG_ENV - COMPOSE_VARS


def env_file(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip().strip('"')
    return values


@pytest.mark.parametrize("example", ["deploy/env.example", "deploy/systemd/model-storage.env.example"])
def test_env_examples_hold_known_keys_no_tokens_and_load(example: str, tmp_path: Path) -> None:
    text = (ROOT / example).read_text()
    values = env_file(ROOT / example)
    assert values, "an example with nothing set is no example"
    assert set(values) <= CONFIG_ENV | COMPOSE_VARS, set(values) - CONFIG_ENV - COMPOSE_VARS
    for key, value in values.items():
        if re.search(r"TOKEN|PASSWORD", key) and not key.endswith("_FILE"):
            assert value == "", f"{example}: {key} has a value"
    # Every setting named in the example, commented out or not, is a real one.
    mentioned = set(re.findall(r"^#?\s*(STORAGE_[A-Z_]+)=", text, flags=re.MULTILINE))
    assert mentioned <= CONFIG_ENV | COMPOSE_VARS, mentioned - CONFIG_ENV - COMPOSE_VARS
    settings_env = {k: v for k, v in values.items() if k in CONFIG_ENV and not k.endswith("_FILE")}
    load_settings(env=settings_env)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, check=False)


@pytest.mark.skipif(not have("promtool"), reason="promtool not installed (make system-deps)")
def test_prometheus_config_passes_promtool() -> None:
    result = promtool("check", "config", str(PROMETHEUS))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(not have("promtool"), reason="promtool not installed (make system-deps)")
def test_prometheus_config_with_the_repo_rules_passes_promtool(tmp_path: Path) -> None:
    """The same config with rules/ where the container mounts it: promtool also checks every rule file."""
    config = loopback_prometheus_config(
        yaml.safe_load(PROMETHEUS.read_text()),
        {"exporter": "127.0.0.1:8470", "prometheus": "127.0.0.1:9090", "alertmanager": "127.0.0.1:9093"},
        RULES_DIR,
    )
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = promtool("check", "config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    rule_files = sorted(RULES_DIR.glob("*.rules.yml")) + sorted(RULES_DIR.glob("*.alerts.yml"))
    assert rule_files, "no rule files in rules/"
    assert f"SUCCESS: {len(rule_files)} rule files found" in result.stdout
    for rule_file in rule_files:
        assert f"Checking {rule_file}\n  SUCCESS: " in result.stdout, result.stdout


def test_prometheus_scrapes_the_exporter_as_job_model_storage_and_alerts_alertmanager() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["model-storage"]["static_configs"] == [{"targets": ["exporter:8470"]}]
    managers = config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"]
    assert managers == ["alertmanager:9093"]
    assert all(pattern.startswith("/etc/prometheus/rules/") for pattern in config["rule_files"])


@pytest.mark.skipif(not have("amtool"), reason="amtool not installed (make system-deps)")
def test_alertmanager_config_passes_amtool() -> None:
    assert ALERTMANAGER.is_file(), f"{ALERTMANAGER} missing"
    result = subprocess.run(["amtool", "check-config", str(ALERTMANAGER)], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_receivers_are_reachable_from_its_container() -> None:
    """127.0.0.1 inside the Alertmanager container is the container itself: a receiver there never gets an alert."""
    config = yaml.safe_load(ALERTMANAGER.read_text())
    services = set(compose()["services"])
    urls = [hook["url"] for receiver in config["receivers"] for hook in receiver.get("webhook_configs", [])]
    assert len(urls) == 3
    for url in urls:
        host = urllib.parse.urlparse(url).hostname
        assert host in services, f"{url}: {host} is not a service of the compose stack"
        assert host == "alert-webhook"


def test_the_dockerfile_needs_no_frontend_from_a_registry() -> None:
    """A `# syntax=` line makes BuildKit pull a frontend image: the offline build fails on it."""
    assert not re.search(r"^#\s*syntax\s*=", DOCKERFILE.read_text(), flags=re.MULTILINE | re.IGNORECASE)


# Dockerfile


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            result.append((keyword.upper(), rest.strip()))
    return result


def test_dockerfile_builds_from_slim_python_and_runs_as_a_non_root_user() -> None:
    instructions = dockerfile_instructions()
    args = dict(rest.split("=", 1) for keyword, rest in instructions if keyword == "ARG" and "=" in rest)
    bases = [rest.split()[0] for keyword, rest in instructions if keyword == "FROM"]
    resolved = [args.get(base.strip("${}"), base) for base in bases]
    assert resolved and all(re.fullmatch(r"python:3\.\d+-slim(-\w+)?", base) for base in resolved), resolved
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root")


def test_dockerfile_copies_only_what_dockerignore_lets_through() -> None:
    allowed = {
        line[1:].removesuffix("/**") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"
    }
    for keyword, rest in dockerfile_instructions():
        if keyword == "COPY" and "--from=" not in rest:
            sources = rest.split()[:-1]
            for source in sources:
                assert source in allowed, f"COPY {source} is excluded by .dockerignore"
                if source != "README.md":  # the lead assembles it; setuptools needs it to build
                    assert (ROOT / source).exists(), source


def test_dockerfile_entrypoint_is_the_exporter_and_compose_uses_the_cleaner_script() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    entrypoint = json.loads(next(rest for keyword, rest in dockerfile_instructions() if keyword == "ENTRYPOINT"))
    assert entrypoint == ["model-storage-exporter"] and entrypoint[0] in scripts
    assert compose()["services"]["cleaner"]["entrypoint"][0] in scripts


def healthcheck_argv() -> list[str]:
    rest = next(rest for keyword, rest in dockerfile_instructions() if keyword == "HEALTHCHECK")
    argv: list[str] = json.loads(rest[rest.index("CMD") + 3 :].strip())
    assert argv[0] == "python"
    return argv


def test_dockerfile_healthcheck_asks_readyz_of_a_real_exporter(store: Path, logs_dir: Path) -> None:
    argv = healthcheck_argv()
    assert "/readyz" in argv[-1]
    exporter = start_exporter(store / "models", store, logs_dir)
    try:
        listen = exporter.url.removeprefix("http://")
        env = {"STORAGE_EXPORTER_LISTEN": f"0.0.0.0:{listen.rsplit(':', 1)[1]}"}
        healthy = subprocess.run([str(VENV_BIN / "python"), *argv[1:]], env=env, capture_output=True, check=False)
        assert healthy.returncode == 0, healthy.stderr
    finally:
        exporter.stop()
    env = {"STORAGE_EXPORTER_LISTEN": f"0.0.0.0:{free_port()}"}
    down = subprocess.run([str(VENV_BIN / "python"), *argv[1:]], env=env, capture_output=True, check=False)
    assert down.returncode != 0


# systemd


def unit(name: str) -> dict[str, list[str]]:
    """Key -> values of a unit file (keys may repeat), sections flattened."""
    values: dict[str, list[str]] = {}
    for line in (SYSTEMD / name).read_text().splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


def verifiable_units(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this venv's scripts: verify requires programs that exist."""
    target = tmp_path / "units"
    target.mkdir()
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        (target / name).write_text(text.replace("/opt/model-storage/.venv/bin/", f"{VENV_BIN}/"))
    return target


def analyze(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["systemd-analyze", *args], capture_output=True, text=True, check=False, cwd=cwd)


needs_systemd_analyze = pytest.mark.skipif(not have("systemd-analyze"), reason="systemd-analyze not installed")


@needs_systemd_analyze
def test_systemd_units_verify_with_no_output_at_all(tmp_path: Path) -> None:
    units = verifiable_units(tmp_path)
    result = analyze("verify", *(f"./{name}" for name in UNITS), cwd=units)
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


@needs_systemd_analyze
def test_systemd_verify_check_catches_a_misspelled_key(tmp_path: Path) -> None:
    units = verifiable_units(tmp_path)
    service = units / "model-storage-cleaner.service"
    service.write_text(service.read_text().replace("NoNewPrivileges=", "NoNewPrivilege="))
    result = analyze("verify", "./model-storage-cleaner.service", cwd=units)
    assert "NoNewPrivilege" in result.stdout + result.stderr


def exposure(name: str, units: Path) -> float:
    result = analyze("security", "--offline=true", f"./{name}", cwd=units)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout + result.stderr)
    assert match, result.stdout[-2000:] + result.stderr
    return float(match[1])


@needs_systemd_analyze
@pytest.mark.parametrize("name", ["model-storage-cleaner.service", "model-storage-exporter.service"])
def test_systemd_security_scores_the_services_as_well_hardened(name: str, tmp_path: Path) -> None:
    assert exposure(name, verifiable_units(tmp_path)) <= 2.0


def test_units_documentation_is_what_the_install_steps_copy() -> None:
    """`systemctl help` opens Documentation=: each file:// there is a file of this repository that
    the systemd install steps in docs/deployment.md copy under /opt/model-storage."""
    steps = (ROOT / "docs" / "deployment.md").read_text().split("### systemd", 1)[1].split("```", 2)[1]
    copies = [line for line in steps.splitlines() if "/opt/model-storage/" in line and line.startswith("sudo cp")]
    assert copies == ["sudo cp -r README.md docs /opt/model-storage/   # what the units' Documentation= points at"]
    copied = copies[0].split("#")[0].split()[2:-1]
    for name in UNITS:
        for url in (u for line in unit(name)["Documentation"] for u in line.split()):
            assert url.startswith("file:///opt/model-storage/"), (name, url)
            relative = url.removeprefix("file:///opt/model-storage/")
            assert (ROOT / relative).is_file(), (name, url)
            assert relative.split("/")[0] in copied, (name, url, copied)


def test_units_run_the_installed_scripts_as_a_dedicated_user() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, script in (
        ("model-storage-exporter.service", "model-storage-exporter"),
        ("model-storage-cleaner.service", "model-storage-cleaner"),
    ):
        values = unit(name)
        assert values["ExecStart"][0].split()[0] == f"/opt/model-storage/.venv/bin/{script}" and script in scripts
        assert values["User"] == ["model-storage"] and "DynamicUser" not in values
        assert values["NoNewPrivileges"] == ["yes"] and values["ProtectSystem"] == ["strict"]
        assert values["EnvironmentFile"] == ["/etc/model-storage/model-storage.env"]
    cleaner = unit("model-storage-cleaner.service")
    assert cleaner["Type"] == ["oneshot"]
    assert "--actor timer run" in cleaner["ExecStart"][0]


def test_units_keep_proc_whole_for_the_watch_limit_and_the_in_use_check() -> None:
    # ProcSubset=pid hides /proc/sys (no watch limit, so its alert could never fire) and
    # ProtectProc=invisible hides other users' processes from the cleaner's in-use check.
    for name in ("model-storage-exporter.service", "model-storage-cleaner.service"):
        values = unit(name)
        assert "ProcSubset" not in values, name
        assert values.get("ProtectProc", ["default"]) == ["default"], name


def test_units_may_write_only_the_storage_path_of_the_env_example() -> None:
    base = env_file(SYSTEMD / "model-storage.env.example")["STORAGE_BASE_PATH"]
    for name in ("model-storage-exporter.service", "model-storage-cleaner.service"):
        assert unit(name)["ReadWritePaths"] == [base], name


def test_cleaner_timer_catches_up_missed_runs_with_a_random_delay() -> None:
    timer = unit("model-storage-cleaner.timer")
    assert timer["Persistent"] == ["true"]
    assert timer["RandomizedDelaySec"] and timer["RandomizedDelaySec"][0] not in ("0", "")
    assert timer["Unit"] == ["model-storage-cleaner.service"]
    assert timer["OnCalendar"]


@needs_systemd_analyze
def test_timer_calendar_expression_is_valid() -> None:
    result = analyze("calendar", unit("model-storage-cleaner.timer")["OnCalendar"][0])
    assert result.returncode == 0, result.stderr


def test_verify_rewrite_touches_only_exec_start(tmp_path: Path) -> None:
    units = verifiable_units(tmp_path)
    for name in UNITS:
        original = (SYSTEMD / name).read_text().splitlines()
        rewritten = (units / name).read_text().splitlines()
        changed = [new for old, new in zip(original, rewritten, strict=True) if old != new]
        assert all(line.startswith("ExecStart=") for line in changed)
    assert shutil.which("model-storage-cleaner", path=str(VENV_BIN))
