"""Every filesystem operation, on real files with the real observer, ends with exact gauges."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from watchdog.observers.inotify_c import InotifyConstants

from exporter.index.events import RawEvent
from exporter.index.fsinfo import subdir_counting_device
from exporter.index.reader import MASK, Handoff, InotifyReader
from exporter.index.service import ExporterService
from exporter.index.tree import Tree
from exporter.index.updater import IndexUpdater
from shared.layout import Layout
from tests.oracle import assert_exact
from tests.support import make_service, wait_until


@pytest.fixture
def service(store: Path) -> Iterator[ExporterService]:
    svc = make_service(store)
    svc.start()
    wait_until(svc.ready.is_set, timeout=10, what="initial scan")
    yield svc
    svc.stop()


def models_of(store: Path) -> Path:
    return store / "models"


def test_create_modify_delete_a_file(service: ExporterService, store: Path) -> None:
    model = models_of(store) / "raw" / "llama"
    model.mkdir()
    (model / "w.bin").write_bytes(b"x" * 1000)
    assert_exact(service)
    with open(model / "w.bin", "ab") as handle:
        handle.write(b"y" * 500)
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (1500, 1, 1)
    (model / "w.bin").unlink()
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (0, 0, 1)


def test_deleting_a_directory_removes_its_subtree(service: ExporterService, store: Path) -> None:
    model = models_of(store) / "quantized" / "m"
    (model / "a" / "b").mkdir(parents=True)
    for i in range(20):
        (model / "a" / "b" / f"f{i}").write_bytes(b"z" * i)
    assert_exact(service)
    shutil.rmtree(model)
    assert_exact(service)
    assert service.snapshot().tiers["quantized"] == (0, 0, 0)


def test_moves_inside_and_across_tiers(service: ExporterService, store: Path) -> None:
    models = models_of(store)
    (models / "raw" / "m" / "sub").mkdir(parents=True)
    (models / "raw" / "m" / "sub" / "w").write_bytes(b"a" * 300)
    (models / "raw" / "m" / "cfg").write_bytes(b"b" * 7)
    assert_exact(service)
    os.rename(models / "raw" / "m", models / "raw" / "m2")
    assert_exact(service)
    os.rename(models / "raw" / "m2", models / "repository" / "m2")
    assert_exact(service)
    assert service.snapshot().tiers["repository"] == (307, 2, 1)
    assert service.snapshot().tiers["raw"] == (0, 0, 0)
    os.rename(models / "repository" / "m2" / "cfg", models / "quantized" / "cfg")
    assert_exact(service)


def test_directories_moved_in_and_out(service: ExporterService, store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "download"
    (outside / "deep" / "er").mkdir(parents=True)
    for i in range(50):
        (outside / "deep" / "er" / f"shard{i}").write_bytes(b"q" * (i + 1))
    os.rename(outside, models_of(store) / "raw" / "downloaded")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (sum(range(1, 51)), 50, 1)
    os.rename(models_of(store) / "raw" / "downloaded", tmp_path / "gone")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (0, 0, 0)


def test_reads_are_not_events(service: ExporterService, store: Path) -> None:
    model = models_of(store) / "raw" / "reader"
    model.mkdir()
    (model / "w.bin").write_bytes(b"r" * 10)
    assert_exact(service)
    before = service.snapshot().events_total
    for _ in range(200):
        (model / "w.bin").read_bytes()
    (model / "marker").write_bytes(b"m")  # create, modify, close: at most three hints
    wait_until(lambda: service.snapshot().tiers["raw"] == (11, 2, 1), timeout=5, what="marker counted")
    # w.bin's own close may trail into this window; 200 reads as events would be far more.
    assert service.snapshot().events_total - before <= 6
    assert not MASK & (InotifyConstants.IN_OPEN | InotifyConstants.IN_ACCESS | InotifyConstants.IN_CLOSE_NOWRITE)


def test_a_directory_moved_out_is_no_longer_watched(service: ExporterService, store: Path, tmp_path: Path) -> None:
    model = models_of(store) / "raw" / "leaving"
    (model / "sub").mkdir(parents=True)
    (model / "sub" / "f").write_bytes(b"1")
    assert_exact(service)
    watches = service.snapshot().watches
    os.rename(model, tmp_path / "left")
    wait_until(lambda: service.snapshot().watches == watches - 2, timeout=5, what="watches dropped")
    # Writes in the old directory, now outside, must not land anywhere in the index.
    (tmp_path / "left" / "sub" / "g").write_bytes(b"22")
    (models_of(store) / "raw" / "after").write_bytes(b"333")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (3, 1, 1)
    # Moved back in: watched again, and new files in it are seen.
    os.rename(tmp_path / "left", model)
    wait_until(lambda: service.snapshot().watches == watches, timeout=5, what="watches back")
    (model / "sub" / "h").write_bytes(b"4444")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (10, 4, 2)


def test_the_hand_off_is_bounded_by_events() -> None:
    handoff = Handoff(limit=5)
    assert handoff.put([RawEvent("modified", "/a")] * 3)
    assert not handoff.put([RawEvent("modified", "/b")] * 3)  # 6 > 5: refused whole, caller rescans
    assert handoff.put([RawEvent("modified", "/c")] * 2)
    assert [e.src for e in handoff.get(0.0, 0.0, 4)] == ["/a", "/a", "/a", "/c"]
    assert [e.src for e in handoff.get(0.0, 0.0, 4)] == ["/c"]
    assert handoff.get(0.0, 0.0, 4) == []


def test_write_temp_then_rename_over_the_target(service: ExporterService, store: Path) -> None:
    model = models_of(store) / "repository" / "bert"
    model.mkdir()
    (model / "model.safetensors").write_bytes(b"o" * 100)
    assert_exact(service)
    for round_ in range(30):
        tmp = model / f".model.safetensors.tmp{round_}"
        tmp.write_bytes(b"n" * (200 + round_))
        os.rename(tmp, model / "model.safetensors")
    assert_exact(service)
    snap = service.snapshot()
    assert snap.tiers["repository"] == (229, 1, 1)


def test_files_in_a_directory_created_a_moment_ago(service: ExporterService, store: Path) -> None:
    base = models_of(store) / "raw" / "fresh"
    for i in range(30):
        deep = base / f"a{i}" / "b"
        deep.mkdir(parents=True)
        (deep / "f").write_bytes(b"1" * 10)
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (300, 30, 1)


def test_hard_links_count_once_and_symlinks_never(service: ExporterService, store: Path, tmp_path: Path) -> None:
    model = models_of(store) / "raw" / "hf-cache"
    (model / "blobs").mkdir(parents=True)
    (model / "snapshots").mkdir()
    (model / "blobs" / "abc").write_bytes(b"w" * 4096)
    os.link(model / "blobs" / "abc", model / "snapshots" / "weights")
    os.symlink(model / "blobs" / "abc", model / "snapshots" / "link")
    big_outside = tmp_path / "elsewhere"
    big_outside.write_bytes(b"e" * 10_000)
    os.symlink(big_outside, models_of(store) / "raw" / "symlinked-model")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (4096, 1, 1)
    (model / "blobs" / "abc").unlink()
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (4096, 1, 1)


def total(svc: ExporterService) -> tuple[int, int]:
    tiers = svc.snapshot().tiers.values()
    return sum(t[0] for t in tiers), sum(t[1] for t in tiers)


def test_a_link_to_an_already_indexed_file_counts_once(service: ExporterService, store: Path) -> None:
    """link() tells only the new name's directory: the first name, indexed while it had one link,
    must still be found to be the same inode."""
    model = models_of(store) / "raw" / "m"
    model.mkdir()
    (model / "a").write_bytes(b"a" * 1000)
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (1000, 1, 1)
    os.link(model / "a", model / "b")  # after `a` is indexed: not in the same batch
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (1000, 1, 1)
    (model / "a").unlink()
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (1000, 1, 1)


def test_a_link_from_another_tier_counts_once_and_takes_over(service: ExporterService, store: Path) -> None:
    models = models_of(store)
    (models / "raw" / "m").mkdir()
    (models / "raw" / "m" / "a").write_bytes(b"a" * 1000)
    (models / "quantized" / "q").mkdir()
    (models / "raw" / "single.gguf").write_bytes(b"s" * 77)
    assert_exact(service)
    os.link(models / "raw" / "m" / "a", models / "quantized" / "q" / "w")
    os.link(models / "raw" / "single.gguf", models / "repository" / "single.gguf")
    # Counts once in all; and raw/m's last change is a's ctime, which link() moved without an event.
    assert_exact(service)
    assert total(service) == (1077, 2)
    with open(models / "quantized" / "q" / "w", "ab") as handle:  # written through the new name
        handle.write(b"w" * 500)
    assert_exact(service)
    assert total(service) == (1577, 2)
    (models / "quantized" / "q" / "w").unlink()  # a's ctime moves again; raw/m must see it
    assert_exact(service)
    assert service.snapshot().tiers["quantized"] == (0, 0, 1)
    assert total(service) == (1577, 2)
    (models / "raw" / "single.gguf").unlink()
    assert_exact(service)
    assert service.snapshot().tiers["repository"] == (77, 1, 1)


def test_a_copy_made_of_links_counts_once(service: ExporterService, store: Path) -> None:
    """`cp -al` makes a new directory full of links to indexed files: its scan meets them first."""
    source = models_of(store) / "raw" / "base"
    (source / "sub").mkdir(parents=True)
    for i in range(20):
        (source / "sub" / f"shard{i}").write_bytes(b"x" * (100 + i))
    assert_exact(service)
    subprocess.run(["cp", "-al", str(source), str(models_of(store) / "quantized" / "linked")], check=True)
    assert_exact(service)
    assert total(service) == (sum(range(100, 120)), 20)


def test_a_file_linked_from_outside_counts_once(service: ExporterService, store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside-blob"
    outside.write_bytes(b"o" * 300)
    (models_of(store) / "raw" / "m").mkdir()
    os.link(outside, models_of(store) / "raw" / "m" / "w")
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (300, 1, 1)


def test_a_reused_inode_number_is_searched_again(service: ExporterService, store: Path, tmp_path: Path) -> None:
    """A file whose other link is outside the tree is searched once; a new file that gets its inode
    number back (ext4 reuses them at once) and then a link in the tree must be searched anew."""
    models = models_of(store)
    (models / "raw" / "a").mkdir()
    (models / "quantized" / "b").mkdir()
    for attempt in range(50):
        # Made in the models' directory, so that ext4 hands its inode to the next file made there.
        first = models / "raw" / "a" / f"f{attempt}"
        first.write_bytes(b"o" * 100)
        outside = tmp_path / f"outside-{attempt}"
        os.link(first, outside)
        with open(first, "ab") as handle:  # an event whose lstat shows a link the index cannot find
            handle.write(b"+")
        assert_exact(service)
        inode = os.lstat(first).st_ino
        first.unlink()
        outside.unlink()
        again = models / "raw" / "a" / f"g{attempt}"
        again.write_bytes(b"n" * 300)
        if os.lstat(again).st_ino == inode:
            break
        again.unlink()
    else:
        pytest.skip("this filesystem did not reuse the inode number")
    assert_exact(service)
    os.link(again, models / "quantized" / "b" / "d.gguf")  # the same link count the old inode had
    assert_exact(service)
    assert total(service) == (300, 1)


def test_removing_a_directory_that_holds_a_link_dates_the_other_model(service: ExporterService, store: Path) -> None:
    models = models_of(store)
    (models / "raw" / "a" / "sub").mkdir(parents=True)
    (models / "quantized" / "b").mkdir()
    (models / "raw" / "a" / "sub" / "f").write_bytes(b"f" * 64)
    os.link(models / "raw" / "a" / "sub" / "f", models / "quantized" / "b" / "f")
    assert_exact(service)
    shutil.rmtree(models / "raw" / "a")  # unlink() moves f's ctime: quantized/b changed
    assert_exact(service)
    assert total(service) == (64, 1)


def test_odd_names_do_not_break_anything(service: ExporterService, store: Path) -> None:
    tier = os.fsencode(models_of(store) / "raw")
    for name in (b"new\nline", b'quo"te', b"back\\slash", b"bad-\xff-utf8", "ünïcode".encode()):
        path = os.path.join(tier, name)
        os.mkdir(path)
        with open(os.path.join(path, b"f"), "wb") as handle:
            handle.write(b"x" * 3)
    assert_exact(service)
    assert service.snapshot().tiers["raw"] == (15, 5, 5)


def test_single_file_models_and_the_other_tier(service: ExporterService, store: Path) -> None:
    models = models_of(store)
    (models / "raw" / "tiny.gguf").write_bytes(b"g" * 123)
    (models / "README").write_bytes(b"r" * 5)
    (models / "scratch").mkdir()
    (models / "scratch" / "x").write_bytes(b"s" * 6)
    assert_exact(service)
    snap = service.snapshot()
    assert snap.tiers["raw"] == (123, 1, 1)
    assert snap.tiers["other"] == (11, 2, 0)


def test_a_create_is_as_new_as_the_directory_it_changed(service: ExporterService, store: Path) -> None:
    """Creating an entry moves its directory's mtime, a separate clock read from the new entry's own
    ctime. With multigrain timestamps (Linux 6.13+) a directory whose times were read within the
    current clock tick gets a fine-grained, later mtime: the model's last change is the directory's."""
    model = models_of(store) / "quantized" / "m"
    model.mkdir()
    assert_exact(service)
    for i in range(5):
        os.lstat(model)  # as the index or a reader may have just done
        (model / f"empty{i}").touch()  # no write after the create: nothing newer than the dir
        os.lstat(model)
        (model / f"sub{i}").mkdir()
        assert_exact(service)


def test_single_file_models_keep_their_own_time_after_a_full_scan(store: Path) -> None:
    """A scan keeps one newest time per directory; a file in a tier dir must not get its tier's."""
    models = models_of(store)
    (models / "raw" / "old.gguf").write_bytes(b"o" * 10)
    os.utime(models / "raw" / "old.gguf", (1_000_000_000, 1_000_000_000))
    (models / "raw" / "newer").mkdir()
    (models / "raw" / "newer" / "w").write_bytes(b"n")
    # The tier directory's newest time is far later than old.gguf's own (a time in 2033).
    os.utime(models / "raw", (2_000_000_000, 2_000_000_000))
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        assert_exact(svc)
        truth = os.lstat(models / "raw" / "old.gguf")
        stat = next(s for s in svc.snapshot().models if s.model == "old.gguf")
        assert stat.changed == max(truth.st_mtime, truth.st_ctime) < 2_000_000_000
        svc.reconcile("test")
        assert_exact(svc)
    finally:
        svc.stop()


