"""Cleanup through the API: the real exporter runs the real cleaner against a real Prometheus.

A dry run changes nothing; a real run moves exactly what the plan said, to trash; a second call while
one runs gets 409 naming the holder (this API's run, or another cleaner holding the lock); the
audit log holds every call, the API's lines and the cleaner's, with the token's name as actor.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from cleaner.lock import CleanerLock, lock_path
from shared.audit import verify_audit
from tests.support import (
    VENV_BIN,
    Proc,
    exporter_env,
    free_port,
    make_model,
    prom_query,
    start_process,
    start_prometheus,
    wait_until,
    write_prometheus_config,
)

ADMIN = "cleanup-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {ADMIN}"}

# The size policy alone, no grace: 14 000 bytes against a 10 000 byte limit, raw and quantized evicted
# down to 5 000 bytes; the blast-radius cap (0.9) is above the 11 000 bytes that takes.
POLICY_ENV = {
    "STORAGE_CLEANUP_POLICIES": "size",
    "STORAGE_CLEANUP_MAX_SIZE_GB": "0.00001",
    "STORAGE_CLEANUP_LOW_WATERMARK": "0.5",
    "STORAGE_CLEANUP_SIZE_TIERS": "raw,quantized",
    "STORAGE_USAGE_TIERS": "",  # no model server reports usage here
    "STORAGE_CLEANUP_GRACE_HOURS": "0",
    "STORAGE_CLEANUP_MAX_EVICT_FRACTION": "0.9",
}
MODELS = {
    ("raw", "big-a"): 6000,
    ("raw", "big-b"): 5000,
    ("quantized", "small"): 1000,
    ("repository", "served"): 2000,
}


@dataclass
class Stack:
    exporter: Proc
    prometheus: Proc
    base: Path


@contextlib.contextmanager
def api_stack(base: Path, logs: Path, admin_token: str = f"ops:{ADMIN}", **env: str) -> Iterator[Stack]:
    """Prometheus scraping an exporter that can run the cleaner against it; yields once scraped."""
    port = free_port()
    config = write_prometheus_config(logs / "prometheus.yml", {"model-storage": [f"127.0.0.1:{port}"]})
    data = logs / "tsdb"
    data.mkdir()
    prometheus = start_prometheus(config, data, logs)
    try:
        exporter_vars = exporter_env(
            base / "models",
            base,
            STORAGE_EXPORTER_LISTEN=f"127.0.0.1:{port}",
            STORAGE_PROMETHEUS_URL=prometheus.url,
            STORAGE_ADMIN_TOKEN=admin_token,
            **env,
        )
        exporter = start_process(
            [str(VENV_BIN / "model-storage-exporter")],
            logs / f"exporter-{port}.log",
            f"http://127.0.0.1:{port}",
            "/readyz",
            env=exporter_vars,
        )
        try:
            wait_until(
                lambda: prom_query(prometheus.url, "model_storage_ready == 1"),
                timeout=30,
                what="Prometheus has scraped the ready exporter",
            )
            yield Stack(exporter, prometheus, base)
        finally:
            assert exporter.stop() == 0
            secret = admin_token.rpartition("=")[2]
            assert secret not in exporter.log()
    finally:
        prometheus.stop()


def build_store(store: Path) -> None:
    for (tier, model), size in MODELS.items():
        make_model(store / "models", tier, model, {"weights.bin": b"w" * (size - 100), "config.json": b"c" * 100})


def tree_state(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root: relative path -> (size, mtime_ns)."""
    state = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            st = path.stat()
            state[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return state


def audit(base: Path) -> list[dict[str, Any]]:
    import json

    return [json.loads(line) for line in (base / "audit.log").read_text().splitlines()]


def keys(items: list[dict[str, Any]]) -> set[tuple[str, str]]:
    return {(item["tier"], item["model"]) for item in items}


def wait_scraped(stack: Stack) -> None:
    def all_models() -> bool:
        return len(prom_query(stack.prometheus.url, "model_storage_model_bytes")) == len(MODELS)

    wait_until(all_models, timeout=20, what="Prometheus sees every model")


def test_dry_run_changes_nothing_and_a_real_run_moves_exactly_the_plan(store: Path, logs_dir: Path) -> None:
    build_store(store)
    with api_stack(store, logs_dir, **POLICY_ENV) as stack:
        wait_scraped(stack)
        url = stack.exporter.url
        before = tree_state(store / "models")

        response = httpx.post(url + "/storage/cleanup?dry_run=true", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        dry = response.json()
        assert dry["outcome"] == "dry_run" and dry["actor"] == "ops" and dry["exit_code"] == 0
        planned = keys(dry["report"]["evictions"])
        assert planned == {("raw", "big-a"), ("raw", "big-b")}, dry["report"]["evictions"]
        assert tree_state(store / "models") == before, "a dry run changed the store"
        assert not (store / "trash").exists() or not any((store / "trash").iterdir())

        response = httpx.post(url + "/storage/cleanup", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        run = response.json()
        report = run["report"]
        assert run["outcome"] == "done" and run["dry_run"] is False
        assert keys(report["plan"]["evictions"]) == planned
        assert keys(report["done"]) == planned and report["skipped"] == [] and report["failed"] == []
        assert report["freed_bytes"] == sum(MODELS[k] for k in planned)

        after = tree_state(store / "models")
        moved = {path: state for path, state in before.items() if path not in after}
        assert {tuple(p.split("/")[:2]) for p in moved} == planned
        assert {p: s for p, s in before.items() if tuple(p.split("/")[:2]) not in planned} == after
        trash = store / "trash" / report["run_id"]
        in_trash = {path: state for path, state in tree_state(trash).items() if not path.startswith(".")}
        assert in_trash == moved, "trash holds exactly the evicted files, unchanged (beside its own record)"

        def info_shows_run() -> bool:
            info = httpx.get(url + "/storage/info", timeout=10).json()
            last = info["cleanup"]
            return bool(last and last["run_id"] == report["run_id"] and info["total"]["bytes"] == 3000)

        wait_until(info_shows_run, timeout=10, what="/storage/info reports the run and the freed space")
        assert httpx.get(url + "/storage/info", timeout=10).json()["cleanup"]["success"] is True

    entries = audit(store)
    api = [e for e in entries if e["operation"] == "api.cleanup"]
    assert [(e["target"], e["result"], e["actor"]) for e in api] == [
        ("dry_run", "success", "ops"),
        ("run", "success", "ops"),
    ]
    assert api[1]["details"]["run_id"] == report["run_id"] and api[1]["bytes"] == report["freed_bytes"]
    cleaner_lines = [e for e in entries if not e["operation"].startswith("api.")]
    assert cleaner_lines and {e["actor"] for e in cleaner_lines} == {"ops"}, "the cleaner audits as the token's name"
    assert any(e["operation"] == "run" and e["target"] == report["run_id"] for e in cleaner_lines)
    assert verify_audit(store / "audit.log").ok


def test_a_second_call_while_one_runs_gets_409_with_the_holder(store: Path, logs_dir: Path) -> None:
    build_store(store)
    started, gate = store.parent / "cleaner-started", store.parent / "gate"
    cleaner = VENV_BIN / "model-storage-cleaner"
    # The first cleanup waits at a gate the test opens, so "while one runs" is a fact, not a race.
    gated = f"sh -c 'touch {started}; while [ ! -e {gate} ]; do sleep 0.02; done; exec {cleaner} \"$@\"' gated"
    with api_stack(store, logs_dir, STORAGE_CLEANER_COMMAND=gated, **POLICY_ENV) as stack:
        wait_scraped(stack)
        url = stack.exporter.url
        first: dict[str, httpx.Response] = {}

        def first_call() -> None:
            first["response"] = httpx.post(url + "/storage/cleanup?dry_run=true", headers=AUTH, timeout=120)

        thread = threading.Thread(target=first_call)
        thread.start()
        try:
            wait_until(started.exists, timeout=20, what="the first cleanup started")
            for query in ("?dry_run=true", "", "?dry_run=false"):
                second = httpx.post(url + "/storage/cleanup" + query, headers=AUTH, timeout=30)
                assert second.status_code == 409, second.text
                error = second.json()["error"]
                assert error["code"] == "cleanup_running"
                assert error["holder"]["source"] == "api" and error["holder"]["actor"] == "ops"
                assert isinstance(error["holder"]["pid"], int) and error["holder"]["dry_run"] is True
        finally:
            gate.touch()
            thread.join(timeout=120)
        assert first["response"].status_code == 200, first["response"].text

        # Another cleaner (the timer's) holds the lock: the API's run stops at it and says who.
        before = tree_state(store / "models")
        with CleanerLock(lock_path(store / "state")):
            held = httpx.post(url + "/storage/cleanup", headers=AUTH, timeout=120)
        assert held.status_code == 409, held.text
        holder = held.json()["error"]["holder"]
        assert holder == {
            "source": "cleaner_lock",
            "pid": os.getpid(),
            "actor": None,
            "started_at": None,
            "dry_run": None,
        }
        assert tree_state(store / "models") == before

    api = [e for e in audit(store) if e["operation"] == "api.cleanup"]
    assert [e["details"]["status"] for e in api] == [409, 409, 409, 200, 409]
    assert all(e["actor"] == "ops" for e in api)
    assert api[-1]["details"]["holder"]["pid"] == os.getpid() and api[-1]["result"] == "failure"


def test_prometheus_unreachable_is_a_503_with_the_cleaners_message(store: Path, logs_dir: Path) -> None:
    build_store(store)
    with api_stack(store, logs_dir, **POLICY_ENV) as stack:
        stack.prometheus.stop()
        before = tree_state(store / "models")
        response = httpx.post(stack.exporter.url + "/storage/cleanup", headers=AUTH, timeout=120)
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "precondition_failed" and error["exit_code"] == 4
        assert "prometheus" in error["message"] and "Traceback" not in response.text
        assert tree_state(store / "models") == before
    last = [e for e in audit(store) if e["operation"] == "api.cleanup"][-1]
    assert last["result"] == "failure" and "prometheus" in last["error"]


def test_a_fresh_install_without_usage_series_plans_and_runs_and_says_usage_is_blind(
    store: Path, logs_dir: Path
) -> None:
    """Issue 13 case 5: no model server reports usage (the compose stack); the dry run used to answer 503."""
    build_store(store)
    fresh = {k: v for k, v in POLICY_ENV.items() if k != "STORAGE_USAGE_TIERS"}  # the default: repository
    fresh["STORAGE_CLEANUP_POLICIES"] = "age,usage,size"
    fresh["STORAGE_CLEANUP_SIZE_TIERS"] = "raw,quantized,repository"
    with api_stack(store, logs_dir, **fresh) as stack:
        wait_scraped(stack)
        url = stack.exporter.url
        response = httpx.post(url + "/storage/cleanup?dry_run=true", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        report = response.json()["report"]
        assert report["evidence"]["usage_coverage"]["blind"] is True
        assert any(w.startswith("usage blind:") for w in report["warnings"]), report["warnings"]
        assert ("repository", "served") not in keys(report["evictions"])
        assert keys(report["evictions"]) == {("raw", "big-a"), ("raw", "big-b")}, report["evictions"]

        response = httpx.post(url + "/storage/cleanup", headers=AUTH, timeout=120)
        assert response.status_code == 200, response.text
        assert keys(response.json()["report"]["done"]) == {("raw", "big-a"), ("raw", "big-b")}
        assert (store / "models" / "repository" / "served").is_dir()

        def blind_served() -> bool:
            body = httpx.get(url + "/metrics", timeout=10).text
            return "\nmodel_storage_cleanup_usage_blind 1.0\n" in body

        wait_until(blind_served, timeout=10, what="the exporter serves model_storage_cleanup_usage_blind 1")
