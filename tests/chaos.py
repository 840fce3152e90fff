"""Chaos harness: seeded rounds of real model-pipeline workloads against the real exporter process,
with both cores kept busy, each round checked against an independent walk (tests/oracle.py).

A round resets the store to a base state made from the round's seed, waits until the exporter is
exact (not timed), runs 1-4 workloads picked by the seed (tar -x, cp -r, cp -al, rsync -a --delete,
rsync --inplace, blue/green swaps, moves out and back, rm -rf and recreate, a tier removed and
recreated, mkdir -p bursts with echo, deep chains, rename loops, hard links, truncation, sparse
files with holes punched and blocks preallocated, concurrent writers in all three tiers, and
mounts: a tmpfs or a bind mount of a populated directory from outside the models path on a model's
subdirectory, written into while mounted, unmounted plainly or lazily, mounted again over a
directory with files of its own, which are then hidden), then measures the time until /metrics
(apparent and allocated bytes, files, models) equals the walk (which counts across mounts, as du -sb).
Mount workloads run last in their round and their mounts stay through the measurement; every mount
a round made is undone (lazily, innermost first) when the round ends, whatever happened, so the
next round's reset also checks that unmounting is followed. Mounting needs root.
"Wrong" means not exact within 5 s after the workload ended. A round depends on its seed only, so
a failing round is replayed with `--seed SEED --rounds 1` (`make stress-exporter SEED=... ROUNDS=1`,
with the same ONLY=... if the mix was narrowed).

    python -m tests.chaos --rounds 500 --seed 1 --scrub off
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from shared.layout import Layout
from tests.oracle import Truth, walk_truth
from tests.support import Proc, http_get, parse_metrics, start_exporter, wait_until

TIERS = ("raw", "quantized", "repository")
EXACT_WITHIN = 5.0
SCRUB_METRIC = "model_storage_scrub_corrections_total"
# Ways of attributing shared hard links tried one by one; past this, bounds (see _bounds_differences).
ATTRIBUTIONS = 4096
# Mounts one round may make: a few, each a mount table change the exporter has to follow.
MOUNTS_PER_ROUND = 3


@dataclass
class Ctx:
    """One round's world: the models path, a scratch directory outside it, and the round's dice."""

    models: Path
    scratch: Path
    rng: random.Random
    serial: int = 0
    mounts: list[Path] = field(default_factory=list)  # made this round, in order, still mounted

    def name(self, prefix: str = "m") -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def tier(self) -> str:
        return self.rng.choice(TIERS)

    def model(self) -> Path | None:
        """An existing model directory, or None."""
        found = [p for t in TIERS if (self.models / t).is_dir() for p in (self.models / t).iterdir() if p.is_dir()]
        found = [p for p in found if not p.is_symlink()]
        return self.rng.choice(sorted(found)) if found else None


def make_tree(ctx: Ctx, root: Path, dirs: int = 3, files: int = 6, depth: int = 2) -> None:
    """A small model-like tree of `files` files spread over nested directories."""
    root.mkdir(parents=True, exist_ok=True)
    places = [root]
    for _ in range(dirs):
        parent = ctx.rng.choice(places)
        if len(parent.relative_to(root).parts) < depth:
            child = parent / ctx.name("d")
            child.mkdir()
            places.append(child)
    for _ in range(files):
        (ctx.rng.choice(places) / ctx.name("f")).write_bytes(os.urandom(ctx.rng.randint(0, 3000)))


def run(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def sh(script: str) -> None:
    subprocess.run(["bash", "-c", script], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# ----- mounts: made through ctx so that the round can undo every one -----


def mountinfo_points(root: Path) -> list[Path]:
    """Mount points at or under `root` in this mount namespace, read from /proc/self/mountinfo."""
    prefix = str(root).rstrip("/") + "/"
    points = []
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            fields = line.split(" ")
            if len(fields) < 5:
                continue
            # Space, tab, newline and backslash come as octal escapes (\040).
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point == str(root) or point.startswith(prefix):
                points.append(Path(point))
    return points


def unmount_under(root: Path) -> None:
    """Lazily unmount everything at or under `root`, deepest first (a leftover from a failed round
    would break the next round's rm -rf and every later test)."""
    for _ in range(10):
        points = mountinfo_points(root)
        if not points:
            return
        for point in sorted(points, key=lambda p: len(p.parts), reverse=True):
            subprocess.run(["umount", "-l", str(point)], capture_output=True)
    raise OSError(f"still mounted under {root}: {mountinfo_points(root)}")


def mount(ctx: Ctx, point: Path, *argv: str) -> bool:
    """Mount on `point` (False when the round has made its share of mounts)."""
    if len(ctx.mounts) >= MOUNTS_PER_ROUND:
        return False
    ctx.mounts.append(point)  # first: a mount that half-happened is undone too
    run("mount", *argv, str(point))
    return True


def umount(ctx: Ctx, point: Path, *, lazy: bool) -> None:
    """Unmount `point`. A plain umount fails (EBUSY) while the exporter scans inside the mount
    (it holds directory descriptors there for the moment): tried again for up to 2 s, then lazily."""
    if not lazy:
        try:
            wait_until(
                lambda: subprocess.run(["umount", str(point)], capture_output=True).returncode == 0,
                timeout=2.0,
                what=f"umount {point}",
            )
        except AssertionError:
            lazy = True
    if lazy:
        run("umount", "-l", str(point))
    ctx.mounts.reverse()
    ctx.mounts.remove(point)  # the last one made there
    ctx.mounts.reverse()


def undo_mounts(ctx: Ctx) -> None:
    """Unmount what the round mounted, innermost (latest) first, lazily so that nothing holds it."""
    for point in reversed(ctx.mounts):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)
    ctx.mounts.clear()


