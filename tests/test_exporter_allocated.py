"""Allocated bytes (512 * st_blocks) next to apparent bytes, on real files through the real daemon:
sparse files, writes that allocate, punched holes and truncates, on tmpfs and on the test filesystem."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from exporter.index.drift import DirView, compare
from exporter.index.scan import scan_local
from exporter.index.scrub import Correction, Finding, Scrubber, apply_finding, list_dir
from exporter.index.tree import DirNode, Tree
from exporter.index.updater import IndexUpdater
from shared.layout import Layout
from tests.chaos import metrics_differences, scrape
from tests.support import Proc, http_json, parse_metrics, start_exporter, wait_until

MIB = 1 << 20


def _fs_type(path: Path) -> str:
    """The filesystem type of `path`, from the mount table (longest mount point above it)."""
    best, kind = "", ""
    real = str(path.resolve())
    with open("/proc/self/mounts") as mounts:
        for line in mounts:
            fields = line.split()
            point = fields[1]
            if (real == point or real.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
                best, kind = point, fields[2]
    return kind


@pytest.fixture(params=["test-fs", "tmpfs"])
def base(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Path]:
    """A store base path on the usual test filesystem (tmp_path) or on tmpfs (/dev/shm)."""
    if request.param == "test-fs":
        root = tmp_path / "storage"
    else:
        shm = Path("/dev/shm")
        assert _fs_type(shm) == "tmpfs", "these tests need /dev/shm on tmpfs"
        root = shm / f"model-storage-alloc-{os.getpid()}-{time.monotonic_ns()}"
    for tier in ("raw", "quantized", "repository"):
        (root / "models" / tier).mkdir(parents=True)
    yield root
    if request.param == "tmpfs":
        shutil.rmtree(root)


@pytest.fixture
def exporter(base: Path, tmp_path: Path) -> Iterator[Proc]:
    logs = tmp_path / "logs"
    logs.mkdir()
    proc = start_exporter(base / "models", base, logs, STORAGE_COALESCE_WINDOW_SECONDS="0.05")
    try:
        yield proc
    finally:
        proc.stop()


def _allocated(path: Path) -> int:
    return os.lstat(path).st_blocks * 512


def _exact(proc: Proc, models: Path, what: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Wait until /metrics (apparent, allocated, files, models) equals an independent walk."""
    last: list[str] = []

    def exact() -> bool:
        last[:] = metrics_differences(scrape(proc), models)
        return not last

    try:
        wait_until(exact, timeout=20, what=what)
    except AssertionError:
        raise AssertionError(f"{what}: {'; '.join(last[:5])}") from None
    return parse_metrics(scrape(proc))


def _model(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, model: str) -> float:
    return samples[(name, frozenset({("tier", "raw"), ("model", model)}))]


def _fallocate(*args: str) -> None:
    subprocess.run(["fallocate", *args], check=True, capture_output=True)


def test_sparse_write_punch_truncate_keep_allocated_exact(exporter: Proc, base: Path) -> None:
    models = base / "models"
    model = models / "raw" / "m"
    model.mkdir()
    sparse = model / "sparse.bin"
    with open(sparse, "wb") as handle:
        handle.truncate(64 * MIB)  # a sparse file: 64 MiB long, nothing allocated
    dense = model / "dense.bin"
    dense.write_bytes(os.urandom(2 * MIB))
    samples = _exact(exporter, models, "a sparse file and a dense one")
    apparent = _model(samples, "model_storage_model_bytes", "m")
    allocated = _model(samples, "model_storage_model_allocated_bytes", "m")
    assert apparent == 66 * MIB
    assert allocated == _allocated(sparse) + _allocated(dense)
    assert allocated < 8 * MIB  # the sparse file's length is not on disk

    # A write into the hole allocates: same length, more allocated.
    with open(sparse, "r+b") as handle:
        handle.seek(16 * MIB)
        handle.write(os.urandom(4 * MIB))
    samples = _exact(exporter, models, "a write into the hole")
    assert _model(samples, "model_storage_model_bytes", "m") == apparent
    grown = _model(samples, "model_storage_model_allocated_bytes", "m")
    assert grown >= allocated + 4 * MIB

    # A punched hole (IN_MODIFY, length unchanged) frees what it covered.
    _fallocate("-p", "-o", str(16 * MIB), "-l", str(4 * MIB), str(sparse))
    samples = _exact(exporter, models, "a hole punched")
    assert _model(samples, "model_storage_model_bytes", "m") == apparent
    assert _model(samples, "model_storage_model_allocated_bytes", "m") <= grown - 4 * MIB

    # Preallocation: allocated with no data written, the length kept (fallocate -n).
    _fallocate("-n", "-o", "0", "-l", str(8 * MIB), str(sparse))
    samples = _exact(exporter, models, "blocks preallocated")
    assert _model(samples, "model_storage_model_allocated_bytes", "m") >= 8 * MIB

    # A truncate frees both.
    os.truncate(dense, 0)
    os.truncate(sparse, MIB)
    samples = _exact(exporter, models, "both truncated")
    assert _model(samples, "model_storage_model_bytes", "m") == MIB
    assert _model(samples, "model_storage_model_allocated_bytes", "m") == _allocated(sparse) + _allocated(dense)
    tier = samples[("model_storage_allocated_bytes", frozenset({("tier", "raw")}))]
    assert tier == _allocated(sparse) + _allocated(dense)


