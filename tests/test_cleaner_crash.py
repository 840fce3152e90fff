"""A real cleaner process SIGKILLed at every step: after recovery every byte is in exactly one place.

The crash hook STORAGE_CLEANER_CRASH_AT=<step>:<n>[:STOP] makes the process kill (or stop) itself
the n-th time it reaches a named step. After each kill the next `purge` recovers, then every model
must be whole either in the models path or in the trash (never both, never half, never gone), no
partial copy may be left, and `restore` must bring back every byte.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleaner.fileops import Manifest, tree_manifest
from shared.audit import verify_audit
from shared.config import load_settings
from tests.support import ROOT, exporter_env, make_model, run_cleaner, save_age_plan, wait_until

KEYS = ("raw/llama", "quantized/llama-q4", "repository/bert")


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("no second filesystem here")
    path = shm / f"model-storage-crash-{os.getpid()}-{time.monotonic_ns()}"
    path.mkdir()
    yield path
    subprocess.run(["rm", "-rf", str(path)], check=True)


def populate(store: Path) -> dict[str, Manifest]:
    models = store / "models"
    make_model(models, "raw", "llama", {"config.json": b"{}", "weights/a.safetensors": os.urandom(30_000)})
    (models / "raw/llama/weights/b.safetensors").write_bytes(os.urandom(20_000))
    make_model(models, "quantized", "llama-q4", {"model.gguf": os.urandom(15_000)})
    make_model(models, "repository", "bert", {"1/model.onnx": os.urandom(9_000), "config.pbtxt": b"name: bert"})
    return {key: tree_manifest(models / key) for key in KEYS}


def save_test_plan(env: dict[str, str]) -> str:
    return save_age_plan(env, KEYS)


def areas(env: dict[str, str]) -> list[Path]:
    settings = load_settings(env=env)
    return [settings.trash_path, settings.backup_path]


def places_of(store: Path, env: dict[str, str], key: str) -> list[Path]:
    found = [store / "models" / key] if os.path.lexists(store / "models" / key) else []
    for area in areas(env):
        if area.is_dir():
            found += [area / run / key for run in sorted(os.listdir(area)) if os.path.lexists(area / run / key)]
    return found


def assert_accounted(
    store: Path, env: dict[str, str], before: dict[str, Manifest], *, may_be_gone: bool = False
) -> None:
    """Every model whole in exactly one place; nothing half-made; the journal is empty."""
    for key, manifest in before.items():
        places = places_of(store, env, key)
        if may_be_gone and not places:
            continue
        assert len(places) == 1, (key, places)
        assert tree_manifest(places[0]) == manifest, f"{key} at {places[0]} is not whole"
    for root in (store / "models", *areas(env)):
        if root.is_dir():
            leftovers = [p for p in root.rglob("*") if p.name.endswith((".partial", ".staged", ".deleting"))]
            assert not leftovers, leftovers
    journal = load_settings(env=env).state_path / "journal"
    assert not journal.is_dir() or not list(journal.iterdir())
    assert verify_audit(store / "audit.log").ok


def run_ids(env: dict[str, str]) -> list[str]:
    return sorted({run for area in areas(env) if area.is_dir() for run in os.listdir(area)})


def crash(args: list[str], env: dict[str, str], at: str) -> None:
    done = run_cleaner(args, {**env, "STORAGE_CLEANER_CRASH_AT": at})
    assert done.returncode == -signal.SIGKILL, (at, done.returncode, done.stdout[-500:], done.stderr[-1500:])


def recover_and_restore_all(store: Path, env: dict[str, str], before: dict[str, Manifest]) -> None:
    run_cleaner(["purge"], env, check=True)  # recovers first; nothing is old enough to purge
    assert_accounted(store, env, before)
    for run_id in run_ids(env):
        run_cleaner(["restore", run_id], env, check=True)
    for key, manifest in before.items():
        assert tree_manifest(store / "models" / key) == manifest
    assert_accounted(store, env, before)


def env_for(store: Path, mode: str, other: Path | None) -> dict[str, str]:
    env = exporter_env(store / "models", store)
    if mode == "exdev":
        assert other is not None
        env["STORAGE_TRASH_PATH"] = str(other / "trash")
    elif mode == "archive":
        env.update(STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(store / "backup"))
    return env


RUN_STEPS = [
    ("trash", "run_started:1"),
    ("trash", "evict_started:2"),
    ("trash", "evict_verified:1"),
    ("trash", "evict_intent_written:1"),
    ("trash", "evict_intent_written:3"),
    ("trash", "evict_renamed:2"),
    ("trash", "evict_done_written:1"),
    ("trash", "evict_metadata_written:2"),
    ("trash", "before_state_written:1"),
    ("exdev", "evict_intent_written:2"),
    ("exdev", "evict_staged:1"),
    ("exdev", "evict_staged_written:2"),
    ("exdev", "copying:2"),
    ("exdev", "evict_copied_written:1"),
    ("exdev", "evict_copy_placed:2"),
    ("exdev", "evict_deleting_written:2"),
    ("exdev", "evict_source_deleting:1"),
    ("exdev", "evict_source_deleting:2"),
    ("exdev", "evict_done_written:3"),
    ("archive", "evict_staged:3"),
    ("archive", "evict_staged_written:1"),
    ("archive", "evict_deleting_written:2"),
    ("archive", "evict_done_written:1"),
    ("archive", "copying:4"),
    ("archive", "evict_copied_written:2"),
    ("archive", "evict_copy_placed:1"),
    ("archive", "evict_source_deleting:3"),
    ("archive", "evict_metadata_written:1"),
]


@pytest.mark.parametrize(("mode", "at"), RUN_STEPS, ids=[f"{m}-{a}" for m, a in RUN_STEPS])
def test_run_killed_at_any_step_loses_nothing(store: Path, request: pytest.FixtureRequest, mode: str, at: str) -> None:
    other = request.getfixturevalue("other_fs") if mode == "exdev" else None
    env = env_for(store, mode, other)
    before = populate(store)
    plan_id = save_test_plan(env)

    crash(["run", "--plan", plan_id], env, at)

    recover_and_restore_all(store, env, before)


@pytest.mark.parametrize(
    "at", ["evict_intent_written:2", "evict_renamed_for_delete:1", "evict_deleting:1", "evict_deleting:2"]
)
def test_backup_mode_none_killed_mid_delete_finishes_the_delete(store: Path, at: str) -> None:
    env = {**exporter_env(store / "models", store), "STORAGE_BACKUP_MODE": "none"}
    before = populate(store)
    crash(["run", "--plan", save_test_plan(env)], env, at)
    run_cleaner(["purge"], env, check=True)
    # Mode none deletes on purpose: each model is whole in place, or entirely gone, never half.
    assert_accounted(store, env, before, may_be_gone=True)


RESTORE_STEPS = [
    ("trash", "restore_intent_written:1"),
    ("trash", "restore_renamed:2"),
    ("trash", "restore_done_written:1"),
    ("exdev", "restore_intent_written:2"),
    ("exdev", "copying:1"),
    ("exdev", "restore_copied_written:1"),
    ("exdev", "restore_copy_placed:1"),
    ("exdev", "restore_deleting_written:2"),
    ("exdev", "restore_source_deleting:1"),
    ("exdev", "restore_done_written:3"),
]


@pytest.mark.parametrize(("mode", "at"), RESTORE_STEPS, ids=[f"{m}-{a}" for m, a in RESTORE_STEPS])
def test_restore_killed_at_any_step_loses_nothing(
    store: Path, request: pytest.FixtureRequest, mode: str, at: str
) -> None:
    other = request.getfixturevalue("other_fs") if mode == "exdev" else None
    env = env_for(store, mode, other)
    before = populate(store)
    run_cleaner(["run", "--plan", save_test_plan(env)], env, check=True)
    (run_id,) = run_ids(env)

    crash(["restore", run_id], env, at)

    recover_and_restore_all(store, env, before)


@pytest.mark.parametrize(
    "at",
    [
        "purge_intent_written:1",
        "purge_renamed_for_delete:2",
        "purge_deleting:1",
        "purge_deleting:3",
        "purge_done_written:2",
    ],
)
def test_purge_killed_at_any_step_finishes_or_keeps_each_entry_whole(store: Path, at: str) -> None:
    env = exporter_env(store / "models", store)
    before = populate(store)
    run_cleaner(["run", "--plan", save_test_plan(env)], env, check=True)

    crash(["purge", "--all"], env, at)

    run_cleaner(["trash"], env, check=True)  # listing needs no recovery and does not choke on it
    run_cleaner(["purge"], env, check=True)
    assert_accounted(store, env, before, may_be_gone=True)
    remaining = [key for key in KEYS if places_of(store, env, key)]
    assert len(remaining) < len(KEYS)  # the purge that was cut short was carried through


def process_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_two_concurrent_runs_second_exits_4_naming_the_first_and_changes_nothing(store: Path) -> None:
    env = exporter_env(store / "models", store)
    before = populate(store)
    plan_id = save_test_plan(env)
    first = subprocess.Popen(
        [sys.executable, "-m", "cleaner", "run", "--plan", plan_id],
        env={**env, "STORAGE_CLEANER_CRASH_AT": "evict_verified:2:STOP"},  # stop mid-run, lock held
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: process_state(first.pid) == "T", timeout=30, what="first cleaner stopped mid-run")
        snapshot = {key: places_of(store, env, key) for key in KEYS}

        second = run_cleaner(["run", "--plan", plan_id], env)

        assert second.returncode == 4, second.stderr
        assert f"pid {first.pid}" in second.stderr
        assert {key: places_of(store, env, key) for key in KEYS} == snapshot
    finally:
        os.kill(first.pid, signal.SIGCONT)
        _out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    for key, manifest in before.items():
        (place,) = places_of(store, env, key)
        assert "trash" in place.parts and tree_manifest(place) == manifest


# ---- writers against a model being evicted by copy (issue 13) -----------------------------------

STAGED_SUFFIXES = (".partial", ".staged", ".deleting")


def recreate(model: Path) -> Manifest:
    """What a downloader holding the old path does once the model is gone: try to append, then recreate."""
    try:
        with open(model / "config.json", "ab") as handle:
            handle.write(b"\n")
    except FileNotFoundError:
        make_model(model.parent.parent, model.parent.name, model.name, {"tokenizer.json": os.urandom(3_000)})
    else:  # the old path still held the model: add a shard to it
        (model / "weights").mkdir(exist_ok=True)
        (model / "weights/c.safetensors").write_bytes(os.urandom(5_000))
    return tree_manifest(model)


def start_stopped_at(env: dict[str, str], plan_id: str, crash_at: str) -> subprocess.Popen[str]:
    """A real `run` stopped (SIGSTOP) at a crash point."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cleaner", "run", "--json", "--plan", plan_id],
        env={**env, "STORAGE_CLEANER_CRASH_AT": crash_at},
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_until(lambda: process_state(proc.pid) == "T", timeout=30, what=f"cleaner stopped at {crash_at}")
    return proc


