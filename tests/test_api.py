"""The storage API: who may call what, bad input answered in JSON, the audit trail, TLS, /metrics under load."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from exporter.api.auth import ANONYMOUS, TokenBook, authorize
from exporter.api.cleanup_answers import BusyError, CleanerResult, Holder, interpret_run, parse_holder
from exporter.api.cleanup_runner import CleanupRunner
from exporter.api.documents import BadRequestError, info_document, parse_dry_run, parse_top
from exporter.api.openapi import OPENAPI
from exporter.index.fsinfo import FsUsage
from exporter.index.status import Snapshot
from exporter.index.tree import ModelStat
from shared.audit import verify_audit
from shared.cleanup_state import CleanupState
from shared.errors import LockHeldError, PreconditionError, error_line
from tests.support import (
    VENV_BIN,
    Proc,
    exporter_env,
    free_port,
    make_model,
    start_exporter,
    wait_until,
)

ADMIN = "admin-token-0123456789abcdef"
SECOND_ADMIN = "second-admin-token-abcdef0123"
READ = "read-token-0123456789abcdef"
WRONG = "wrong-token-0123456789abcdef"
ALL_TOKENS = (ADMIN, SECOND_ADMIN, READ, WRONG)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def audit_lines(base: Path) -> list[dict[str, Any]]:
    path = base / "audit.log"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"} and isinstance(body["error"]["message"], str), body
    if code is not None:
        assert body["error"]["code"] == code, body
    assert "Traceback" not in response.text
    return body


# ----- pure parts ---------------------------------------------------------------------------------


def test_tokens_are_matched_by_name_and_role() -> None:
    book = TokenBook({"ops": ADMIN, "ci": SECOND_ADMIN}, {"grafana": READ})
    assert book.identify(f"Bearer {ADMIN}").name == "ops"
    assert book.identify(f"bearer  {SECOND_ADMIN} ").role == "admin"
    assert book.identify(f"Bearer {READ}").role == "read"
    for header in (f"Bearer {WRONG}", f"Basic {ADMIN}", ADMIN, "Bearer", "Bearer ", f"Bearer {ADMIN}x", ""):
        caller = book.identify(header)
        assert caller.role is None and caller.presented and caller.name == ANONYMOUS, header
    assert not book.identify(None).presented


@pytest.mark.parametrize(
    ("admin", "read", "token", "need", "expected"),
    [
        # no tokens configured: reads are open, admin operations refused with how to enable them
        ({}, {}, None, "read", None),
        ({}, {}, None, "admin", 403),
        ({}, {}, WRONG, "admin", 403),
        ({}, {}, WRONG, "read", 401),
        # an admin token only: reads stay open, but a wrong token is still a wrong token
        ({"ops": ADMIN}, {}, None, "read", None),
        ({"ops": ADMIN}, {}, ADMIN, "read", None),
        ({"ops": ADMIN}, {}, None, "admin", 401),
        ({"ops": ADMIN}, {}, WRONG, "admin", 401),
        ({"ops": ADMIN}, {}, ADMIN, "admin", None),
        # both: reads need either token, admin operations the admin token
        ({"ops": ADMIN}, {"grafana": READ}, None, "read", 401),
        ({"ops": ADMIN}, {"grafana": READ}, WRONG, "read", 401),
        ({"ops": ADMIN}, {"grafana": READ}, READ, "read", None),
        ({"ops": ADMIN}, {"grafana": READ}, ADMIN, "read", None),
        ({"ops": ADMIN}, {"grafana": READ}, READ, "admin", 403),
        ({"ops": ADMIN}, {"grafana": READ}, ADMIN, "admin", None),
    ],
)
def test_authorize_decides_by_configuration_and_role(
    admin: dict[str, str], read: dict[str, str], token: str | None, need: str, expected: int | None
) -> None:
    book = TokenBook(admin, read)
    denial = authorize(book, book.identify(None if token is None else f"Bearer {token}"), need)  # type: ignore[arg-type]
    assert (denial.status if denial else None) == expected
    if denial is not None and denial.code == "admin_disabled":
        assert "STORAGE_ADMIN_TOKEN" in denial.message


@pytest.mark.parametrize("value", ["0", "1001", "-1", "abc", "", "1.5", " 5", "+5", "5_0", "99999999999"])
def test_top_out_of_range_or_not_a_number_is_rejected(value: str) -> None:
    with pytest.raises(BadRequestError):
        parse_top([("top", value)])


def test_query_parsing_accepts_bounds_and_refuses_unknown_or_repeated() -> None:
    assert parse_top([]) == 10
    assert parse_top([("top", "1")]) == 1 and parse_top([("top", "1000")]) == 1000
    assert parse_dry_run([]) is False
    assert parse_dry_run([("dry_run", "true")]) is True and parse_dry_run([("dry_run", "False")]) is False
    for params in ([("dry_run", "maybe")], [("dry_run", "1")], [("force", "true")], [("dry_run", "true")] * 2):
        with pytest.raises(BadRequestError):
            parse_dry_run(params)
    with pytest.raises(BadRequestError):
        parse_top([("top", "3"), ("limit", "2")])


def _snapshot(models: list[ModelStat]) -> Snapshot:
    return Snapshot(
        tiers={"raw": (300, 3, 2), "quantized": (0, 0, 0), "repository": (50, 1, 1), "other": (7, 1, 0)},
        models=models,
        ready=True,
        polling=False,
        events_total=12,
        overflows_total=1,
        errors_total={"scan": 2},
        scan_duration_seconds=0.25,
        last_full_scan=1_700_000_000.0,
        drift_bytes=9,
        watches=6,
        # A sparse model in raw: less allocated than apparent.
        allocated={"raw": 256, "quantized": 0, "repository": 0, "other": 0},
    )


def test_info_document_sums_tiers_and_lists_the_largest_models() -> None:
    models = [
        ModelStat("raw", "a", 100, 1, 10.0, 4096),
        ModelStat("raw", "b\udcff", 200, 2, 20.0),
        ModelStat("repository", "c", 50, 1, 0.0),
    ]
    state = CleanupState(timestamp=5.0, success=True, run_id="r", exit_code=0)
    doc = info_document(
        _snapshot(models), capacity_bytes=1000, filesystem=FsUsage(4000, 1000), cleanup=state, top=2, now=99.0
    )
    assert doc["total"] == {"bytes": 357, "files": 5, "models": 3, "allocated_bytes": 256}
    assert doc["tiers"]["raw"] == {"bytes": 300, "files": 3, "models": 2, "allocated_bytes": 256}
    # Capacity is what fills the disk: the ratio is of allocated bytes; the apparent one is beside it.
    assert doc["usage_ratio"] == pytest.approx(0.256)
    assert doc["apparent_usage_ratio"] == pytest.approx(0.357)
    assert doc["filesystem"] == {"size_bytes": 4000, "avail_bytes": 1000, "usage_ratio": 0.75}
    assert [(m["model"], m["bytes"], m["allocated_bytes"]) for m in doc["largest_models"]] == [
        ("b\\xff", 200, 0),
        ("a", 100, 4096),
    ]
    assert doc["scan"]["overflows_total"] == 1 and doc["scan"]["drift_bytes"] == 9
    assert doc["cleanup"]["run_id"] == "r"
    json.dumps(doc, allow_nan=False).encode("utf-8")  # what the response renderer does
    empty = info_document(_snapshot([]), capacity_bytes=1, filesystem=None, cleanup=None, top=10, now=1.0)
    assert empty["largest_models"] == [] and empty["filesystem"] is None and empty["cleanup"] is None


def test_openapi_document_is_valid_and_every_error_response_uses_the_error_schema() -> None:
    from jsonschema import Draft202012Validator

    Draft202012Validator.check_schema(OPENAPI["components"]["schemas"]["Info"])
    for path, methods in OPENAPI["paths"].items():
        for method, op in methods.items():
            for status, response in op["responses"].items():
                if int(status) >= 400 and path.startswith("/storage"):
                    schema = response["content"]["application/json"]["schema"]
                    assert schema == {"$ref": "#/components/schemas/Error"}, (method, path, status)
            if path.startswith("/storage/"):
                assert "401" in op["responses"] and "400" in op["responses"], (method, path)
            if method == "post":
                assert "403" in op["responses"]


LOCK_MESSAGE = (
    "model-storage-cleaner: another cleaner is running (pid 4242, lock /s/cleaner.lock); nothing was changed "
    "(wait for it to finish)"
)
# What `run --json` prints on stderr when the lock is held: the line for people, then the JSON error line.
LOCK_STDERR = LOCK_MESSAGE + "\n" + error_line(LockHeldError(4242, "/s/cleaner.lock")) + "\n"


@pytest.mark.parametrize(
    ("code", "stdout", "stderr", "status", "error_code"),
    [
        (0, '{"plan_id": "p"}', "", 200, None),
        (3, '{"run_id": "r", "failed": [1]}', "", 207, None),
        (0, "not json", "", 502, "bad_cleaner_output"),
        (4, "", '{"event": "log line"}\n' + LOCK_STDERR, 409, "cleanup_running"),
        # The English alone names no holder: only the structured line does.
        (4, "", LOCK_MESSAGE + "\n", 503, "precondition_failed"),
        (4, "", "model-storage-cleaner: prometheus http://p:9090: unreachable\n", 503, "precondition_failed"),
        (2, "", "model-storage-cleaner: config: cleaner.age_days=-1: expected a number > 0\n", 503, "cleaner_config"),
        (
            5,
            "",
            "model-storage-cleaner: write /s/state/journal: No space left on device [ENOSPC]\n",
            503,
            "filesystem_error",
        ),
        (1, "", "model-storage-cleaner: unexpected error: KeyError: 'x'\n", 502, "cleaner_failed"),
        (-9, "", "", 502, "cleaner_failed"),
    ],
)
def test_cleaner_exit_codes_map_to_statuses_never_500(
    code: int, stdout: str, stderr: str, status: int, error_code: str | None
) -> None:
    result = CleanerResult(("cleaner",), code, stdout, stderr, 1.5)
    answer = interpret_run(result, dry_run=False, actor="ops")
    assert answer.status == status
    if error_code is None:
        assert answer.body["report"] == json.loads(stdout) and answer.body["actor"] == "ops"
        assert answer.body["outcome"] == ("done" if code == 0 else "partial")
    else:
        assert answer.body["error"]["code"] == error_code and answer.result == "failure"
        assert "\n" not in answer.body["error"]["message"] and "{" not in answer.body["error"]["message"][:1]
    if status == 409:
        assert answer.body["error"]["holder"] == {
            "source": "cleaner_lock",
            "pid": 4242,
            "actor": None,
            "started_at": None,
            "dry_run": None,
        }


def test_cleaner_that_cannot_start_or_overruns_is_503_or_504() -> None:
    assert (
        interpret_run(CleanerResult(("x",), None, start_error="x: No such file"), dry_run=True, actor="a").status == 503
    )
    assert interpret_run(CleanerResult(("x",), None, timed_out=True), dry_run=True, actor="a").status == 504
    assert parse_holder(error_line(LockHeldError(None, "/x"))) == Holder("cleaner_lock", None)
    assert parse_holder(error_line(LockHeldError(77, "/x"))) == Holder("cleaner_lock", 77)
    assert parse_holder("another cleaner is running (pid 77, lock /x)") is None
    assert parse_holder(error_line(PreconditionError("prometheus http://p:9090: unreachable"))) is None


def test_runner_stops_a_cleaner_past_its_timeout_and_runs_one_at_a_time(tmp_path: Path) -> None:
    started = tmp_path / "started"
    runner = CleanupRunner(f"sh -c 'touch {started}; exec sleep 30' slow", timeout_seconds=1.0)
    outcome: list[CleanerResult] = []
    thread = threading.Thread(target=lambda: outcome.append(runner.run("ops", dry_run=True)))
    thread.start()
    try:
        wait_until(started.exists, timeout=10, what="the slow cleaner started")
        with pytest.raises(BusyError) as busy:
            runner.run("ci", dry_run=False)
        assert busy.value.holder.actor == "ops" and busy.value.holder.pid is not None
        pid = busy.value.holder.pid
    finally:
        thread.join(timeout=30)
    assert outcome[0].timed_out and outcome[0].seconds < 15
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()
    assert runner.holder() is None
    assert runner.run_argv("-odd", dry_run=True)[-4:] == ["--actor=-odd", "run", "--json", "--dry-run"]


# ----- a real exporter ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    """An exporter with two named admin tokens (one from a file) and a read token; Prometheus unreachable."""
    base = tmp_path_factory.mktemp("secured") / "storage"
    for tier in ("raw", "quantized", "repository"):
        (base / "models" / tier).mkdir(parents=True)
    make_model(base / "models", "raw", "llama", {"w.bin": b"x" * 3000, "cfg.json": b"{}"})
    make_model(base / "models", "repository", "bert", {"1/model.onnx": b"y" * 1000})
    secret = base.parent / "admin-token"
    secret.write_text(f"ops:{ADMIN},ci:{SECOND_ADMIN}\n")
    logs = base.parent / "logs"
    logs.mkdir()
    proc = start_exporter(
        base / "models",
        base,
        logs,
        STORAGE_ADMIN_TOKEN_FILE=str(secret),
        STORAGE_READ_TOKEN=READ,
        STORAGE_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}",
        STORAGE_PROMETHEUS_TIMEOUT_SECONDS="2",
    )
    yield proc, base
    assert proc.stop() == 0
    audit = base / "audit.log"
    text = proc.log() + (audit.read_text() if audit.exists() else "")  # no audit line when run alone
    for token in ALL_TOKENS:
        assert token not in text, "a token reached the log or the audit log"


@pytest.fixture(scope="module")
def open_exporter(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Proc, Path]]:
    """An exporter with no token configured at all."""
    base = tmp_path_factory.mktemp("open") / "storage"
    for tier in ("raw", "quantized", "repository"):
        (base / "models" / tier).mkdir(parents=True)
    logs = base.parent / "logs"
    logs.mkdir()
    proc = start_exporter(base / "models", base, logs, STORAGE_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}")
    yield proc, base
    assert proc.stop() == 0


ENDPOINTS = [
    ("GET", "/storage/info", "read"),
    ("GET", "/storage/cleanup/policies", "read"),
    ("POST", "/storage/collect", "admin"),
    ("POST", "/storage/cleanup?dry_run=true", "admin"),
]
OPEN_ENDPOINTS = ["/metrics", "/healthz", "/readyz", "/openapi.json", "/docs", "/"]


@pytest.mark.parametrize(("method", "path", "need"), ENDPOINTS)
@pytest.mark.parametrize("who", ["none", "wrong", "read", "admin", "second_admin"])
def test_every_endpoint_with_every_kind_of_token(
    secured: tuple[Proc, Path], method: str, path: str, need: str, who: str
) -> None:
    proc, base = secured
    token = {"none": None, "wrong": WRONG, "read": READ, "admin": ADMIN, "second_admin": SECOND_ADMIN}[who]
    before = len(audit_lines(base))
    response = httpx.request(method, proc.url + path, headers=bearer(token) if token else {}, timeout=60)
    if who in ("none", "wrong"):
        body = assert_error(response, 401, "unauthorized")
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "token" in body["error"]["message"]
        entry = audit_lines(base)[-1]
        assert entry["operation"] == "api.auth_failed" and entry["actor"] == "anonymous"
        assert entry["result"] == "failure" and entry["details"]["remote"] == "127.0.0.1"
        return
    if who == "read" and need == "admin":
        assert_error(response, 403, "forbidden")
        assert audit_lines(base)[-1]["operation"] == "api.denied"
        return
    if path.startswith("/storage/cleanup?"):
        # Authorised: the cleaner ran and could not reach Prometheus (exit code 4).
        body = assert_error(response, 503, "precondition_failed")
        assert "prometheus" in body["error"]["message"].lower()
    else:
        assert response.status_code == 200, response.text[:500]
    if need == "admin":
        actor = "ops" if who == "admin" else "ci"
        mine = [e for e in audit_lines(base)[before:] if e["operation"].startswith("api.")]
        assert [e["actor"] for e in mine] == [actor], mine
        assert mine[0]["operation"] == ("api.collect" if "collect" in path else "api.cleanup")


@pytest.mark.parametrize("path", OPEN_ENDPOINTS)
def test_metrics_health_and_docs_stay_open_with_a_read_token_configured(secured: tuple[Proc, Path], path: str) -> None:
    proc, _ = secured
    assert httpx.get(proc.url + path, timeout=10).status_code == 200


def test_info_reports_the_tree_and_top(secured: tuple[Proc, Path]) -> None:
    proc, base = secured
    info = httpx.get(proc.url + "/storage/info?top=1", headers=bearer(READ), timeout=10).json()
    allocated = sum(p.lstat().st_blocks * 512 for p in (base / "models" / "raw").rglob("*") if p.is_file())
    assert info["tiers"]["raw"] == {"bytes": 3002, "files": 2, "models": 1, "allocated_bytes": allocated}
    assert info["tiers"]["repository"]["bytes"] == 1000
    assert info["total"]["bytes"] == 4002 and info["total"]["models"] == 2
    assert [m["model"] for m in info["largest_models"]] == ["llama"]
    assert info["scan"]["ready"] is True and info["scan"]["last_full_scan"] > 0
    assert info["capacity_bytes"] == 100 * 10**9 and info["filesystem"]["size_bytes"] > 0


def test_collect_reports_and_corrects_drift(secured: tuple[Proc, Path]) -> None:
    proc, base = secured
    response = httpx.post(proc.url + "/storage/collect", headers=bearer(ADMIN), timeout=60)
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["files"] == 3 and result["seconds"] >= 0 and result["coalesced"] is False
    entry = [e for e in audit_lines(base) if e["operation"] == "api.collect"][-1]
    assert entry["actor"] == "ops" and entry["result"] == "success" and entry["details"]["files"] == 3


def test_policies_come_from_the_cleaner(secured: tuple[Proc, Path]) -> None:
    proc, _ = secured
    response = httpx.get(proc.url + "/storage/cleanup/policies", headers=bearer(READ), timeout=60)
    assert response.status_code == 200, response.text
    names = {p["name"] for p in response.json()["policies"]}
    assert names == {"age", "usage", "size"}


def test_no_admin_token_means_post_is_refused_with_how_to_enable(open_exporter: tuple[Proc, Path]) -> None:
    proc, base = open_exporter
    for path in ("/storage/collect", "/storage/cleanup", "/storage/cleanup?dry_run=true"):
        for headers in ({}, bearer(ADMIN)):
            body = assert_error(httpx.post(proc.url + path, headers=headers, timeout=10), 403, "admin_disabled")
            assert "STORAGE_ADMIN_TOKEN" in body["error"]["message"]
    assert httpx.get(proc.url + "/storage/info", timeout=10).status_code == 200
    assert_error(httpx.get(proc.url + "/storage/info", headers=bearer(WRONG), timeout=10), 401)
    assert not (base / "state" / "last-run.json").exists(), "the cleaner must not have run"
    operations = {e["operation"] for e in audit_lines(base)}
    assert operations == {"api.denied", "api.auth_failed"}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("POST", "/storage/cleanup?dry_run=maybe", 400, "bad_request"),
        ("POST", "/storage/cleanup?dry_run=", 400, "bad_request"),
        ("POST", "/storage/cleanup?dry_run=true&dry_run=false", 400, "bad_request"),
        ("POST", "/storage/cleanup?force=1", 400, "bad_request"),
        ("POST", "/storage/collect?full=1", 400, "bad_request"),
        ("GET", "/storage/info?top=0", 400, "bad_request"),
        ("GET", "/storage/info?top=1001", 400, "bad_request"),
        ("GET", "/storage/info?top=ten", 400, "bad_request"),
        ("GET", "/storage/info?tpo=3", 400, "bad_request"),
        ("GET", "/storage/cleanup/policies?x=1", 400, "bad_request"),
        ("GET", "/storage/nothing", 404, "not_found"),
        ("DELETE", "/storage/info", 405, "method_not_allowed"),
        ("GET", "/storage/cleanup", 405, "method_not_allowed"),
    ],
)
def test_bad_input_gets_a_json_4xx(secured: tuple[Proc, Path], method: str, path: str, status: int, code: str) -> None:
    proc, _ = secured
    response = httpx.request(method, proc.url + path, headers=bearer(ADMIN), timeout=30)
    assert_error(response, status, code)
    if status == 405:
        assert response.headers["allow"]


def test_oversized_bodies_get_413_whether_declared_or_streamed(secured: tuple[Proc, Path]) -> None:
    proc, base = secured
    big = b"{" + b" " * 4096 + b"}"
    for path in ("/storage/collect", "/storage/cleanup?dry_run=true"):
        response = httpx.post(proc.url + path, headers=bearer(ADMIN), content=big, timeout=30)
        assert_error(response, 413, "body_too_large")

    def chunks() -> Iterator[bytes]:
        for _ in range(10):
            yield b"x" * 512

    response = httpx.post(proc.url + "/storage/collect", headers=bearer(ADMIN), content=chunks(), timeout=30)
    assert_error(response, 413, "body_too_large")
    assert audit_lines(base)[-1]["details"]["status"] == 413
    # A small body is ignored: these endpoints take none.
    assert httpx.post(proc.url + "/storage/collect", headers=bearer(ADMIN), content=b"{}", timeout=60).is_success


def test_audit_chain_stays_valid_with_the_exporter_writing(secured: tuple[Proc, Path]) -> None:
    proc, base = secured
    httpx.post(proc.url + "/storage/collect", headers=bearer(WRONG), timeout=10)
    verdict = verify_audit(base / "audit.log")
    assert verdict.ok and verdict.lines >= 1, verdict


def test_docs_page_is_self_contained_and_lists_every_operation(secured: tuple[Proc, Path]) -> None:
    proc, _ = secured
    response = httpx.get(proc.url + "/docs", timeout=10)
    page = response.text
    # Interactive but self-contained: one inline script, nothing loaded from anywhere.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, re.DOTALL)
    assert len(scripts) == 1 and scripts[0][0] == ""
    assert " src=" not in page and "http://cdn" not in page and "https://" not in page
    # The CSP allows exactly that script (by hash) and connections to this origin only.
    csp = dict(part.strip().split(" ", 1) for part in response.headers["content-security-policy"].split(";"))
    digest = base64.b64encode(hashlib.sha256(scripts[0][1].encode()).digest()).decode()
    assert csp["script-src"] == f"'sha256-{digest}'"
    assert csp["default-src"] == "'none'" and csp["connect-src"] == "'self'"
    for path, methods in OPENAPI["paths"].items():
        for method in methods:
            assert f"{method.upper()} {path}" in page
            assert f"<form class='try' data-method='{method.upper()}' data-path='{path}'>" in page
            for parameter in methods[method].get("parameters", []):
                assert f"data-param='{parameter['name']}'" in page
    assert httpx.get(proc.url + "/openapi.json", timeout=10).json() == json.loads(json.dumps(OPENAPI))


def test_cleaner_missing_is_a_503_not_a_500(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(
        store / "models",
        store,
        logs_dir,
        STORAGE_ADMIN_TOKEN=ADMIN,
        STORAGE_CLEANER_COMMAND=str(store / "no-such-cleaner"),
    )
    try:
        response = httpx.post(proc.url + "/storage/cleanup?dry_run=true", headers=bearer(ADMIN), timeout=30)
        assert_error(response, 503, "cleaner_unavailable")
        response = httpx.get(proc.url + "/storage/cleanup/policies", timeout=30)
        assert_error(response, 503, "cleaner_unavailable")
        entry = audit_lines(store)[-1]
        assert entry["operation"] == "api.cleanup" and entry["actor"] == "admin" and entry["result"] == "failure"
        assert "no-such-cleaner" in entry["error"]
    finally:
        assert proc.stop() == 0


def test_tls_serves_the_api_over_https(store: Path, logs_dir: Path, tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    port = free_port()
    env = exporter_env(
        store / "models",
        store,
        STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}",
        STORAGE_TLS_CERT_FILE=str(cert),
        STORAGE_TLS_KEY_FILE=str(key),
        STORAGE_READ_TOKEN=READ,
    )
    log_path = logs_dir / "tls.log"
    with open(log_path, "wb") as log_file:
        popen = subprocess.Popen(
            [str(VENV_BIN / "model-storage-exporter")], env=env, stdout=log_file, stderr=subprocess.STDOUT
        )
    proc = Proc(popen, f"https://127.0.0.1:{port}", log_path)
    try:
        context = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=context, timeout=10) as client:

            def ready() -> bool:
                try:
                    return client.get(proc.url + "/readyz").status_code == 200
                except httpx.TransportError:
                    assert popen.poll() is None, proc.log()
                    return False

            wait_until(ready, timeout=30, what="TLS ready")
            assert client.get(proc.url + "/storage/info", headers=bearer(READ)).status_code == 200
            assert client.get(proc.url + "/storage/info").status_code == 401
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/storage/info", timeout=5)
    finally:
        assert proc.stop() == 0


def test_listens_on_loopback_unless_told_otherwise() -> None:
    from shared.config import load_settings

    assert load_settings(None, {}).exporter.listen == ("127.0.0.1", 8470)


def test_info_and_metrics_keep_answering_during_a_collect_and_an_event_burst(store: Path, logs_dir: Path) -> None:
    """A slow /storage/collect and a burst of file events must not stall /metrics or /storage/info."""
    models = store / "models"
    for m in range(40):
        make_model(models, "raw", f"m{m}", {f"d{d}/f{f}": b"" for d in range(10) for f in range(50)})
    proc = start_exporter(models, store, logs_dir, STORAGE_ADMIN_TOKEN=ADMIN, STORAGE_SCAN_WORKERS="1")
    stop = threading.Event()
    collects: list[float] = []

    def collect_loop() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                started = time.monotonic()
                assert client.post(proc.url + "/storage/collect", headers=bearer(ADMIN)).status_code == 200
                collects.append(time.monotonic() - started)

    def burst() -> None:
        for i in range(3000):
            (models / "quantized" / f"burst-{i % 30}").mkdir(exist_ok=True)
            (models / "quantized" / f"burst-{i % 30}" / f"{i}.bin").write_bytes(b"z" * 10)

    worker = threading.Thread(target=collect_loop)
    writer = threading.Thread(target=burst)
    worst = {"/metrics": 0.0, "/storage/info": 0.0}
    try:
        worker.start()
        writer.start()
        with httpx.Client(timeout=10) as client:
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline or writer.is_alive():
                for path in worst:
                    started = time.monotonic()
                    assert client.get(proc.url + path).status_code == 200
                    worst[path] = max(worst[path], time.monotonic() - started)
        writer.join()

        def settled() -> bool:
            info = httpx.get(proc.url + "/storage/info", timeout=10).json()
            return bool(info["tiers"]["quantized"]["files"] == 3000)

        wait_until(settled, timeout=20, what="the burst is counted")
    finally:
        stop.set()
        worker.join(timeout=120)
        proc.stop()
    assert collects, "no collect finished"
    # Each collect scans 20 000 files; a scrape must not wait for one.
    assert worst["/metrics"] < 1.0 and worst["/storage/info"] < 1.0, (worst, max(collects))


def test_refused_requests_are_audited_up_to_a_limit_per_address_and_counted_beyond(store: Path, logs_dir: Path) -> None:
    # A client hammering the API with bad tokens must not fill the disk the audit log shares with the models.
    proc = start_exporter(
        store / "models", store, logs_dir, STORAGE_ADMIN_TOKEN=ADMIN, STORAGE_AUDIT_REFUSALS_PER_MINUTE="3"
    )
    try:
        for _ in range(8):
            assert_error(httpx.post(proc.url + "/storage/collect", headers=bearer(WRONG), timeout=10), 401)
        assert httpx.post(proc.url + "/storage/collect", headers=bearer(ADMIN), timeout=60).status_code == 200
    finally:
        assert proc.stop() == 0
    operations = [e["operation"] for e in audit_lines(store)]
    assert operations.count("api.auth_failed") == 3
    assert operations[-1] == "api.collect"  # allowed calls are always audited
    assert proc.log().count("api.refusals_throttled") == 1
    assert WRONG not in proc.log() and ADMIN not in proc.log()
    assert verify_audit(store / "audit.log").ok
