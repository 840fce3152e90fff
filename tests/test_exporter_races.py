"""The reader's and the updater's guarantees (R1-R4, U1-U4), each with hand-built event sequences.

The sequences are plain values, as the reader would hand them over or as the kernel would queue
them; the filesystem under them is real, and put in the state the interleaving would leave it in.
`test_exporter_races_kernel.py` runs the same cases through the kernel, repeated.
"""

from __future__ import annotations

import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import InotifyConstants as C

from exporter.index.events import RawEvent
from exporter.index.reader import Handoff, InotifyReader
from exporter.index.scan import scan_local
from exporter.index.tree import Tree
from exporter.index.updater import IndexUpdater
from shared.layout import Layout
from tests.oracle import walk_truth


def index_of(models: Path) -> tuple[Tree, IndexUpdater, list[tuple[str, str, str]]]:
    """A tree built by a full scan, as the service starts, and an updater for it."""
    tree = Tree(Layout())
    errors: list[tuple[str, str, str]] = []
    updater = IndexUpdater(str(models), lambda *e: errors.append(e), lambda _parts: None)
    result = scan_local(str(models))
    assert result.node is not None
    tree.graft((), result.node)
    return tree, updater, errors


def counts(tree: Tree) -> dict[str, tuple[int, int, int, int]]:
    allocated = tree.tier_allocated()
    return {tier: (*values, allocated[tier]) for tier, values in tree.tier_totals().items()}


def truth_counts(models: Path) -> dict[str, tuple[int, int, int, int]]:
    truth = walk_truth(models)
    return {tier: (v[0], v[1], v[2], v[3]) for tier, v in truth.tiers.items()}


def model_counts(tree: Tree) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {(s.tier, s.model): (s.bytes, s.files, s.allocated) for s in tree.model_stats()}


def truth_models(models: Path) -> dict[tuple[str, str], tuple[int, int, int]]:
    return {key: (int(v[0]), int(v[1]), int(v[3])) for key, v in walk_truth(models).models.items()}


def assert_index_exact(tree: Tree, models: Path) -> None:
    assert counts(tree) == truth_counts(models)
    assert model_counts(tree) == truth_models(models)


