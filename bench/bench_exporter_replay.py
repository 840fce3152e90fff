"""The event path's CPU per file, one thread, no HTTP: what a burst costs the reader and the updater.

Wall-clock figures of the events benchmark move by half with a shared machine's load; CPU time of a
fixed, recorded workload hardly does. Two replays of the events benchmark's burst (BENCH_REPLAY_DIRS
directories of 1,000 one-byte files, default 30, on /dev/shm when there is one):
- reader: the kernel's read buffer of the burst (create, open, modify, close_write per file: opens
  tracked) parsed and translated to hints, in reads of 512 events;
- updater: those hints applied to an index of 10,000 one-file models in slices of 500 (the
  service's APPLY_SLICE), the directory announced first and its files after (a watched
  directory), then one `modified` hint per file (a write to each).
The baseline in the same run is the syscall floor of the updater: one bare os.lstat per file.
"""

from __future__ import annotations

import os
import shutil
import statistics
import struct
import tempfile
import threading
import time
from collections.abc import Callable

from watchdog.observers.inotify_c import InotifyConstants as C

from bench.common import env_int, report, write_result
from exporter.index.events import RawEvent
from exporter.index.reader import Handoff, InotifyReader
from exporter.index.scan import scan_local
from exporter.index.translate import parse_events
from exporter.index.tree import Tree
from exporter.index.updater import IndexUpdater
from shared.layout import Layout

PER_DIR = 1000
SLICE = 500


def _cpu(fn: Callable[[], None]) -> float:
    started = time.process_time()
    fn()
    return time.process_time() - started


def _buffer(wd_of_dir: int, dirs: int) -> bytes:
    records = []
    for d in range(dirs):
        for i in range(PER_DIR):
            name = f"f{i}".encode()
            length = (len(name) + 16) // 16 * 16
            for mask in (C.IN_CREATE, C.IN_OPEN, C.IN_MODIFY, C.IN_CLOSE_WRITE):
                records.append(struct.pack("iIII", wd_of_dir + d, mask, 0, length) + name.ljust(length, b"\0"))
    return b"".join(records)


def reader_replay(root: str, dirs: int) -> float:
    """CPU seconds to parse and translate the burst's kernel events."""
    reader = InotifyReader(root, Handoff(10**9), lambda _reason: None, lambda _p, _e: None, on_opens=lambda _o: None)
    try:
        for d in range(dirs):
            reader._paths[100 + d] = f"{root}/raw/burst/d{d}"
        buffer = _buffer(100, dirs)
        size = 512 * 32  # 512 events per read: each record here is 32 bytes (header and a short name)

        def run() -> None:
            for start in range(0, len(buffer), size):
                reader.translate(parse_events(buffer[start : start + size]))
                reader.take_opens()

        return _cpu(run)
    finally:
        reader._fd.close()


def updater_replay(base: str, dirs: int) -> tuple[float, float, float]:
    """CPU seconds of (created hints, modified hints, bare lstats) for the burst."""
    root = os.path.join(base, "models")
    tiers = ("raw", "quantized", "repository")
    for tier in tiers:
        os.makedirs(os.path.join(root, tier))
    for i in range(10_000):
        model = os.path.join(root, tiers[i % 3], f"model-{i:05d}")
        os.mkdir(model)
        with open(os.path.join(model, "w.bin"), "wb") as handle:
            handle.write(b"w" * (i % 100))
    tree = Tree(Layout())
    scanned = scan_local(root)
    assert scanned.node is not None
    tree.graft((), scanned.node)
    tree.take_suspects()
    updater = IndexUpdater(root, lambda _k, _p, _r: None, lambda _parts: None)
    lock = threading.Lock()
    created = 0.0

    def apply(events: list[RawEvent]) -> None:
        for start in range(0, len(events), SLICE):
            updater.apply(tree, events[start : start + SLICE], lock)

    burst = os.path.join(root, "raw", "burst")
    os.mkdir(burst)
    created += _cpu(lambda: apply([RawEvent("created", burst)]))
    paths = []
    for d in range(dirs):
        directory = os.path.join(burst, f"d{d}")
        os.mkdir(directory)
        announced = [RawEvent("created", directory)]
        created += _cpu(lambda: apply(announced))  # noqa: B023 - called at once, in this iteration
        files = []
        for i in range(PER_DIR):
            path = os.path.join(directory, f"f{i}")
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
            os.write(fd, b"x")
            os.close(fd)
            files.append(path)
        paths.extend(files)
        hints = [RawEvent("created", p) for p in files]
        created += _cpu(lambda: apply(hints))  # noqa: B023 - called at once, in this iteration
    modified = _cpu(lambda: apply([RawEvent("modified", p) for p in paths]))
    assert tree.tier_totals()["raw"][1] >= len(paths), "the replay lost files"

    def bare() -> None:
        for path in paths:
            os.lstat(path)

    return created, modified, _cpu(bare)


def main() -> dict[str, object]:
    dirs = env_int("BENCH_REPLAY_DIRS", 30)
    runs = env_int("BENCH_REPLAY_RUNS", 3)
    files = dirs * PER_DIR
    where = "/dev/shm" if os.path.isdir("/dev/shm") else None
    reader_us, created_us, modified_us, lstat_us = [], [], [], []
    for _ in range(runs):
        tmp = tempfile.mkdtemp(prefix="bench-replay-", dir=where)
        try:
            reader_us.append(reader_replay(tmp, dirs) / files * 1e6)
            created, modified, bare = updater_replay(tmp, dirs)
        finally:
            shutil.rmtree(tmp)
        created_us.append(created / files * 1e6)
        modified_us.append(modified / files * 1e6)
        lstat_us.append(bare / files * 1e6)
    reader_m, created_m = statistics.median(reader_us), statistics.median(created_us)
    modified_m, lstat_m = statistics.median(modified_us), statistics.median(lstat_us)
    figures: dict[str, object] = {
        "files": files,
        "runs": runs,
        "reader_parse_and_translate_us_per_file": round(reader_m, 2),
        "updater_created_us_per_file": round(created_m, 2),
        "updater_modified_us_per_file": round(modified_m, 2),
        "bare_lstat_us_per_file": round(lstat_m, 2),
        "ratio_created_vs_lstat": round(created_m / lstat_m, 2),
        "ratio_modified_vs_lstat": round(modified_m / lstat_m, 2),
    }
    report(
        f"event path, CPU per file of a {files:,}-file burst (medians of {runs}): reader {reader_m:.1f} us "
        f"(4 kernel events, opens tracked); updater created {created_m:.1f} us, modified {modified_m:.1f} us; "
        f"bare lstat {lstat_m:.2f} us (ratio created/lstat {created_m / lstat_m:.1f}, modified/lstat "
        f"{modified_m / lstat_m:.1f})"
    )
    write_result("exporter_replay", figures)
    return figures


if __name__ == "__main__":
    main()
