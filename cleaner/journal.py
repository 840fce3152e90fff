"""Write-ahead journal of moves and deletions, and the journaled operations (transfer, delete).

Every changing step is recorded (JSON line, fsync'd) before it happens and after it completes. A
move is an atomic `rename` (RENAME_NOREPLACE, so it never replaces anything). Evicting by copy
(another filesystem, archive mode) stages the model first: see cleaner.staged. Restoring across
filesystems is copy -> verify -> `copied` -> rename into place -> `deleting` -> delete the source
(in the trash, which no writer addresses) -> `done`. A delete renames its path to a hidden name of
its own first and records the device+inode, so recovery deletes only that, never a recreated path.
The file operations themselves are cleaner.fileops'; finishing or undoing what a killed cleaner
left is cleaner.recovery's.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cleaner.crash_hook import crash_point
from cleaner.fileops import (
    CopyMismatchError,
    check_copy,
    copy_tree,
    fsync_dir,
    make_dirs,
    remove_tree,
    rename_noreplace,
    source_change,
    stat_digest,
    stat_manifest,
)
from shared.errors import FilesystemError

JOURNAL_DIR = "journal"


# ---- the journal -----------------------------------------------------------------------------


def journal_dir(state_path: Path) -> Path:
    return state_path / JOURNAL_DIR


class Journal:
    """One journal per changing command (run, restore, purge): <state>/journal/<op_id>.jsonl."""

    def __init__(self, state_path: Path, op_id: str, *, command: str) -> None:
        directory = journal_dir(state_path)
        self.path = directory / f"{op_id}.jsonl"
        self.op_id = op_id
        self._seq = 0
        try:
            make_dirs(directory)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            fsync_dir(directory)
        except OSError as err:
            raise FilesystemError.from_os(err, "create the journal", self.path) from None
        self.write({"op": "begin", "op_id": op_id, "command": command, "pid": os.getpid()})

    def write(self, record: dict[str, Any]) -> None:
        """Append and fsync one record; the step it records has not happened yet (or is done), so a
        failure here stops the command with nothing half-done beyond what the journal already says."""
        try:
            os.write(self._fd, json.dumps(record, sort_keys=True).encode() + b"\n")
            os.fsync(self._fd)
        except OSError as err:
            raise FilesystemError.from_os(err, "append to the journal", self.path) from None

    def intent(self, action: str, **fields: Any) -> int:
        self._seq += 1
        self.write({"op": "intent", "seq": self._seq, "action": action, **fields})
        return self._seq

    def mark(self, seq: int, state: str, **fields: Any) -> None:
        self.write({"op": state, "seq": seq, **fields})

    def close(self) -> None:
        """Everything recorded has been carried out or rolled back: the journal is no longer needed."""
        self.write({"op": "end"})
        os.close(self._fd)
        os.unlink(self.path)
        fsync_dir(self.path.parent)


def read_journal(path: Path) -> list[dict[str, Any]]:
    """The records of a journal; a torn last line (the writer was killed mid-write) is not a record."""
    records: list[dict[str, Any]] = []
    for line in path.read_bytes().split(b"\n"):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


# ---- journaled operations --------------------------------------------------------------------


PARTIAL_TAG = "model-storage-cleaner"


def partial_path(dst: Path, op_id: str) -> Path:
    """Where a copy is built before it is verified: beside `dst`, hidden, so listings skip it.

    The name carries the project and the operation id, so it is unmistakably this operation's own:
    a `.<model>.partial` beside a model may be a downloader's file, and is never touched.
    """
    return dst.parent / f".{dst.name}.{PARTIAL_TAG}-{op_id}.partial"


def _not_created_by_us(err: BaseException, partial: Path) -> bool:
    """The copy could not start because `partial` already existed: whatever is there is not ours."""
    return isinstance(err, FileExistsError) and err.filename == os.fspath(partial)


class TransferError(Exception):
    """A transfer could not be made; the source is untouched and the journal says `failed`."""


class CrossDeviceError(TransferError):
    """A rename would cross filesystems and the caller copies another way (cleaner.staged)."""


class SourceChangedError(TransferError):
    """The source changed while it was copied: the copy was discarded and the source kept."""


def transfer(
    journal: Journal,
    src: Path,
    dst: Path,
    *,
    purpose: str,
    meta: dict[str, Any],
    force_copy: bool = False,
    after_copy: Callable[[Path], None] | None = None,
    copy_on_exdev: bool = True,
) -> str:
    """Move `src` to the new path `dst` (whose parent exists); returns "renamed" or "copied".

    `after_copy` is a test hook called on the unverified copy (e.g. to corrupt it).
    """
    partial = partial_path(dst, journal.op_id)
    seq = journal.intent(
        "transfer", src=str(src), dst=str(dst), partial=str(partial), purpose=purpose, meta=meta, copy=force_copy
    )
    crash_point(f"{purpose}_intent_written")
    if not force_copy:
        try:
            rename_noreplace(src, dst)
        except OSError as err:
            if err.errno != errno.EXDEV or not copy_on_exdev:
                journal.mark(seq, "failed", error=err.strerror or str(err))
                kind = CrossDeviceError if err.errno == errno.EXDEV else TransferError
                raise kind(f"cannot move {src} to {dst}: {err.strerror or err}") from None
        else:
            fsync_dir(src.parent)
            fsync_dir(dst.parent)
            crash_point(f"{purpose}_renamed")
            journal.mark(seq, "done")
            crash_point(f"{purpose}_done_written")
            return "renamed"
    try:
        # copy_tree creates `partial` exclusively (mkdir, O_EXCL): if it exists, it fails untouched.
        expected, seen = copy_tree(src, partial)
        if after_copy is not None:
            after_copy(partial)
        check_copy(expected, partial)
        fsync_dir(partial.parent)
        # The copy is verified against what was read; a writer may have added to or changed the
        # source meanwhile, and deleting the source would then lose what it wrote.
        changed = source_change(seen, stat_manifest(src))
        if changed is not None:
            raise SourceChangedError(f"{src} changed during the copy: {changed}; the original was kept")
    except SourceChangedError as err:
        crash_point(f"{purpose}_source_changed")
        remove_tree(partial)
        journal.mark(seq, "failed", error=str(err), reason="source_changed")
        raise
    except (OSError, CopyMismatchError) as err:
        if not _not_created_by_us(err, partial):
            remove_tree(partial)
        message = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        journal.mark(seq, "failed", error=message)
        raise TransferError(f"cannot copy {src} to {dst}: {message}; the original is untouched") from None
    # Recovery re-checks the source against this before it deletes the source on our behalf.
    journal.mark(seq, "copied", source_stat=stat_digest(seen))
    crash_point(f"{purpose}_copied_written")
    try:
        rename_noreplace(partial, dst)
    except OSError as err:
        # Recorded before the copy goes, so recovery never reads "copied, copy gone" as "moved".
        journal.mark(seq, "aborting", error=err.strerror or str(err))
        remove_tree(partial)
        journal.mark(seq, "failed", error=err.strerror or str(err))
        raise TransferError(f"cannot move the copy into {dst}: {err.strerror or err}") from None
    fsync_dir(dst.parent)
    crash_point(f"{purpose}_copy_placed")
    journal.mark(seq, "deleting")
    crash_point(f"{purpose}_deleting_written")
    remove_tree(src, step=f"{purpose}_source_deleting")
    journal.mark(seq, "done")
    crash_point(f"{purpose}_done_written")
    return "copied"


def delete(journal: Journal, path: Path, *, purpose: str, meta: dict[str, Any]) -> None:
    """Delete `path` for good (purge, backup mode none); recovery finishes a half-done one.

    The path is first renamed to a hidden name of this operation beside it, whose device+inode the
    journal holds: recovery then deletes only that, never a path a writer recreated meanwhile.
    """
    doomed = path.parent / f".{path.name}.{PARTIAL_TAG}-{journal.op_id}.deleting"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return  # already gone: re-runs are safe
    seq = journal.intent(
        "delete", path=str(path), doomed=str(doomed), identity=[st.st_dev, st.st_ino], purpose=purpose, meta=meta
    )
    crash_point(f"{purpose}_intent_written")
    rename_noreplace(path, doomed)
    fsync_dir(path.parent)
    journal.mark(seq, "renamed")
    crash_point(f"{purpose}_renamed_for_delete")
    remove_tree(doomed, step=f"{purpose}_deleting")
    journal.mark(seq, "done")
    crash_point(f"{purpose}_done_written")