@pytest.fixture
def models(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    for tier in ("raw", "quantized", "repository"):
        (root / tier).mkdir(parents=True)
    return root


def fill(directory: Path, files: int, size: int = 10) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (directory / f"f{i}").write_bytes(b"x" * (size + i))


# ----- U1: an announced directory is scanned whatever the index holds -----


def test_a_directory_recreated_under_the_same_name_is_scanned_not_touched(models: Path) -> None:
    """rm -rf m; tar -x m in one coalescing window: the hints are `deleted m`, `created m`, and
    the index still holds the old m when they are applied."""
    fill(models / "raw" / "m", 3)
    tree, updater, _ = index_of(models)
    shutil.rmtree(models / "raw" / "m")
    fill(models / "raw" / "m" / "sub", 7, size=100)
    m = str(models / "raw" / "m")
    updater.apply(tree, [RawEvent("deleted", m + "/f0"), RawEvent("deleted", m), RawEvent("created", m)])
    assert_index_exact(tree, models)


def test_a_tier_removed_and_recreated_with_a_model_in_it_is_scanned(models: Path) -> None:
    fill(models / "repository" / "old", 5)
    tree, updater, _ = index_of(models)
    shutil.rmtree(models / "repository")
    fill(models / "repository" / "new", 20)
    tier = str(models / "repository")
    updater.apply(tree, [RawEvent("deleted", tier), RawEvent("created", tier)])
    assert_index_exact(tree, models)
    assert counts(tree)["repository"][:3] == (sum(range(10, 30)), 20, 1)


def test_a_subdirectory_announced_after_its_parent_was_scanned_is_scanned_again(models: Path) -> None:
    """mkdir -p m/d/e/f; echo > m/d/e/f/x: the scan of m met f while still empty; the file was written
    before f's watch; f's own create hint comes in a later batch and must not be a mere touch."""
    (models / "raw" / "m" / "d" / "e" / "f").mkdir(parents=True)
    tree, updater, _ = index_of(models)
    (models / "raw" / "m" / "d" / "e" / "f" / "x").write_bytes(b"7\n")
    updater.apply(tree, [RawEvent("created", str(models / "raw" / "m" / "d" / "e" / "f"))])
    assert_index_exact(tree, models)
    assert counts(tree)["raw"][:3] == (2, 1, 1)


def test_a_directory_moved_back_in_is_scanned_for_what_changed_outside(models: Path, tmp_path: Path) -> None:
    """mv m out/x; (written outside); mv out/x m: the reader hands over `created m`, `deleted m`."""
    fill(models / "raw" / "m", 2)
    tree, updater, _ = index_of(models)
    os.rename(models / "raw" / "m", tmp_path / "x")
    fill(tmp_path / "x" / "more", 4)
    os.rename(tmp_path / "x", models / "raw" / "m")
    m = str(models / "raw" / "m")
    updater.apply(tree, [RawEvent("created", m), RawEvent("deleted", m)])
    assert_index_exact(tree, models)


def test_rename_over_an_empty_model_directory_rekeys_the_populated_one(models: Path) -> None:
    fill(models / "raw" / "new", 6)
    (models / "raw" / "m").mkdir()
    tree, updater, _ = index_of(models)
    os.rename(models / "raw" / "new", models / "raw" / "m")
    updater.apply(tree, [RawEvent("moved", str(models / "raw" / "new"), str(models / "raw" / "m"))])
    assert_index_exact(tree, models)
    assert counts(tree)["raw"][:3] == (sum(range(10, 16)), 6, 1)


# ----- U2: the size after the last write -----


def test_the_size_after_the_last_write_is_what_the_index_holds(models: Path) -> None:
    (models / "raw" / "m").mkdir()
    tree, updater, _ = index_of(models)
    path = models / "raw" / "m" / "w.bin"
    path.write_bytes(b"a" * 10)
    hints = [RawEvent("created", str(path)), RawEvent("modified", str(path))]
    with open(path, "ab") as handle:
        handle.write(b"b" * 90)  # the last write, after the hints were queued but before the flush
    hints.append(RawEvent("modified", str(path)))
    assert updater.apply(tree, hints) == 2  # one lstat for the file, one for its directory
    assert counts(tree)["raw"][:3] == (100, 1, 1)


# ----- U3: an unreadable directory is retried at its next hint -----


def test_an_unreadable_directory_is_scanned_again_when_its_permissions_change(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the unprivileged exporter sees chmod 000 ... chmod 755: lstats below it and its listing are
    refused, and the IN_ATTRIB of the chmod back is a plain `modified` hint for the directory. (As
    root nothing is refused: the refusal is made at the edges, os.lstat and the scanner's os.open;
    the kernel test runs unprivileged.)"""
    import exporter.index.scan as scan_module

    (models / "raw" / "m").mkdir()
    tree, updater, errors = index_of(models)
    locked = str(models / "raw" / "m")
    real_lstat, real_open = os.lstat, os.open
    refusing = [True]

    def lstat(path: str | os.PathLike[str], **kwargs: object) -> os.stat_result:
        if refusing[0] and os.fspath(path).startswith(locked + "/"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_lstat(path)

    def open_(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if refusing[0] and (str(path) == locked or str(path).startswith(locked + "/")):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "lstat", lstat)
    monkeypatch.setattr(scan_module.os, "open", open_)
    fill(models / "raw" / "m" / "d", 3)
    (models / "raw" / "m" / "top").write_bytes(b"t" * 5)
    updater.apply(tree, [RawEvent("created", locked + "/d"), RawEvent("created", locked + "/top")])
    assert errors and counts(tree)["raw"][:3] == (0, 0, 1)
    refusing[0] = False
    updater.apply(tree, [RawEvent("modified", locked)])  # chmod 755 m
    assert_index_exact(tree, models)


def test_a_directory_the_scan_could_not_open_is_scanned_again_at_its_next_hint(
    models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import exporter.index.scan as scan_module

    (models / "raw" / "m").mkdir()
    tree, updater, errors = index_of(models)
    fill(models / "raw" / "m" / "private", 4)
    locked = str(models / "raw" / "m" / "private")
    real_open = os.open
    refusing = [True]

    def open_(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if refusing[0] and str(path) == locked:
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(scan_module.os, "open", open_)
    updater.apply(tree, [RawEvent("created", locked)])
    assert [e[1] for e in errors] == [locked]
    refusing[0] = False
    # chmod -R a+rX m: the IN_ATTRIB of m comes first; m's scan must retry what lies below it.
    updater.apply(tree, [RawEvent("modified", str(models / "raw" / "m"))])
    assert_index_exact(tree, models)


# ----- the reader: R1-R4 on hand-built kernel event sequences -----


@pytest.fixture
def reader(models: Path) -> Iterator[InotifyReader]:
    """A reader whose watches are real (the kernel answers add_watch) but whose events are fed by hand."""
    r = InotifyReader(str(models), Handoff(10_000), lambda _r: None, lambda _p, _e: None)
    with r._map_lock:
        r._watch_tree(str(models), strict=True)
    yield r
    r.stop()


def wd_of(reader: InotifyReader, path: Path) -> int:
    return reader._wds[str(path)]


def test_a_directory_moved_out_and_straight_back_stays_watched(
    reader: InotifyReader, models: Path, tmp_path: Path
) -> None:
    """R3: `mv m out/x; mv out/x m` in one read: an unpaired move-from, then an unpaired move-to of
    the same inode. The move-to re-watches m (same wd); the move-from must not forget it after."""
    fill(models / "raw" / "m" / "sub", 1)
    reader.rewatch(str(models / "raw" / "m"))
    tier, sub = wd_of(reader, models / "raw"), wd_of(reader, models / "raw" / "m" / "sub")
    watches = reader.watches
    os.rename(models / "raw" / "m", tmp_path / "x")
    os.rename(tmp_path / "x", models / "raw" / "m")
    hints = reader.translate(
        [(tier, C.IN_MOVED_FROM | C.IN_ISDIR, 11, b"m"), (tier, C.IN_MOVED_TO | C.IN_ISDIR, 12, b"m")]
    )
    m = str(models / "raw" / "m")
    assert hints == [RawEvent("created", m), RawEvent("deleted", m)]
    assert reader.watches == watches
    assert reader._paths[sub] == str(models / "raw" / "m" / "sub")
    # And events from the re-watched directory are still translated.
    assert reader.translate([(sub, C.IN_CREATE, 0, b"late")]) == [RawEvent("created", m + "/sub/late")]


def test_a_directory_moved_out_for_good_is_forgotten(reader: InotifyReader, models: Path, tmp_path: Path) -> None:
    fill(models / "raw" / "m" / "sub", 1)
    reader.rewatch(str(models / "raw" / "m"))
    tier, sub = wd_of(reader, models / "raw"), wd_of(reader, models / "raw" / "m" / "sub")
    watches = reader.watches
    os.rename(models / "raw" / "m", tmp_path / "x")
    assert reader.translate([(tier, C.IN_MOVED_FROM | C.IN_ISDIR, 11, b"m")]) == [
        RawEvent("deleted", str(models / "raw" / "m"))
    ]
    assert reader.watches == watches - 2
    assert reader.translate([(sub, C.IN_CREATE, 0, b"outside")]) == []


def test_a_blue_green_swap_in_one_read_leaves_the_new_directory_watched(
    reader: InotifyReader, models: Path, tmp_path: Path
) -> None:
    """mv repository/m out/m-old; mv out/m-new repository/m."""
    fill(models / "repository" / "m", 1)
    reader.rewatch(str(models / "repository" / "m"))
    fill(tmp_path / "m-new" / "d", 2)
    tier = wd_of(reader, models / "repository")
    os.rename(models / "repository" / "m", tmp_path / "m-old")
    os.rename(tmp_path / "m-new", models / "repository" / "m")
    hints = reader.translate(
        [(tier, C.IN_MOVED_FROM | C.IN_ISDIR, 21, b"m"), (tier, C.IN_MOVED_TO | C.IN_ISDIR, 22, b"m")]
    )
    m = str(models / "repository" / "m")
    assert RawEvent("created", m) in hints
    new_m, new_d = wd_of(reader, models / "repository" / "m"), wd_of(reader, models / "repository" / "m" / "d")
    assert reader._paths[new_m] == m and reader._paths[new_d] == m + "/d"
    assert reader.translate([(new_d, C.IN_CREATE, 0, b"w")]) == [RawEvent("created", m + "/d/w")]


def test_a_move_whose_source_watch_was_another_directory_announces_the_destination(
    reader: InotifyReader, models: Path
) -> None:
    """R2: mkdir p (D); mv p q; mkdir p (X), all before the reader read the first create: it watched X
    as p. The move p -> q then carries X's watch to q; q's add_watch answers with another wd (or
    none was added), so q is watched anew and announced for a scan."""
    (models / "raw" / "m").mkdir()
    reader.rewatch(str(models / "raw" / "m"))
    parent = wd_of(reader, models / "raw" / "m")
    (models / "raw" / "m" / "q").mkdir()  # D, already at q
    (models / "raw" / "m" / "p").mkdir()  # X, at p
    hints = reader.translate(
        [
            (parent, C.IN_CREATE | C.IN_ISDIR, 0, b"p"),  # read late: watches X
            (parent, C.IN_MOVED_FROM | C.IN_ISDIR, 31, b"p"),
            (parent, C.IN_MOVED_TO | C.IN_ISDIR, 31, b"q"),
        ]
    )
    q = str(models / "raw" / "m" / "q")
    assert RawEvent("created", q) in hints
    assert reader._paths[wd_of(reader, models / "raw" / "m" / "q")] == q
    # X's own create, read next, puts its watch back under p.
    reader.translate([(parent, C.IN_CREATE | C.IN_ISDIR, 0, b"p")])
    p_wd, q_wd = wd_of(reader, models / "raw" / "m" / "p"), wd_of(reader, models / "raw" / "m" / "q")
    assert p_wd != q_wd
    assert reader._paths[p_wd] == str(models / "raw" / "m" / "p") and reader._paths[q_wd] == q


def test_a_directory_that_cannot_be_watched_yet_is_not_a_failure_and_is_watched_at_its_attrib(
    reader: InotifyReader, models: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """R1: unprivileged, inotify_add_watch on a mode-700 directory of another user is EACCES. (As
    root it never is: the refusal is made at the edge, the add_watch call.)"""
    tier = wd_of(reader, models / "raw")
    fill(models / "raw" / "m" / "sub", 2)
    real_add = reader._fd.add_callback
    refusing = [True]

    def add_callback(path: bytes, *args: object) -> object:
        if refusing[0] and path.startswith(os.fsencode(models / "raw" / "m")):
            return -1  # what watchdog answers for EACCES
        return real_add(path, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(reader._fd, "add_callback", add_callback)
    m = str(models / "raw" / "m")
    assert reader.translate([(tier, C.IN_CREATE | C.IN_ISDIR, 0, b"m")]) == [RawEvent("created", m)]
    assert not reader.failed and m not in reader._wds
    refusing[0] = False
    assert reader.translate([(tier, C.IN_ATTRIB | C.IN_ISDIR, 0, b"m")]) == [RawEvent("created", m)]
    assert m in reader._wds and m + "/sub" in reader._wds
    # A directory watched in full: its IN_ATTRIB is a plain hint.
    assert reader.translate([(tier, C.IN_ATTRIB | C.IN_ISDIR, 0, b"m")]) == [RawEvent("modified", m)]


def test_a_directory_made_and_moved_before_its_hints_were_applied_is_scanned_at_its_destination(
    models: Path,
) -> None:
    """mkdir raw/.new; (files); rm -rf raw/m; mv raw/.new raw/m, all before the batch is applied:
    the hints for .new find it gone, so the index has nothing to re-key, and the old m is still
    indexed when the move is applied. The destination must be scanned, not kept as the old m."""
    fill(models / "raw" / "m", 3)
    tree, updater, _ = index_of(models)
    new = models / "raw" / ".new"
    fill(new / "d", 6, size=50)
    shutil.rmtree(models / "raw" / "m")
    os.rename(new, models / "raw" / "m")
    m = str(models / "raw" / "m")
    updater.apply(
        tree,
        [
            RawEvent("created", str(new)),
            RawEvent("created", str(new / "d")),
            RawEvent("created", str(new / "d" / "f0")),
            RawEvent("deleted", m + "/f0"),
            RawEvent("deleted", m),
            RawEvent("moved", str(new), m),
        ],
    )
    assert_index_exact(tree, models)


def test_the_thread_guard_sees_a_service_left_running(store: Path) -> None:
    """Every exporter thread is a daemon: the guard must count them, and let a stopped one go."""
    from tests.conftest import leaked_threads
    from tests.support import make_service, wait_until

    before = set(threading.enumerate())
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        left = leaked_threads(before, stopping_seconds=0.2)
        assert "index-updater (daemon)" in left and "inotify-reader (daemon)" in left
    finally:
        svc.stop()
    assert leaked_threads(before) == []
