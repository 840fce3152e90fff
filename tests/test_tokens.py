"""Tokens as generators make them: every recipe in the docs starts the exporter; no part of a token is ever echoed."""

from __future__ import annotations

import random
import re
import string
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support import ROOT, VENV_BIN, Proc, exporter_env, free_port, start_exporter

DEPLOYMENT_DOC = (ROOT / "docs" / "deployment.md").read_text()
API_DOC = (ROOT / "docs" / "api.md").read_text()
DOCS = "\n".join(path.read_text() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])
# What prints a token in the docs' recipes: stdin is never read, the output is the token.
GENERATOR = re.compile(
    r"head -c \d+ /dev/urandom \| base64(?: -w ?0)?|openssl rand -(?:hex|base64) \d+"
    r"|python3 -c 'import secrets; print\(secrets\.token_\w+\(\d+\)\)'"
)


def section(text: str, heading: str) -> str:
    return text.split(f"\n{heading}\n", 1)[1].split("\n#", 1)[0]


def recipes(text: str) -> list[str]:
    """Generator commands of the shell blocks of `text` that make a token (not Grafana's password)."""
    found = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.splitlines():
            match = GENERATOR.search(line)
            if match and "grafana" not in line:
                found.append(match.group(0))
    return found


def test_the_docs_have_token_recipes_in_each_place_it_deploys() -> None:
    assert recipes(section(DEPLOYMENT_DOC, "### docker compose")) == ["head -c 32 /dev/urandom | base64"]
    assert recipes(section(DEPLOYMENT_DOC, "### systemd")) == ["head -c 32 /dev/urandom | base64"]
    assert len(set(recipes(section(API_DOC, "### Tokens")))) == 3


@pytest.mark.parametrize("generator", sorted(set(recipes(DOCS))))
def test_every_documented_token_recipe_makes_a_token_the_exporter_takes(
    generator: str, store: Path, logs_dir: Path, tmp_path: Path
) -> None:
    made = subprocess.run(["bash", "-c", generator], capture_output=True, text=True, check=True, timeout=30)
    token = made.stdout.strip()
    secret = tmp_path / "admin-token"
    secret.write_text(made.stdout)  # as `> secrets/storage_admin_token` leaves it, newline and all
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN_FILE=str(secret))
    try:
        answer = httpx.post(proc.url + "/storage/collect", headers={"Authorization": f"Bearer {token}"}, timeout=60)
        assert answer.status_code == 200, answer.text
        wrong = httpx.post(proc.url + "/storage/collect", headers={"Authorization": "Bearer x" * 20}, timeout=60)
        assert wrong.status_code == 401
    finally:
        assert proc.stop() == 0
    audit = (store / "audit.log").read_text()
    assert '"actor":"admin"' in audit.replace(" ", "")
    assert token not in proc.log() + audit


# ----- no part of a secret in any output -----------------------------------------------------------

_RNG = random.Random(14)  # fixed: the shapes, and so this test, are the same on every run
_ALPHABET = string.ascii_letters + string.digits + "+/"


def _token(length: int = 32) -> str:
    return "".join(_RNG.choice(_ALPHABET) for _ in range(length))


T1, T2, SHORT = _token(), _token() + "==", _token(10)
# Malformed values of STORAGE_ADMIN_TOKEN / _FILE, names kept under 4 characters.
TEXT_SHAPES = {
    "old name=token form": f"q7={T1}",
    "base64 with an inner =": f"{T1}={T2}",
    "too short": SHORT,
    "named, too short": f"q7:{SHORT}",
    "whitespace inside": f"{T1} {T2}",
    "wrapped base64": f"{T1}\n{T2}",
    "bad name": f"b!d:{T1}",
    "token as name": f"{T1}/:{T2}",  # a name may not hold "/"
    "two colons": f"q7:{T1}:{T2}",
    "empty item": f"{T1},,{T2}",
    "name twice": f"q7:{T1},q7:{T2}",
}
YAML_SHAPES: dict[str, Any] = {
    "old form in a string": {"api": {"admin_tokens": f"q7={T1}"}},
    "token as a number": {"api": {"admin_tokens": {"q7": int("9" + "1234567890" * 3)}}},
    "token as the name": {"api": {"admin_tokens": {T1 + "/": T2}}},
    "short in a mapping": {"api": {"read_tokens": {"q7": SHORT}}},
    "a list": {"api": {"admin_tokens": [T1, T2]}},
    "nested": {"api": {"admin_tokens": {"q7": {"x": T1}}}},
    "bearer token as a list": {"cleaner": {"prometheus": {"bearer_token": [T1]}}},
    "password as a number": {"cleaner": {"prometheus": {"password": int("7" + "9876543210" * 3)}}},
}


