"""The chaos harness, short: 50 seeded rounds of real workloads under CPU contention, all exact."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

from tests.chaos import (
    EXACT_WITHIN,
    MOUNT_WORKLOADS,
    WORKLOADS,
    Ctx,
    make_tree,
    metrics_differences,
    mount,
    mountinfo_points,
    run_chaos,
    time_to_exact,
    umount,
    undo_mounts,
    unmount_under,
    write_into,
)
from tests.oracle import walk_truth
from tests.support import start_exporter

ROUNDS = int(os.environ.get("CHAOS_ROUNDS", "50"))


def test_chaos_rounds_under_contention_are_all_exact_within_five_seconds(tmp_path: Path) -> None:
    seed = int(os.environ.get("CHAOS_SEED", random.SystemRandom().randrange(1 << 31)))
    summary = run_chaos(ROUNDS, seed, scrub=False, hogs=os.cpu_count() or 2, workdir=tmp_path)
    report = "\n".join(summary.lines())
    assert summary.rounds == ROUNDS and summary.exact == ROUNDS, f"seed {seed}:\n{report}"
    assert len(summary.times) == ROUNDS


def test_every_workload_named_in_the_issue_is_in_the_harness() -> None:
    assert set(WORKLOADS) >= {
        "tar-x",
        "cp-r",
        "cp-al",
        "rsync-delete",
        "rsync-inplace",
        "blue-green",
        "move-out-and-back",
        "rm-recreate",
        "tier-recreate",
        "mkdir-burst",
        "deep-chain",
        "rename-loop",
        "hard-links",
        "truncate",
        "sparse-holes",
        "concurrent-writers",
        "mount-tmpfs",
        "mount-bind",
    }


def test_the_harness_oracle_sees_a_wrong_gauge(tmp_path: Path) -> None:
    """The comparison can fail: a /metrics body one byte off, or missing a model, is reported."""
    models = tmp_path / "models"
    (models / "raw" / "m").mkdir(parents=True)
    (models / "quantized").mkdir()
    (models / "repository").mkdir()
    (models / "raw" / "m" / "w").write_bytes(b"x" * 10)
    truth = walk_truth(models)
    assert truth.models[("raw", "m")][:2] == [10, 1]

    allocated = (models / "raw" / "m" / "w").lstat().st_blocks * 512

    def body(model_bytes: int, with_model: bool = True, model_allocated: int = allocated) -> str:
        lines = [
            f'model_storage_bytes{{tier="{t}"}} {b}'
            for t, b in (("raw", model_bytes), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_files{{tier="{t}"}} {f}'
            for t, f in (("raw", 1), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_models{{tier="{t}"}} {n}'
            for t, n in (("raw", 1), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        lines += [
            f'model_storage_allocated_bytes{{tier="{t}"}} {a}'
            for t, a in (("raw", model_allocated), ("quantized", 0), ("repository", 0), ("other", 0))
        ]
        if with_model:
            lines += [
                f'model_storage_model_bytes{{tier="raw",model="m"}} {model_bytes}',
                'model_storage_model_files{tier="raw",model="m"} 1',
                f'model_storage_model_allocated_bytes{{tier="raw",model="m"}} {model_allocated}',
            ]
        return "\n".join(lines) + "\n"

    assert metrics_differences(body(10), models) == []
    assert metrics_differences(body(11), models)
    assert metrics_differences(body(10, with_model=False), models)
    # Allocated bytes are compared too: one block off is reported.
    assert metrics_differences(body(10, model_allocated=allocated + 512), models)


def _du(*argv: str) -> int:
    return int(subprocess.run(["du", *argv], check=True, capture_output=True, text=True).stdout.split()[0])


def _dirs(path: Path, field: str) -> list[int]:
    """A value per directory under `path`, from find (which crosses mounts, as du without -x)."""
    out = subprocess.run(["find", str(path), "-type", "d", "-printf", f"%{field}\\n"], check=True, capture_output=True)
    return [int(line) for line in out.stdout.split()]


def _du_files(path: Path) -> tuple[int, int, int]:
    """(bytes, files, allocated) of the regular files under `path` as du counts them: du's totals
    less the directories' own share."""
    return (
        _du("-sb", str(path)) - sum(_dirs(path, "s")),
        _du("-s", "--inodes", str(path)) - len(_dirs(path, "s")),
        _du("-sB1", str(path)) - 512 * sum(_dirs(path, "b")),
    )


