"""Torture test of the cleaner against concurrent writers: no byte a writer wrote is ever lost.

Writers (appending to their own files, creating new files, renaming files in from outside the
model, recreating a removed model under the same name) run in threads of this process against
models a real `model-storage-cleaner` process evicts, restores and purges, in three modes: rename
into the trash, copy fallback (the trash on a tmpfs mounted here, as root, and unmounted after) and
archive. Each scenario either SIGKILLs the cleaner at one crash point (then the next command
recovers), or holds it with SIGSTOP at the point between a check and the act it guards while
every kind of writer acts on the model it is working on, then SIGCONTs it.

The oracle is independent of the cleaner: every write that succeeded put a unique random blob
somewhere; after the scenario (recovery, then a restore of every run) each blob must be found,
byte-identical, in some file under the store, the trash or the archive. Blobs that a `purge`
deleted on purpose (those only in the trash when it started) are counted apart.

`python -m tests.cleaner_torture [--full] [--seed N]` prints the figures; `make stress-cleaner`
runs the full size; tests/test_cleaner_torture.py runs a reduced set.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.config import load_settings
from tests.support import ROOT, exporter_env, run_cleaner, save_age_plan, wait_until

MODES = ("rename", "exdev", "archive")
MODELS = ("raw/a", "quantized/b", "repository/c", "raw/busy")
CLEANER_OWN = (".partial", ".staged", ".deleting")

# Crash points of `run` per mode (the n-th time the step is reached).
RUN_CRASHES = {
    "rename": [
        "run_started:1",
        "evict_started:2",
        "evict_verified:1",
        "evict_intent_written:1",
        "evict_renamed:1",
        "evict_renamed:3",
        "evict_done_written:2",
        "evict_metadata_written:1",
        "before_state_written:1",
    ],
    "copy": [
        "evict_verified:1",
        "evict_intent_written:1",
        "evict_staged:1",
        "evict_staged_written:1",
        "evict_staged_written:2",
        "copying:1",
        "copying:3",
        "evict_copied_written:1",
        "evict_copy_placed:1",
        "evict_deleting_written:1",
        "evict_source_deleting:1",
        "evict_source_deleting:2",
        "evict_done_written:1",
        "evict_metadata_written:2",
    ],
}
# Each window between a check and the act it guards: the cleaner is held there while writers act.
RUN_WINDOWS = {
    "rename": ["evict_verified:1", "evict_intent_written:1", "evict_renamed:1"],
    "copy": [
        "evict_verified:1",
        "evict_intent_written:1",
        "evict_staged_written:1",
        "copying:1",
        "evict_copied_written:1",
        "evict_copy_placed:1",
        "evict_deleting_written:1",
        "evict_source_deleting:1",
    ],
}
RESTORE_CRASHES = {
    "rename": ["restore_intent_written:1", "restore_renamed:2", "restore_done_written:1"],
    "copy": [
        "restore_intent_written:1",
        "copying:1",
        "restore_copied_written:1",
        "restore_copy_placed:1",
        "restore_deleting_written:1",
        "restore_source_deleting:1",
        "restore_done_written:2",
    ],
}
RESTORE_WINDOWS = {"rename": ["restore_intent_written:1"], "copy": ["restore_intent_written:1", "copying:1"]}
PURGE_CRASHES = ["purge_intent_written:1", "purge_renamed_for_delete:2", "purge_deleting:1", "purge_done_written:1"]
PURGE_WINDOWS = ["purge_intent_written:1", "purge_renamed_for_delete:1"]


def family(mode: str) -> str:
    return "rename" if mode == "rename" else "copy"


@dataclass(frozen=True, slots=True)
class Scenario:
    mode: str
    command: str  # run | restore | purge
    at: str  # crash point step:n
    hold: bool  # SIGSTOP there (a window) instead of SIGKILL

    @property
    def name(self) -> str:
        return f"{self.mode}-{self.command}-{'hold' if self.hold else 'kill'}-{self.at}"


def scenarios(full: bool) -> list[Scenario]:
    found: list[Scenario] = []
    for mode in MODES:
        f = family(mode)
        found += [Scenario(mode, "run", at, False) for at in RUN_CRASHES[f]]
        found += [Scenario(mode, "run", at, True) for at in RUN_WINDOWS[f]]
        found += [Scenario(mode, "restore", at, False) for at in RESTORE_CRASHES[f]]
        found += [Scenario(mode, "restore", at, True) for at in RESTORE_WINDOWS[f]]
        if mode != "archive":  # an archive is never purged
            found += [Scenario(mode, "purge", at, False) for at in PURGE_CRASHES]
            found += [Scenario(mode, "purge", at, True) for at in PURGE_WINDOWS]
    if full:
        return found
    return [s for s in found if s.name in REDUCED]


# The reduced set `make test` runs (< 3 min): the windows of the staged copy, a kill on each side of
# its rename and of its delete, and one of each other command.
REDUCED = {
    "rename-run-hold-evict_verified:1",
    "exdev-run-hold-evict_staged_written:1",
    "exdev-run-hold-evict_copied_written:1",
    "exdev-run-hold-evict_deleting_written:1",
    "exdev-run-hold-evict_source_deleting:1",
    "archive-run-hold-evict_staged_written:1",
    "archive-run-hold-evict_deleting_written:1",
    "exdev-run-kill-evict_staged:1",
    "exdev-run-kill-evict_copied_written:1",
    "archive-run-kill-evict_source_deleting:1",
    "exdev-restore-hold-copying:1",
    "exdev-purge-kill-purge_deleting:1",
}


# ---- the writers and the oracle ----------------------------------------------------------------


@dataclass
class Oracle:
    """Every blob a writer wrote successfully (and every original file), by content."""

    blobs: dict[bytes, str] = field(default_factory=dict)  # blob -> how it was written
    lock: threading.Lock = field(default_factory=threading.Lock)

    def wrote(self, blob: bytes, how: str) -> None:
        with self.lock:
            self.blobs[blob] = how


def new_blob(rng: random.Random) -> bytes:
    return rng.randbytes(16) + rng.randbytes(rng.randrange(32, 2048))


class Writers:
    """The four kinds of writer; each act that succeeds records its blob."""

    KINDS = ("append", "new_file", "rename_in", "recreate")

    def __init__(self, store: Path, oracle: Oracle, seed: int) -> None:
        self.models = store / "models"
        self.incoming = store / "incoming"
        self.incoming.mkdir(exist_ok=True)
        self.oracle = oracle
        self.rng = random.Random(seed)
        self.rng_lock = threading.Lock()
        self.counter = 0
        self.acts = 0
        self.failed = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def _next(self) -> tuple[int, bytes]:
        with self.rng_lock:
            self.counter += 1
            return self.counter, new_blob(self.rng)

    def act(self, kind: str, key: str) -> bool:
        """One write of `kind` into model `key`, by its path, as a pipeline would; True when it landed."""
        n, blob = self._next()
        model = self.models / key
        try:
            if kind == "append":
                fd = os.open(model / "log.bin", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, blob)
                finally:
                    os.close(fd)
            elif kind == "new_file":
                (model / f"new-{n}.bin").write_bytes(blob)
            elif kind == "rename_in":
                tmp = self.incoming / f"in-{n}.bin"
                tmp.write_bytes(blob)
                self.oracle.wrote(blob, kind)  # it exists now: in incoming, or in the model once renamed
                os.rename(tmp, model / f"renamed-{n}.bin")
                self.acts += 1
                return True
            else:
                model.mkdir(parents=True, exist_ok=True)
                (model / f"recreated-{n}.bin").write_bytes(blob)
        except (FileNotFoundError, NotADirectoryError):
            self.failed += 1  # the model's path was gone at that instant: the write failed, nothing landed
            return False
        self.oracle.wrote(blob, kind)
        self.acts += 1
        return True

    def all_kinds(self, key: str) -> None:
        for kind in self.KINDS:
            self.act(kind, key)

    def start(self, threads: int = 2) -> None:
        if self._threads:
            return
        for index in range(threads):
            thread = threading.Thread(target=self._loop, args=(index,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _loop(self, index: int) -> None:
        rng = random.Random(self.rng.random() + index)
        while not self._stop.is_set():
            # Any write to the busy model; to the others only once their path is gone (recreating
            # them), so they stay unchanged until the cleaner has checked them and their windows open.
            key = "raw/busy" if rng.random() < 0.5 else rng.choice(MODELS)
            if key == "raw/busy" or not os.path.lexists(self.models / key):
                self.act(rng.choice(self.KINDS), key)
            self._stop.wait(rng.uniform(0.002, 0.02))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(10)
        self._threads.clear()
        self._stop.clear()


# ---- the store, the cleaner process -------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(size_mb: int = 64) -> Iterator[Path]:
    """A tmpfs mounted for the run: the trash on another filesystem. Needs root; unmounted after."""
    if os.geteuid() != 0:
        raise SystemExit("the torture test mounts a tmpfs for the copy fallback: run it as root")
    path = Path(tempfile.mkdtemp(prefix="model-storage-torture-tmpfs-"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)
        path.rmdir()


def populate(store: Path, oracle: Oracle, rng: random.Random) -> None:
    for key in MODELS:
        for rel in ("config.json", "weights/part-1.bin", "weights/part-2.bin"):
            path = store / "models" / key / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            blob = new_blob(rng) * 4
            path.write_bytes(blob)
            oracle.wrote(blob, "original")


def save_plan_for(env: dict[str, str]) -> str:
    return save_age_plan(env, MODELS)


def env_for(store: Path, mode: str, other: Path) -> dict[str, str]:
    env = exporter_env(store / "models", store, STORAGE_CLEANUP_GRACE_HOURS="0")
    if mode == "exdev":
        env["STORAGE_TRASH_PATH"] = str(other / "trash")
    elif mode == "archive":
        env.update(STORAGE_BACKUP_MODE="archive", STORAGE_BACKUP_PATH=str(other / "backup"))
    return env


def state_of(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


def areas(env: dict[str, str]) -> list[Path]:
    settings = load_settings(env=env)
    return [settings.trash_path, settings.backup_path]


def run_ids(env: dict[str, str]) -> list[str]:
    return sorted({r for a in areas(env) if a.is_dir() for r in os.listdir(a) if not r.startswith(".")})


def contents(roots: list[Path]) -> list[bytes]:
    found = []
    for root in roots:
        if not root.exists():
            continue
        for dirpath, _dirs, files in os.walk(root):
            for name in files:
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    with open(path, "rb") as handle:
                        found.append(handle.read())
    return found


def located(blobs: list[bytes], roots: list[Path]) -> set[bytes]:
    data = contents(roots)
    return {blob for blob in blobs if any(blob in chunk for chunk in data)}


# ---- one scenario ----------------------------------------------------------------------------


@dataclass
class Outcome:
    scenario: Scenario
    reached: bool
    written_bytes: int
    found_bytes: int
    purged_bytes: int
    lost: list[str]
    acts: int
    problems: list[str]


def cleaner_at(args: list[str], env: dict[str, str], at: str, hold: bool, writers: Writers, key: str) -> bool:
    """Run the cleaner until it reaches `at`: kill it there, or hold it while every writer acts. True if reached."""
    spec = f"{at}:STOP"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cleaner", *args],
        env={**env, "STORAGE_CLEANER_CRASH_AT": spec},
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: state_of(proc.pid) == "T" or proc.poll() is not None, timeout=60, what=f"reach {at}")
        reached = proc.poll() is None
        if reached:
            writers.start()  # no-op when already running
            if hold:
                for target in MODELS if key == "*" else (key,):
                    writers.all_kinds(target)
                os.kill(proc.pid, signal.SIGCONT)
            else:
                writers.all_kinds(key if key != "*" else "raw/a")  # while it lies stopped, then killed
                os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return reached


def run_scenario(scenario: Scenario, root: Path, other: Path, seed: int) -> Outcome:
    store = root / "storage"
    for tier in ("raw", "quantized", "repository"):
        (store / "models" / tier).mkdir(parents=True)
    oracle = Oracle()
    rng = random.Random(seed)
    populate(store, oracle, rng)
    env = env_for(store, scenario.mode, other)
    writers = Writers(store, oracle, seed)
    problems: list[str] = []
    purged: set[bytes] = set()
    reached = True
    roots = [store, *areas(env)]
    try:
        if scenario.command == "run":
            plan_id = save_plan_for(env)
            writers.start()
            reached = cleaner_at(["run", "--plan", plan_id], env, scenario.at, scenario.hold, writers, "raw/a")
        else:
            run_cleaner(["run", "--plan", save_plan_for(env)], env, check=True)
            if scenario.command == "restore":
                # Writers start once the restore is under way: a recreated path before it makes it refuse.
                (run_id,) = run_ids(env)
                reached = cleaner_at(["restore", run_id], env, scenario.at, scenario.hold, writers, "*")
            else:
                writers.start()
                # What only the trash holds when the purge starts may be deleted on purpose.
                in_store = located(list(oracle.blobs), [store / "models", store / "incoming"])
                purged = set(oracle.blobs) - in_store
                reached = cleaner_at(["purge", "--all"], env, scenario.at, scenario.hold, writers, "*")
        writers.stop()
        recovered = run_cleaner(["purge"], env)  # the next command recovers first
        if recovered.returncode != 0:
            problems.append(f"recovery: exit {recovered.returncode}: {recovered.stderr.strip()[-300:]}")
        for run_id in run_ids(env):
            done = run_cleaner(["restore", run_id], env)
            if done.returncode not in (0, 4):  # 4: a writer recreated a model's path, restore refuses
                problems.append(f"restore {run_id}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    finally:
        writers.stop()
    blobs = list(oracle.blobs)
    found = located(blobs, roots)
    lost = [oracle.blobs[b] for b in blobs if b not in found and b not in purged]
    leftovers = [str(p) for r in roots if r.exists() for p in r.rglob("*") if p.name.endswith(CLEANER_OWN)]
    if leftovers:
        problems.append(f"cleaner files left behind: {leftovers[:3]}")
    journal = load_settings(env=env).state_path / "journal"
    if journal.is_dir() and list(journal.iterdir()):
        problems.append(f"journal not empty: {sorted(os.listdir(journal))}")
    counted = [b for b in blobs if b not in purged]
    return Outcome(
        scenario,
        reached,
        written_bytes=sum(len(b) for b in counted),
        found_bytes=sum(len(b) for b in counted if b in found),
        purged_bytes=sum(len(b) for b in purged),
        lost=lost,
        acts=writers.acts,
        problems=problems,
    )


def clean(root: Path, other: Path) -> None:
    subprocess.run(["rm", "-rf", str(root)], check=True)
    for entry in other.iterdir():
        subprocess.run(["rm", "-rf", str(entry)], check=True)


def torture(chosen: list[Scenario], seed: int, out: Path | None = None) -> list[Outcome]:
    outcomes = []
    with tmpfs() as other, tempfile.TemporaryDirectory(prefix="model-storage-torture-") as tmp:
        for index, scenario in enumerate(chosen):
            root = Path(tmp) / f"s{index}"
            outcomes.append(run_scenario(scenario, root, other, seed + index))
            clean(root, other)
    return outcomes


def summary(outcomes: list[Outcome]) -> str:
    kills = [o for o in outcomes if not o.scenario.hold]
    holds = [o for o in outcomes if o.scenario.hold]
    lines = [
        f"scenarios: {len(outcomes)} ({len({o.scenario.mode for o in outcomes})} modes: "
        f"{', '.join(sorted({o.scenario.mode for o in outcomes}))})",
        f"crash points (SIGKILL): {len(kills)}, reached {sum(o.reached for o in kills)}",
        f"windows held (SIGSTOP/SIGCONT): {len(holds)}, reached {sum(o.reached for o in holds)}",
        f"writer acts that landed: {sum(o.acts for o in outcomes)}",
        f"bytes written: {sum(o.written_bytes for o in outcomes)}",
        f"bytes found: {sum(o.found_bytes for o in outcomes)}",
        f"bytes purged on purpose (only in trash when a purge began): {sum(o.purged_bytes for o in outcomes)}",
        f"bytes lost: {sum(o.written_bytes - o.found_bytes for o in outcomes)}",
    ]
    for o in outcomes:
        if not o.reached:
            lines.append(f"  {o.scenario.name}: the cleaner never reached {o.scenario.at}")
        if o.lost or o.problems:
            lines.append(f"  {o.scenario.name}: lost {len(o.lost)} blobs {o.lost[:5]}; {'; '.join(o.problems)}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--full", action="store_true", help="every crash point x every mode x writers")
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args(argv)
    chosen = scenarios(args.full)
    started = time.monotonic()
    outcomes = torture(chosen, args.seed)
    print(summary(outcomes))
    print(f"seed {args.seed}, {time.monotonic() - started:.0f} s")
    bad = [o for o in outcomes if o.lost or o.problems]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
