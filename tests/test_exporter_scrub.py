"""The scrub: pure decisions, corrections of drift planted behind the exporter's back, and no race
with the event path (a stale listing never reaches the index)."""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs
from watchdog.observers.inotify_c import CallbackId, WatchDescriptor

from exporter.index import scrub
from exporter.index.drift import BacklogYield, DirView, Listing, LogBudget, Pacer, compare, held, recent
from exporter.index.events import RawEvent
from exporter.index.scan import scan_local
from exporter.index.scrub import Finding, apply_finding, list_dir
from exporter.index.service import ExporterService
from exporter.index.tree import DirNode, Tree
from exporter.index.updater import IndexUpdater
from exporter.metrics.endpoint import MetricsRenderer
from shared.layout import Layout
from tests.oracle import assert_exact, differences
from tests.support import http_get, make_service, parse_metrics, start_exporter, wait_until

FAST = "100000"  # stats per second: a cycle of a test store takes the 1 s floor


Sizes = int | tuple[int, int]


def _sizes(files: dict[str, Sizes]) -> dict[str, tuple[int, int]]:
    """name -> (size, blocks); a bare size has as many 512-byte blocks as a dense file would."""
    return {name: v if isinstance(v, tuple) else (v, (v + 511) // 512) for name, v in files.items()}


def view(files: dict[str, Sizes], linked: tuple[str, ...] = (), dirs: tuple[str, ...] = ()) -> DirView:
    return DirView(_sizes(files), frozenset(linked), dirs)


def listing(
    files: dict[str, Sizes],
    linked: tuple[str, ...] = (),
    dirs: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
    changed: float = 10.0,
) -> Listing:
    return Listing(_sizes(files), frozenset(linked), frozenset(dirs), frozenset(others), changed)


# ----- pure decisions ---------------------------------------------------------------------------


def test_compare_of_a_directory_the_index_holds_exactly_is_empty() -> None:
    index = view({"a": 1, "b": 2}, linked=("b",), dirs=("d",))
    disk = listing({"a": 1, "b": 2}, linked=("b",), dirs=("d",), others=("symlink",))
    assert compare(index, disk) == []


def test_compare_names_every_kind_of_difference_in_both_directions() -> None:
    index = view({"size": 1, "gone": 5, "plain": 3, "was_file": 4}, dirs=("gone_dir", "was_dir", "same_dir"))
    disk = listing(
        {"size": 9, "plain": 3, "new": 7},
        linked=("plain",),
        dirs=("new_dir", "was_file", "same_dir"),
        others=("was_dir", "symlink"),
    )
    found = {d.name: (d.index, d.disk) for d in compare(index, disk)}
    assert found == {
        "size": ("file 1 bytes, 512 allocated", "file 9 bytes, 512 allocated"),
        "plain": ("file 3 bytes, 512 allocated", "file 3 bytes, 512 allocated (linked)"),
        "new": ("absent", "file 7 bytes, 512 allocated"),
        "new_dir": ("absent", "directory"),
        "was_file": ("file 4 bytes, 512 allocated", "directory"),
        "was_dir": ("directory", "not a regular file"),
        "gone": ("file 5 bytes, 512 allocated", "absent"),
        "gone_dir": ("directory", "absent"),
    }


def test_compare_names_a_file_whose_allocation_alone_changed() -> None:
    # Same length, blocks allocated late (delayed allocation, compression at writeback) or a hole
    # punched: no size changed, the allocated bytes did.
    index = view({"sparse": (1 << 20, 0), "same": (10, 8)})
    disk = listing({"sparse": (1 << 20, 2048), "same": (10, 8)})
    found = {d.name: (d.index, d.disk) for d in compare(index, disk)}
    assert found == {"sparse": ("file 1048576 bytes, 0 allocated", "file 1048576 bytes, 1048576 allocated")}


def test_recent_leaves_fresh_differences_to_the_events() -> None:
    old_dir = 10.0
    assert recent({"a": 98.0}, old_dir, now=100.0, grace=3.0)
    assert not recent({"b": 50.0}, old_dir, now=100.0, grace=3.0)
    # A name gone: only the directory's mtime tells when.
    assert recent({}, 99.0, now=100.0, grace=3.0)
    assert not recent({}, old_dir, now=100.0, grace=3.0)


def test_pacer_spends_the_budget_evenly_and_never_bursts_after_a_pause() -> None:
    pacer = Pacer(1000.0, burst=1.0)
    assert pacer.charge(100, now=0.0) == pytest.approx(0.1)
    assert pacer.charge(100, now=0.1) == pytest.approx(0.1)
    # 50 s idle buys only one second of credit: 1000 stats free, the next 1000 cost a second.
    assert pacer.charge(1000, now=50.0) == pytest.approx(0.0)
    assert pacer.charge(1000, now=50.0) == pytest.approx(1.0)


def test_backlog_yield_waits_while_events_are_queued_up_to_its_share_of_a_cycle() -> None:
    waits = BacklogYield(step=0.05, share=1.0)
    waits.start_cycle(0.2)
    assert waits.wait(backlog=False) == 0.0
    spent = [waits.wait(backlog=True) for _ in range(6)]
    # 0.2 s of allowance in 0.05 s steps, then the scrub goes on however busy the events are.
    assert spent == pytest.approx([0.05, 0.05, 0.05, 0.05, 0.0, 0.0])
    waits.start_cycle(0.12)
    assert [waits.wait(backlog=True) for _ in range(4)] == pytest.approx([0.05, 0.05, 0.02, 0.0])


def _one_model_scrubber(tmp_path: Path, per_second: float) -> tuple[scrub.Scrubber, Tree, threading.Event]:
    """A scrubber over a real one-file model, its index, and the event that stops it."""
    models = tmp_path / "models"
    (models / "raw" / "m").mkdir(parents=True)
    (models / "raw" / "m" / "w").write_bytes(b"abc")
    tree = _tree_of(models)
    ready, stop = threading.Event(), threading.Event()
    ready.set()
    scrubber = scrub.Scrubber(
        str(models), per_second, lambda fn: fn(tree), lambda _f: None, lambda _p: None, ready, stop
    )
    return scrubber, tree, stop


def test_a_scrub_cycle_lets_queued_events_go_first_but_is_never_held_past_its_allowance(tmp_path: Path) -> None:
    scrubber, _tree, stop = _one_model_scrubber(tmp_path, 1000.0)
    visited: list[float] = []
    queued = {"events": 5}
    scrubber.backlog = lambda: queued["events"]
    real_list_dir = scrub.list_dir

    def listing(path: str) -> Listing | None:
        visited.append(time.monotonic())
        return real_list_dir(path)

    scrub.list_dir = listing  # type: ignore[assignment]
    try:
        started = time.monotonic()
        release = threading.Timer(0.3, lambda: queued.update(events=0))
        release.start()
        assert scrubber.cycle()
        release.join()
        # Nothing listed while events were queued: the first directory waited for the backlog.
        assert visited and visited[0] - started >= 0.29
        queued["events"] = 5  # and a backlog that never clears holds a cycle back one allowance at most
        started = time.monotonic()
        assert scrubber.cycle()
        expected = scrubber.figures().expected_cycle_seconds
        assert time.monotonic() - started <= 2 * expected + 1.0
    finally:
        scrub.list_dir = real_list_dir
        stop.set()


def test_a_directory_visit_costs_the_budget_eight_lstats(tmp_path: Path) -> None:
    # Its CPU cost: charged as one lstat, a store of small directories cost several % of a core.
    scrubber, tree, stop = _one_model_scrubber(tmp_path, 10.0)
    started = time.monotonic()
    assert scrubber.cycle()
    took = time.monotonic() - started
    stop.set()
    assert scrub.DIR_VISIT_STATS == 8
    assert scrubber.figures().expected_cycle_seconds == pytest.approx((1 + tree.dirs * 9) / 10.0)
    # One second of credit up front, then the visits' cost paced at 10 a second.
    charged = tree.dirs * scrub.DIR_VISIT_STATS + (tree.dirs - 1) + 1
    assert took >= (charged - 10) / 10.0 - 0.1


def test_log_budget_allows_so_many_lines_a_minute_and_counts_the_rest() -> None:
    budget = LogBudget(2)
    assert [budget.allow(t) for t in (0.0, 1.0, 2.0, 3.0)] == [True, True, False, False]
    assert budget.take_suppressed() == 2
    assert budget.allow(61.0)
    assert budget.take_suppressed() == 0


# ----- corrections and the race, on real files without threads ----------------------------------


def _tree_of(models: Path) -> Tree:
    tree = Tree(Layout())
    found = scan_local(str(models))
    assert found.node is not None
    tree.graft((), found.node)
    return tree


def _counts(tree: Tree) -> tuple[object, ...]:
    return (
        tree.tier_totals(),
        tree.tier_allocated(),
        sorted((s.tier, s.model, s.bytes, s.files, s.allocated) for s in tree.model_stats()),
    )


def _finding(tree: Tree, models: Path, parts: tuple[str, ...]) -> Finding | None:
    listed = list_dir(str(models.joinpath(*parts)))
    assert listed is not None
    node = tree.lookup(parts)
    assert isinstance(node, DirNode)
    found = compare(DirView.of(node), listed)
    return Finding(parts, tuple(found)) if found else None


def _updater(models: Path) -> IndexUpdater:
    return IndexUpdater(str(models), lambda *_: None, lambda _parts: None)


def test_apply_finding_corrects_drift_the_events_never_reported(tmp_path: Path) -> None:
    models = tmp_path / "models"
    model = models / "raw" / "m"
    model.mkdir(parents=True)
    (model / "a").write_bytes(b"a" * 100)
    (model / "gone").write_bytes(b"g" * 7)
    tree = _tree_of(models)
    # Behind the index's back: no events are applied.
    (model / "a").write_bytes(b"a" * 150)
    (model / "gone").unlink()
    (model / "new").write_bytes(b"n" * 30)
    (model / "sub").mkdir()
    (model / "sub" / "deep").write_bytes(b"d" * 5)

    finding = _finding(tree, models, ("raw", "m"))
    assert finding is not None
    corrections = apply_finding(tree, _updater(models), finding, contextlib.nullcontext())

    by_path = {os.path.basename(c.path): (c.bytes_delta, c.files_delta) for c in corrections}
    assert by_path == {"a": (50, 0), "gone": (-7, -1), "new": (30, 1), "sub": (5, 1)}
    assert _counts(tree) == _counts(_tree_of(models))
    allocated = sum(os.lstat(p).st_blocks * 512 for p in (model / "a", model / "new", model / "sub" / "deep"))
    assert held(tree, ("raw", "m")) == (185, 3, allocated)


OPS = ("append", "truncate", "create", "remove", "mkdir", "rmtree", "file_to_dir")


def _mutate(rng: random.Random, model: Path) -> list[RawEvent]:
    """One random change in `model`, and the events inotify would report for it."""
    names = sorted(p.name for p in model.iterdir())
    op = rng.choice(OPS)
    name = rng.choice(names) if names and op not in ("create", "mkdir") else f"n{rng.randrange(1000)}"
    path = model / name
    if op in ("create", "mkdir", "file_to_dir") and path.exists():
        op = "append" if path.is_file() else "rmtree"
    if op == "append" and path.is_file():
        with open(path, "ab") as handle:
            handle.write(b"x" * rng.randrange(1, 500))
        return [RawEvent("modified", str(path))]
    if op == "truncate" and path.is_file():
        os.truncate(path, rng.randrange(0, 50))
        return [RawEvent("modified", str(path))]
    if op in ("remove", "rmtree", "append", "truncate") and path.exists():
        if path.is_dir():
            for child in path.iterdir():
                child.unlink()
            path.rmdir()
        else:
            path.unlink()
        return [RawEvent("deleted", str(path))]
    if op == "mkdir" or op == "file_to_dir":
        path.mkdir()
        (path / "f").write_bytes(b"y" * rng.randrange(1, 300))
        return [RawEvent("created", str(path)), RawEvent("created", str(path / "f"))]
    path.write_bytes(b"z" * rng.randrange(0, 300))
    return [RawEvent("created", str(path))]


@pytest.mark.parametrize("seed", range(60))
def test_a_listing_gone_stale_before_it_is_applied_never_reaches_the_index(tmp_path: Path, seed: int) -> None:
    """Hand-built interleavings of the race: the scrub lists a directory, the disk changes and the
    events are applied, then the scrub's (now stale) finding reaches the updater. The index must
    end as a fresh scan says: the drift from before the listing corrected, nothing after it undone."""
    rng = random.Random(seed)
    models = tmp_path / "models"
    model = models / "raw" / "m"
    model.mkdir(parents=True)
    for i in range(5):
        (model / f"f{i}").write_bytes(b"s" * rng.randrange(0, 200))
    tree = _tree_of(models)
    updater = _updater(models)
    # The index misses some changes (drift), the scrub lists, then more changes come with their events.
    for _ in range(rng.randrange(0, 3)):
        _mutate(rng, model)
    finding = _finding(tree, models, ("raw", "m"))
    for _ in range(rng.randrange(1, 6)):
        updater.apply(tree, _mutate(rng, model))
    if finding is None:
        return
    apply_finding(tree, updater, finding, contextlib.nullcontext())
    fresh = _tree_of(models)
    assert _counts(tree) == _counts(fresh), f"seed {seed}"


# ----- through a real exporter ------------------------------------------------------------------


@pytest.fixture
def scrubbing(store: Path) -> Iterator[ExporterService]:
    svc = make_service(store, STORAGE_SCRUB_STATS_PER_SECOND=FAST)
    svc.start()
    wait_until(svc.ready.is_set, timeout=20, what="initial scan")
    yield svc
    svc.stop()


def _within_one_cycle(svc: ExporterService) -> None:
    """Wait until a whole cycle started after now has ended."""
    assert svc.scrubber is not None
    now = svc.scrubber.cycles
    wait_until(lambda: svc.scrubber is not None and svc.scrubber.cycles >= now + 2, timeout=60, what="a full cycle")


def test_scrub_corrects_a_write_through_an_outside_hard_link_within_one_cycle(
    store: Path, tmp_path: Path, scrubbing: ExporterService
) -> None:
    """Case 10: inotify reports a write only to the watches of the directory it went through."""
    svc = scrubbing
    blob = tmp_path / "outside" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(b"o" * 1000)
    model = store / "models" / "raw" / "m"
    model.mkdir()
    os.link(blob, model / "w")
    assert_exact(svc)
    allocated_before = os.lstat(blob).st_blocks * 512
    with capture_logs() as entries:
        with open(blob, "ab") as handle:
            handle.write(b"p" * 500)
        # The events cannot have seen that write (and the scrub leaves a fresh change alone for 3 s).
        assert svc.snapshot().tiers["raw"] == (1000, 1, 1)
        _within_one_cycle(svc)

    assert not differences(svc)
    assert svc.snapshot().tiers["raw"] == (1500, 1, 1)
    [logged] = [e for e in entries if e["event"] == "scrub.corrected"]
    assert (logged["path"], logged["index"], logged["disk"]) == (
        str(model / "w"),
        f"file 1000 bytes, {allocated_before} allocated (linked)",
        f"file 1500 bytes, {os.lstat(blob).st_blocks * 512} allocated (linked)",
    )
    assert (logged["bytes_delta"], logged["files_delta"], logged["outcome"]) == (500, 0, "success")
    figures = svc.snapshot().scrub
    assert (figures.corrections_total, figures.drift_bytes_total) == (1, 500)
    assert figures.cycle_seconds >= scrub.MIN_CYCLE_SECONDS
    metrics = parse_metrics(MetricsRenderer(svc, svc.settings).render().decode())
    assert metrics[("model_storage_scrub_corrections_total", frozenset())] == 1
    assert metrics[("model_storage_scrub_drift_bytes_total", frozenset())] == 500
    assert metrics[("model_storage_scrub_cycle_seconds", frozenset())] >= 1
    assert metrics[("model_storage_scrub_last_cycle_timestamp_seconds", frozenset())] > 0


def test_scrub_corrects_changes_made_while_a_directory_had_no_watch_and_watches_it_again(
    store: Path, scrubbing: ExporterService
) -> None:
    svc = scrubbing
    model = store / "models" / "quantized" / "q"
    (model / "shard").mkdir(parents=True)
    (model / "shard" / "a").write_bytes(b"a" * 10)
    assert_exact(svc)
    reader = svc._reader
    assert reader is not None
    shard = str(model / "shard")
    wd = reader._wds[shard]
    reader._fd.remove_callbacks([(WatchDescriptor(wd), CallbackId(1))])
    wait_until(lambda: shard not in reader._wds, timeout=10, what="the watch is gone")
    (model / "shard" / "a").write_bytes(b"a" * 40)
    (model / "shard" / "b").write_bytes(b"b" * 5)
    assert svc.snapshot().tiers["quantized"] == (10, 1, 1), "unwatched: the index cannot have seen them"

    _within_one_cycle(svc)

    assert not differences(svc)
    assert svc.snapshot().scrub.corrections_total == 2
    assert svc.snapshot().scrub.drift_bytes_total == 35
    assert shard in reader._wds, "the directory is watched again"


def test_a_disabled_scrub_exports_zeros_and_runs_no_thread(store: Path) -> None:
    svc = make_service(store, STORAGE_SCRUB_STATS_PER_SECOND="0")
    assert svc.scrubber is None
    metrics = parse_metrics(MetricsRenderer(svc, svc.settings).render().decode())
    assert metrics[("model_storage_scrub_expected_cycle_seconds", frozenset())] == 0
    assert metrics[("model_storage_scrub_last_cycle_timestamp_seconds", frozenset())] == 0


HOG = "import time\nend = time.monotonic() + 600\nwhile time.monotonic() < end:\n    pass\n"


@pytest.fixture
def busy_cores() -> Iterator[None]:
    hogs = [subprocess.Popen([sys.executable, "-c", HOG]) for _ in range(os.cpu_count() or 2)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def test_scrub_and_events_agree_under_contention(store: Path, busy_cores: None) -> None:
    """Seeded rounds of random writes while the scrub lists the same directories with no grace (its
    findings race the events) and both cores are busy: every round ends exact, found by an
    independent walk. Replay a failing round with its printed seed."""
    seed = int(os.environ.get("SCRUB_RACE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    svc = make_service(store, STORAGE_SCRUB_STATS_PER_SECOND=FAST)
    # No grace and no floor: the scrub lists the few directories over and over, racing every event.
    grace, scrub.GRACE_SECONDS = scrub.GRACE_SECONDS, 0.0
    floor, scrub.MIN_CYCLE_SECONDS = scrub.MIN_CYCLE_SECONDS, 0.0
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=20, what="initial scan")
        models = [store / "models" / tier / f"m{i}" for tier in ("raw", "quantized") for i in range(2)]
        for model in models:
            model.mkdir()
        for round_ in range(8):
            for _ in range(60):
                _mutate(rng, rng.choice(models))
                time.sleep(rng.random() * 0.01)  # the workload's pace, not a synchronisation
            try:
                assert_exact(svc, timeout=20)
            except AssertionError as err:
                raise AssertionError(f"round {round_} of seed {seed} (SCRUB_RACE_SEED={seed}): {err}") from None
        assert svc.scrubber is not None and svc.scrubber.cycles > 50, "the scrub raced the events"
    finally:
        svc.stop()
        scrub.GRACE_SECONDS = grace
        scrub.MIN_CYCLE_SECONDS = floor


def test_the_exporter_process_scrubs_at_the_budget_from_its_environment(
    store: Path, tmp_path: Path, logs_dir: Path
) -> None:
    """The daemon as deployed: STORAGE_SCRUB_STATS_PER_SECOND, /metrics, the correction in its log."""
    blob = tmp_path / "outside-blob"
    blob.write_bytes(b"o" * 300)
    model = store / "models" / "repository" / "served"
    model.mkdir()
    os.link(blob, model / "weights")
    proc = start_exporter(store / "models", store, logs_dir, STORAGE_SCRUB_STATS_PER_SECOND=FAST)
    try:

        def metrics() -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
            return parse_metrics(http_get(proc.url + "/metrics")[1].decode())

        served = ("model_storage_model_bytes", frozenset({("tier", "repository"), ("model", "served")}))
        assert metrics()[served] == 300
        assert metrics()[("model_storage_scrub_expected_cycle_seconds", frozenset())] >= 1
        with open(blob, "ab") as handle:
            handle.write(b"p" * 200)
        wait_until(lambda: metrics()[served] == 500, timeout=60, what="the scrub corrected the model")
        after = metrics()
        assert after[("model_storage_scrub_corrections_total", frozenset())] == 1
        assert after[("model_storage_scrub_drift_bytes_total", frozenset())] == 200
        wait_until(lambda: "scrub.corrected" in proc.log(), timeout=10, what="the correction logged")
        assert str(model / "weights") in proc.log()
    finally:
        assert proc.stop() == 0
