"""The cleaner acting on real files: trash, verification against the filesystem, restore, purge, archive."""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleaner import apply, restore_purge, trash, verify
from cleaner.commands import run as run_command
from cleaner.commands import trash as trash_command
from cleaner.commands.views import store_paths
from cleaner.fileops import CopyMismatchError, tree_manifest
from cleaner.journal import Journal
from cleaner.lock import CleanerLock, lock_path
from cleaner.plan_store import load_plan, new_plan_id, save_plan
from cleaner.plan_values import Eviction, Kept, Plan
from shared.audit import AuditLog, verify_audit
from shared.cleanup_state import read_cleanup_state
from shared.config import Settings, load_settings
from shared.errors import ConfigError, LockHeldError, PreconditionError
from shared.logs import configure_logging
from tests.support import exporter_env, make_model, run_cleaner, wait_until

DAY = 86400.0
configure_logging("json", "info")  # as the CLI does: logs on stderr, so stdout is the report alone


def settings_for(store: Path, **env: str) -> Settings:
    return load_settings(env={"STORAGE_BASE_PATH": str(store), **env})


def plan_for(
    settings: Settings, models: list[tuple[str, str]], *, policy: str = "age", kept: tuple[Kept, ...] = ()
) -> str:
    """Save a plan evicting `models`, with the snapshot the exporter would have given at this moment."""
    now = time.time()
    evictions = []
    for tier, model in models:
        path = settings.models_path / tier / model
        snap = verify.snapshot(path) if os.path.lexists(path) else verify.Snapshot(0, 0, 0.0)
        evictions.append(
            Eviction(tier, model, snap.bytes, snap.files, snap.newest_change, 40 * DAY, None, policy, "test")
        )
    plan = Plan(new_plan_id(now), now, tuple(evictions), kept, total_bytes_before=sum(e.bytes for e in evictions))
    save_plan(plan, settings.state_path)
    return plan.plan_id


def run_args(plan_id: str | None = None, **extra: Any) -> argparse.Namespace:
    values = {"dry_run": False, "plan": plan_id, "json": True, "allow_large": False, "actor": "cli", **extra}
    return argparse.Namespace(**values)


def run(settings: Settings, plan_id: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    capsys.readouterr()
    code = run_command.cmd_run(settings, run_args(plan_id))
    return code, json.loads(capsys.readouterr().out)


def three_models(store: Path) -> dict[str, dict[str, Any]]:
    models = store / "models"
    make_model(models, "raw", "llama", {"config.json": b"{}", "weights/model.safetensors": os.urandom(40_000)})
    make_model(models, "quantized", "llama-q4", {"model.gguf": os.urandom(20_000)})
    make_model(models, "repository", "bert", {"1/model.onnx": os.urandom(10_000), "config.pbtxt": b"name: bert"})
    return {key: tree_manifest(models / key) for key in ("raw/llama", "quantized/llama-q4", "repository/bert")}


@pytest.fixture
def holder() -> Iterator[list[subprocess.Popen[str]]]:
    """Helper processes that hold a model somehow; stopped at the end."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.communicate(timeout=10)  # also closes the pipes: an unclosed one warns when collected


def hold(procs: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    """Start `code` in another Python process; returns once it printed `ready`."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code + "\nprint('ready', flush=True)\nimport sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    procs.append(proc)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


# ---- the main path ---------------------------------------------------------------------------


def test_run_moves_planned_models_to_trash_and_restore_brings_back_every_byte(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    before = three_models(store)
    make_model(store / "models", "raw", "not-planned", {"a": b"stays"})
    plan_id = plan_for(settings, [("raw", "llama"), ("quantized", "llama-q4"), ("repository", "bert")])

    code, report = run(settings, plan_id, capsys)

    assert code == 0
    run_id = report["run_id"]
    assert report["plan_id"] == plan_id and report["exit_code"] == 0
    assert [d["tier"] + "/" + d["model"] for d in report["done"]] == list(before)
    for key, manifest in before.items():
        assert not (store / "models" / key).exists()
        assert tree_manifest(store / "trash" / run_id / key) == manifest
    assert (store / "models/raw/not-planned/a").read_bytes() == b"stays"
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and state.success and state.run_id == run_id
    planned_bytes = sum(e["bytes"] for e in report["plan"]["evictions"])
    assert state.evicted_bytes_total == {"age": planned_bytes}
    assert state.evicted_models_total == {"age": 3}
    assert state.trash_bytes == planned_bytes
    assert not list((settings.state_path / "journal").iterdir())

    capsys.readouterr()
    assert (
        trash_command.cmd_restore(settings, argparse.Namespace(run_id=run_id, target=None, json=True, actor="cli")) == 0
    )
    assert json.loads(capsys.readouterr().out)["restored_bytes"] == planned_bytes
    for key, manifest in before.items():
        assert tree_manifest(store / "models" / key) == manifest
    assert not (store / "trash" / run_id).exists()
    assert read_cleanup_state(settings.cleanup_state_file).trash_bytes == 0  # type: ignore[union-attr]

    audit = verify_audit(settings.audit_log_path)
    assert audit.ok, audit
    operations = [json.loads(line)["operation"] for line in settings.audit_log_path.read_text().splitlines()]
    assert operations.count("move") == 3 and operations.count("restore") == 3 and "run" in operations


def test_counters_accumulate_across_runs_and_skips_are_per_run(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"x" * 100})
    make_model(store / "models", "raw", "b", {"w": b"y" * 50})
    kept = (
        Kept("raw", "c", 7, "protected: matches protect glob 'raw/c'", "age", "protected"),
        Kept("raw", "d", 1, "grace", None, "grace"),
    )
    code, _ = run(settings, plan_for(settings, [("raw", "a"), ("raw", "gone")], kept=kept), capsys)
    assert code == 0
    first = read_cleanup_state(settings.cleanup_state_file)
    assert first is not None and first.skipped == {"protected": 1, "missing": 1}
    code, _ = run(settings, plan_for(settings, [("raw", "b")], policy="size"), capsys)
    second = read_cleanup_state(settings.cleanup_state_file)
    assert second is not None
    assert second.evicted_bytes_total == {"age": 100, "size": 50}
    assert second.evicted_models_total == {"age": 1, "size": 1}
    assert second.skipped == {}
    assert second.trash_bytes == 150


# ---- verification against the filesystem -----------------------------------------------------


def test_model_written_after_the_plan_is_skipped_as_changed(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "raw", "growing", {"part-1": b"a" * 1000})
    plan_id = plan_for(settings, [("raw", "growing")])
    with open(model / "part-1", "ab") as handle:  # a writer appends once the plan is made
        handle.write(b"more")

    code, report = run(settings, plan_id, capsys)

    assert code == 0 and report["done"] == []
    assert [(s["model"], s["reason"]) for s in report["skipped"]] == [("growing", "changed_since_plan")]
    assert (model / "part-1").stat().st_size == 1004


def test_model_touched_without_size_change_is_skipped_as_changed(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "raw", "touched", {"w": b"a" * 10})
    plan_id = plan_for(settings, [("raw", "touched")])
    later = time.time() + 5
    os.utime(model / "w", (later, later))
    _, report = run(settings, plan_id, capsys)
    assert [s["reason"] for s in report["skipped"]] == ["changed_since_plan"]


def test_writer_appending_while_plan_is_made_keeps_its_model(
    store: Path, capsys: pytest.CaptureFixture[str], holder: list[subprocess.Popen[str]]
) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "raw", "downloading", {"blob": b"0" * 100})
    code = (
        "import threading, time\n"
        f"def write():\n"
        f"    while True:\n"
        f"        with open({str(model / 'blob')!r}, 'ab') as f: f.write(b'x')\n"
        f"        time.sleep(0.005)\n"
        "threading.Thread(target=write, daemon=True).start()"
    )
    hold(holder, code)
    plan_id = plan_for(settings, [("raw", "downloading")])
    planned = load_plan(plan_id, settings.state_path).evictions[0].bytes
    wait_until(lambda: (model / "blob").stat().st_size > planned, timeout=5, what="the writer appended")
    _, report = run(settings, plan_id, capsys)
    assert report["done"] == []
    assert report["skipped"][0]["reason"] in ("changed_since_plan", "in_use")
    assert model.exists()


