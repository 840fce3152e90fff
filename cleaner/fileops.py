"""File operations the cleaner's journaled steps are built of: durable mkdir and rename, manifests, copy, remove.

No journal here: each function does one thing to the filesystem and makes it durable (fsync of the
file and of the directory that names it); the journal (cleaner.journal) records around them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cleaner.crash_hook import crash_point

_COPY_CHUNK = 1 << 20


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: Path) -> None:
    """mkdir -p, with every new entry made durable in its parent."""
    missing: list[Path] = []
    current = path
    while not current.exists():
        missing.append(current)
        current = current.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            os.mkdir(directory, 0o755)
        fsync_dir(directory.parent)


_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
_libc = ctypes.CDLL(None, use_errno=True)
_renameat2: Any = getattr(_libc, "renameat2", None)


def rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails with EEXIST instead of replacing `dst` (an empty dir would be replaced)."""
    if _renameat2 is not None:
        result = _renameat2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code not in (errno.EINVAL, errno.ENOSYS):
            raise OSError(code, os.strerror(code), str(src), None, str(dst))
    # No renameat2 here: check, then rename; the cleaner lock keeps other cleaners out of the gap.
    if os.path.lexists(dst):
        raise OSError(errno.EEXIST, os.strerror(errno.EEXIST), str(src), None, str(dst))
    os.rename(src, dst)


Manifest = dict[str, tuple[str, int, str]]  # relative path -> (kind, size, sha256 or link target)


class CopyMismatchError(Exception):
    """The copy differs from what was read from the source."""


def _hash_file(path: Path) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    with open(path, "rb", buffering=0) as handle:
        while chunk := handle.read(_COPY_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


def tree_manifest(root: Path) -> Manifest:
    """Every entry under `root` (lstat, no symlink followed) with sizes and content hashes."""
    manifest: Manifest = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        if stat.S_ISDIR(st.st_mode):
            manifest[rel] = ("dir", 0, "")
            for entry in sorted(os.scandir(path), key=lambda e: e.name):
                visit(Path(entry.path), f"{rel}/{entry.name}" if rel else entry.name)
        elif stat.S_ISREG(st.st_mode):
            size, digest = _hash_file(path)
            manifest[rel] = ("file", size, digest)
        elif stat.S_ISLNK(st.st_mode):
            manifest[rel] = ("symlink", 0, os.readlink(path))
        else:
            manifest[rel] = ("special", 0, "")

    visit(root, "")
    return manifest


StatManifest = dict[str, tuple[str, int, int, int, str]]  # rel -> (kind, size, mtime_ns, inode, link target)


def _stat_entry(path: Path, st: os.stat_result) -> tuple[str, int, int, int, str]:
    if stat.S_ISDIR(st.st_mode):
        return ("dir", 0, st.st_mtime_ns, st.st_ino, "")
    if stat.S_ISREG(st.st_mode):
        return ("file", st.st_size, st.st_mtime_ns, st.st_ino, "")
    if stat.S_ISLNK(st.st_mode):
        return ("symlink", 0, st.st_mtime_ns, st.st_ino, os.readlink(path))
    return ("special", 0, st.st_mtime_ns, st.st_ino, "")


def stat_manifest(root: Path) -> StatManifest:
    """Every entry under `root` (lstat, no symlink followed) with kind, size, mtime and inode; no reads."""
    manifest: StatManifest = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        manifest[rel] = _stat_entry(path, st)
        if stat.S_ISDIR(st.st_mode):
            with os.scandir(path) as entries:
                children = [(entry.path, entry.name) for entry in entries]
            for child, name in children:
                visit(Path(child), f"{rel}/{name}" if rel else name)

    visit(root, "")
    return manifest


def source_change(copied: StatManifest, now: StatManifest) -> str | None:
    """How the source differs now from what was copied (file set, kinds, sizes, mtimes), or None. Pure."""
    for rel in sorted(set(copied) | set(now)):
        name = rel or "."
        before, after = copied.get(rel), now.get(rel)
        if before == after:
            continue
        if before is None:
            return f"{name} appeared"
        if after is None:
            return f"{name} disappeared"
        if before[0] != after[0] or before[3] != after[3] or before[4] != after[4]:
            return f"{name} was replaced"
        if before[1] != after[1]:
            return f"{name} is {after[1]} bytes, {before[1]} were copied"
        return f"{name} was modified"
    return None


def stat_digest(manifest: StatManifest) -> str:
    """A short fingerprint of a stat manifest, kept in the journal so recovery can re-check the source."""
    return hashlib.sha256(json.dumps(sorted(manifest.items())).encode()).hexdigest()


def _copy_file(src: Path, dst: Path, st: os.stat_result) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with open(src, "rb", buffering=0) as handle:
            while chunk := handle.read(_COPY_CHUNK):
                digest.update(chunk)
                size += len(chunk)
                view = memoryview(chunk)
                while view:
                    written = os.write(out, view)
                    view = view[written:]
        os.fsync(out)
        os.fchmod(out, stat.S_IMODE(st.st_mode))
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
    finally:
        os.close(out)
    return size, digest.hexdigest()


def copy_tree(src: Path, dst: Path) -> tuple[Manifest, StatManifest]:
    """Copy `src` (a dir or a file) to the new path `dst`.

    Returns the manifest of what was read and the source's stat manifest as it was copied, to tell
    later whether a writer changed the source meanwhile.
    """
    manifest: Manifest = {}
    seen: StatManifest = {}

    def visit(source: Path, target: Path, rel: str) -> None:
        st = os.lstat(source)
        seen[rel] = _stat_entry(source, st)
        if stat.S_ISDIR(st.st_mode):
            os.mkdir(target, 0o700)
            manifest[rel] = ("dir", 0, "")
            for entry in sorted(os.scandir(source), key=lambda e: e.name):
                visit(Path(entry.path), target / entry.name, f"{rel}/{entry.name}" if rel else entry.name)
            os.chmod(target, stat.S_IMODE(st.st_mode))
            os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
            fsync_dir(target)
        elif stat.S_ISREG(st.st_mode):
            manifest[rel] = ("file", *_copy_file(source, target, st))
            crash_point("copying")
        elif stat.S_ISLNK(st.st_mode):
            link = os.readlink(source)
            os.symlink(link, target)
            manifest[rel] = ("symlink", 0, link)
        else:
            raise CopyMismatchError(f"{source}: not a file, directory or symlink; will not copy it")

    visit(src, dst, "")
    return manifest, seen


def check_copy(expected: Manifest, copy: Path) -> None:
    """Re-read the copy: same entries, sizes and SHA-256 of every file as the source read."""
    actual = tree_manifest(copy)
    for rel in sorted(set(expected) | set(actual)):
        if expected.get(rel) != actual.get(rel):
            raise CopyMismatchError(
                f"copy differs at {rel or '.'}: expected {expected.get(rel)}, found {actual.get(rel)}"
            )


def remove_tree(path: Path, step: str = "removing") -> None:
    """rm -rf that never follows a symlink; a missing path is fine (re-runs are safe)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(path)
        crash_point(step)
        return
    for dirpath, dirnames, filenames in os.walk(path, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
            crash_point(step)
        for name in dirnames:
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                os.unlink(full)
            else:
                os.rmdir(full)
    os.rmdir(path)
    fsync_dir(path.parent)