def mount_target(ctx: Ctx) -> Path:
    """A directory inside a model to mount on: a new empty one, or one that has files of its own
    (hidden while mounted over: du -sb, and the walk, see only the mounted filesystem)."""
    model = ctx.model()
    if model is None:
        model = ctx.models / ctx.tier() / ctx.name("mnt")
        make_tree(ctx, model, dirs=1, files=3)
    if ctx.rng.random() < 0.5:
        populated = sorted(p for p in model.rglob("*") if p.is_dir() and any(q.is_file() for q in p.iterdir()))
        if populated:
            return ctx.rng.choice(populated)
        under = model / ctx.name("under")
        make_tree(ctx, under, dirs=1, files=4)
        return under
    target = model / ctx.name("mnt")
    target.mkdir()
    return target


def write_into(ctx: Ctx, directory: Path) -> None:
    """Writes inside a mounted directory: new files, appends, a removal."""
    make_tree(ctx, directory, dirs=ctx.rng.randint(0, 2), files=ctx.rng.randint(1, 8))
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for path in files[: ctx.rng.randint(0, 3)]:
        with open(path, "ab") as handle:
            handle.write(os.urandom(ctx.rng.randint(1, 3000)))
    if files and ctx.rng.random() < 0.3:
        files[-1].unlink()


def after_mount(ctx: Ctx, point: Path, again: Callable[[], bool]) -> None:
    """Keep the mount (it stays through the measurement), or unmount it plainly or lazily and
    perhaps mount again on the same directory (`again`), then write into what is there now."""
    choice = ctx.rng.random()
    if choice < 0.4:
        return
    umount(ctx, point, lazy=choice < 0.7)
    if ctx.rng.random() < 0.5 and again():
        write_into(ctx, point)
    elif ctx.rng.random() < 0.5:
        write_into(ctx, point)  # into the uncovered directory itself


def w_mount_tmpfs(ctx: Ctx) -> None:
    point = mount_target(ctx)

    def tmpfs() -> bool:
        return mount(ctx, point, "-t", "tmpfs", "-o", "size=16m", "tmpfs")

    if not tmpfs():
        return
    if ctx.rng.random() < 0.8:  # else left empty
        write_into(ctx, point)
    after_mount(ctx, point, tmpfs)


def w_mount_bind(ctx: Ctx) -> None:
    point = mount_target(ctx)

    def bind() -> bool:
        source = ctx.scratch / ctx.name("bound")  # outside the models path, one mount each
        make_tree(ctx, source, dirs=2, files=ctx.rng.randint(1, 10))
        return mount(ctx, point, "--bind", str(source))

    if not bind():
        return
    if ctx.rng.random() < 0.7:
        write_into(ctx, point)
    after_mount(ctx, point, bind)


# ----- workloads: each makes real changes with real tools -----


