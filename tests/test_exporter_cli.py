"""The exporter as users run it: a real process, its HTTP endpoints, its exit codes."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from tests.support import VENV_BIN, exporter_env, http_get, parse_metrics, start_exporter, wait_until

EXPORTER = str(VENV_BIN / "model-storage-exporter")


def test_a_single_write_shows_on_metrics_within_a_second(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(store / "models", store, logs_dir)
    try:
        (store / "models" / "repository" / "bert").mkdir()
        started = time.monotonic()
        (store / "models" / "repository" / "bert" / "w.bin").write_bytes(b"x" * 4321)

        def visible() -> bool:
            _, body = http_get(proc.url + "/metrics")
            samples = parse_metrics(body.decode())
            key = ("model_storage_model_bytes", frozenset({("tier", "repository"), ("model", "bert")}))
            return samples.get(key) == 4321

        wait_until(visible, timeout=1.0, interval=0.01, what="write visible on /metrics")
        assert time.monotonic() - started < 1.0
    finally:
        assert proc.stop() == 0


def test_live_scrape_passes_promtool_check_metrics(store: Path, logs_dir: Path) -> None:
    models = store / "models"
    (models / "raw" / 'we"ird\nname').mkdir()
    (models / "raw" / 'we"ird\nname' / "f").write_bytes(b"1" * 10)
    (models / "quantized" / "q.gguf").write_bytes(b"2" * 20)
    with open(models / "quantized" / "sparse.gguf", "wb") as handle:
        handle.truncate(1 << 30)  # 1 GiB long, nothing allocated
    proc = start_exporter(models, store, logs_dir)
    try:
        status, body = http_get(proc.url + "/metrics")
        assert status == 200
        check = subprocess.run(["promtool", "check", "metrics"], input=body, capture_output=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
        assert check.stdout.strip() == b"" and check.stderr.strip() == b"", check.stdout + check.stderr
        samples = parse_metrics(body.decode())
        assert samples[("model_storage_bytes", frozenset({("tier", "raw")}))] == 10
        assert samples[("model_storage_models", frozenset({("tier", "quantized")}))] == 2
        allocated = (models / "quantized" / "q.gguf").lstat().st_blocks * 512
        assert samples[("model_storage_allocated_bytes", frozenset({("tier", "quantized")}))] == allocated
        sparse = frozenset({("tier", "quantized"), ("model", "sparse.gguf")})
        assert samples[("model_storage_model_bytes", sparse)] == 1 << 30
        assert samples[("model_storage_model_allocated_bytes", sparse)] == 0
        assert samples[("model_storage_ready", frozenset())] == 1
    finally:
        proc.stop()


def test_landing_health_and_readiness(store: Path, logs_dir: Path) -> None:
    proc = start_exporter(store / "models", store, logs_dir)
    try:
        status, body = http_get(proc.url + "/")
        assert status == 200 and b"/metrics" in body
        assert http_get(proc.url + "/healthz")[0] == 200
        assert http_get(proc.url + "/readyz")[0] == 200
    finally:
        proc.stop()


def test_a_deleted_model_vanishes_from_metrics(store: Path, logs_dir: Path) -> None:
    model = store / "models" / "raw" / "doomed"
    model.mkdir()
    (model / "f").write_bytes(b"d" * 5)
    proc = start_exporter(store / "models", store, logs_dir)
    try:
        assert b'model="doomed"' in http_get(proc.url + "/metrics")[1]
        (model / "f").unlink()
        model.rmdir()
        wait_until(lambda: b'model="doomed"' not in http_get(proc.url + "/metrics")[1], timeout=2)
    finally:
        proc.stop()


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"STORAGE_MAX_SIZE_GB": "-1"}, "STORAGE_MAX_SIZE_GB"),
        ({"STORAGE_MAX_SIZE_GB": "lots"}, "STORAGE_MAX_SIZE_GB"),
        ({"STORAGE_EXPORTER_LISTEN": "nowhere"}, "STORAGE_EXPORTER_LISTEN"),
        ({"STORAGE_RAW_DIR": "a/b"}, "STORAGE_RAW_DIR"),
        ({"STORAGE_CONFIG": "/nonexistent/config.yml"}, "/nonexistent/config.yml"),
        ({"STORAGE_MODELS_PATH": "/nonexistent/models"}, "/nonexistent/models"),
    ],
)
def test_bad_configuration_exits_2_with_one_line(store: Path, env: dict[str, str], needle: str) -> None:
    full_env = exporter_env(store / "models", store, **env)
    result = subprocess.run([EXPORTER], env=full_env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert needle in lines[0]
    assert "Traceback" not in result.stderr


def test_bad_yaml_key_exits_2(store: Path, tmp_path: Path) -> None:
    config = tmp_path / "c.yml"
    config.write_text("storage:\n  modles:\n    path: x\n")
    result = subprocess.run(
        [EXPORTER, "--config", str(config)],
        env=exporter_env(store / "models", store),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "storage.modles.path" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_unknown_flag_exits_2(store: Path) -> None:
    result = subprocess.run(
        [EXPORTER, "--frobnicate"], env=exporter_env(store / "models", store), capture_output=True, text=True
    )
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
