"""An independent walk of a models tree: what the exporter's gauges must equal."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from shared.layout import Layout


@dataclass
class Truth:
    tiers: dict[str, list[int]] = field(default_factory=dict)  # tier -> [bytes, files, models]
    models: dict[tuple[str, str], list[float]] = field(default_factory=dict)  # -> [bytes, files, changed]
    # The path whose mtime or ctime is the model's `changed`: what a timestamp mismatch names.
    newest: dict[tuple[str, str], str] = field(default_factory=dict)


def walk_truth(models_path: Path, layout: Layout | None = None) -> Truth:
    """du -b semantics: regular files' st_size, each inode once, symlinks not followed.

    A model's `changed` is the newest mtime or ctime of its own entry and of every regular file and
    directory inside it, as floats exactly as `os.lstat` gives them: the index must equal it, not
    merely not be older.
    """
    layout = layout or Layout()
    truth = Truth({t: [0, 0, 0] for t in (*layout.tiers, "other")})
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(models_path):
        rel = Path(dirpath).relative_to(models_path).parts
        for name in [*dirnames, *filenames]:
            full = Path(dirpath, name)
            try:
                st = os.lstat(full)
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
                truth.models.setdefault((tier, model), [0, 0, 0.0])
            if model is not None:
                entry = truth.models.setdefault((tier, model), [0, 0, 0.0])
                stamp = max(st.st_mtime, st.st_ctime)
                if stamp > entry[2]:
                    entry[2] = stamp
                    truth.newest[(tier, model)] = str(full)
            if not is_file:
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1:
                if key in seen:
                    continue
                seen.add(key)
            truth.tiers[tier][0] += st.st_size
            truth.tiers[tier][1] += 1
            if model is not None:
                truth.models[(tier, model)][0] += st.st_size
                truth.models[(tier, model)][1] += 1
    return truth
