"""Paths longer than PATH_MAX (4096 bytes) under the models path: counted exactly, watched, never a
fall-back to polling. Built through directory descriptors, as no path-based call can reach them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from watchdog.observers.inotify_c import CallbackId, WatchDescriptor

from exporter.index.longpath import lstat, open_path
from exporter.index.service import ExporterService
from tests.oracle import assert_exact, walk_truth
from tests.support import make_service, wait_until

NAME = "d" * 250
DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY


def chain(top: Path, depth: int) -> list[int]:
    """`depth` nested directories under `top`; their descriptors, outermost first (caller closes)."""
    return chain_from(os.open(top, DIR_FLAGS), depth)


def write(dir_fd: int, name: str, size: int) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=dir_fd)
    try:
        os.write(fd, b"x" * size)
    finally:
        os.close(fd)


def started(store: Path, **env: str) -> ExporterService:
    svc = make_service(store, **env)
    svc.start()
    wait_until(svc.ready.is_set, timeout=30, what="initial scan")
    return svc


def test_the_oracle_reaches_past_path_max(store: Path) -> None:
    model = store / "models" / "raw" / "deep"
    model.mkdir()
    fds = chain(model, 20)
    try:
        assert len(str(model)) + 20 * (len(NAME) + 1) > 4096
        write(fds[-1], "bottom", 123)
        write(fds[3], "shallow", 7)
    finally:
        for fd in fds:
            os.close(fd)
    assert walk_truth(store / "models").models[("raw", "deep")][:2] == [130, 2]


# The scan's worker pool and the scrub reach past PATH_MAX as well as the updater does.
SETUPS = [{}, {"STORAGE_SCAN_WORKERS": "2", "STORAGE_SCRUB_STATS_PER_SECOND": "100000"}]


@pytest.mark.parametrize("setup", [0, 1, 0, 1], ids=["events-1", "pool-scrub-1", "events-2", "pool-scrub-2"])
def test_files_beyond_path_max_before_and_after_start_are_exact_without_polling(store: Path, setup: int) -> None:
    model = store / "models" / "quantized" / "deep"
    model.mkdir()
    fds = chain(model, 20)  # the full path passes 4096 bytes at about level 16
    try:
        for level in (2, 8, 14, 16, 18, 20):
            write(fds[level], f"before{level}", 100 + level)
        svc = started(store, **SETUPS[setup])
        try:
            assert_exact(svc)
            assert svc.snapshot().tiers["quantized"][:2] == (sum(100 + lv for lv in (2, 8, 14, 16, 18, 20)), 6)
            for level in (3, 15, 17, 19, 20):
                write(fds[level], f"after{level}", 1000 + level)
            write(fds[20], "before20", 5)  # rewritten smaller
            os.unlink("before18", dir_fd=fds[18])
            assert_exact(svc)
            # A new chain below the deepest directory, made after start, with files all the way down.
            more = chain_from(fds[20], 4)
            try:
                write(more[-1], "newest", 77)
                write(more[1], "mid", 33)
                assert_exact(svc)
            finally:
                for fd in more[1:]:
                    os.close(fd)
            expected_files = 6 - 1 + 5 + 2
            assert svc.snapshot().tiers["quantized"][1] == expected_files
            if svc.scrubber is not None:
                # Drift beyond PATH_MAX that no event reports (made while the deep directory had no
                # watch): the scrub lists the deep directory, corrects it and watches it again.
                reader = svc._reader
                assert reader is not None
                deep = str(model) + ("/" + NAME) * 19
                wd = reader._wds[deep]
                reader._fd.remove_callbacks([(WatchDescriptor(wd), CallbackId(1))])
                wait_until(lambda: deep not in reader._wds, timeout=10, what="the watch is gone")
                write(fds[19], "unseen", 555)
                assert_exact(svc, timeout=30)
                assert svc.snapshot().scrub.corrections_total == 1, svc.snapshot().scrub
                assert svc.snapshot().scrub.drift_bytes_total == 555
                assert deep in reader._wds, "the deep directory is watched again"
            # A deep directory renamed, and one moved up from beyond the limit to below it.
            os.rename(NAME, "renamed", src_dir_fd=fds[17], dst_dir_fd=fds[17])
            write(fds[17], "beside", 3)
            assert_exact(svc)
            os.rename("renamed", "up", src_dir_fd=fds[17], dst_dir_fd=fds[1])
            assert_exact(svc)
            assert svc.snapshot().tiers["quantized"][1] == expected_files + 1 + (svc.scrubber is not None)
            assert not svc.polling, svc.polling_reason
            assert svc.is_ready()
            assert not +svc.counters.errors, dict(svc.counters.errors)
        finally:
            svc.stop()
    finally:
        for fd in fds:
            os.close(fd)


def chain_from(fd: int, depth: int) -> list[int]:
    fds = [fd]
    for _ in range(depth):
        os.mkdir(NAME, dir_fd=fds[-1])
        fds.append(os.open(NAME, DIR_FLAGS, dir_fd=fds[-1]))
    return fds


def test_open_path_and_lstat_past_path_max_agree_with_descriptor_calls(tmp_path: Path) -> None:
    fds = chain(tmp_path, 20)
    try:
        write(fds[-1], "f", 42)
        deep = str(tmp_path) + ("/" + NAME) * 20
        assert len(deep) > 4096
        with pytest.raises(OSError, match="too long"):
            os.lstat(deep)
        assert lstat(deep + "/f").st_size == 42
        assert lstat(deep).st_ino == os.fstat(fds[-1]).st_ino
        fd = open_path(deep)
        try:
            assert os.listdir(fd) == ["f"]
        finally:
            os.close(fd)
        with pytest.raises(FileNotFoundError):
            lstat(deep + "/missing")
    finally:
        for fd in fds:
            os.close(fd)
