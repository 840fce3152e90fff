"""A reconcile scan finds drift the events could not show, reports it and corrects the index."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from exporter.metrics.endpoint import MetricsRenderer
from tests.oracle import assert_exact, differences
from tests.support import make_service, parse_metrics, wait_until


def test_a_reconcile_finds_reports_and_corrects_drift(store: Path, tmp_path: Path) -> None:
    # A write through a hard link outside the models path changes a file inside it, and inotify tells
    # only the watches of the directory it was written through (and of the inode): none of ours.
    blob = tmp_path / "outside" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(b"o" * 1000)
    model = store / "models" / "raw" / "m"
    model.mkdir()
    os.link(blob, model / "w")
    (model / "config.json").write_bytes(b"c" * 10)
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        assert_exact(svc)
        assert svc.snapshot().tiers["raw"] == (1010, 2, 1)
        with open(blob, "ab") as handle:
            handle.write(b"p" * 500)
        assert differences(svc), "the index cannot have seen that write"
        assert svc.snapshot().tiers["raw"] == (1010, 2, 1)

        result = svc.reconcile("test")

        assert (result.drift_bytes, result.drift_models, result.files) == (500, 1, 2)
        assert svc.snapshot().drift_bytes == 500
        metrics = parse_metrics(MetricsRenderer(svc, svc.settings).render().decode())
        assert metrics[("model_storage_reconcile_drift_bytes", frozenset())] == 500
        assert metrics[("model_storage_model_bytes", frozenset({("tier", "raw"), ("model", "m")}))] == 1510
        assert svc.snapshot().tiers["raw"] == (1510, 2, 1)
        assert_exact(svc)
        # The next reconcile finds the index exact and says so.
        assert svc.reconcile("test").drift_bytes == 0
        assert svc.snapshot().drift_bytes == 0
    finally:
        svc.stop()


def test_a_reconcile_corrects_allocation_changed_without_an_event(store: Path, tmp_path: Path) -> None:
    # A hole punched through a hard link outside the models path: the allocation of a file inside it
    # changes (its length does not), and none of our watches is told.
    blob = tmp_path / "outside" / "blob"
    blob.parent.mkdir()
    blob.write_bytes(os.urandom(1 << 20))
    model = store / "models" / "raw" / "m"
    model.mkdir()
    os.link(blob, model / "w")
    svc = make_service(store)
    svc.start()
    try:
        wait_until(svc.ready.is_set, timeout=10, what="initial scan")
        assert_exact(svc)
        before = blob.lstat().st_blocks * 512
        assert svc.snapshot().allocated["raw"] == before
        subprocess.run(["fallocate", "-p", "-o", "0", "-l", str(1 << 19), str(blob)], check=True)
        after = blob.lstat().st_blocks * 512
        assert after < before
        assert differences(svc), "the index cannot have seen that hole"

        result = svc.reconcile("test")

        # The reconcile's drift figure is of apparent bytes: none moved.
        assert (result.drift_bytes, result.files) == (0, 1)
        assert svc.snapshot().allocated["raw"] == after
        metrics = parse_metrics(MetricsRenderer(svc, svc.settings).render().decode())
        assert metrics[("model_storage_model_allocated_bytes", frozenset({("tier", "raw"), ("model", "m")}))] == after
        assert_exact(svc)
    finally:
        svc.stop()