def w_tar_x(ctx: Ctx) -> None:
    source = ctx.scratch / ctx.name("src")
    make_tree(ctx, source, dirs=4, files=30)
    archive = ctx.scratch / (source.name + ".tar")
    run("tar", "-cf", str(archive), "-C", str(source), ".")
    target = ctx.models / ctx.tier() / ctx.name("tar")
    target.mkdir()
    run("tar", "-xf", str(archive), "-C", str(target))


def w_cp_r(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    run("cp", "-r", str(model), str(ctx.models / ctx.tier() / ctx.name("copy")))


def w_cp_al(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    run("cp", "-al", str(model), str(ctx.models / ctx.tier() / ctx.name("links")))


def w_rsync_delete(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    source = ctx.scratch / ctx.name("rs")
    make_tree(ctx, source, dirs=3, files=15)
    run("rsync", "-a", "--delete", str(source) + "/", str(model) + "/")


def w_rsync_inplace(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    source = ctx.scratch / ctx.name("rsi")
    shutil.copytree(model, source, symlinks=True)
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        if ctx.rng.random() < 0.5:
            with open(path, "ab") as handle:
                handle.write(os.urandom(ctx.rng.randint(1, 4000)))
    run("rsync", "-a", "--inplace", str(source) + "/", str(model) + "/")


def w_blue_green(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    fresh = ctx.scratch / ctx.name("green")
    make_tree(ctx, fresh, dirs=3, files=12)
    sh(f"mv '{model}' '{ctx.scratch / ctx.name('blue')}' && mv '{fresh}' '{model}'")


def w_move_out_and_back(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    away = ctx.scratch / ctx.name("away")
    sh(f"mv '{model}' '{away}' && mv '{away}' '{model}'")
    (model / ctx.name("after")).write_bytes(b"a" * ctx.rng.randint(1, 500))
    sub = [p for p in model.rglob("*") if p.is_dir()]
    if sub:
        (ctx.rng.choice(sorted(sub)) / ctx.name("late")).write_bytes(b"l" * ctx.rng.randint(1, 500))


def w_rm_recreate(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    if ctx.rng.random() < 0.5:
        shutil.rmtree(model)
        make_tree(ctx, model, dirs=2, files=10)
    else:
        source = ctx.scratch / ctx.name("re")
        make_tree(ctx, source, dirs=3, files=10)
        archive = ctx.scratch / (source.name + ".tar")
        run("tar", "-cf", str(archive), "-C", str(source), ".")
        sh(f"rm -rf '{model}' && mkdir '{model}' && tar -xf '{archive}' -C '{model}'")


def w_tier_recreate(ctx: Ctx) -> None:
    tier = ctx.models / ctx.tier()
    shutil.rmtree(tier)
    model = tier / ctx.name("fresh")
    model.mkdir(parents=True)
    for i in range(20):
        (model / f"shard{i}").write_bytes(os.urandom(ctx.rng.randint(1, 2000)))


def w_mkdir_burst(ctx: Ctx) -> None:
    model = ctx.models / ctx.tier() / ctx.name("burst")
    count = ctx.rng.randint(5, 40)
    name = model.name
    sh(f"cd '{model.parent}' && for i in $(seq {count}); do mkdir -p {name}/d$i/e/f; echo $i > {name}/d$i/e/f/x; done")


def w_deep_chain(ctx: Ctx) -> None:
    model = ctx.models / ctx.tier() / ctx.name("deep")
    levels = ctx.rng.choice((50, 100, 200))
    sh(
        f"cd '{model.parent}' && mkdir {model.name} && cd {model.name} && "
        f"for i in $(seq {levels}); do mkdir d && cd d; if [ $((i % 10)) = 0 ]; then echo $i > f; fi; done"
    )


def w_rename_loop(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    here = model
    for _ in range(ctx.rng.randint(2, 6)):
        there = ctx.models / ctx.tier() / ctx.name("ren")
        os.rename(here, there)
        here = there
    if ctx.rng.random() < 0.5:
        files = sorted(p for p in here.rglob("*") if p.is_file())
        if files:
            first = ctx.rng.choice(files)
            second = first.with_name(first.name + ".r")
            os.rename(first, second)
            os.rename(second, first)


def w_hard_links(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    files = sorted(p for p in model.rglob("*") if p.is_file())
    target = ctx.models / ctx.tier() / ctx.name("hl")
    target.mkdir()
    for path in files[: ctx.rng.randint(1, 5)]:
        os.link(path, target / ctx.name("l"))
    if files and ctx.rng.random() < 0.5:
        with open(files[0], "ab") as handle:  # written through one of its in-tree names
            handle.write(b"h" * ctx.rng.randint(1, 300))
    if files and ctx.rng.random() < 0.3:
        files[-1].unlink()


def w_truncate(ctx: Ctx) -> None:
    model = ctx.model()
    if model is None:
        return
    for path in sorted(p for p in model.rglob("*") if p.is_file())[:6]:
        run("truncate", "-s", str(ctx.rng.randint(0, 5000)), str(path))


def w_sparse_holes(ctx: Ctx) -> None:
    """Allocation that changes apart from the length: sparse files written into, holes punched
    (fallocate -p, IN_MODIFY), blocks preallocated past the data (fallocate -n)."""
    model = ctx.model() if ctx.rng.random() < 0.5 else None
    if model is None:
        model = ctx.models / ctx.tier() / ctx.name("sparse")
        model.mkdir()
    for _ in range(ctx.rng.randint(1, 4)):
        path = model / ctx.name("s")
        with open(path, "wb") as handle:
            handle.truncate(ctx.rng.randint(1, 64) * 65536)
            handle.seek(ctx.rng.randrange(0, 32 * 65536))
            handle.write(os.urandom(ctx.rng.randint(1, 200_000)))
    files = sorted(p for p in model.rglob("*") if p.is_file())
    for path in files[: ctx.rng.randint(1, 4)]:
        size = path.stat().st_size
        if size and ctx.rng.random() < 0.6:
            offset = ctx.rng.randrange(0, size)
            run("fallocate", "-p", "-o", str(offset), "-l", str(ctx.rng.randint(1, 200_000)), str(path))
        else:
            run("fallocate", "-n", "-o", str(size), "-l", str(ctx.rng.randint(1, 300_000)), str(path))


def w_rename_over_empty(ctx: Ctx) -> None:
    tier = ctx.models / ctx.tier()
    empty = tier / ctx.name("empty")
    empty.mkdir()
    source = tier / ctx.name("full") if ctx.rng.random() < 0.5 else ctx.scratch / ctx.name("full")
    make_tree(ctx, source, dirs=2, files=8)
    os.rename(source, empty)


def w_concurrent_writers(ctx: Ctx) -> None:
    """One writer per tier at once: create, append, delete and recreate models."""
    seeds = [ctx.rng.randrange(1 << 30) for _ in TIERS]

    def writer(tier: str, seed: int) -> None:
        rng = random.Random(seed)
        base = ctx.models / tier
        for i in range(rng.randint(10, 40)):
            name = base / f"cw-{tier}-{i % 4}"
            choice = rng.random()
            with contextlib.suppress(FileNotFoundError, FileExistsError, NotADirectoryError, OSError):
                if choice < 0.4:
                    name.mkdir(exist_ok=True)
                    (name / f"w{i}").write_bytes(b"c" * rng.randint(0, 2000))
                elif choice < 0.6 and name.is_dir():
                    files = sorted(name.iterdir())
                    if files and files[0].is_file():
                        with open(files[0], "ab") as handle:
                            handle.write(b"+" * rng.randint(1, 500))
                elif choice < 0.8:
                    shutil.rmtree(name)
                    name.mkdir()
                    (name / "again").write_bytes(b"r" * rng.randint(0, 900))
                else:
                    shutil.rmtree(name)

    threads = [threading.Thread(target=writer, args=(t, s)) for t, s in zip(TIERS, seeds, strict=True)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()


WORKLOADS: dict[str, Callable[[Ctx], None]] = {
    "tar-x": w_tar_x,
    "cp-r": w_cp_r,
    "cp-al": w_cp_al,
    "rsync-delete": w_rsync_delete,
    "rsync-inplace": w_rsync_inplace,
    "blue-green": w_blue_green,
    "move-out-and-back": w_move_out_and_back,
    "rm-recreate": w_rm_recreate,
    "tier-recreate": w_tier_recreate,
    "mkdir-burst": w_mkdir_burst,
    "deep-chain": w_deep_chain,
    "rename-loop": w_rename_loop,
    "hard-links": w_hard_links,
    "truncate": w_truncate,
    "sparse-holes": w_sparse_holes,
    "rename-over-empty": w_rename_over_empty,
    "concurrent-writers": w_concurrent_writers,
    "mount-tmpfs": w_mount_tmpfs,
    "mount-bind": w_mount_bind,
}
# Run after the others of their round: the rest of the mix removes and renames whole models and
# tiers, which a mount inside would refuse (EBUSY) or carry along.
MOUNT_WORKLOADS = frozenset({"mount-tmpfs", "mount-bind"})


# ----- the oracle against the real exporter's /metrics -----


TIER_SERIES = ("model_storage_bytes", "model_storage_files", "model_storage_models", "model_storage_allocated_bytes")
MODEL_SERIES = ("model_storage_model_bytes", "model_storage_model_files", "model_storage_model_allocated_bytes")


def metrics_differences(body: str, models: Path, layout: Layout | None = None) -> list[str]:
    """What /metrics says (tier and model bytes, files, models, allocated bytes) that a fresh walk does not."""
    samples = parse_metrics(body)
    tiers: dict[str, tuple[int, ...]] = {}  # (bytes, files, models, allocated)
    index: dict[tuple[str, str], tuple[int, ...]] = {}  # (bytes, files, allocated)
    for (name, labels), value in samples.items():
        label = dict(labels)
        if name in TIER_SERIES:
            row = list(tiers.get(label["tier"], (0, 0, 0, 0)))
            row[TIER_SERIES.index(name)] = int(value)
            tiers[label["tier"]] = tuple(row)
        elif name in MODEL_SERIES:
            key = (label["tier"], label["model"])
            row2 = list(index.get(key, (0, 0, 0)))
            row2[MODEL_SERIES.index(name)] = int(value)
            index[key] = tuple(row2)
    truth = walk_truth(models, layout)
    problems: list[str] = []
    if set(index) != set(truth.models):
        problems.append(f"models differ: {sorted(set(index) ^ set(truth.models))[:5]}")
    if math.prod(len(places) for _, places in truth.shared) > ATTRIBUTIONS:
        return problems + _bounds_differences(tiers, index, truth)
    best: list[str] | None = None
    for truth_tiers, truth_models in truth.attributions(ATTRIBUTIONS):
        mismatches = [
            f"tier {tier}: exporter {tiers.get(tier)} walk {tuple(values)}"
            for tier, values in truth_tiers.items()
            if tiers.get(tier) != tuple(values)
        ]
        mismatches += [
            f"{key}: exporter {index[key]} walk {_model_row(v)}"
            for key, v in truth_models.items()
            if key in index and index[key] != _model_row(v)
        ]
        if not mismatches:
            return problems
        if best is None:
            best = mismatches
    return problems + (best or [])


def _model_row(values: list[float]) -> tuple[int, ...]:
    """A walk's [bytes, files, changed, allocated] as /metrics gives them: (bytes, files, allocated)."""
    return (int(values[0]), int(values[1]), int(values[3]))


def _bounds_differences(
    tiers: dict[str, tuple[int, ...]], index: dict[tuple[str, str], tuple[int, ...]], truth: Truth
) -> list[str]:
    """Too many ways to attribute shared hard links to try each: every tier and model must lie
    between its count without them and with all of those it holds, and the totals must add up.
    Rows compared here are (bytes, files, allocated)."""
    problems = []
    low_t: dict[str, tuple[int, ...]] = {tier: (v[0], v[1], v[3]) for tier, v in truth.tiers.items()}
    high_t = dict(low_t)
    low_m: dict[tuple[str, str], tuple[int, ...]] = {key: _model_row(v) for key, v in truth.models.items()}
    high_m = dict(low_m)
    total = [sum(v[0] for v in truth.tiers.values()), sum(v[1] for v in truth.tiers.values())]
    total.append(sum(v[3] for v in truth.tiers.values()))
    for (size, allocated), places in truth.shared:
        add = (size, 1, allocated)
        total = [a + b for a, b in zip(total, add, strict=True)]
        for tier, model in places:
            high_t[tier] = tuple(a + b for a, b in zip(high_t[tier], add, strict=True))
            if model is not None:
                high_m[(tier, model)] = tuple(a + b for a, b in zip(high_m[(tier, model)], add, strict=True))

    def within(row: tuple[int, ...], lo: tuple[int, ...], hi: tuple[int, ...]) -> bool:
        return all(a <= x <= b for x, a, b in zip(row, lo, hi, strict=True))

    for tier, (nbytes, nfiles, nmodels, nallocated) in tiers.items():
        tier_row = (nbytes, nfiles, nallocated)
        lo, hi = low_t.get(tier, (0, 0, 0)), high_t.get(tier, (0, 0, 0))
        if not within(tier_row, lo, hi) or nmodels != truth.tiers[tier][2]:
            problems.append(f"tier {tier}: exporter {(nbytes, nfiles, nmodels, nallocated)} outside walk {lo}..{hi}")
    for key, row in index.items():
        lo, hi = low_m.get(key, (0, 0, 0)), high_m.get(key, (0, 0, 0))
        if not within(row, lo, hi):
            problems.append(f"{key}: exporter {row} outside walk {lo}..{hi}")
    sums = [sum(v[0] for v in tiers.values()), sum(v[1] for v in tiers.values()), sum(v[3] for v in tiers.values())]
    if sums != total:
        problems.append(f"totals (bytes, files, allocated): exporter {sums} walk {total}")
    return problems


def scrape(proc: Proc) -> str:
    status, body = http_get(proc.url + "/metrics", timeout=10)
    if status != 200:
        raise OSError(f"/metrics answered {status}")
    return body.decode()


def time_to_exact(proc: Proc, models: Path, within: float) -> tuple[float | None, list[str]]:
    """Seconds from now until /metrics equals the walk (None: not within `within`), and the last differences."""
    started = time.monotonic()
    last: list[str] = []

    def exact() -> bool:
        nonlocal last
        try:
            last = metrics_differences(scrape(proc), models)
        except (OSError, ValueError) as err:
            last = [f"scrape failed: {err}"]
        return not last

    try:
        wait_until(exact, timeout=within, interval=0.05, what="the gauges equal the walk")
    except AssertionError:
        return None, last
    return time.monotonic() - started, []


# ----- rounds -----


@dataclass
class Outcome:
    seed: int
    workloads: list[str]
    seconds: float | None  # time to exact; None when wrong
    differences: list[str] = field(default_factory=list)


def reset_store(ctx: Ctx) -> None:
    """The round's base state: a few models per tier, made from the round's seed."""
    undo_mounts(ctx)
    unmount_under(ctx.models)
    unmount_under(ctx.scratch)
    for tier in TIERS:
        shutil.rmtree(ctx.models / tier, ignore_errors=True)
    for extra in ctx.models.iterdir():
        if extra.is_dir() and not extra.is_symlink():
            shutil.rmtree(extra)
        else:
            extra.unlink()
    shutil.rmtree(ctx.scratch, ignore_errors=True)
    ctx.scratch.mkdir()
    for tier in TIERS:
        (ctx.models / tier).mkdir()
        for _ in range(ctx.rng.randint(1, 3)):
            make_tree(ctx, ctx.models / tier / ctx.name("base"), dirs=3, files=8)


def run_round(proc: Proc, models: Path, scratch: Path, seed: int, only: frozenset[str] = frozenset()) -> Outcome:
    ctx = Ctx(models, scratch, random.Random(seed))
    reset_store(ctx)
    settled, diffs = time_to_exact(proc, models, 30.0)
    if settled is None:
        return Outcome(seed, ["reset"], None, diffs)
    mix = sorted(only or WORKLOADS)
    names = ctx.rng.sample(mix, ctx.rng.randint(1, min(4, len(mix))))
    names.sort(key=lambda name: name in MOUNT_WORKLOADS)
    try:
        for name in names:
            WORKLOADS[name](ctx)
        seconds, diffs = time_to_exact(proc, models, EXACT_WITHIN)
    finally:
        undo_mounts(ctx)
    return Outcome(seed, names, seconds, diffs)


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """`count` busy-looping processes (one per core keeps both cores busy); stopped by PID."""
    # Each hog also ends when its parent is gone (a harness killed outright leaves no spinning orphans).
    spin = f"import os\nwhile os.getppid() == {os.getpid()}:\n    for _ in range(1000000): pass\n"
    hogs = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(count)]
    try:
        yield hogs
    finally:
        for hog in hogs:
            hog.send_signal(signal.SIGKILL)
            hog.wait()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


@dataclass
class Summary:
    rounds: int
    exact: int
    times: list[float]
    failures: list[Outcome]
    scrub_corrections: float | None
    only: frozenset[str] = frozenset()
    drawn: dict[str, int] = field(default_factory=dict)  # workload -> rounds it ran in

    def lines(self) -> list[str]:
        out = [f"rounds exact: {self.exact}/{self.rounds}"]
        if self.drawn:
            out.append("rounds per workload: " + ", ".join(f"{n} {c}" for n, c in sorted(self.drawn.items())))
        if self.times:
            p50, p99, top = statistics.median(self.times), percentile(self.times, 0.99), max(self.times)
            out.append(f"time to exact: p50 {p50:.3f}s p99 {p99:.3f}s max {top:.3f}s")
        out.append(
            "scrub: not present" if self.scrub_corrections is None else f"scrub corrections: {self.scrub_corrections:g}"
        )
        narrowed = f" ONLY={','.join(sorted(self.only))}" if self.only else ""
        for failure in self.failures:
            what = "; ".join(failure.differences[:5])
            out.append(
                f"WRONG round seed {failure.seed} ({', '.join(failure.workloads)}): {what}"
                f" -- replay: make stress-exporter SEED={failure.seed} ROUNDS=1{narrowed}"
            )
        return out


def run_chaos(
    rounds: int,
    seed: int,
    *,
    scrub: bool = False,
    hogs: int = 2,
    workdir: Path | None = None,
    echo: Callable[[str], None] | None = None,
    only: frozenset[str] = frozenset(),
) -> Summary:
    """Run `rounds` rounds (round i has seed `seed + i`) against one real exporter; `only`, when
    given, narrows the mix to those workloads (a seed replays the same round with the same `only`)."""
    with contextlib.ExitStack() as stack:
        base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="chaos-", dir=workdir)))
        stack.callback(unmount_under, base)  # before the directory is removed: never rm -rf into a mount
        storage = base / "storage"
        models = storage / "models"
        for tier in TIERS:
            (models / tier).mkdir(parents=True)
        scratch = base / "scratch"
        logs = base / "logs"
        logs.mkdir()
        env = {} if scrub else {"STORAGE_SCRUB_STATS_PER_SECOND": "0"}
        proc = start_exporter(models, storage, logs, **env)
        stack.callback(proc.stop)
        stack.enter_context(cpu_hogs(hogs))
        outcomes: list[Outcome] = []
        for i in range(rounds):
            outcome = run_round(proc, models, scratch, seed + i, only)
            outcomes.append(outcome)
            if echo is not None and (outcome.seconds is None or (i + 1) % 50 == 0):
                done = sum(o.seconds is not None for o in outcomes)
                echo(f"round {i + 1}/{rounds}: {done} exact")
                if outcome.seconds is None:
                    echo(f"  seed {outcome.seed} WRONG ({', '.join(outcome.workloads)}): {outcome.differences[:5]}")
        corrections = parse_metrics(scrape(proc)).get((SCRUB_METRIC, frozenset()))
    times = [o.seconds for o in outcomes if o.seconds is not None]
    failures = [o for o in outcomes if o.seconds is None]
    drawn = collections.Counter(name for o in outcomes for name in o.workloads)
    return Summary(rounds, len(times), times, failures, corrections, only, dict(drawn))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=500)
    parser.add_argument("--seed", type=int, default=None, help="first round's seed (default: random)")
    parser.add_argument("--scrub", choices=("off", "on"), default="off")
    parser.add_argument("--hogs", type=int, default=os.cpu_count() or 2, help="CPU-hog processes")
    parser.add_argument("--workdir", type=Path, default=None, help="where the temp store goes")
    parser.add_argument("--only", default="", help="comma-separated workloads to draw from (default: all)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    only = frozenset(filter(None, args.only.split(",")))
    if only - set(WORKLOADS):
        parser.error(f"--only: no such workload: {', '.join(sorted(only - set(WORKLOADS)))}")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 31)

    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)  # unwinds: the exporter and the hogs are stopped by PID

    signal.signal(signal.SIGTERM, stop)
    mix = f", only {','.join(sorted(only))}" if only else ""
    print(f"chaos: {args.rounds} rounds from seed {seed}, scrub {args.scrub}, {args.hogs} CPU hogs{mix}", flush=True)
    summary = run_chaos(
        args.rounds,
        seed,
        scrub=args.scrub == "on",
        hogs=args.hogs,
        workdir=args.workdir,
        echo=lambda line: print(line, flush=True),
        only=only,
    )
    for line in summary.lines():
        print(line)
    return 0 if not summary.failures else 1


if __name__ == "__main__":
    raise SystemExit(main())
