"""Filesystems mounted inside the models path: counted and watched (du -sb semantics), including
mounts that appear and go while the exporter runs. Real tmpfs and bind mounts: the suite runs as root."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from exporter.index.mounts import changed_points, mounts_under, points_to_report
from exporter.index.service import ExporterService
from tests.chaos import cpu_hogs
from tests.oracle import assert_exact, walk_truth
from tests.support import make_service, wait_until

ROUNDS = int(os.environ.get("MOUNT_ROUNDS", "6"))


class Mounts:
    """Mounts made by one test, unmounted (lazily, innermost first) whatever happens."""

    def __init__(self) -> None:
        self.points: list[Path] = []

    def tmpfs(self, path: Path) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(path)], check=True)
        self.points.append(path)

    def bind(self, source: Path, path: Path) -> None:
        subprocess.run(["mount", "--bind", str(source), str(path)], check=True)
        self.points.append(path)

    def umount(self, path: Path) -> None:
        subprocess.run(["umount", str(path)], check=True)
        self.points.reverse()
        self.points.remove(path)  # the last one mounted there
        self.points.reverse()

    def cleanup(self) -> None:
        for path in reversed(self.points):
            subprocess.run(["umount", "-l", str(path)], capture_output=True)
        self.points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    assert os.geteuid() == 0, "these tests mount tmpfs and bind mounts: run the suite as root"
    made = Mounts()
    yield made
    made.cleanup()


def started(store: Path) -> ExporterService:
    svc = make_service(store)
    svc.start()
    wait_until(svc.ready.is_set, timeout=20, what="initial scan")
    return svc


def fill(directory: Path, rng: random.Random, count: int, tag: str) -> None:
    for i in range(count):
        sub = directory / f"s{rng.randrange(3)}" if rng.random() < 0.5 else directory
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{tag}{i}").write_bytes(b"x" * rng.randrange(1, 5000))


# ----- pure -----

MOUNTINFO = """\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
40 22 0:35 / /srv/models/raw/m/cache rw shared:20 - tmpfs tmpfs rw
41 22 0:36 / /srv/models2/x rw shared:21 - tmpfs tmpfs rw
42 22 8:1 /data /srv/models/raw/with\\040space rw shared:1 - ext4 /dev/sda1 rw
43 22 0:37 / /srv/models rw shared:22 - xfs /dev/sdb rw
"""


def test_mounts_under_the_root_only_with_escapes_decoded() -> None:
    table = mounts_under(MOUNTINFO, "/srv/models")
    assert table == {
        ("/srv/models/raw/m/cache", "40 0:35 /"),
        ("/srv/models/raw/with space", "42 8:1 /data"),
        ("/srv/models", "43 0:37 /"),
    }


def test_a_bind_mount_of_another_directory_under_a_reused_id_is_another_mount() -> None:
    # The kernel reuses a freed mount id: the same id over another source directory is a replacement.
    before = mounts_under(MOUNTINFO, "/srv/models")
    after = mounts_under(MOUNTINFO.replace("42 22 8:1 /data ", "42 22 8:1 /other "), "/srv/models")
    assert changed_points(before, after) == ["/srv/models/raw/with space"]


def test_a_flagged_change_that_left_the_table_as_it_was_reports_every_inner_point() -> None:
    # M3: umount and mount again of a tmpfs between two reads can give the very same lines back.
    table = mounts_under(MOUNTINFO, "/srv/models")
    assert points_to_report(table, table, "/srv/models", flagged_unchanged=False) == []
    assert points_to_report(table, table, "/srv/models", flagged_unchanged=True) == [
        "/srv/models/raw/m/cache",
        "/srv/models/raw/with space",
    ]


def test_changed_points_outermost_first_and_a_replaced_mount_counts() -> None:
    old = frozenset({("/m/raw/a", "1"), ("/m/raw/a/b", "2"), ("/m/raw/c", "3")})
    # a/b gone (covered by a's report), c replaced by another mount (same point, new id), d new.
    new = frozenset({("/m/raw/a", "9"), ("/m/raw/c", "4"), ("/m/raw/d", "5")})
    assert changed_points(old, new) == ["/m/raw/a", "/m/raw/c", "/m/raw/d"]
    assert changed_points(old, old) == []
    assert changed_points(frozenset({("/m/raw/ab", "1")}), frozenset({("/m/raw/a", "2")})) == ["/m/raw/a", "/m/raw/ab"]


# ----- through the kernel -----


def test_oracle_counts_across_mounts(store: Path, mounts: Mounts) -> None:
    """The oracle's semantics, checked against du -sb (which crosses mount points) on the same tree."""
    model = store / "models" / "raw" / "m"
    (model / "mnt").mkdir(parents=True)
    (model / "a").write_bytes(b"a" * 10)
    mounts.tmpfs(model / "mnt")
    (model / "mnt" / "b").write_bytes(b"b" * 1000)
    truth = walk_truth(store / "models")
    assert truth.models[("raw", "m")][:2] == [1010, 2]
    du = subprocess.run(["du", "-sb", "--apparent-size", str(model)], capture_output=True, text=True, check=True)
    dirs = sum(os.lstat(p).st_size for p in (model, model / "mnt"))
    assert int(du.stdout.split()[0]) == 1010 + dirs