def test_model_with_a_file_held_open_by_a_reader_is_skipped(
    store: Path, capsys: pytest.CaptureFixture[str], holder: list[subprocess.Popen[str]]
) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "repository", "served", {"1/model.onnx": b"m" * 4096})
    plan_id = plan_for(settings, [("repository", "served")])
    proc = hold(holder, f"f = open({str(model / '1/model.onnx')!r}, 'rb')")

    _, report = run(settings, plan_id, capsys)

    assert report["done"] == []
    skip = report["skipped"][0]
    assert skip["reason"] == "in_use" and f"pid {proc.pid}" in skip["detail"]
    assert (model / "1/model.onnx").exists()


def test_memory_mapped_safetensors_count_as_in_use_even_after_close(
    store: Path, capsys: pytest.CaptureFixture[str], holder: list[subprocess.Popen[str]]
) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "raw", "mapped", {"model.safetensors": b"s" * 8192})
    plan_id = plan_for(settings, [("raw", "mapped")])
    proc = hold(
        holder,
        # Python's mmap keeps a dup of the fd; map through libc so only the mapping remains, as with
        # safetensors' loaders that close the file after mapping it.
        "import ctypes, os\nlibc = ctypes.CDLL(None)\nlibc.mmap.restype = ctypes.c_void_p\n"
        "c = ctypes\nlibc.mmap.argtypes = [c.c_void_p, c.c_size_t, c.c_int, c.c_int, c.c_int, c.c_long]\n"
        f"fd = os.open({str(model / 'model.safetensors')!r}, os.O_RDONLY)\n"
        "assert libc.mmap(None, 8192, 1, 1, fd, 0) not in (None, ctypes.c_void_p(-1).value)\nos.close(fd)",
    )
    fds = [os.readlink(f"/proc/{proc.pid}/fd/{fd}") for fd in os.listdir(f"/proc/{proc.pid}/fd")]
    assert not any("mapped" in target for target in fds)  # only the mapping is left

    _, report = run(settings, plan_id, capsys)

    assert report["skipped"][0]["reason"] == "in_use"
    assert "memory-maps" in report["skipped"][0]["detail"]


def test_an_application_protects_a_model_by_holding_a_flock_on_its_directory(
    store: Path, capsys: pytest.CaptureFixture[str], holder: list[subprocess.Popen[str]]
) -> None:
    settings = settings_for(store)
    model = make_model(store / "models", "raw", "locked", {"w": b"1"})
    plan_id = plan_for(settings, [("raw", "locked")])
    hold(holder, f"import fcntl, os\nfd = os.open({str(model)!r}, os.O_RDONLY)\nfcntl.flock(fd, fcntl.LOCK_SH)")
    _, report = run(settings, plan_id, capsys)
    assert report["skipped"][0]["reason"] == "in_use"
    assert "flock" in report["skipped"][0]["detail"]


def test_posix_locks_on_model_files_are_read_from_proc_locks(store: Path, holder: list[subprocess.Popen[str]]) -> None:
    model = make_model(store / "models", "raw", "posix", {"w": b"1234"})
    proc = hold(holder, f"import fcntl\nf = open({str(model / 'w')!r}, 'r+b')\nfcntl.lockf(f, fcntl.LOCK_EX)")
    snap = verify.snapshot(model)
    locks = verify.parse_lock_inodes(Path("/proc/locks").read_text(), os.getpid())
    assert any(inode in snap.inodes and pid == proc.pid for inode, pid in locks.items())


def test_our_own_flock_and_open_files_do_not_count_as_use(store: Path) -> None:
    model = make_model(store / "models", "raw", "mine", {"w": b"1"})
    snap = verify.snapshot(model)
    with open(model / "w", "rb"):
        verdict = verify.verify_model(
            models_path=store / "models",
            layout=settings_for(store).layout,
            tier="raw",
            model="mine",
            planned_bytes=snap.bytes,
            planned_last_changed=snap.newest_change,
        )
    try:
        assert verdict.ok, verdict
        assert verdict.lock_fd is not None
    finally:
        verdict.release()