def test_copied_models_are_as_new_as_their_ctime(service: ExporterService, store: Path, tmp_path: Path) -> None:
    source = tmp_path / "old-model"
    source.mkdir()
    (source / "w").write_bytes(b"o" * 10)
    os.utime(source / "w", (1_000_000_000, 1_000_000_000))
    os.utime(source, (1_000_000_000, 1_000_000_000))
    subprocess.run(["cp", "-a", str(source), str(models_of(store) / "raw" / "copied")], check=True)
    assert_exact(service)
    stat = next(s for s in service.snapshot().models if s.model == "copied")
    assert stat.changed > 1_700_000_000  # ctime of the copy, not the preserved 2001 mtime


def test_unreadable_directory_is_counted_not_fatal(
    service: ExporterService, store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root nothing is unreadable; opening the directory is the scanner's one edge, so fail it there.
    import exporter.index.scan as scan_module

    real_open = os.open
    locked = str(models_of(store) / "raw" / "locked")

    def open_(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_module.os, "open", open_)
    (models_of(store) / "raw" / "locked").mkdir()
    wait_until(lambda: service.snapshot().errors_total.get("scan", 0) >= 1, timeout=5, what="scan error counted")
    (models_of(store) / "raw" / "ok").mkdir()
    (models_of(store) / "raw" / "ok" / "f").write_bytes(b"1")
    wait_until(lambda: service.snapshot().tiers["raw"][0] == 1, timeout=5, what="still updating")


OPS = st.lists(
    st.tuples(
        st.sampled_from(["write", "append", "rm", "rmtree", "mkdir", "mv", "mvout", "mvin", "save"]),
        st.sampled_from(["raw/a", "raw/b", "quantized/a", "repository/c", "raw/a/d", "quantized/a/d", "x"]),
        st.sampled_from(["raw/a", "raw/b", "quantized/a", "repository/c", "raw/a/d", "repository/e", "x"]),
        st.integers(0, 5000),
    ),
    min_size=1,
    max_size=12,
)


def perform(models: Path, outside: Path, op: tuple[str, str, str, int], counter: list[int]) -> None:
    kind, a, b, size = op
    pa, pb = models / a, models / b
    counter[0] += 1
    try:
        if kind == "write":
            pa.parent.mkdir(parents=True, exist_ok=True)
            if pa.is_dir():
                pa = pa / f"f{counter[0]}"
            pa.write_bytes(b"w" * size)
        elif kind == "append" and pa.is_file():
            with open(pa, "ab") as handle:
                handle.write(b"a" * size)
        elif kind == "rm" and pa.is_file():
            pa.unlink()
        elif kind == "rmtree" and pa.is_dir():
            shutil.rmtree(pa)
        elif kind == "mkdir":
            pa.mkdir(parents=True, exist_ok=True)
            (pa / f"g{counter[0]}").write_bytes(b"m" * size) if pa.is_dir() else None
        elif kind == "mv" and pa.exists() and not str(pb).startswith(str(pa) + "/"):
            pb.parent.mkdir(parents=True, exist_ok=True)
            if pb.is_dir() and not pa.is_dir():
                pb = pb / pa.name
            if pb.is_dir():
                shutil.rmtree(pb)
            os.rename(pa, pb)
        elif kind == "mvout" and pa.exists():
            os.rename(pa, outside / f"out{counter[0]}")
        elif kind == "mvin":
            src = outside / f"in{counter[0]}"
            (src / "s").mkdir(parents=True)
            (src / "s" / "f").write_bytes(b"i" * size)
            pa.parent.mkdir(parents=True, exist_ok=True)
            if not pa.exists():
                os.rename(src, pa)
        elif kind == "save" and pa.parent.is_dir() and not pa.is_dir():
            tmp = pa.parent / f".tmp{counter[0]}"
            tmp.write_bytes(b"s" * size)
            os.rename(tmp, pa)
    except (FileNotFoundError, NotADirectoryError, IsADirectoryError, FileExistsError, OSError):
        pass  # a sequence may ask for the impossible; the filesystem decides what happened


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_random_operation_sequences_end_exact(tmp_path_factory: pytest.TempPathFactory, ops: list) -> None:  # type: ignore[type-arg]
    base = tmp_path_factory.mktemp("hyp") / "storage"
    for tier in ("raw", "quantized", "repository"):
        (base / "models" / tier).mkdir(parents=True)
    outside = base.parent / "outside"
    outside.mkdir()
    svc = make_service(base)
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10)
        counter = [0]
        for op in ops:
            perform(base / "models", outside, op, counter)
        assert_exact(svc, timeout=6)
    finally:
        svc.stop()