def no_partials_and_empty_journal(store: Path, env: dict[str, str]) -> None:
    for root in (store / "models", *areas(env)):
        if root.is_dir():
            assert not [p for p in root.rglob("*") if p.name.endswith(STAGED_SUFFIXES)]
    journal = load_settings(env=env).state_path / "journal"
    assert not journal.is_dir() or not list(journal.iterdir())
    assert verify_audit(store / "audit.log").ok


def old_llama_places(store: Path, env: dict[str, str]) -> list[Path]:
    """Where the evicted llama may be: in trash/archive, or kept beside its recreated path."""
    kept = sorted((store / "models/raw").glob("llama.cleaner-kept-*"))
    return [p for p in places_of(store, env, "raw/llama") if p != store / "models/raw/llama"] + kept


WINDOWS = [
    "copying:1",
    "evict_staged_written:1",
    "evict_copied_written:1",
    "evict_copy_placed:1",
    "evict_deleting_written:1",
]


@pytest.mark.parametrize("mode", ["exdev", "archive"])
@pytest.mark.parametrize("window", WINDOWS)
def test_a_writer_in_any_window_of_a_copy_eviction_loses_nothing_and_its_model_is_never_touched(
    store: Path, request: pytest.FixtureRequest, mode: str, window: str
) -> None:
    """Issue 13 case 1: a tokenizer.json written after the copy was verified used to be deleted with the source."""
    other = request.getfixturevalue("other_fs") if mode == "exdev" else None
    env = env_for(store, mode, other)
    before = populate(store)
    proc = start_stopped_at(env, save_test_plan(env), f"{window}:STOP")
    try:
        written = recreate(store / "models/raw/llama")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)

    assert proc.returncode == 0, err
    assert tree_manifest(store / "models/raw/llama") == written
    report = json.loads(out)
    assert ("raw", "llama") in {(d["tier"], d["model"]) for d in report["done"]}, report
    (old,) = old_llama_places(store, env)
    assert tree_manifest(old) == before["raw/llama"]
    for key in KEYS[1:]:
        (place,) = places_of(store, env, key)
        assert store / "models" not in place.parents and tree_manifest(place) == before[key]
    no_partials_and_empty_journal(store, env)