def test_the_oracle_counts_across_mounts_as_du_sb_does(tmp_path: Path) -> None:
    """A tmpfs over a directory with files of its own (hidden), a bind mount of a populated
    directory from outside the tree, and a tmpfs in a tmpfs: the walk equals du per model and tier."""
    assert os.geteuid() == 0, "this test mounts tmpfs and bind mounts: run the suite as root"
    ctx = Ctx(tmp_path / "models", tmp_path / "scratch", random.Random(12))
    try:
        ctx.scratch.mkdir()
        for tier in ("raw", "quantized", "repository"):
            make_tree(ctx, ctx.models / tier / "m", dirs=2, files=5)
        hidden = ctx.models / "raw" / "m" / "hidden"
        hidden.mkdir()
        (hidden / "under").write_bytes(b"u" * 100_000)
        assert mount(ctx, hidden, "-t", "tmpfs", "-o", "size=16m", "tmpfs")
        make_tree(ctx, hidden, dirs=2, files=6)
        assert mount(ctx, hidden / sorted(p.name for p in hidden.iterdir() if p.is_dir())[0], "-t", "tmpfs", "tmpfs")
        (ctx.mounts[-1] / "inner").write_bytes(b"i" * 7777)
        source = ctx.scratch / "populated"
        make_tree(ctx, source, dirs=2, files=7)
        bound = ctx.models / "quantized" / "m" / "bound"
        bound.mkdir()
        assert mount(ctx, bound, "--bind", str(source))
        assert set(mountinfo_points(ctx.models)) == set(ctx.mounts)
        # The mounts matter: du -x (stopping at them) counts something else.
        assert _du("-sxb", str(ctx.models)) != _du("-sb", str(ctx.models))

        truth = walk_truth(ctx.models)
        assert not truth.shared
        for tier in ("raw", "quantized", "repository"):
            nbytes, nfiles, _, allocated = truth.models[(tier, "m")]
            assert (nbytes, nfiles, allocated) == _du_files(ctx.models / tier / "m"), tier
            assert tuple(truth.tiers[tier][i] for i in (0, 1, 3)) == _du_files(ctx.models / tier), tier
        assert truth.models[("raw", "m")][0] < 100_000  # the hidden file is not counted
    finally:
        undo_mounts(ctx)
    assert mountinfo_points(tmp_path) == []


def test_mount_rounds_are_exact_and_leave_nothing_mounted(tmp_path: Path) -> None:
    """Rounds drawn from the mount workloads only (kept, unmounted plainly or lazily, over hidden
    files or not): exact within five seconds, and every mount undone after each round."""
    assert os.geteuid() == 0, "this test mounts tmpfs and bind mounts: run the suite as root"
    seed = int(os.environ.get("CHAOS_SEED", random.SystemRandom().randrange(1 << 31)))
    summary = run_chaos(8, seed, hogs=os.cpu_count() or 2, workdir=tmp_path, only=MOUNT_WORKLOADS)
    assert summary.exact == 8, f"seed {seed}:\n" + "\n".join(summary.lines())
    assert mountinfo_points(tmp_path) == []


def test_a_mount_workload_mounts_and_the_round_undoes_it(tmp_path: Path) -> None:
    """The workloads really mount (some mount stays for the measurement), and undo_mounts and
    unmount_under leave nothing behind, even a mount the round's list does not know of."""
    assert os.geteuid() == 0, "this test mounts tmpfs and bind mounts: run the suite as root"
    kept = 0
    for seed in range(12):
        models = tmp_path / f"s{seed}" / "models"
        ctx = Ctx(models, tmp_path / f"s{seed}" / "scratch", random.Random(seed))
        ctx.scratch.mkdir(parents=True)
        make_tree(ctx, models / "raw" / f"base{seed}", dirs=2, files=4)
        try:
            WORKLOADS["mount-tmpfs" if seed % 2 else "mount-bind"](ctx)
            assert set(mountinfo_points(models)) == set(ctx.mounts)
            kept += bool(ctx.mounts)
        finally:
            undo_mounts(ctx)
        assert mountinfo_points(tmp_path) == []
    assert kept >= 3
    stray = models / "stray"
    stray.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stray)], check=True)
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(stray)], check=True)  # stacked
    unmount_under(tmp_path)
    assert mountinfo_points(tmp_path) == []


def _mount_id(point: Path) -> str:
    with open("/proc/self/mountinfo") as handle:
        ids = [line.split(" ")[0] for line in handle if line.split(" ")[4] == str(point)]
    assert len(ids) == 1, ids
    return ids[0]


def test_a_mount_replaced_at_the_same_point_while_the_exporter_is_held_is_followed(tmp_path: Path) -> None:
    """Hand-built: the exporter held with SIGSTOP while a bind mount in a model is replaced by
    another (umount, mount --bind of another populated directory, a write into it): once resumed,
    it must count what is mounted now. The kernel hands the new mount the id the old one freed."""
    assert os.geteuid() == 0, "this test mounts bind mounts: run the suite as root"
    ctx = Ctx(tmp_path / "storage" / "models", tmp_path / "scratch", random.Random(7027))
    ctx.scratch.mkdir()
    (tmp_path / "logs").mkdir()
    for tier in ("raw", "quantized", "repository"):
        make_tree(ctx, ctx.models / tier / "m", dirs=1, files=3)
    point = ctx.models / "raw" / "m" / "mnt"
    point.mkdir()
    first, second = ctx.scratch / "first", ctx.scratch / "second"
    make_tree(ctx, first, dirs=1, files=4)
    make_tree(ctx, second, dirs=2, files=9)
    proc = start_exporter(ctx.models, tmp_path / "storage", tmp_path / "logs", STORAGE_SCRUB_STATS_PER_SECOND="0")
    try:
        assert mount(ctx, point, "--bind", str(first))
        seconds, diffs = time_to_exact(proc, ctx.models, 10.0)
        assert seconds is not None, diffs
        before = _mount_id(point)
        proc.popen.send_signal(signal.SIGSTOP)
        try:
            umount(ctx, point, lazy=False)
            assert mount(ctx, point, "--bind", str(second))
            write_into(ctx, point)
            assert _mount_id(point) == before, "the kernel did not reuse the mount id: this test shows nothing"
        finally:
            proc.popen.send_signal(signal.SIGCONT)
        seconds, diffs = time_to_exact(proc, ctx.models, EXACT_WITHIN)
        assert seconds is not None, diffs
    finally:
        proc.stop()
        undo_mounts(ctx)