def test_hard_links_allocate_once_and_moves_carry_allocation(exporter: Proc, base: Path) -> None:
    models = base / "models"
    first = models / "raw" / "a"
    first.mkdir()
    (first / "w").write_bytes(os.urandom(3 * MIB))
    (models / "quantized" / "b").mkdir()
    os.link(first / "w", models / "quantized" / "b" / "w")
    samples = _exact(exporter, models, "a file linked into another model")
    total = sum(v for (name, _), v in samples.items() if name == "model_storage_allocated_bytes")
    assert total == _allocated(first / "w")  # once, not twice

    # Moved across tiers: the allocation moves with it, without a stat (a re-key).
    os.rename(first, models / "repository" / "a")
    samples = _exact(exporter, models, "a model moved to another tier")
    total = sum(v for (name, _), v in samples.items() if name == "model_storage_allocated_bytes")
    assert total == _allocated(models / "repository" / "a" / "w")


def test_storage_info_gives_allocated_beside_apparent(exporter: Proc, base: Path) -> None:
    model = base / "models" / "raw" / "s"
    model.mkdir()
    with open(model / "w", "wb") as handle:
        handle.truncate(32 * MIB)
        handle.seek(0)
        handle.write(b"x" * MIB)
    _exact(exporter, base / "models", "a partly sparse model")
    info = http_json(exporter.url + "/storage/info")
    raw = info["tiers"]["raw"]
    assert raw["bytes"] == 32 * MIB
    assert raw["allocated_bytes"] == _allocated(model / "w")
    assert info["total"]["allocated_bytes"] == sum(t["allocated_bytes"] for t in info["tiers"].values())


# ----- the scrub corrects allocation that changed without an event ---------------------------------


def _tree_of(models: Path) -> Tree:
    tree = Tree(Layout())
    found = scan_local(str(models))
    assert found.node is not None
    tree.graft((), found.node)
    return tree


def test_the_scrub_corrects_allocation_changed_without_an_event(base: Path) -> None:
    """Delayed allocation or compression at writeback changes st_blocks with no event: here a hole
    is punched behind the index's back (no event applied) and the scrub's comparison finds it."""
    models = base / "models"
    model = models / "raw" / "m"
    model.mkdir()
    path = model / "w"
    path.write_bytes(os.urandom(4 * MIB))
    tree = _tree_of(models)
    before = tree.models[("raw", "m")].allocated
    assert before == _allocated(path)
    _fallocate("-p", "-o", "0", "-l", str(2 * MIB), str(path))
    assert _allocated(path) < before

    listed = list_dir(str(model))
    node = tree.lookup(("raw", "m"))
    assert listed is not None and isinstance(node, DirNode)
    differences = compare(DirView.of(node), listed)
    assert [d.name for d in differences] == ["w"]
    updater = IndexUpdater(str(models), lambda *_: None, lambda _parts: None)
    corrections = apply_finding(tree, updater, Finding(("raw", "m"), tuple(differences)), contextlib.nullcontext())
    assert [(c.bytes_delta, c.files_delta, c.allocated_delta) for c in corrections] == [
        (0, 0, _allocated(path) - before)
    ]
    assert tree.models[("raw", "m")].allocated == _allocated(path)
    assert tree.tier_allocated()["raw"] == _allocated(path)


def test_allocation_only_corrections_are_applied_but_not_counted_as_missed_events() -> None:
    """ext4 adds an extent block at writeback, btrfs compresses: st_blocks moves with no event. That
    is no miss of the event path, so it must not feed ModelStorageScrubFindingDrift."""
    scrubber = Scrubber(
        "/nowhere",
        1000.0,
        lambda fn: None,
        lambda finding: None,
        lambda path: None,
        threading.Event(),
        threading.Event(),
    )
    with capture_logs() as entries:
        scrubber.record([Correction("/m/w", "file 10 bytes, 0 allocated", "file 10 bytes, 4096 allocated", 0, 0, 4096)])
        assert (scrubber.figures().corrections_total, scrubber.figures().drift_bytes_total) == (0, 0)
        scrubber.record([Correction("/m/x", "absent", "file 7 bytes, 4096 allocated", 7, 1, 4096)])
        assert (scrubber.figures().corrections_total, scrubber.figures().drift_bytes_total) == (1, 7)
    assert [(e["event"], e.get("allocated_bytes_delta")) for e in entries] == [
        ("scrub.allocation_corrected", 4096),
        ("scrub.corrected", 4096),
    ]
