"""ENOSPC and EROFS on the cleaner's state path: one line naming the operation and the path, exit 5.

A tiny tmpfs mounted here (as root, unmounted after) is the state path: filled up for ENOSPC,
remounted read-only for EROFS. EACCES cannot be provoked as root (root passes permission checks);
it takes the same path through `FilesystemError`, checked in the unit test below.
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleaner import verify
from cleaner.plan_store import new_plan_id, save_plan
from cleaner.plan_values import Eviction, Plan
from shared.config import load_settings
from shared.errors import FilesystemError
from tests.support import exporter_env, make_model, run_cleaner


@pytest.fixture
def tiny_tmpfs() -> Iterator[Path]:
    assert os.geteuid() == 0, "this test mounts a tmpfs: run the suite as root"
    path = Path(tempfile.mkdtemp(prefix="model-storage-state-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def fill(path: Path) -> None:
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as err:
        assert err.errno == errno.ENOSPC
    finally:
        os.close(fd)


def plan_saved(env: dict[str, str]) -> str:
    settings = load_settings(env=env)
    snap = verify.snapshot(settings.models_path / "raw/m")
    now = time.time()
    evictions = (Eviction("raw", "m", snap.bytes, snap.files, snap.newest_change, 9e6, None, "age", "t"),)
    plan = Plan(new_plan_id(now), now, evictions, (), snap.bytes)
    save_plan(plan, settings.state_path)
    return plan.plan_id


def one_line_naming(done: subprocess.CompletedProcess[str], path: Path, what: str) -> str:
    assert done.returncode == 5, (done.returncode, done.stderr)
    assert "Traceback" not in done.stderr and done.stderr.strip().count("\n") == 0, done.stderr
    assert str(path) in done.stderr and what in done.stderr and "cannot " in done.stderr, done.stderr
    return done.stderr


@pytest.mark.parametrize("command", ["run", "purge", "restore"])
def test_enospc_on_the_state_path_names_the_operation_and_the_path(store: Path, tiny_tmpfs: Path, command: str) -> None:
    """Issue 13 case 4: this ended with `unexpected error: OSError: [Errno 28] No space left on device`."""
    env = exporter_env(store / "models", store, STORAGE_STATE_PATH=str(tiny_tmpfs))
    make_model(store / "models", "raw", "m", {"w": b"1" * 1000})
    plan_id = plan_saved(env)
    fill(tiny_tmpfs)
    args = {"run": ["run", "--plan", plan_id], "purge": ["purge"], "restore": ["restore", "20990101T000000Z-000000"]}
    message = one_line_naming(run_cleaner(args[command], env), tiny_tmpfs, "No space left on device (ENOSPC)")
    assert "free space" in message
    assert (store / "models/raw/m/w").read_bytes() == b"1" * 1000


def test_erofs_on_the_state_path_names_the_operation_and_the_path(store: Path, tiny_tmpfs: Path) -> None:
    env = exporter_env(store / "models", store, STORAGE_STATE_PATH=str(tiny_tmpfs))
    make_model(store / "models", "raw", "m", {"w": b"1" * 1000})
    plan_id = plan_saved(env)
    subprocess.run(["mount", "-o", "remount,ro", str(tiny_tmpfs)], check=True)
    message = one_line_naming(run_cleaner(["run", "--plan", plan_id], env), tiny_tmpfs, "Read-only file system")
    assert "read-only" in message
    assert (store / "models/raw/m/w").read_bytes() == b"1" * 1000


def test_save_plan_on_a_full_filesystem_names_the_plan_path(tiny_tmpfs: Path) -> None:
    fill(tiny_tmpfs)
    plan = Plan(new_plan_id(time.time()), time.time(), (), (), 0)
    with pytest.raises(FilesystemError) as caught:
        save_plan(plan, tiny_tmpfs)
    assert caught.value.exit_code == 5
    assert f"cannot save the plan {tiny_tmpfs}/plans/{plan.plan_id}.json" in caught.value.message
    assert not list((tiny_tmpfs / "plans").glob("*.tmp"))


def test_eacces_is_a_filesystem_error_with_a_hint() -> None:
    err = PermissionError(errno.EACCES, "Permission denied", "/srv/state/cleaner.lock")
    error = FilesystemError.from_os(err, "open the lock file")
    assert error.exit_code == 5
    assert error.one_line() == (
        "cannot open the lock file /srv/state/cleaner.lock: Permission denied (EACCES) "
        "(check the owner and mode of that path for the user the cleaner runs as)"
    )
