"""Evicting a model by copy (trash on another filesystem, archive mode) with no window between check and act.

The model is first renamed out of its tier into a staging name beside it (same directory, so the
rename is atomic and never crosses a filesystem). No writer addresses that name: from then on a
writer using the old path fails or recreates it, and the cleaner never touches the old path again
except to rename the staged model back into it with RENAME_NOREPLACE (which never replaces a
recreated model). Only a process that already held a handle inside the model could still change
it, so the staged tree is checked for holders (open files, maps, working directories, locks) after
the rename: with none, nothing can reach the staged tree any more and it is frozen. It is then
copied, the copy verified, and exactly the verified files are deleted (each re-compared by inode,
size and mtime first); anything else found in the staging directory is kept and reported.

Journal records of one staged eviction and what is true at each (recovery relies on these):
- `intent` (src, its device+inode, staged, partial, dst): nothing moved yet, or the rename to
  `staged` happened. Recovery: a staged tree whose device+inode match goes back to src (or, when
  src was recreated meanwhile, to a visible `<model>.cleaner-kept-<op>` beside it); any partial
  copy is removed.
- `staged`: the model is at `staged`, src is free for writers. Same recovery as `intent`.
- `copied` (the verified file set: path, kind, size, mtime, inode of every entry): a verified
  copy is at `partial` (or already at `dst`). Recovery: if the staged tree still matches the set,
  put the copy in place and go on as for `deleting`; otherwise discard the copy and roll back.
- `deleting`: the copy is at `dst`. Recovery deletes from `staged` exactly the entries matching
  the verified set (same inode, size, mtime) and removes the staging directory only when empty;
  anything else is kept (renamed back or beside as above) and reported.
- `done` / `failed`: nothing left to do.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cleaner import crash_hook, fileops
from cleaner import journal as jr
from cleaner.verify import find_users
from cleaner.walk import snapshot

STAGE_TAG = "model-storage-cleaner"
KEPT_TAG = "cleaner-kept"

VerifiedSet = dict[str, list[Any]]  # rel -> [kind, size, mtime_ns, inode, link]


class HeldError(jr.TransferError):
    """A process still held part of the model after it was staged: it was put back, untouched."""


def staged_path(src: Path, op_id: str) -> Path:
    """Hidden, beside the model, named for this operation: no writer or downloader uses this name."""
    return src.parent / f".{src.name}.{STAGE_TAG}-{op_id}.staged"


def kept_path(src: Path, op_id: str) -> Path:
    """Visible, beside the model: what could be neither evicted nor put back (src was recreated)."""
    return src.parent / f"{src.name}.{KEPT_TAG}-{op_id}"


def identity(path: Path) -> list[int]:
    st = os.lstat(path)
    return [st.st_dev, st.st_ino]


def matches(entry: tuple[str, int, int, int, str], recorded: list[Any] | None) -> bool:
    """A file must be exactly as verified; a directory only the same inode (deleting in it changes its mtime)."""
    if recorded is None:
        return False
    if entry[0] == "dir":
        return bool(recorded[0] == "dir" and entry[3] == recorded[3])
    return list(entry) == list(recorded)


def holders(path: Path, proc_root: Path = Path("/proc")) -> tuple[str, ...]:
    """Processes other than us holding anything inside `path` (open, mapped, locked, cwd)."""
    return find_users(os.path.realpath(path), snapshot(path).inodes, os.getpid(), proc_root).holders


def put_back(staged: Path, src: Path, op_id: str) -> tuple[str, Path]:
    """The staged tree back to src, or beside it when a writer recreated src; never replaces anything."""
    try:
        fileops.rename_noreplace(staged, src)
        fileops.fsync_dir(src.parent)
        return "rolled_back", src
    except OSError as err:
        if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
    kept = kept_path(src, op_id)
    fileops.rename_noreplace(staged, kept)
    fileops.fsync_dir(src.parent)
    return "kept_both", kept


def delete_verified(staged: Path, verified: VerifiedSet, step: str) -> list[str]:
    """Delete from `staged` exactly the entries matching `verified`; the rest stays. Returns what stayed."""
    now = fileops.stat_manifest(staged)
    stayed = {rel for rel in now if not matches(now[rel], verified.get(rel))}
    if now[""][0] != "dir":  # a model that is a single file
        if not stayed:
            os.unlink(staged)
            fileops.fsync_dir(staged.parent)
        return sorted(stayed)
    # Deepest first, so a directory is removed only after its verified contents.
    for rel in sorted(now, key=lambda r: (-r.count("/"), r)):
        if rel == "" or rel in stayed:
            continue
        full = staged / rel
        if now[rel][0] == "dir":
            try:
                os.rmdir(full)
            except OSError as err:
                if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                    raise
                stayed.add(rel)
        else:
            os.unlink(full)
            crash_hook.crash_point(step)
    try:
        os.rmdir(staged)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        stayed.add("")
    else:
        fileops.fsync_dir(staged.parent)
    return sorted(stayed)


def evict_by_copy(
    journal: jr.Journal,
    src: Path,
    dst: Path,
    *,
    meta: dict[str, Any],
    after_copy: Callable[[Path], None] | None = None,
    proc_root: Path = Path("/proc"),
) -> tuple[str, list[str]]:
    """Stage, copy, verify, place, delete the verified files. Returns ("copied", what was kept)."""
    purpose = "evict"
    staged = staged_path(src, journal.op_id)
    partial = jr.partial_path(dst, journal.op_id)
    seq = journal.intent(
        "staged_transfer",
        src=str(src),
        staged=str(staged),
        dst=str(dst),
        partial=str(partial),
        identity=identity(src),
        purpose=purpose,
        meta=meta,
    )
    crash_hook.crash_point(f"{purpose}_intent_written")
    try:
        fileops.rename_noreplace(src, staged)
    except OSError as err:
        journal.mark(seq, "failed", error=err.strerror or str(err))
        raise jr.TransferError(f"cannot stage {src} as {staged}: {err.strerror or err}") from None
    fileops.fsync_dir(src.parent)
    crash_hook.crash_point(f"{purpose}_staged")
    journal.mark(seq, "staged")
    crash_hook.crash_point(f"{purpose}_staged_written")
    held = holders(staged, proc_root)
    if held:
        outcome, where = put_back(staged, src, journal.op_id)
        journal.mark(seq, "failed", error="in use after staging", reason="in_use", put_back=str(where))
        raise HeldError(f"{src} was in use once staged ({held[0]}); {outcome.replace('_', ' ')} at {where}")
    try:
        expected, seen = fileops.copy_tree(staged, partial)
        if after_copy is not None:
            after_copy(partial)
        fileops.check_copy(expected, partial)
        fileops.fsync_dir(partial.parent)
        now = fileops.stat_manifest(staged)
        # Frozen since the holder check, so this cannot differ; checked because deletion trusts it.
        changed = fileops.source_change(seen, now)
        if changed is not None:
            raise jr.SourceChangedError(f"{src} changed during the copy: {changed}; the original was kept")
        verified = {rel: list(entry) for rel, entry in now.items()}
    except jr.SourceChangedError as err:
        crash_hook.crash_point(f"{purpose}_source_changed")
        fileops.remove_tree(partial)
        put_back(staged, src, journal.op_id)
        journal.mark(seq, "failed", error=str(err), reason="source_changed")
        raise
    except (OSError, fileops.CopyMismatchError) as err:
        if not jr._not_created_by_us(err, partial):
            fileops.remove_tree(partial)
        put_back(staged, src, journal.op_id)
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        journal.mark(seq, "failed", error=message)
        raise jr.TransferError(f"cannot copy {src} to {dst}: {message}; the original was put back") from None
    journal.mark(seq, "copied", verified=verified)
    crash_hook.crash_point(f"{purpose}_copied_written")
    try:
        fileops.rename_noreplace(partial, dst)
    except OSError as err:
        journal.mark(seq, "aborting", error=err.strerror or str(err))
        fileops.remove_tree(partial)
        put_back(staged, src, journal.op_id)
        journal.mark(seq, "failed", error=err.strerror or str(err))
        raise jr.TransferError(f"cannot move the copy into {dst}: {err.strerror or err}") from None
    fileops.fsync_dir(dst.parent)
    crash_hook.crash_point(f"{purpose}_copy_placed")
    journal.mark(seq, "deleting")
    crash_hook.crash_point(f"{purpose}_deleting_written")
    stayed = delete_verified(staged, verified, f"{purpose}_source_deleting")
    kept: list[str] = []
    if stayed:
        _outcome, where = put_back(staged, src, journal.op_id)
        kept = [f"{where}/{rel}" if rel else str(where) for rel in stayed if rel]
    journal.mark(seq, "done", kept=kept)
    crash_hook.crash_point(f"{purpose}_done_written")
    return "copied", kept


def recover(intent: dict[str, Any], states: list[str], records: list[dict[str, Any]]) -> tuple[str, str]:
    """Finish or undo one staged eviction; deletes only what matches the recorded identity and file set."""
    src, staged = Path(intent["src"]), Path(intent["staged"])
    dst, partial = Path(intent["dst"]), Path(intent["partial"])
    op_id = staged.name.rsplit(f"{STAGE_TAG}-", 1)[-1].removesuffix(".staged")
    seq = intent.get("seq")
    verified: VerifiedSet | None = None
    for record in records:
        if record.get("seq") == seq and record.get("op") == "copied":
            verified = record.get("verified")
    ours = _is_ours(staged, intent.get("identity"))
    if not ours:
        fileops.remove_tree(partial)
        if os.path.lexists(staged):
            return "kept_both", f"{staged} is not the staged model (device/inode differ); left untouched"
        if "deleting" in states:
            return "completed", "the staged model was already gone"
        if os.path.lexists(dst) and "copied" in states:
            return "completed", "the staged model was already gone; the copy is in place"
        return "rolled_back", "the model was never staged; nothing was changed"
    forward = "deleting" in states or ("copied" in states and "aborting" not in states)
    if forward and verified is not None and "deleting" not in states:
        if not os.path.lexists(partial) and not os.path.lexists(dst):
            forward = False
        else:
            current = fileops.stat_manifest(staged)
            if set(current) != set(verified) or not all(matches(e, verified.get(r)) for r, e in current.items()):
                forward = False
    if forward and verified is not None and "deleting" not in states and os.path.lexists(partial):
        if os.path.lexists(dst):
            forward = False
        else:
            fileops.rename_noreplace(partial, dst)
            fileops.fsync_dir(dst.parent)
    if not forward or verified is None:
        fileops.remove_tree(partial)
        outcome, where = put_back(staged, src, op_id)
        return outcome, f"the model was put back at {where}"
    stayed = delete_verified(staged, verified, "recover_deleting")
    if stayed:
        outcome, where = put_back(staged, src, op_id)
        return "kept_both", f"deleted the verified files; kept {len(stayed)} other entries at {where}"
    return "completed", "deleted exactly the verified files of the staged model"


def _is_ours(staged: Path, recorded: Any) -> bool:
    try:
        st = os.lstat(staged)
    except FileNotFoundError:
        return False
    if not isinstance(recorded, list) or len(recorded) != 2:
        return False
    return [st.st_dev, st.st_ino] == recorded