def test_a_tmpfs_mounted_before_start_is_counted_watched_and_its_unmount_seen(store: Path, mounts: Mounts) -> None:
    model = store / "models" / "raw" / "m"
    (model / "mnt").mkdir(parents=True)
    (model / "a").write_bytes(b"a" * 10)
    (model / "mnt" / "covered").write_bytes(b"c" * 3)
    mounts.tmpfs(model / "mnt")
    (model / "mnt" / "pre").write_bytes(b"p" * 100)
    svc = started(store)
    try:
        assert_exact(svc)
        assert svc.snapshot().tiers["raw"] == (110, 2, 1)
        (model / "mnt" / "d").mkdir()
        (model / "mnt" / "d" / "post").write_bytes(b"z" * 1000)
        assert_exact(svc)
        mounts.umount(model / "mnt")
        # The tmpfs' files are gone from the tree, the covered one is back, and the model's last
        # change is what it holds now (older than the tmpfs' files).
        assert_exact(svc)
        assert svc.snapshot().tiers["raw"] == (13, 2, 1)
        # The uncovered directory is watched: a write in it is seen.
        (model / "mnt" / "later").write_bytes(b"l" * 5)
        assert_exact(svc)
    finally:
        svc.stop()


def test_mounts_that_appear_and_go_while_running(store: Path, mounts: Mounts, tmp_path: Path) -> None:
    models = store / "models"
    model = models / "quantized" / "m"
    (model / "deep" / "mnt").mkdir(parents=True)
    (model / "deep" / "mnt" / "covered").write_bytes(b"c" * 7)
    source = tmp_path / "outside"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "w").write_bytes(b"w" * 300)
    svc = started(store)
    try:
        assert_exact(svc)
        mounts.tmpfs(model / "deep" / "mnt")  # covers a populated directory
        assert_exact(svc)
        (model / "deep" / "mnt" / "n").write_bytes(b"n" * 50)
        assert_exact(svc)
        mounts.bind(source, model / "deep" / "mnt")  # stacked on the tmpfs
        assert_exact(svc)
        assert svc.snapshot().tiers["quantized"] == (300, 1, 1)
        # Written through the outside path: the same directory inodes, so the watches see it.
        (source / "sub" / "v").write_bytes(b"v" * 20)
        assert_exact(svc)
        mounts.umount(model / "deep" / "mnt")  # the tmpfs again
        assert_exact(svc)
        assert svc.snapshot().tiers["quantized"] == (50, 1, 1)
        mounts.umount(model / "deep" / "mnt")
        assert_exact(svc)
        assert svc.snapshot().tiers["quantized"] == (7, 1, 1)
        # A whole tier mounted, then the models path itself.
        mounts.bind(source, models / "raw")
        assert_exact(svc)
        assert svc.snapshot().tiers["raw"] == (320, 2, 1)
        other = tmp_path / "other-models"
        (other / "repository" / "x").mkdir(parents=True)
        (other / "repository" / "x" / "f").write_bytes(b"f" * 11)
        mounts.bind(other, models)
        assert_exact(svc, timeout=10)
        assert svc.snapshot().tiers["repository"] == (11, 1, 1)
        (other / "repository" / "x" / "g").write_bytes(b"g" * 4)
        assert_exact(svc)
        mounts.umount(models)
        assert_exact(svc, timeout=10)
        assert svc.snapshot().tiers["raw"] == (320, 2, 1)
        assert not svc.polling
    finally:
        svc.stop()


