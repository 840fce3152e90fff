"""Crash recovery: finish or undo every unfinished step of the journals a killed cleaner left.

Recovery rolls a step back when its source is still whole and forward once the copy was verified,
so a model is always whole in one place. A delete is finished only on the hidden path whose
device+inode the journal holds, never on a path a writer recreated.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleaner import staged
from cleaner.fileops import fsync_dir, remove_tree, rename_noreplace, stat_digest, stat_manifest
from cleaner.journal import journal_dir, read_journal


def _recover_delete(intent: dict[str, Any], states: list[str]) -> tuple[str, str]:
    """Finish deleting the renamed path if it is still the one recorded; never the original path."""
    path = Path(intent["path"])
    doomed = Path(intent["doomed"]) if intent.get("doomed") else None
    if doomed is None:  # a journal from before deletes were renamed first
        return "kept_both", f"{path} left in place: the journal does not say what exactly was being deleted"
    try:
        st = os.lstat(doomed)
    except FileNotFoundError:
        if "renamed" in states:
            return "completed", "already deleted"
        try:
            same = [os.lstat(path).st_dev, os.lstat(path).st_ino] == intent.get("identity")
        except FileNotFoundError:
            return "completed", f"{path} is gone"
        # A purge deletes a trash entry, which no writer addresses: finish it. An eviction without
        # backup may have been written to since: keep it; the next run plans it again.
        if same and intent.get("purpose") == "purge":
            rename_noreplace(path, doomed)
            fsync_dir(path.parent)
            remove_tree(doomed)
            return "completed", f"finished deleting {path}"
        return "rolled_back", f"{path} was never renamed for deletion; left in place"
    if [st.st_dev, st.st_ino] != intent.get("identity"):
        return "kept_both", f"{doomed} is not what was being deleted (device/inode differ); left untouched"
    remove_tree(doomed)
    return "completed", f"finished deleting {path}"


@dataclass(frozen=True, slots=True)
class Recovered:
    """What recovery made of one unfinished step."""

    op_id: str
    action: str  # transfer | delete
    purpose: str
    outcome: str  # completed | rolled_back | kept_both | lost
    meta: dict[str, Any] = field(default_factory=dict)
    src: str = ""
    dst: str = ""
    detail: str = ""


def unfinished(records: list[dict[str, Any]]) -> Iterator[tuple[dict[str, Any], list[str]]]:
    """(intent, the states recorded after it) for every intent not yet done or failed. Pure."""
    states: dict[int, list[str]] = {}
    intents: dict[int, dict[str, Any]] = {}
    for record in records:
        seq = record.get("seq")
        if not isinstance(seq, int):
            continue
        if record.get("op") == "intent":
            intents[seq] = record
            states[seq] = []
        elif seq in states:
            states[seq].append(str(record.get("op")))
    for seq, intent in intents.items():
        if not {"done", "failed"} & set(states[seq]):
            yield intent, states[seq]


def _changed_since_copy(src: Path, source_stat: str | None) -> str | None:
    """Why the source no longer matches what was copied, or None (no record: a journal of an older version)."""
    if source_stat is None or not os.path.lexists(src):
        return None  # a missing source leaves the copy the only one: it must go into place
    try:
        now = stat_manifest(src)
    except OSError as err:
        return f"it cannot be walked ({err.strerror or err})"
    return None if stat_digest(now) == source_stat else "its files, sizes or mtimes differ from the copy"


def _recover_transfer(intent: dict[str, Any], states: list[str], source_stat: str | None = None) -> tuple[str, str]:
    src, dst, partial = Path(intent["src"]), Path(intent["dst"]), Path(intent["partial"])
    if "deleting" in states:
        remove_tree(src)
        return "completed", "finished deleting the source after a verified copy"
    if "aborting" in states:
        remove_tree(partial)
        return "rolled_back", "the copy could not be put in place; the source was kept"
    if "copied" in states:
        if not os.path.lexists(partial) and not os.path.lexists(dst):
            return "rolled_back", "no copy found; the source was kept"
        if os.path.lexists(partial) and os.path.lexists(dst):
            remove_tree(partial)
            return "rolled_back", f"{dst} is occupied; the verified copy was discarded"
        # A writer may have changed the source between the crash and now: never delete it then.
        changed = _changed_since_copy(src, source_stat)
        if changed is not None and os.path.lexists(partial):
            remove_tree(partial)
            return "rolled_back", f"{src} changed after it was copied ({changed}); the copy was discarded"
        if changed is not None:
            # The copy is already at `dst` and may be in use there: neither side is ours to delete.
            return "kept_both", f"{src} changed after it was copied ({changed}); both it and {dst} were kept"
        if os.path.lexists(partial):
            rename_noreplace(partial, dst)
            fsync_dir(dst.parent)
        remove_tree(src)
        return "completed", "moved the verified copy into place and deleted the source"
    # Before `copied` the source is never touched: either the rename happened or nothing did.
    remove_tree(partial)
    if os.path.lexists(src):
        return "rolled_back", "the source was still in place"
    if os.path.lexists(dst):
        return "completed", "the rename had happened"
    return "lost", f"neither {src} nor {dst} exists"


def recover(state_path: Path) -> list[Recovered]:
    """Finish or undo every unfinished step of every journal left by a killed cleaner."""
    directory = journal_dir(state_path)
    if not directory.is_dir():
        return []
    results: list[Recovered] = []
    for path in sorted(directory.glob("*.jsonl")):
        records = read_journal(path)
        op_id = path.stem
        source_stats = {r.get("seq"): r.get("source_stat") for r in records if r.get("op") == "copied"}
        for intent, states in unfinished(records):
            action = str(intent.get("action"))
            meta = dict(intent.get("meta") or {})
            purpose = str(intent.get("purpose", ""))
            if action == "transfer":
                outcome, detail = _recover_transfer(intent, states, source_stats.get(intent.get("seq")))
                results.append(
                    Recovered(op_id, action, purpose, outcome, meta, str(intent["src"]), str(intent["dst"]), detail)
                )
            elif action == "staged_transfer":
                outcome, detail = staged.recover(intent, states, records)
                results.append(
                    Recovered(op_id, action, purpose, outcome, meta, str(intent["src"]), str(intent["dst"]), detail)
                )
            elif action == "delete":
                outcome, detail = _recover_delete(intent, states)
                results.append(Recovered(op_id, action, purpose, outcome, meta, str(intent["path"]), "", detail))
        os.unlink(path)
    if results or any(directory.iterdir()):
        fsync_dir(directory)
    return results