KILLS = [
    "evict_intent_written:1",
    "evict_staged:1",
    "evict_staged_written:1",
    "copying:1",
    "evict_copied_written:1",
    "evict_copy_placed:1",
    "evict_deleting_written:1",
    "evict_source_deleting:1",
    "evict_source_deleting:2",
    "evict_done_written:1",
]


@pytest.mark.parametrize("mode", ["exdev", "archive"])
@pytest.mark.parametrize("at", KILLS)
def test_recovery_never_deletes_a_model_recreated_after_the_crash(
    store: Path, request: pytest.FixtureRequest, mode: str, at: str
) -> None:
    """Issue 13 case 2: recovery used to delete a re-downloaded raw/llama once its journal said "deleting"."""
    other = request.getfixturevalue("other_fs") if mode == "exdev" else None
    env = env_for(store, mode, other)
    before = populate(store)
    crash(["run", "--plan", save_test_plan(env)], env, at)
    if os.path.lexists(store / "models/raw/llama"):
        written = tree_manifest(store / "models/raw/llama")  # not staged yet: recovery leaves it as it is
        recreated = False
    else:
        written = recreate(store / "models/raw/llama")
        recreated = True

    run_cleaner(["purge"], env, check=True)

    assert tree_manifest(store / "models/raw/llama") == written
    if recreated:
        (old,) = old_llama_places(store, env)
        assert tree_manifest(old) == before["raw/llama"]
    else:
        assert old_llama_places(store, env) == []
    records = [json.loads(line) for line in (store / "audit.log").read_text().splitlines()]
    assert all(r["details"]["outcome"] != "lost" for r in records if r["operation"] == "recover")
    no_partials_and_empty_journal(store, env)


