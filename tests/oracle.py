"""An independent walk of a models tree: what the exporter's gauges must equal."""

from __future__ import annotations

import itertools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from exporter.index.service import ExporterService
from shared.layout import Layout
from tests.support import wait_until

ModelKey = tuple[str, str]
Place = tuple[str, str | None]  # (tier, model); model None for the `other` tier


@dataclass
class Truth:
    tiers: dict[str, list[int]] = field(default_factory=dict)  # tier -> [bytes, files, models, allocated]
    models: dict[ModelKey, list[float]] = field(default_factory=dict)  # -> [bytes, files, changed, allocated]
    # The path whose mtime or ctime is the model's `changed`: what a timestamp mismatch names.
    newest: dict[ModelKey, str] = field(default_factory=dict)
    # Hard-linked inodes with paths in more than one model (or tier): ((size, allocated), the places they are in).
    # du -b counts each once, at whichever path it meets first; so may the index. Not in the totals
    # above: `attributions` adds them every possible way.
    shared: list[tuple[tuple[int, int], list[Place]]] = field(default_factory=list)

    def attributions(self, limit: int = 4096) -> Iterator[tuple[dict[str, list[int]], dict[ModelKey, list[float]]]]:
        """(tiers, models) with each shared inode counted once, at each combination of its places."""
        for choice in itertools.islice(itertools.product(*(places for _, places in self.shared)), limit):
            tiers = {tier: list(values) for tier, values in self.tiers.items()}
            models = {key: list(values) for key, values in self.models.items()}
            for (sizes, _), (tier, model) in zip(self.shared, choice, strict=True):
                _add(tiers, models, tier, model, sizes)
            yield tiers, models


def _add(
    tiers: dict[str, list[int]],
    models: dict[ModelKey, list[float]],
    tier: str,
    model: str | None,
    sizes: tuple[int, int],
) -> None:
    size, allocated = sizes
    tiers[tier][0] += size
    tiers[tier][1] += 1
    tiers[tier][3] += allocated
    if model is not None:
        models[(tier, model)][0] += size
        models[(tier, model)][1] += 1
        models[(tier, model)][3] += allocated


def walk_truth(models_path: Path, layout: Layout | None = None) -> Truth:
    """du -b semantics: regular files' st_size (and, as `du -B1`, 512 * st_blocks), each inode
    once, symlinks not followed, mount points crossed (os.fwalk does not stop at them, as du without -x does not).

    A model's `changed` is the newest mtime or ctime of its own entry and of every regular file and
    directory inside it, as floats exactly as `os.lstat` gives them: the index must equal it, not
    merely not be older.
    """
    layout = layout or Layout()
    truth = Truth({t: [0, 0, 0, 0] for t in (*layout.tiers, "other")})
    links: dict[tuple[int, int], tuple[tuple[int, int], dict[Place, None]]] = {}
    # fwalk, relative to each directory's descriptor: paths past PATH_MAX are reached too.
    for dirpath, dirnames, filenames, dir_fd in os.fwalk(models_path):
        rel = Path(dirpath).relative_to(models_path).parts
        for name in [*dirnames, *filenames]:
            full = Path(dirpath, name)
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            parts = (*rel, name)
            tier, model = layout.classify(parts)
            is_file = stat.S_ISREG(st.st_mode)
            is_dir = stat.S_ISDIR(st.st_mode)
            if not (is_file or is_dir):
                continue
            if model is not None and len(parts) == 2:
                truth.tiers[tier][2] += 1
                truth.models.setdefault((tier, model), [0, 0, 0.0, 0])
            if model is not None:
                entry = truth.models.setdefault((tier, model), [0, 0, 0.0, 0])
                stamp = max(st.st_mtime, st.st_ctime)
                if stamp > entry[2]:
                    entry[2] = stamp
                    truth.newest[(tier, model)] = str(full)
            if not is_file:
                continue
            sizes = (st.st_size, st.st_blocks * 512)
            if st.st_nlink > 1:
                links.setdefault((st.st_dev, st.st_ino), (sizes, {}))[1][(tier, model)] = None
                continue
            _add(truth.tiers, truth.models, tier, model, sizes)
    for sizes, places in links.values():
        if len(places) == 1:
            _add(truth.tiers, truth.models, *next(iter(places)), sizes)
        else:
            truth.shared.append((sizes, list(places)))
    return truth


def differences(svc: ExporterService) -> list[str]:
    """What the index says that an independent walk does not (empty when exact)."""
    truth = walk_truth(Path(svc.root), svc.settings.layout)
    snap = svc.snapshot()
    index_models = {(s.tier, s.model): s for s in snap.models}
    problems = []
    if set(index_models) != set(truth.models):
        problems.append(f"models differ: {sorted(set(index_models) ^ set(truth.models))[:5]}")
    counts: list[str] | None = None
    # A hard link shared by two models counts in one of them, either may be right: one must match.
    for tiers, models in truth.attributions():
        # (bytes, files, models, allocated) per tier; (bytes, files, allocated) per model.
        mismatches = [
            f"tier {tier}: index {(*snap.tiers[tier], snap.allocated[tier])} truth {tuple(values)}"
            for tier, values in tiers.items()
            if tuple(values) != (*snap.tiers[tier], snap.allocated[tier])
        ]
        for key, (nbytes, nfiles, _, nallocated) in models.items():
            stat = index_models.get(key)
            if stat is not None and (stat.bytes, stat.files, stat.allocated) != (nbytes, nfiles, nallocated):
                mismatches.append(
                    f"{key}: index {(stat.bytes, stat.files, stat.allocated)} truth {(nbytes, nfiles, nallocated)}"
                )
        if not mismatches:
            counts = []
            break
        if counts is None:
            counts = mismatches
    problems += counts or []
    for key, (_, _, changed, _) in truth.models.items():
        stat = index_models.get(key)
        if stat is not None and stat.changed != changed:
            # Exactly: a newer time would keep a model from ageing, an older one could get it evicted.
            newest = truth.newest.get(key, "?")
            problems.append(f"{key}: last change {stat.changed!r}, truth {changed!r} (from {newest})")
    return problems


def assert_exact(svc: ExporterService, timeout: float = 5.0) -> None:
    last: list[str] = []

    def exact() -> bool:
        last[:] = differences(svc)
        return not last

    try:
        wait_until(exact, timeout=timeout, what="gauges equal a fresh walk")
    except AssertionError:
        raise AssertionError("; ".join(last[:10])) from None
