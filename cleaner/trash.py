"""The trash (and archive) area: <root>/<run-id>/<tier>/<model>, a metadata file per run, purge rules.

A model is in the trash exactly when its directory is there; the per-run `.run.json` only adds
what the directory cannot tell (the original path, when it was moved, why), so `trash` and
`restore` work without the journal and survive a lost metadata file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cleaner.fileops import fsync_dir, remove_tree
from cleaner.walk import snapshot

RUN_META = ".run.json"
TIER_NAMES = ("raw", "quantized", "repository")
DAY_SECONDS = 86400.0


def valid_name(name: str) -> bool:
    """A plain directory entry name: never a path, never `.`/`..`, never hidden (our own files)."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def valid_run_id(run_id: str) -> bool:
    return valid_name(run_id) and not run_id.startswith(".")


def entry_path(root: Path, run_id: str, tier: str, model: str) -> Path:
    return root / run_id / tier / model


@dataclass(frozen=True, slots=True)
class TrashEntry:
    run_id: str
    tier: str
    model: str
    path: Path
    bytes: int
    files: int
    moved_at: float
    original_path: str
    policy: str | None

    @property
    def key(self) -> str:
        return f"{self.tier}/{self.model}"


def tree_size(path: Path) -> tuple[int, int]:
    """(bytes, files) with du -b semantics: regular files' sizes, each inode once, no symlink followed."""
    walked = snapshot(path)
    return walked.bytes, walked.files


# ---- per-run metadata ------------------------------------------------------------------------


def read_run_meta(root: Path, run_id: str) -> dict[str, Any]:
    try:
        data = json.loads((root / run_id / RUN_META).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"run_id": run_id, "entries": {}}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        return {"run_id": run_id, "entries": {}}
    return data


def _write_run_meta(root: Path, run_id: str, data: dict[str, Any]) -> None:
    path = root / run_id / RUN_META
    tmp = path.with_name(f"{RUN_META}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def record_entry(root: Path, run_id: str, entry: dict[str, Any]) -> None:
    """Add or update one model of a run (`entry` has tier, model, original_path, bytes, moved_at ...)."""
    data = read_run_meta(root, run_id)
    data["run_id"] = run_id
    data["entries"][f"{entry['tier']}/{entry['model']}"] = {**entry, "state": entry.get("state", "trashed")}
    _write_run_meta(root, run_id, data)


def mark_entry(root: Path, run_id: str, key: str, state: str, when: float) -> None:
    """Note that a model left this run's area (restored or purged); the metadata keeps its history."""
    if not (root / run_id).is_dir():
        return
    data = read_run_meta(root, run_id)
    if key in data["entries"]:
        data["entries"][key].update(state=state, **{f"{state}_at": when})
        _write_run_meta(root, run_id, data)


def remove_run_if_empty(root: Path, run_id: str) -> bool:
    """Drop a run's directory once no model is left in it (metadata and empty tier dirs go too)."""
    run_dir = root / run_id
    if not run_dir.is_dir():
        return False
    for tier in TIER_NAMES:
        tier_dir = run_dir / tier
        if tier_dir.is_dir() and any(not n.startswith(".") for n in os.listdir(tier_dir)):
            return False
    for tier in TIER_NAMES:
        tier_dir = run_dir / tier
        if tier_dir.is_dir():
            for name in os.listdir(tier_dir):  # only hidden leftovers of aborted copies
                path = tier_dir / name
                remove_tree(path)
            tier_dir.rmdir()
    for name in (RUN_META, f"{RUN_META}.tmp"):
        (run_dir / name).unlink(missing_ok=True)
    try:
        run_dir.rmdir()
    except OSError:
        return False  # something else was put there: leave it
    fsync_dir(root)
    return True


# ---- listing ---------------------------------------------------------------------------------


def list_entries(root: Path) -> list[TrashEntry]:
    """Every model held in the area, oldest first, sized from disk."""
    entries: list[TrashEntry] = []
    if not root.is_dir():
        return entries
    for run_id in sorted(os.listdir(root)):
        run_dir = root / run_id
        if not valid_run_id(run_id) or not run_dir.is_dir() or run_dir.is_symlink():
            continue
        meta = read_run_meta(root, run_id)["entries"]
        for tier in TIER_NAMES:
            tier_dir = run_dir / tier
            if not tier_dir.is_dir() or tier_dir.is_symlink():
                continue
            for model in sorted(os.listdir(tier_dir)):
                if not valid_name(model) or model.startswith("."):
                    continue
                path = tier_dir / model
                info = meta.get(f"{tier}/{model}", {})
                size, files = tree_size(path)
                moved_at = float(info.get("moved_at") or os.lstat(path).st_ctime)
                entries.append(
                    TrashEntry(
                        run_id=run_id,
                        tier=tier,
                        model=model,
                        path=path,
                        bytes=size,
                        files=files,
                        moved_at=moved_at,
                        original_path=str(info.get("original_path", "")),
                        policy=info.get("policy"),
                    )
                )
    entries.sort(key=lambda e: (e.moved_at, e.run_id, e.key))
    return entries


# ---- purge rules (pure) ----------------------------------------------------------------------


def expires_at(moved_at: float, retention_days: float) -> float:
    return moved_at + retention_days * DAY_SECONDS


def is_expired(entry: TrashEntry, now: float, retention_days: float) -> bool:
    return now >= expires_at(entry.moved_at, retention_days)


def select_for_purge(
    entries: Sequence[TrashEntry],
    now: float,
    retention_days: float,
    max_bytes: int,
    *,
    purge_all: bool = False,
    keep_runs: frozenset[str] = frozenset(),
) -> list[TrashEntry]:
    """Expired entries, then the oldest others while the trash is still above its cap.

    Entries of `keep_runs` (the run that is ending) are never chosen but still count towards the
    cap: a run that evicts more than the cap must leave what it evicted restorable, so older runs
    go first and then the trash stays over its cap until the next purge.
    """
    candidates = [e for e in entries if e.run_id not in keep_runs]
    if purge_all:
        return candidates
    chosen = [e for e in candidates if is_expired(e, now, retention_days)]
    rest = sorted((e for e in candidates if not is_expired(e, now, retention_days)), key=lambda e: e.moved_at)
    remaining = sum(e.bytes for e in entries) - sum(e.bytes for e in chosen)
    for entry in rest:
        if remaining <= max_bytes:
            break
        chosen.append(entry)
        remaining -= entry.bytes
    return chosen


def run_bytes(entries: Sequence[TrashEntry], run_id: str) -> int:
    """What one run holds in the trash. Pure."""
    return sum(e.bytes for e in entries if e.run_id == run_id)


def over_cap_warning(entries: Sequence[TrashEntry], run_id: str, max_bytes: int) -> str | None:
    """Why the trash stays over its cap after the end-of-run purge: this run alone exceeds it. Pure."""
    held = run_bytes(entries, run_id)
    if held <= max_bytes:
        return None
    return (
        f"run {run_id} alone put {held} bytes in the trash, over its cap of {max_bytes} bytes "
        "(STORAGE_TRASH_MAX_GB); kept so it can be restored, purged by a later purge"
    )