@pytest.mark.parametrize("at", ["evict_renamed_for_delete:1", "evict_deleting:2"])
def test_mode_none_recovery_never_deletes_a_model_recreated_after_the_crash(store: Path, at: str) -> None:
    env = {**exporter_env(store / "models", store), "STORAGE_BACKUP_MODE": "none"}
    populate(store)
    crash(["run", "--plan", save_test_plan(env)], env, at)
    written = recreate(store / "models/raw/llama")
    run_cleaner(["purge"], env, check=True)
    assert tree_manifest(store / "models/raw/llama") == written
    no_partials_and_empty_journal(store, env)


def test_a_process_that_opened_a_file_before_staging_puts_the_model_back(store: Path, other_fs: Path) -> None:
    """A writer holding a file of the model across the rename could still write into the staged tree: the
    holder check after the rename sees it, and the model goes back to its path, untouched."""
    env = env_for(store, "exdev", other_fs)
    populate(store)
    proc = start_stopped_at(env, save_test_plan(env), "evict_verified:1:STOP")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; f = open(sys.argv[1], 'ab', 0); f.write(b'1'); input(); f.write(b'2')",
            str(store / "models/raw/llama/config.json"),
        ],
        stdin=subprocess.PIPE,
    )
    try:
        wait_until(lambda: (store / "models/raw/llama/config.json").read_bytes().endswith(b"1"), timeout=30)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        out, err = proc.communicate(timeout=60)
        assert writer.stdin is not None
        writer.communicate(b"\n", timeout=30)
    assert proc.returncode == 0, err
    report = json.loads(out)
    assert [(s["model"], s["reason"]) for s in report["skipped"]] == [("llama", "in_use")], report
    assert (store / "models/raw/llama/config.json").read_bytes() == b"{}12"
    no_partials_and_empty_journal(store, env)