@pytest.mark.parametrize("seed", range(ROUNDS))
def test_random_mounts_and_writes_stay_exact(store: Path, mounts: Mounts, tmp_path: Path, seed: int) -> None:
    """Seeded rounds of mounts, unmounts and writes at random depths, with both cores kept busy, each
    step checked against the oracle (replay one with `-k 'random and SEED'`)."""
    rng = random.Random(seed)
    models = store / "models"
    places = []
    for tier in ("raw", "quantized", "repository"):
        for m in range(2):
            place = models / tier / f"m{m}" / rng.choice(["a", "a/b", "a/b/c"])
            place.mkdir(parents=True)
            fill(place, rng, rng.randrange(0, 4), "under")
            places.append(place)
    svc = started(store)
    mounted: list[Path] = []
    busy = contextlib.ExitStack()
    busy.enter_context(cpu_hogs(2))  # both cores busy
    try:
        assert_exact(svc)
        for step in range(8):
            action = rng.random()
            if mounted and action < 0.35:
                mounts.umount(mounted.pop())
            elif action < 0.75:
                place = rng.choice(places)
                if rng.random() < 0.5:
                    mounts.tmpfs(place)
                else:
                    source = tmp_path / f"src-{seed}-{step}"
                    source.mkdir()
                    fill(source, rng, rng.randrange(1, 6), "src")
                    mounts.bind(source, place)
                mounted.append(place)
            fill(rng.choice(places), rng, rng.randrange(1, 4), f"w{step}-")
            assert_exact(svc)
        while mounted:
            mounts.umount(mounted.pop())
            assert_exact(svc)
        assert not svc.polling
    finally:
        busy.close()
        svc.stop()


def test_the_watcher_is_woken_by_the_kernel_not_by_its_periodic_read(
    tmp_path: Path, mounts: Mounts, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POLLPRI on /proc/self/mountinfo wakes it: with the periodic read pushed out of reach, a mount
    and an unmount are still reported, each once, at the mount point."""
    import threading

    from exporter.index import mounts as mounts_module

    monkeypatch.setattr(mounts_module, "REREAD_SECONDS", 3600.0)
    (tmp_path / "models" / "raw" / "m").mkdir(parents=True)
    reported: list[str] = []
    stop = threading.Event()
    watcher = mounts_module.MountWatcher(str(tmp_path / "models"), reported.append, stop)
    watcher.start()
    try:
        point = tmp_path / "models" / "raw" / "m"
        mounts.tmpfs(point)
        wait_until(lambda: reported == [str(point)], timeout=20, what="the mount reported")
        elsewhere = tmp_path / "elsewhere"  # outside the models path: not reported
        elsewhere.mkdir()
        mounts.tmpfs(elsewhere)
        mounts.umount(point)
        wait_until(lambda: reported == [str(point), str(point)], timeout=20, what="the unmount reported")
    finally:
        stop.set()
        watcher.join(timeout=10)
    assert reported == [str(point), str(point)]


@pytest.mark.parametrize(
    ("when", "source", "workers"),
    [("before-start", "m", "1"), ("while-running", "m", "1"), ("before-start", "", "2"), ("while-running", "", "2")],
)
def test_a_bind_mount_into_its_own_subtree_is_a_reported_cycle_not_an_endless_walk(
    store: Path, mounts: Mounts, when: str, source: str, workers: str
) -> None:
    """The model (or its whole tier, above the scan pool's subtrees) bind-mounted onto a directory
    inside itself: its files count once, the loop is not descended (by the scan, its workers or the
    watches), the exporter stays ready and on events."""
    model = store / "models" / "raw" / "m"
    (model / "sub" / "loop").mkdir(parents=True)
    (model / "w").write_bytes(b"w" * 100)
    (model / "sub" / "x").write_bytes(b"x" * 10)
    looped = store / "models" / "raw" / source
    if when == "before-start":
        mounts.bind(looped, model / "sub" / "loop")
    svc = make_service(store, STORAGE_SCAN_WORKERS=workers)
    svc.start()
    wait_until(svc.ready.is_set, timeout=30, what="initial scan")
    try:
        if when == "while-running":
            assert svc.snapshot().tiers["raw"] == (110, 2, 1)
            mounts.bind(looped, model / "sub" / "loop")
            svc.reconcile("test")  # the pool's full scan too
        wait_until(lambda: svc.counters.errors["scan"] >= 1, timeout=20, what="the cycle reported")
        assert svc.snapshot().tiers["raw"] == (110, 2, 1)
        (model / "sub" / "y").write_bytes(b"y" * 5)  # still watched, once
        wait_until(lambda: svc.snapshot().tiers["raw"] == (115, 3, 1), timeout=10, what="the write seen")
        assert svc.is_ready() and not svc.polling
        reader = svc._reader
        assert reader is not None
        assert not any("/loop/" in path for path in reader._wds), "nothing watched through the loop"
        mounts.umount(model / "sub" / "loop")
        assert_exact(svc)
    finally:
        svc.stop()