def secret_parts(value: Any) -> list[str]:
    """Every string (or number) inside a shape that is, or holds, a secret."""
    if isinstance(value, dict):
        return [part for k, v in value.items() for part in secret_parts(k) + secret_parts(v)]
    if isinstance(value, list):
        return [part for item in value for part in secret_parts(item)]
    return [str(value)]


def assert_no_part_of(secrets: list[str], *outputs: str) -> None:
    """No substring of 4 or more characters of any secret appears in any output."""
    text = "\n".join(outputs)
    for secret in secrets:
        for start in range(len(secret) - 3):
            piece = secret[start : start + 4]
            assert piece not in text, f"{piece!r} of a secret is in the output"


def run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / argv[0]), *argv[1:]], env=env, capture_output=True, text=True, timeout=60)


def assert_refused_quietly(result: subprocess.CompletedProcess[str], secrets: list[str], base: Path) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-500:])
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    audit = base / "audit.log"
    assert_no_part_of(secrets, result.stdout, result.stderr, audit.read_text() if audit.exists() else "")


@pytest.mark.parametrize("how", ["env", "file"])
@pytest.mark.parametrize("shape", TEXT_SHAPES.values(), ids=TEXT_SHAPES.keys())
def test_a_malformed_token_is_refused_without_any_part_of_it(shape: str, how: str, store: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_text(shape + "\n")
    variable = {"env": {"STORAGE_ADMIN_TOKEN": shape}, "file": {"STORAGE_ADMIN_TOKEN_FILE": str(secret_file)}}[how]
    env = exporter_env(store / "models", store, STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{free_port()}", **variable)
    for argv in (["model-storage-exporter"], ["model-storage-cleaner", "policies"]):
        result = run(argv, env)
        assert "STORAGE_ADMIN_TOKEN" in result.stderr, result.stderr
        assert_refused_quietly(result, [shape], store)


@pytest.mark.parametrize("shape", YAML_SHAPES.values(), ids=YAML_SHAPES.keys())
def test_a_malformed_secret_in_yaml_is_refused_without_any_part_of_it(
    shape: dict[str, Any], store: Path, tmp_path: Path
) -> None:
    config = tmp_path / "config.yml"
    config.write_text(yaml.safe_dump(shape))
    env = exporter_env(
        store / "models", store, STORAGE_CONFIG=str(config), STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{free_port()}"
    )
    secret = next(iter(next(iter(shape.values())).values()))  # the one value set: {section: {key: value}}
    assert isinstance(secret, str | int | list | dict)
    if "prometheus" in shape.get("cleaner", {}):
        secret = next(iter(shape["cleaner"]["prometheus"].values()))
    assert_refused_quietly(run(["model-storage-exporter"], env), secret_parts(secret), store)


def test_a_token_file_that_is_not_text_is_refused_in_one_line(store: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "token"
    secret_file.write_bytes(b"\xff\xfe" + T1.encode())
    env = exporter_env(store / "models", store, STORAGE_ADMIN_TOKEN_FILE=str(secret_file))
    result = run(["model-storage-exporter"], env)
    assert "not UTF-8 text" in result.stderr
    assert_refused_quietly(result, [T1], store)


@pytest.fixture
def running(store: Path, logs_dir: Path) -> Iterator[Proc]:
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN=f"ops:{_token()}")
    yield proc
    proc.stop()


def test_tokens_sent_to_the_api_never_come_back(running: Proc, store: Path) -> None:
    sent = [shape for shape in TEXT_SHAPES.values() if "\n" not in shape]
    responses = []
    with httpx.Client(base_url=running.url, timeout=30) as client:
        for value in sent:
            for authorization in (f"Bearer {value}", value, f"Basic {value}", f"Bearer  {value}"):
                headers = {"Authorization": authorization}
                for method, path in (("POST", "/storage/collect"), ("GET", "/storage/info"), ("GET", "/metrics/")):
                    responses.append(client.request(method, path, headers=headers))
            responses.append(client.get(f"/storage/info?token={value}"))
            responses.append(client.get(f"/storage/{value.replace('/', '_')}"))
    assert all(r.status_code < 500 for r in responses), [r.status_code for r in responses]
    assert {r.status_code for r in responses} >= {400, 401, 404}
    assert running.stop() == 0
    shown = [r.text + repr(sorted(r.headers.items())) for r in responses]
    audit = store / "audit.log"
    assert_no_part_of(sent, *shown, running.log(), audit.read_text() if audit.exists() else "")