def test_symlinked_model_pointing_outside_is_skipped_and_its_target_untouched(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.bin").write_bytes(b"keep me")
    (store / "models/raw/evil").symlink_to(outside)
    plan_id = plan_for(settings, [("raw", "evil")])

    _, report = run(settings, plan_id, capsys)

    assert [s["reason"] for s in report["skipped"]] == ["outside_models_path"]
    assert (store / "models/raw/evil").is_symlink()
    assert (outside / "data.bin").read_bytes() == b"keep me"


def test_symlink_inside_a_model_is_moved_as_a_link_never_followed(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    outside = tmp_path / "shared-weights.bin"
    outside.write_bytes(b"w" * 100)
    model = make_model(store / "models", "raw", "linked", {"config.json": b"{}"})
    (model / "weights.bin").symlink_to(outside)
    before = tree_manifest(model)
    _, report = run(settings, plan_for(settings, [("raw", "linked")]), capsys)
    assert len(report["done"]) == 1
    assert outside.read_bytes() == b"w" * 100
    assert tree_manifest(store / "trash" / report["run_id"] / "raw/linked") == before


def test_tier_directory_symlinked_outside_is_refused(store: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    make_model(elsewhere, "x", "m", {"w": b"1"})
    (store / "models/raw").rmdir()
    (store / "models/raw").symlink_to(elsewhere / "x")
    verdict = verify.verify_model(
        models_path=store / "models",
        layout=settings_for(store).layout,
        tier="raw",
        model="m",
        planned_bytes=1,
        planned_last_changed=time.time() + 100,
    )
    assert not verdict.ok and verdict.reason == "outside_models_path"
    assert (elsewhere / "x/m/w").exists()


@pytest.mark.parametrize("name", ["..", "../../etc", "a/b", ".", ""])
def test_model_names_that_are_paths_are_refused(store: Path, name: str) -> None:
    verdict = verify.verify_model(
        models_path=store / "models",
        layout=settings_for(store).layout,
        tier="raw",
        model=name,
        planned_bytes=0,
        planned_last_changed=0,
    )
    assert not verdict.ok and verdict.reason == "outside_models_path"


def test_protect_globs_are_rechecked_when_a_saved_plan_is_applied(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make_model(store / "models", "raw", "golden", {"w": b"1"})
    plan_id = plan_for(settings_for(store), [("raw", "golden")])
    settings = settings_for(store, STORAGE_CLEANUP_PROTECT="gold*")
    _, report = run(settings, plan_id, capsys)
    assert [s["reason"] for s in report["skipped"]] == ["protected"]
    make_model(store / "models", "raw", "marked", {"w": b"1"})
    plan_id = plan_for(settings, [("raw", "marked")])
    (store / "models/raw/marked/.keep").touch()  # an application marks it after the plan was made
    _, report = run(settings, plan_id, capsys)
    assert [s["reason"] for s in report["skipped"]] == ["protected"]
    assert (store / "models/raw/golden/w").exists() and (store / "models/raw/marked/w").exists()


# ---- locks, errors -----------------------------------------------------------------------------


def test_a_second_cleaner_exits_4_naming_the_holder_and_changes_nothing(store: Path) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "m", {"w": b"1"})
    plan_id = plan_for(settings, [("raw", "m")])
    with CleanerLock(lock_path(settings.state_path)):
        done = run_cleaner(["run", "--plan", plan_id], exporter_env(store / "models", store))
    assert done.returncode == 4
    assert f"pid {os.getpid()}" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert (store / "models/raw/m/w").exists() and not (store / "trash").exists()
    assert not settings.cleanup_state_file.exists()


def test_a_held_lock_is_reported_as_a_structured_error_under_json_with_the_line_for_people_kept(store: Path) -> None:
    """The exporter reads the holder from this JSON line, never from the English one (which stays as it was)."""
    settings = settings_for(store)
    make_model(store / "models", "raw", "m", {"w": b"1"})
    plan_id = plan_for(settings, [("raw", "m")])
    lock = lock_path(settings.state_path)
    with CleanerLock(lock):
        done = run_cleaner(["run", "--json", "--plan", plan_id], exporter_env(store / "models", store))
    assert done.returncode == 4 and done.stdout == ""
    people, structured = done.stderr.strip().splitlines()
    assert people == (
        f"model-storage-cleaner: another cleaner is running (pid {os.getpid()}, lock {lock}); nothing was changed "
        "(wait for it to finish)"
    )
    assert json.loads(structured) == {
        "error": {
            "code": "lock_held",
            "exit_code": 4,
            "message": people.removeprefix("model-storage-cleaner: "),
            "holder_pid": os.getpid(),
            "lock_path": str(lock),
        }
    }
    assert (store / "models/raw/m/w").exists() and not (store / "trash").exists()


def test_a_lock_file_naming_no_pid_gives_a_holder_pid_of_null(store: Path) -> None:
    lock = lock_path(settings_for(store).state_path)
    with CleanerLock(lock):
        lock.write_text("")  # a holder killed between truncating and writing its pid
        with pytest.raises(LockHeldError) as raised:
            CleanerLock(lock).acquire()
    assert raised.value.details == {"holder_pid": None, "lock_path": str(lock)}
    assert "(pid unknown, lock " in raised.value.one_line()


def test_an_eviction_failing_on_an_error_exits_3_and_keeps_the_model(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocked = tmp_path / "trash-is-a-file"
    blocked.write_text("not a directory")
    settings = settings_for(store, STORAGE_TRASH_PATH=str(blocked))
    make_model(store / "models", "raw", "m", {"w": b"1"})
    code, report = run(settings, plan_for(settings, [("raw", "m")]), capsys)
    assert code == 3 and report["exit_code"] == 3
    assert report["failed"][0]["model"] == "m"
    assert (store / "models/raw/m/w").exists()
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and not state.success and state.exit_code == 3


def test_unknown_plan_id_is_a_usage_error(store: Path) -> None:
    with pytest.raises(ConfigError):
        run_command.cmd_run(settings_for(store), run_args("20260101T000000Z-abcdef"))


# ---- restore -----------------------------------------------------------------------------------


def test_restore_of_one_model_leaves_the_rest_in_trash(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    before = three_models(store)
    _, report = run(settings, plan_for(settings, [tuple(k.split("/")) for k in before]), capsys)  # type: ignore[misc]
    run_id = report["run_id"]
    args = argparse.Namespace(run_id=run_id, target="quantized/llama-q4", json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    assert tree_manifest(store / "models/quantized/llama-q4") == before["quantized/llama-q4"]
    assert not (store / "models/raw/llama").exists()
    assert {e.key for e in trash.list_entries(settings.trash_path)} == {"raw/llama", "repository/bert"}


def test_restore_refuses_when_the_original_path_is_occupied_and_changes_nothing(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    before = three_models(store)
    _, report = run(settings, plan_for(settings, [tuple(k.split("/")) for k in before]), capsys)  # type: ignore[misc]
    make_model(store / "models", "repository", "bert", {"new": b"a newer model"})
    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    with pytest.raises(PreconditionError, match="occupied"):
        trash_command.cmd_restore(settings, args)
    assert (store / "models/repository/bert/new").read_bytes() == b"a newer model"
    assert not (store / "models/raw/llama").exists()
    assert len(trash.list_entries(settings.trash_path)) == 3


def test_restore_of_unknown_run_or_bad_target_is_a_usage_error(store: Path) -> None:
    settings = settings_for(store)
    for run_id, target in (("nope", None), ("../x", None), ("r", "raw/../x")):
        with pytest.raises(ConfigError):
            trash_command.cmd_restore(
                settings, argparse.Namespace(run_id=run_id, target=target, json=False, actor="cli")
            )


# ---- trash: listing and purge ------------------------------------------------------------------


def entry(run_id: str, moved_at: float, size: int) -> trash.TrashEntry:
    return trash.TrashEntry(run_id, "raw", f"m-{run_id}", Path("/x"), size, 1, moved_at, "", "age")


def test_purge_selection_takes_expired_entries_then_oldest_beyond_the_cap() -> None:
    now = 100 * DAY
    old, mid, new = entry("a", now - 8 * DAY, 10), entry("b", now - 3 * DAY, 30), entry("c", now - DAY, 30)
    assert trash.select_for_purge([old, mid, new], now, 7, max_bytes=1000) == [old]
    assert trash.select_for_purge([old, mid, new], now, 7, max_bytes=30) == [old, mid]
    assert trash.select_for_purge([old, mid, new], now, 7, max_bytes=0) == [old, mid, new]
    assert trash.select_for_purge([mid, new], now, 7, max_bytes=1000, purge_all=True) == [mid, new]
    assert trash.select_for_purge([mid], now, 3, max_bytes=1000) == [mid]  # exactly at expiry


def test_purge_selection_never_takes_the_kept_run_but_counts_it_towards_the_cap() -> None:
    now = 100 * DAY
    expired, older, current = entry("a", now - 8 * DAY, 10), entry("b", now - DAY, 30), entry("c", now, 100)
    everything = [expired, older, current]
    assert trash.select_for_purge(everything, now, 7, max_bytes=50, keep_runs=frozenset({"c"})) == [expired, older]
    assert trash.select_for_purge(everything, now, 7, max_bytes=130, keep_runs=frozenset({"c"})) == [expired]
    assert trash.select_for_purge(everything, now, 7, 0, purge_all=True, keep_runs=frozenset({"c"})) == [
        expired,
        older,
    ]
    assert trash.over_cap_warning(everything, "c", 99) is not None
    assert trash.over_cap_warning(everything, "c", 100) is None


def test_a_run_evicting_more_than_the_trash_cap_keeps_all_it_evicted_restorable(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store, STORAGE_TRASH_MAX_GB=str(150 / 1e9))
    make_model(store / "models", "raw", "earlier", {"w": b"e" * 100})
    _, first = run(settings, plan_for(settings, [("raw", "earlier")]), capsys)
    before = {name: make_model(store / "models", "raw", name, {"w": name.encode() * 100}) for name in ("a", "b")}
    manifests = {name: tree_manifest(path) for name, path in before.items()}

    code, report = run(settings, plan_for(settings, [("raw", "a"), ("raw", "b")]), capsys)

    assert code == 0
    assert [(p["run_id"], p["model"]) for p in report["purged"]] == [(first["run_id"], "earlier")]
    assert [e.model for e in trash.list_entries(settings.trash_path)] == ["a", "b"]
    assert report["trash_bytes"] == 200
    (warning,) = report["warnings"]
    assert report["run_id"] in warning and "over its cap of 150 bytes" in warning
    records = [json.loads(line) for line in settings.audit_log_path.read_text().splitlines()]
    (skipped,) = [r for r in records if r["operation"] == "purge" and r["result"] == "skipped"]
    assert skipped["target"] == report["run_id"] and skipped["bytes"] == 200
    assert skipped["details"]["reason"] == "current_run_over_cap"
    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    for name, manifest in manifests.items():
        assert tree_manifest(store / "models/raw" / name) == manifest


def test_purge_respects_retention_on_real_trash(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"1" * 10})
    _, first = run(settings, plan_for(settings, [("raw", "a")]), capsys)
    make_model(store / "models", "raw", "b", {"w": b"2" * 10})
    _, second = run(settings, plan_for(settings, [("raw", "b")]), capsys)
    moved = trash.list_entries(settings.trash_path)[0].moved_at
    audit = AuditLog(settings.audit_log_path)

    journal = Journal(settings.state_path, "purge-test", command="purge")
    purged = restore_purge.purge_trash(
        store_paths(settings),
        settings.cleaner.trash,
        journal,
        audit,
        actor="cli",
        now=moved + 6.9 * DAY,
        purge_all=False,
    ).entries
    assert purged == []
    assert len(trash.list_entries(settings.trash_path)) == 2
    purged = restore_purge.purge_trash(
        store_paths(settings),
        settings.cleaner.trash,
        journal,
        audit,
        actor="cli",
        now=moved + 7.1 * DAY,
        purge_all=False,
    ).entries
    journal.close()
    assert sorted(e.model for e in purged) == ["a", "b"]
    assert not (store / "trash" / first["run_id"]).exists() and not (store / "trash" / second["run_id"]).exists()
    assert verify_audit(settings.audit_log_path).ok


def test_purge_command_keeps_fresh_entries_unless_all(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"1"})
    run(settings, plan_for(settings, [("raw", "a")]), capsys)
    assert trash_command.cmd_purge(settings, argparse.Namespace(all=False, json=False, actor="cli")) == 0
    assert len(trash.list_entries(settings.trash_path)) == 1
    assert trash_command.cmd_purge(settings, argparse.Namespace(all=True, json=False, actor="cli")) == 0
    assert trash.list_entries(settings.trash_path) == []


def test_trash_cap_purges_oldest_at_the_end_of_a_run(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store, STORAGE_TRASH_MAX_GB=str(150 / 1e9))
    make_model(store / "models", "raw", "old", {"w": b"o" * 100})
    run(settings, plan_for(settings, [("raw", "old")]), capsys)
    make_model(store / "models", "raw", "new", {"w": b"n" * 100})
    _, report = run(settings, plan_for(settings, [("raw", "new")]), capsys)
    assert [p["model"] for p in report["purged"]] == ["old"]
    assert [e.model for e in trash.list_entries(settings.trash_path)] == ["new"]


def test_trash_lists_run_size_age_and_purge_time(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"1" * 123})
    _, report = run(settings, plan_for(settings, [("raw", "a")]), capsys)
    assert trash_command.cmd_trash(settings, argparse.Namespace(json=True)) == 0
    listing = json.loads(capsys.readouterr().out)
    (row,) = listing["entries"]
    assert row["run_id"] == report["run_id"] and row["bytes"] == 123 and row["policy"] == "age"
    assert row["original_path"] == str(store / "models/raw/a")
    assert row["purge_at"] == pytest.approx(row["moved_at"] + 7 * DAY)
    assert 0 <= row["age_seconds"] < 60
    assert trash_command.cmd_trash(settings, argparse.Namespace(json=False)) == 0
    assert report["run_id"] in capsys.readouterr().out


def test_trash_metadata_lost_still_lists_and_restores(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"1"})
    _, report = run(settings, plan_for(settings, [("raw", "a")]), capsys)
    (store / "trash" / report["run_id"] / trash.RUN_META).unlink()
    assert [e.key for e in trash.list_entries(settings.trash_path)] == ["raw/a"]
    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    assert (store / "models/raw/a/w").read_bytes() == b"1"


# ---- other filesystems, archive, none -----------------------------------------------------------


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A directory on another filesystem than tmp_path (tmpfs /dev/shm), so rename gives EXDEV."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    path = shm / f"model-storage-test-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def test_trash_on_another_filesystem_falls_back_to_copy_verify_delete(
    store: Path, other_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store, STORAGE_TRASH_PATH=str(other_fs / "trash"))
    before = three_models(store)
    _, report = run(settings, plan_for(settings, [tuple(k.split("/")) for k in before]), capsys)  # type: ignore[misc]
    assert {d["how"] for d in report["done"]} == {"copied"}
    for key, manifest in before.items():
        assert not (store / "models" / key).exists()
        assert tree_manifest(other_fs / "trash" / report["run_id"] / key) == manifest
    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    for key, manifest in before.items():
        assert tree_manifest(store / "models" / key) == manifest


@pytest.mark.parametrize("how", ["trash_rename", "trash_copy", "archive"])
def test_a_single_file_model_goes_and_comes_back_in_every_mode(
    store: Path, other_fs: Path, capsys: pytest.CaptureFixture[str], how: str
) -> None:
    env = {
        "trash_rename": {},
        "trash_copy": {"STORAGE_TRASH_PATH": str(other_fs / "trash")},
        "archive": {"STORAGE_BACKUP_MODE": "archive", "STORAGE_BACKUP_PATH": str(other_fs / "backup")},
    }[how]
    settings = settings_for(store, **env)
    solo = store / "models/quantized/solo.gguf"
    data = os.urandom(30_000)
    solo.write_bytes(data)

    code, report = run(settings, plan_for(settings, [("quantized", "solo.gguf")]), capsys)

    assert code == 0 and [d["model"] for d in report["done"]] == ["solo.gguf"], report
    assert report["done"][0]["how"] == ("renamed" if how == "trash_rename" else "copied")
    assert not solo.exists()
    args = argparse.Namespace(run_id=report["run_id"], target="quantized/solo.gguf", json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    assert solo.read_bytes() == data
    assert sorted(p.name for p in solo.parent.iterdir()) == ["solo.gguf"], "no temporary copy left behind"


def test_archive_mode_copies_verifies_then_removes_the_original(
    store: Path, other_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store, STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(other_fs / "backup"))
    before = three_models(store)
    _, report = run(settings, plan_for(settings, [("raw", "llama")]), capsys)
    assert report["done"][0]["how"] == "copied" and report["done"][0]["mode"] == "archive"
    assert not (store / "models/raw/llama").exists()
    assert tree_manifest(other_fs / "backup" / report["run_id"] / "raw/llama") == before["raw/llama"]
    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0
    assert tree_manifest(store / "models/raw/llama") == before["raw/llama"]


def test_archive_mode_catches_a_corrupted_copy_and_deletes_nothing(store: Path, other_fs: Path) -> None:
    settings = settings_for(store, STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(other_fs / "backup"))
    before = three_models(store)
    snap = verify.snapshot(store / "models/raw/llama")
    eviction = Eviction("raw", "llama", snap.bytes, snap.files, snap.newest_change, 0, None, "age", "test")

    def corrupt(copy: Path) -> None:
        target = copy / "weights/model.safetensors"
        data = bytearray(target.read_bytes())
        data[1234] ^= 0xFF
        target.write_bytes(bytes(data))

    ctx = apply.Context.for_run(store_paths(settings), settings.cleaner, run_id="r1", actor="cli", now=time.time())
    journal = Journal(settings.state_path, "r1", command="run")
    result = apply.apply_evictions([eviction], ctx, journal, AuditLog(settings.audit_log_path), after_copy=corrupt)
    journal.close()

    assert result.done == [] and len(result.failed) == 1
    assert "copy differs at weights/model.safetensors" in result.failed[0].error
    assert tree_manifest(store / "models/raw/llama") == before["raw/llama"]
    assert not any(p.name != ".run.json" for p in (other_fs / "backup").rglob("*") if p.is_file())
    assert apply.exit_code_for(result) == 3


@pytest.mark.parametrize("change", ["append", "new_file", "rewrite"])
def test_archive_mode_keeps_a_staged_model_changed_during_the_copy_and_skips_it(
    store: Path, other_fs: Path, change: str
) -> None:
    """Only a handle held across the rename could change the staged tree (the holder check sees those):
    should one be missed, the change is still found after the copy and the model goes back, whole."""
    settings = settings_for(store, STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(other_fs / "backup"))
    before = three_models(store)["raw/llama"]
    model = store / "models/raw/llama"
    snap = verify.snapshot(model)
    eviction = Eviction("raw", "llama", snap.bytes, snap.files, snap.newest_change, 0, None, "age", "test")

    def writer_at_work(_copy: Path) -> None:  # runs once the copy is made, before it is checked
        (staged,) = (store / "models/raw").glob(".llama.*.staged")
        if change == "append":
            with open(staged / "config.json", "ab") as handle:
                handle.write(b" ")
        elif change == "new_file":
            (staged / "weights/extra.safetensors").write_bytes(b"new shard")
        else:
            later = time.time() + 5
            os.utime(staged / "config.json", (later, later))

    ctx = apply.Context.for_run(store_paths(settings), settings.cleaner, run_id="r1", actor="cli", now=time.time())
    journal = Journal(settings.state_path, "r1", command="run")
    result = apply.apply_evictions(
        [eviction], ctx, journal, AuditLog(settings.audit_log_path), after_copy=writer_at_work
    )
    journal.close()

    assert result.done == [] and result.failed == [] and apply.exit_code_for(result) == 0
    (skip,) = result.skipped
    assert skip.reason == "changed_during_copy" and "changed during the copy" in skip.detail
    after = tree_manifest(model)  # the original, with what the writer did, is all back in place
    expected = dict(before)
    if change == "append":
        expected["config.json"] = tree_manifest(model / "config.json")[""]
    elif change == "new_file":
        expected["weights/extra.safetensors"] = tree_manifest(model / "weights/extra.safetensors")[""]
    assert after == expected
    assert list(other_fs.rglob("*llama*")) == []  # no copy, no partial copy left behind
    assert list((store / "models/raw").glob(".*")) == []
    records = [json.loads(line) for line in settings.audit_log_path.read_text().splitlines()]
    assert [(r["operation"], r["details"]["reason"]) for r in records] == [("skip", "changed_during_copy")]


def test_archive_mode_a_writer_at_the_old_path_during_the_copy_recreates_it_and_it_is_never_touched(
    store: Path, other_fs: Path
) -> None:
    settings = settings_for(store, STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(other_fs / "backup"))
    before = three_models(store)["raw/llama"]
    model = store / "models/raw/llama"
    snap = verify.snapshot(model)
    eviction = Eviction("raw", "llama", snap.bytes, snap.files, snap.newest_change, 0, None, "age", "test")
    failed_writes: list[str] = []

    def writer_at_work(_copy: Path) -> None:
        try:
            with open(model / "config.json", "ab") as handle:
                handle.write(b" ")
        except FileNotFoundError as err:
            failed_writes.append(str(err.filename))
            (model / "weights").mkdir(parents=True)
            (model / "weights/extra.safetensors").write_bytes(b"new shard")

    ctx = apply.Context.for_run(store_paths(settings), settings.cleaner, run_id="r1", actor="cli", now=time.time())
    journal = Journal(settings.state_path, "r1", command="run")
    result = apply.apply_evictions(
        [eviction], ctx, journal, AuditLog(settings.audit_log_path), after_copy=writer_at_work
    )
    journal.close()

    assert failed_writes == [str(model / "config.json")]
    assert [(d.model, d.how) for d in result.done] == [("llama", "copied")]
    assert tree_manifest(other_fs / "backup/r1/raw/llama") == before
    assert sorted(tree_manifest(model)) == ["", "weights", "weights/extra.safetensors"]
    assert (model / "weights/extra.safetensors").read_bytes() == b"new shard"


def test_source_change_names_what_differs() -> None:
    from cleaner.fileops import source_change

    copied = {"": ("dir", 0, 1, 10, ""), "w": ("file", 5, 2, 11, "")}
    assert source_change(copied, dict(copied)) is None
    assert source_change(copied, {**copied, "x": ("file", 1, 3, 12, "")}) == "x appeared"
    assert source_change(copied, {"": copied[""]}) == "w disappeared"
    assert source_change(copied, {**copied, "w": ("file", 9, 4, 11, "")}) == "w is 9 bytes, 5 were copied"
    assert source_change(copied, {**copied, "w": ("file", 5, 4, 11, "")}) == "w was modified"
    assert source_change(copied, {**copied, "w": ("file", 5, 2, 99, "")}) == "w was replaced"


def test_copy_check_compares_every_file(tmp_path: Path) -> None:
    make_model(tmp_path, "a", "m", {"x": b"1", "d/y": b"22"})
    expected = tree_manifest(tmp_path / "a/m")
    (tmp_path / "a/m/d/y").write_bytes(b"23")
    from cleaner.fileops import check_copy

    with pytest.raises(CopyMismatchError, match="d/y"):
        check_copy(expected, tmp_path / "a/m")


def test_backup_mode_none_deletes_directly(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store, STORAGE_BACKUP_MODE="none")
    make_model(store / "models", "raw", "gone", {"w": b"1" * 10})
    _, report = run(settings, plan_for(settings, [("raw", "gone")]), capsys)
    assert report["done"][0]["how"] == "deleted"
    assert not (store / "models/raw/gone").exists() and trash.list_entries(settings.trash_path) == []


# ---- the state file ----------------------------------------------------------------------------


def test_state_file_is_replaced_atomically_and_unreadable_state_reads_as_none(tmp_path: Path) -> None:
    from shared.cleanup_state import CleanupState, write_cleanup_state

    path = tmp_path / "state/last-run.json"
    assert read_cleanup_state(path) is None
    state = CleanupState(1.0, True, "r", 0, None, {"age": 5}, {"age": 1}, {"in_use": 2}, 9)
    write_cleanup_state(path, state)
    assert read_cleanup_state(path) == state
    assert [p.name for p in path.parent.iterdir()] == ["last-run.json"]
    path.write_text("{not json")
    assert read_cleanup_state(path) is None


def test_every_protected_model_the_plan_kept_counts_as_skipped_protected() -> None:
    from cleaner.plan_values import ModelFacts
    from cleaner.policies import Coverage, PolicyView, decide

    now = 1_800_000_000.0
    old = now - 60 * DAY
    facts = [
        ModelFacts("raw", "by-glob", 10, 1, old),
        ModelFacts(
            "raw", "by-marker", 10, 1, old, hold="protected: .keep marker in the model directory", hold_code="protected"
        ),
        ModelFacts("raw", "evicted", 10, 1, old),
        ModelFacts("raw", "young", 10, 1, now - 60),
    ]
    view = PolicyView(policies=("age",), protect=("raw/by-glob",), allow_large=True)
    decision = decide(facts, Coverage(7 * DAY, 7 * DAY, 0), view, now)
    assert {k.model: k.policy for k in decision.kept if k.reason.startswith("protected")} == {
        "by-glob": None,
        "by-marker": None,
    }
    assert apply.skipped_counts(decision.kept, []) == {"protected": 2}


def test_the_state_file_counts_protected_models_of_the_plan(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"x"})
    kept = (
        Kept("raw", "p", 7, "protected: matches protect glob 'raw/p'", None, "protected"),
        Kept("raw", "young", 1, "grace: changed 1h ago", None, "grace"),
    )
    run(settings, plan_for(settings, [("raw", "a")], kept=kept), capsys)
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and state.skipped == {"protected": 1}


def test_the_state_timestamp_is_when_the_run_finished(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = settings_for(store)
    for name in ("a", "b"):
        make_model(store / "models", "raw", name, {"w": os.urandom(1000)})
    plan_id = plan_for(settings, [("raw", "a"), ("raw", "b")])
    started = time.time()

    run(settings, plan_id, capsys)

    state = read_cleanup_state(settings.cleanup_state_file)
    records = [json.loads(line) for line in settings.audit_log_path.read_text().splitlines()]
    last_step = max(r["time"] for r in records if r["operation"] != "run")
    assert state is not None and started < state.timestamp <= time.time()
    assert state.timestamp >= last_step  # after the last move was audited, not when the run began


def test_an_unreadable_model_directory_is_counted_as_unreadable_not_as_a_partial_download(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 13 case 6: the sentence "...cannot check for partial downloads" was parsed back as partial_download."""
    from cleaner import plan_build
    from cleaner.plan_values import ModelFacts
    from cleaner.policies import Coverage, PolicyView, decide

    settings = settings_for(store)
    make_model(store / "models", "raw", "locked", {"w": b"1"})
    make_model(store / "models", "raw", "old", {"w": b"2"})

    def unreadable(path: Path, suffixes: tuple[str, ...]) -> tuple[str | None, int]:
        if path.name == "locked":  # root reads any directory: the EACCES is made here
            raise PermissionError(13, "Permission denied", str(path))
        return None, 1

    monkeypatch.setattr(plan_build, "walk_selected", unreadable)
    facts = [
        plan_build.check_partial(store_paths(settings), ModelFacts("raw", m, 1, 1, 0.0)) for m in ("locked", "old")
    ]
    view = PolicyView(policies=("age",), age_seconds=10.0, grace_seconds=0.0)
    decision = decide(facts, Coverage(1.0, 1.0), view, 1e6)

    assert [e.model for e in decision.evictions] == ["old"]
    assert apply.skipped_counts(decision.kept, []) == {"unreadable": 1}
    (kept,) = decision.kept
    assert "Permission denied" in kept.reason


def test_kept_codes_and_not_sentences_make_the_skip_labels() -> None:
    from shared.reasons import Reason, sentence

    def kept(code: Reason, text: str) -> Kept:
        return Kept("raw", "m", 1, text, "age", code)

    # The sentence says "usage unknown"; the code decides, and the sentence is derived from it.
    assert apply.kept_reason_label(kept(Reason.BLAST_RADIUS, "usage unknown, oddly")) == "blast_radius"
    assert apply.kept_reason_label(kept(Reason.ENOUGH_REQUESTS, sentence(Reason.ENOUGH_REQUESTS, "12"))) is None
    assert apply.kept_reason_label(Kept("raw", "m", 1, "protected: an old plan", "age")) is None
    assert sentence(Reason.UNREADABLE, "EACCES") == "model directory unreadable: EACCES"


def test_run_with_prometheus_down_exits_4_but_leaves_a_failed_state_to_alert_on(store: Path) -> None:
    from tests.support import free_port

    settings = settings_for(store, STORAGE_PROMETHEUS_URL=f"http://127.0.0.1:{free_port()}")
    make_model(store / "models", "raw", "m", {"w": b"1"})
    with pytest.raises(PreconditionError):
        run_command.cmd_run(settings, run_args(None))
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and not state.success and state.exit_code == 4 and state.error
    assert (store / "models/raw/m/w").exists()
    assert verify_audit(settings.audit_log_path).ok


# ---- the cleaner's areas never overlap the models ------------------------------------------------


@pytest.mark.parametrize("command", [["purge", "--all"], ["trash"], ["run", "--plan", "x"]])
def test_a_trash_path_containing_the_models_is_refused_and_no_model_is_touched(store: Path, command: list[str]) -> None:
    before = three_models(store)
    env = exporter_env(store / "models", store, STORAGE_TRASH_PATH=str(store))

    done = run_cleaner(command, env)

    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"STORAGE_TRASH_PATH={str(store)!r} contains the models path" in line
    for key, manifest in before.items():
        assert tree_manifest(store / "models" / key) == manifest


# ---- a check that cannot be made skips one model, never the run ---------------------------------


def nest_beyond_path_max(root: Path, depth: int = 18) -> None:
    """Directories nested (through fds) until their full path exceeds PATH_MAX: a walk by path then
    fails with ENAMETOOLONG, for root too, as a real I/O error would."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(depth):
            os.mkdir("d" * 250, dir_fd=fd)
            child = os.open("d" * 250, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
            os.close(fd)
            fd = child
    finally:
        os.close(fd)


def test_a_model_whose_walk_fails_is_skipped_and_the_run_goes_on(
    store: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store)
    make_model(store / "models", "raw", "fine", {"w": b"f" * 10})
    broken = make_model(store / "models", "raw", "broken", {"w": b"b" * 10})
    nest_beyond_path_max(broken)
    plan_id = plan_for(settings, [("raw", "fine")])
    plan = load_plan(plan_id, settings.state_path)
    walkable = Eviction("raw", "broken", 10, 1, time.time(), 40 * DAY, None, "age", "test")
    save_plan(Plan(plan.plan_id + "-b", plan.created_at, (walkable, *plan.evictions), (), 20), settings.state_path)

    code, report = run(settings, plan.plan_id + "-b", capsys)

    assert code == 0
    assert [d["model"] for d in report["done"]] == ["fine"]
    (skip,) = report["skipped"]
    assert skip["model"] == "broken" and skip["reason"] == "check_failed"
    assert "File name too long" in skip["detail"] and len(skip["detail"]) < 300
    assert (broken / "w").read_bytes() == b"b" * 10
    state = read_cleanup_state(settings.cleanup_state_file)
    assert state is not None and state.success and state.skipped == {"check_failed": 1}
    records = [json.loads(line) for line in settings.audit_log_path.read_text().splitlines()]
    assert [r["details"]["reason"] for r in records if r["operation"] == "skip"] == ["check_failed"]


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied"), NotADirectoryError(20, "Not a directory")])
def test_an_error_walking_a_model_is_a_failed_check_and_releases_its_lock(store: Path, error: OSError) -> None:
    import fcntl

    model = make_model(store / "models", "raw", "m", {"w": b"1"})

    def failing_walk(path: Path) -> verify.Snapshot:
        raise error

    verdict = verify.verify_model(
        models_path=store / "models",
        layout=settings_for(store).layout,
        tier="raw",
        model="m",
        planned_bytes=1,
        planned_last_changed=time.time(),
        walk=failing_walk,
    )
    assert not verdict.ok and verdict.reason == verify.CHECK_FAILED and str(error.strerror) in verdict.detail
    assert verdict.lock_fd is None
    fd = os.open(model, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the model's flock was released
    finally:
        os.close(fd)


# ---- the copy's temporary name is the cleaner's own ----------------------------------------------


def test_a_restore_across_filesystems_leaves_a_downloaders_partial_file_alone(
    store: Path, other_fs: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = settings_for(store, STORAGE_TRASH_PATH=str(other_fs / "trash"))
    before = three_models(store)
    _, report = run(settings, plan_for(settings, [("raw", "llama")]), capsys)
    assert report["done"][0]["how"] == "copied"
    downloader = store / "models/raw/.llama.partial"  # e.g. a download of the same name, in progress
    downloader.write_bytes(b"half a download")

    args = argparse.Namespace(run_id=report["run_id"], target=None, json=False, actor="cli")
    assert trash_command.cmd_restore(settings, args) == 0

    assert tree_manifest(store / "models/raw/llama") == before["raw/llama"]
    assert downloader.read_bytes() == b"half a download"
    assert sorted(p.name for p in (store / "models/raw").iterdir()) == [".llama.partial", "llama"]


def test_a_copy_never_removes_a_file_already_at_its_temporary_name(store: Path, other_fs: Path) -> None:
    from cleaner import journal as jr

    src = make_model(store / "models", "raw", "m", {"w": b"model"})
    dst = other_fs / "m"
    squatter = jr.partial_path(dst, "op-1")
    assert "model-storage-cleaner" in squatter.name and "op-1" in squatter.name
    squatter.write_bytes(b"not ours")
    journal = Journal(store / "state", "op-1", command="run")

    with pytest.raises(jr.TransferError, match="File exists"):
        jr.transfer(journal, src, dst, purpose="evict", meta={}, force_copy=True)
    journal.close()

    assert squatter.read_bytes() == b"not ours"
    assert (src / "w").read_bytes() == b"model" and not dst.exists()


# ---- a read-only models path stops a run before anything moves -------------------------------------


def test_a_read_only_or_unwritable_place_is_a_problem_and_names_the_path() -> None:
    from cleaner.writable import Place, places_to_check, probe, problem

    ok, ro, denied = (
        Place(Path("/m"), False, True),
        Place(Path("/m/raw"), True, True),
        Place(Path("/m/q"), False, False),
    )
    assert problem([ok]) is None and problem([]) is None
    assert problem([ok, ro, denied]) == "/m/raw is on a read-only mount"
    assert problem([ok, denied]) == "/m/q is not writable by this user"
    layout = settings_for(Path("/s")).layout
    evictions = [
        Eviction("raw", "a", 1, 1, 0.0, 0.0, None, "age", ""),
        Eviction("raw", "b", 1, 1, 0.0, 0.0, None, "age", ""),
    ]
    assert places_to_check(Path("/m"), layout, evictions) == [
        Path("/m"),
        Path("/m/raw"),
        Path("/m/raw/a"),
        Path("/m/raw/b"),
    ]

    flags = os.statvfs_result((4096, 4096, 1, 1, 1, 1, 1, 1, os.ST_RDONLY, 255))
    place = probe(Path("/"), statvfs=lambda _path: flags, access=lambda _path, _mode: True)
    assert place == Place(Path("/"), True, True)
    assert probe(Path("/"), statvfs=lambda _path: flags, access=lambda _path, _mode: False) == Place(
        Path("/"), True, False
    )
    assert probe(Path("/no/such/model")) is None


def test_only_the_mount_of_the_models_path_matters_not_its_own_permissions(tmp_path: Path) -> None:
    from cleaner.writable import probe, require_writable

    # A root-owned 0755 models path over tier directories the cleaner's user owns: evictions only
    # change the tiers, so that layout must not stop a run (as root, access() cannot show it: inject).
    models = tmp_path / "models"
    (models / "raw" / "m").mkdir(parents=True)
    paths = [models, models / "raw", models / "raw" / "m"]
    require_writable(paths, probe_path=functools.partial(probe, access=lambda path, _mode: path != models))
    with pytest.raises(PreconditionError, match="raw is not writable"):
        require_writable(paths, probe_path=functools.partial(probe, access=lambda path, _mode: path.name != "raw"))


def test_a_single_file_model_is_evicted_whatever_its_own_mode(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # A `.gguf` straight in a tier is a model; its missing execute bit must not read as "not writable".
    settings = settings_for(store)
    solo = store / "models/raw/solo.gguf"
    solo.write_bytes(b"g" * 123)
    solo.chmod(0o444)
    plan_id = plan_for(settings, [("raw", "solo.gguf")])

    code, report = run(settings, plan_id, capsys)

    assert code == 0 and [d["model"] for d in report["done"]] == ["solo.gguf"]
    assert not solo.exists() and (settings.trash_path / report["run_id"] / "raw/solo.gguf").read_bytes() == b"g" * 123


def test_a_planned_model_that_is_a_symlink_to_a_read_only_place_does_not_stop_the_run(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outside = tmp_path / "elsewhere"
    (outside / "m").mkdir(parents=True)
    (outside / "m/w").write_bytes(b"not ours")
    settings = settings_for(store)
    make_model(store / "models", "raw", "a", {"w": b"a"})
    plan_id = plan_for(settings, [("raw", "a")])
    plan = load_plan(plan_id, settings.state_path)
    (store / "models/raw/link").symlink_to(outside / "m")
    link = Eviction("raw", "link", 8, 1, time.time(), 40 * DAY, None, "age", "test")
    save_plan(Plan(plan_id + "-l", plan.created_at, (link, *plan.evictions), (), 9), settings.state_path)

    with read_only_bind(outside):
        code, report = run(settings, plan_id + "-l", capsys)

    assert code == 0 and [d["model"] for d in report["done"]] == ["a"]
    assert [(s["model"], s["reason"]) for s in report["skipped"]] == [("link", "outside_models_path")]
    assert (outside / "m/w").read_bytes() == b"not ours"


@contextlib.contextmanager
def read_only_bind(path: Path) -> Iterator[Path]:
    """`path` bind-mounted read-only onto itself (as the exporter's container sees the models), then unmounted."""
    if subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode != 0:
        pytest.skip("cannot bind-mount here (needs root and mount rights)")
    try:
        remount = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only here: {remount.stderr.strip()}")
        assert os.statvfs(path).f_flag & os.ST_RDONLY
        yield path
    finally:
        # EBUSY while an exporter beside the test lists a directory in there (its scan or its
        # scrub holds the descriptor for milliseconds): tried again. Still busy after that is a
        # descriptor someone kept: the test fails, and the mount goes lazily so nothing is left.
        try:
            wait_until(
                lambda: subprocess.run(["umount", str(path)], capture_output=True).returncode == 0,
                timeout=10,
                interval=0.05,
                what=f"umount {path} (busy: a process keeps a descriptor open in there)",
            )
        except AssertionError:
            subprocess.run(["umount", "-l", str(path)], check=True)
            raise


def three_models_manifest(models: Path) -> dict[str, Any]:
    return {key: tree_manifest(models / key) for key in ("raw/llama", "quantized/llama-q4", "repository/bert")}


def test_a_run_on_a_read_only_models_path_exits_4_and_moves_nothing(store: Path, other_fs: Path) -> None:
    # The trash on another filesystem is the compose case: renames give EXDEV and the copy fallback
    # would fill the trash with copies it can never delete the originals of.
    models = store / "models"
    before = three_models(store)
    env = exporter_env(models, store, STORAGE_TRASH_PATH=str(other_fs / "trash"))
    plan_id = plan_for(load_settings(env=env), [("raw", "llama"), ("repository", "bert")])

    with read_only_bind(models):
        done = run_cleaner(["run", "--plan", plan_id], env)

    assert done.returncode == 4, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert f"{models} is on a read-only mount" in line and "nothing was changed" in line
    assert three_models_manifest(models) == before
    assert not (other_fs / "trash").exists()
    state = read_cleanup_state(store / "state/last-run.json")
    assert state is not None and not state.success and state.exit_code == 4
    records = [json.loads(line) for line in (store / "audit.log").read_text().splitlines()]
    assert [(r["operation"], r["result"]) for r in records] == [("run", "failure")]


def test_a_read_only_tier_directory_of_a_planned_model_exits_4_before_any_move(store: Path) -> None:
    models = store / "models"
    before = three_models(store)
    env = exporter_env(models, store)
    plan_id = plan_for(load_settings(env=env), [("raw", "llama"), ("repository", "bert")])

    with read_only_bind(models / "repository"):
        done = run_cleaner(["run", "--plan", plan_id], env)

    assert done.returncode == 4, done.stderr
    assert f"{models / 'repository'} is on a read-only mount" in done.stderr
    assert three_models_manifest(models) == before  # raw/llama, planned first, was not moved either
    assert not (store / "trash").exists()


# ---- twins: models sharing inodes (cp -al) -------------------------------------------------------


def test_a_cp_al_twin_is_planned_at_the_bytes_it_frees_and_is_evictable(store: Path) -> None:
    """Issue 13 case 3: the exporter charged the twin 0 bytes, every run then skipped it as changed."""
    from cleaner import plan_build
    from cleaner.plan_values import ModelFacts
    from cleaner.policies import Coverage, PolicyView, decide

    settings = settings_for(store)
    models = store / "models"
    make_model(models, "raw", "llama", {"a.bin": os.urandom(1_200_000), "b.bin": os.urandom(800_000)})
    subprocess.run(["cp", "-al", str(models / "raw/llama"), str(models / "quantized/llama-twin")], check=True)
    make_model(models, "quantized", "llama-twin", {"own.bin": os.urandom(5_000)})
    old = time.time()
    # What Prometheus says: the exporter charges each shared inode once, to the first model it met.
    seen = [ModelFacts("raw", "llama", 2_000_000, 2, old), ModelFacts("quantized", "llama-twin", 5_000, 3, old)]
    view = PolicyView(policies=("age",), age_tiers=("quantized",), age_seconds=0.0, grace_seconds=0.0)
    now = time.time() + 10
    decision, _facts = plan_build.decide_with_disk_checks(store_paths(settings), seen, Coverage(1.0, 1.0), view, now)
    (eviction,) = decision.evictions
    assert (eviction.model, eviction.bytes) == ("llama-twin", 5_000)  # only own.bin's last link goes
    assert decide(_facts, Coverage(1.0, 1.0), view, now).evictions == decision.evictions

    ctx = apply.Context.for_run(store_paths(settings), settings.cleaner, run_id="r1", actor="cli", now=now)
    journal = Journal(settings.state_path, "r1", command="run")
    result = apply.apply_evictions([eviction], ctx, journal, AuditLog(settings.audit_log_path))
    journal.close()

    assert result.skipped == [] and [d.model for d in result.done] == ["llama-twin"]
    assert (models / "raw/llama/a.bin").stat().st_nlink == 2  # the other link is in the trash now
    assert verify.snapshot(models / "raw/llama").freed_bytes == 0


def test_freed_bytes_count_only_inodes_whose_every_link_is_inside() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "m").mkdir()
        (root / "m/own").write_bytes(b"x" * 10)
        (root / "m/inner-1").write_bytes(b"y" * 20)
        os.link(root / "m/inner-1", root / "m/inner-2")  # both links inside: freed, counted once
        (root / "m/shared").write_bytes(b"z" * 40)
        os.link(root / "m/shared", root / "outside")
        snap = verify.snapshot(root / "m")
        assert (snap.bytes, snap.freed_bytes, snap.files) == (70, 30, 3)