def test_a_burst_that_overflows_ends_exact(store: Path) -> None:
    """100,000 creates that overflow the hand-off (or the kernel queue); a rescan makes it exact."""
    svc = make_service(store, STORAGE_EVENT_QUEUE_SIZE="1000")
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10)
        writer = (
            "import os,sys\n"
            "root=sys.argv[1]\n"
            "for d in range(100):\n"
            "    p=os.path.join(root,'raw','burst','d%d'%d); os.makedirs(p)\n"
            "    for i in range(1000):\n"
            "        fd=os.open(os.path.join(p,'f%d'%i),os.O_WRONLY|os.O_CREAT,0o644)\n"
            "        os.write(fd,b'x'); os.close(fd)\n"
        )
        # The reader keeps up with a writer on this disk now: stall the updater for the burst so the
        # 1,000-event hand-off (or the kernel queue) really overflows.
        with svc.lock:
            subprocess.run([sys.executable, "-c", writer, str(models_of(store))], check=True)
        assert_exact(svc, timeout=60)
        assert svc.snapshot().tiers["raw"] == (100_000, 100_000, 1)
        # The scan triggered by the new `burst` directory can make the gauges exact before the
        # updater gets round to counting the overflow: wait for the count too, with a deadline.
        wait_until(lambda: svc.snapshot().overflows_total > 0, timeout=10, what="overflow counted")
        assert_exact(svc, timeout=60)
    finally:
        svc.stop()


