"""Start-up watches as it scans (R8): every directory is watched before it is listed, so nothing
written while the exporter starts is missed, whichever side of a listing it lands on."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import exporter.index.scan as scan_module
from exporter.index.scan import Scanner
from exporter.index.service import ExporterService
from tests.chaos import cpu_hogs
from tests.oracle import assert_exact
from tests.support import make_service, wait_until

SEED = int(os.environ.get("STARTUP_SEED", "1203"))
ROUNDS = 6


def two_models(store: Path) -> Path:
    """Models two levels deep, so that a pooled scan lists the tiers itself and hands out the models."""
    models = store / "models"
    for tier, name in (("raw", "a"), ("quantized", "b")):
        shard = models / tier / name / "shard"
        shard.mkdir(parents=True)
        (shard / "w").write_bytes(b"w" * 100)
    return models


@pytest.mark.parametrize("workers", [1, 2])
def test_what_is_made_right_after_a_directory_was_listed_is_counted(
    store: Path, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hook right after the scan lists a directory in this process (with a pool: the root and the
    # tiers; without: every directory): a model made in the tier, and a file written into a model,
    # after the listing. Only a watch added before the listing sees them.
    models = two_models(store)
    real_scan_one = scan_module._scan_one
    made: list[str] = []

    def scan_one(path: str, *args: object, **kwargs: object) -> None:
        real_scan_one(path, *args, **kwargs)  # type: ignore[arg-type]
        if path.endswith("/models/raw") and not made:
            late = models / "raw" / "late" / "shard"
            late.mkdir(parents=True)
            (late / "w").write_bytes(b"l" * 333)
            made.append(str(late))
        if path.endswith("/raw/a/shard") and len(made) == 1:
            (models / "raw" / "a" / "shard" / "after").write_bytes(b"x" * 77)
            made.append(path)

    monkeypatch.setattr(scan_module, "_scan_one", scan_one)
    svc = make_service(store, STORAGE_SCAN_WORKERS=str(workers))
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=30, what="initial scan")
        assert made, "the hook never ran: the scan did not list the raw tier in this process"
        assert_exact(svc, timeout=10)
        assert svc.snapshot().tiers["raw"][:2] == (100 + 333 + (77 if len(made) > 1 else 0), 2 + (len(made) > 1))
    finally:
        svc.stop()


def workers_of(scanner: Scanner) -> list[int]:
    def running() -> list[int]:
        pool = scanner._pool
        pids = list(pool._processes) if pool is not None and pool._processes else []
        return pids if len(pids) == scanner.workers else []

    return wait_until(running, timeout=60, what="every scan worker running")


@pytest.fixture
def held(store: Path) -> Iterator[tuple[ExporterService, Scanner, list[int]]]:
    """A service whose two scan workers are stopped (SIGSTOP) before the initial scan starts."""
    two_models(store)
    scanner = Scanner(2)
    scanner.start()
    pids = workers_of(scanner)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    svc = ExporterService(make_service(store).settings, scanner=scanner)
    try:
        yield svc, scanner, pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        svc.stop()


def test_what_is_written_between_the_watch_and_the_scan_is_counted(
    held: tuple[ExporterService, Scanner, list[int]], store: Path
) -> None:
    # Both models were handed to the held workers, so both were watched and neither is listed yet.
    svc, scanner, pids = held
    models = store / "models"
    svc.start()
    wait_until(lambda: len(scanner._pool._pending_work_items) >= 2 if scanner._pool else False, what="jobs handed out")
    assert not svc.ready.is_set()
    (models / "raw" / "a" / "shard" / "w").write_bytes(b"w" * 1000)  # grown
    (models / "raw" / "a" / "shard" / "new").write_bytes(b"n" * 10)
    (models / "quantized" / "b" / "deep" / "er").mkdir(parents=True)
    (models / "quantized" / "b" / "deep" / "er" / "x").write_bytes(b"x" * 55)
    (models / "quantized" / "b" / "shard" / "w").unlink()
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    pool = scanner._pool
    wait_until(lambda: pool is not None and not pool._pending_work_items, timeout=30, what="both models listed")
    # Both models were listed: what follows only their watches can see.
    (models / "raw" / "a" / "shard" / "later").write_bytes(b"l" * 7)
    (models / "quantized" / "b" / "deep" / "er" / "y").write_bytes(b"y" * 3)
    wait_until(svc.ready.is_set, timeout=30, what="initial scan")
    assert_exact(svc, timeout=10)
    assert svc.snapshot().tiers["raw"][:2] == (1017, 3)
    assert svc.snapshot().tiers["quantized"][:2] == (58, 2)


WRITER = r"""
import os, random, sys, time
root, seed, stop = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rng = random.Random(seed)
dirs = [os.path.join(dp, d) for dp, dn, _ in os.walk(root) for d in dn]
ops = 0
while not os.path.exists(stop) or ops < 200:
    parent = rng.choice(dirs)
    roll = rng.random()
    try:
        if roll < 0.2:
            new = os.path.join(parent, f"n{ops}")
            os.mkdir(new)
            dirs.append(new)
            with open(os.path.join(new, "f"), "wb") as f:
                f.write(os.urandom(rng.randrange(1, 500)))
        elif roll < 0.8:
            with open(os.path.join(parent, f"f{rng.randrange(40)}"), "ab") as f:
                f.write(os.urandom(rng.randrange(1, 500)))
        else:
            names = [n for n in os.listdir(parent) if n.startswith("f")]
            if names:
                os.unlink(os.path.join(parent, rng.choice(names)))
    except FileNotFoundError:
        pass
    ops += 1
    time.sleep(0.0005)
print(ops)
"""


def populate(models: Path, rng: random.Random) -> None:
    for tier in ("raw", "quantized", "repository"):
        for m in range(rng.randrange(5, 12)):
            for d in range(3):
                sub = models / tier / f"m{m}" / f"d{d}"
                sub.mkdir(parents=True)
                for f in range(rng.randrange(3, 15)):
                    (sub / f"f{f}").write_bytes(b"s" * rng.randrange(0, 2000))


@pytest.mark.parametrize("workers", [1, 2])
def test_writes_all_through_start_up_are_counted_under_contention(tmp_path: Path, workers: int) -> None:
    """Seeded (STARTUP_SEED replays a failing round): a writer runs from before the exporter starts
    until after it is ready, with both cores busy; then the gauges equal an independent walk."""
    with cpu_hogs(os.cpu_count() or 2):
        for round_ in range(ROUNDS):
            seed = SEED * 100 + round_
            rng = random.Random(seed)
            base = tmp_path / f"round-{workers}-{round_}" / "storage"
            models = base / "models"
            populate(models, rng)
            stop = tmp_path / f"stop-{workers}-{round_}"
            writer = subprocess.Popen(
                [sys.executable, "-c", WRITER, str(models), str(seed), str(stop)], stdout=subprocess.PIPE
            )
            svc = make_service(base, STORAGE_SCAN_WORKERS=str(workers))
            try:
                svc.start()
                wait_until(svc.ready.is_set, timeout=60, what=f"initial scan (seed {seed})")
                stop.touch()
                out, _ = writer.communicate(timeout=60)
                assert int(out) >= 200
                try:
                    assert_exact(svc, timeout=10)
                except AssertionError as err:
                    raise AssertionError(f"round {round_} (STARTUP_SEED={SEED}, round seed {seed}): {err}") from None
            finally:
                if writer.poll() is None:
                    writer.kill()
                    writer.wait()
                svc.stop()