INOTIFY_SYSCTL = Path("/proc/sys/fs/inotify")


@contextlib.contextmanager
def inotify_limit(name: str, value: int) -> Iterator[None]:
    """Lower a kernel inotify limit while the block runs (the service's start), then put it back.

    `max_queued_events` is copied into each inotify instance when it is made, so the service keeps
    the small queue after the limit is restored; `max_user_watches` is checked as watches are added.
    """
    knob = INOTIFY_SYSCTL / name
    try:
        before = knob.read_text()
        knob.write_text(f"{value}\n")
    except OSError as err:
        pytest.skip(f"cannot change {knob}: {err}")
    try:
        yield
    finally:
        knob.write_text(before)


def test_a_kernel_queue_overflow_rewatches_rescans_and_ends_exact(store: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    svc = make_service(store)
    reasons: list[str] = []
    raise_ = svc.overflow.raise_

    def spy(reason: str) -> None:
        reasons.append(reason)
        raise_(reason)

    monkeypatch.setattr(svc.overflow, "raise_", spy)
    with inotify_limit("max_queued_events", 16):
        svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        writer = (
            "import os,sys\n"
            "root=sys.argv[1]\n"
            "for d in range(20):\n"
            "    p=os.path.join(root,'raw','burst','d%d'%d); os.makedirs(p)\n"
            "    for i in range(250):\n"
            "        open(os.path.join(p,'f%d'%i),'wb').write(b'x')\n"
        )
        subprocess.run([sys.executable, "-c", writer, str(models_of(store))], check=True)
        wait_until(lambda: "inotify_queue_overflow" in reasons, timeout=10, what="kernel queue overflow seen")
        assert_exact(svc, timeout=60)
        assert svc.snapshot().tiers["raw"] == (5000, 5000, 1)
        wait_until(lambda: svc.snapshot().overflows_total > 0, timeout=10, what="overflow counted")
        # Directories made while events were lost got their watches back: later writes in them count.
        for d in (0, 19):
            (models_of(store) / "raw" / "burst" / f"d{d}" / "late").write_bytes(b"y" * 10)
        assert_exact(svc, timeout=10)
        assert svc.snapshot().tiers["raw"] == (5020, 5002, 1)
    finally:
        svc.stop()


def test_no_watches_left_falls_back_to_polling_and_stays_exact(store: Path) -> None:
    svc = make_service(store, STORAGE_POLL_INTERVAL_SECONDS="1")
    try:
        # Held until ready: the initial scan adds the watches below the root as it lists (R8).
        with inotify_limit("max_user_watches", 1):
            svc.start()
            wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        assert svc.polling and "watches" in (svc.polling_reason or "")
        assert svc.snapshot().errors_total.get("watch", 0) > 0
        model = models_of(store) / "quantized" / "m"
        model.mkdir()
        (model / "w.bin").write_bytes(b"q" * 77)
        assert_exact(svc, timeout=10)
        assert svc.snapshot().tiers["quantized"] == (77, 1, 1)
    finally:
        svc.stop()


class _RecordingLock:
    """A lock stand-in that says whether it is held, so a test can see where syscalls happen."""

    def __init__(self) -> None:
        self.held = False
        self.taken = 0

    def __enter__(self) -> None:
        self.held = True
        self.taken += 1

    def __exit__(self, *_: object) -> None:
        self.held = False


def test_a_new_tree_is_scanned_once_outside_the_index_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A directory made with files and subdirectories arrives as one batch of creates: the new
    directory is scanned once, the paths inside it need no lstat of their own, and no syscall
    runs while the index lock is held (a scrape waiting for the lock waits for arithmetic only)."""
    models = tmp_path / "models"
    (models / "raw").mkdir(parents=True)
    tree = Tree(Layout())
    errors: list[tuple[str, str, str]] = []
    updater = IndexUpdater(str(models), lambda *e: errors.append(e), lambda _parts: None)
    lock = _RecordingLock()
    under_lock: list[str] = []
    real_lstat, real_scandir = os.lstat, os.scandir

    def lstat(path: Any) -> os.stat_result:
        if lock.held:
            under_lock.append(f"lstat {path}")
        return real_lstat(path)

    def scandir(path: Any) -> Any:
        if lock.held:
            under_lock.append(f"scandir {path}")
        return real_scandir(path)

    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(os, "scandir", scandir)
    updater.apply(tree, [RawEvent("created", str(models / "raw"))], lock)
    model = models / "raw" / "m"
    (model / "a" / "b").mkdir(parents=True)
    (model / "w.bin").write_bytes(b"x" * 10)
    (model / "a" / "c.bin").write_bytes(b"x" * 20)
    (model / "a" / "b" / "d.bin").write_bytes(b"x" * 30)
    created = [
        model,
        model / "w.bin",
        model / "a",
        model / "a" / "c.bin",
        model / "a" / "b",
        model / "a" / "b" / "d.bin",
    ]
    lstats = updater.apply(tree, [RawEvent("created", str(path)) for path in created], lock)
    assert tree.tier_totals()["raw"] == (60, 3, 1)
    assert lstats == 2  # raw/m (then scanned) and raw (its parent): what lies inside came with the scan
    assert under_lock == [] and errors == []
    assert lock.taken == 2


@pytest.mark.parametrize("counts_subdirs", [True, False])
def test_watching_lists_only_directories_that_have_subdirectories(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, counts_subdirs: bool
) -> None:
    """On a filesystem that counts subdirectories in st_nlink, a directory with a link count of 2
    is watched without being listed (a million-file store lists its few parent directories, not
    every file); elsewhere every directory is listed. Either way every directory is watched, and
    a subdirectory made later in an unlisted one is watched from its create event."""
    models = tmp_path / "models"
    for model in ("a", "b", "c"):
        (models / "raw" / model / "sub").mkdir(parents=True)
        (models / "raw" / model / "sub" / "w.bin").write_bytes(b"w")
    (models / "quantized").mkdir()
    all_dirs = [str(models)] + [str(p) for p in models.rglob("*") if p.is_dir()]
    leaf_device = subdir_counting_device(str(models)) if counts_subdirs else None
    if counts_subdirs and leaf_device is None:
        pytest.skip(f"{tmp_path} is not on a filesystem that counts subdirectories")
    listed: list[str] = []
    real_scandir = os.scandir

    def scandir(path: Any) -> Any:
        listed.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    reader = InotifyReader(str(models), Handoff(10_000), lambda _r: None, lambda _p, _e: None, leaf_device)
    reader.start()
    try:
        assert reader.watches == len(all_dirs)
        leaves = {str(models / "quantized")} | {str(models / "raw" / m / "sub") for m in "abc"}
        if counts_subdirs:
            assert sorted(listed) == sorted(set(all_dirs) - leaves)
        else:
            assert sorted(listed) == sorted(all_dirs)
        (models / "raw" / "a" / "sub" / "later").mkdir()
        wait_until(lambda: reader.watches == len(all_dirs) + 1, timeout=5, what="a watch on the new directory")
    finally:
        reader.stop()


def test_only_filesystems_that_count_subdirectories_are_trusted(tmp_path: Path) -> None:
    line = "36 25 0:32 / {point} rw,relatime shared:1 - {fstype} /dev/x rw\n"
    for fstype, trusted in (("ext4", True), ("xfs", True), ("tmpfs", True), ("btrfs", False), ("overlay", False)):
        device = subdir_counting_device(str(tmp_path), line.format(point="/", fstype=fstype))
        assert (device == os.stat(tmp_path).st_dev) if trusted else device is None, fstype
