"""Checks made against the filesystem just before a model is touched: where, whether, unchanged, unused.

A model passes when it is a real directory (or file) directly under its tier directory inside the
models path, unchanged since the plan's snapshot (bytes, newest mtime/ctime), and nobody uses it:
no other process holds one of its files open, memory-mapped, locked, or has it as working
directory, and a non-blocking `flock` on it succeeds (the lock is then held until the move is
done, so an application can protect a model by holding that lock, as with systemd-tmpfiles).

Processes whose /proc entries we may not read (other users, without root) are counted in
`unreadable`; they do not block a model, the report says how many there were.
"""

from __future__ import annotations

import fcntl
import os
import re
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cleaner.plan_build import KEEP_MARKER
from cleaner.plan_values import ModelFacts
from cleaner.policies import protection
from cleaner.walk import Inode, Snapshot, snapshot
from shared.layout import Layout
from shared.reasons import Reason

MISSING = Reason.MISSING
OUTSIDE = Reason.OUTSIDE_MODELS_PATH
CHANGED = Reason.CHANGED_SINCE_PLAN
IN_USE = Reason.IN_USE
PROTECTED = Reason.PROTECTED
UNSUPPORTED = Reason.UNSUPPORTED_TYPE
CHECK_FAILED = Reason.CHECK_FAILED  # a check could not be made (an I/O error): never read as "passed"
TIME_TOLERANCE_SECONDS = 1e-3  # timestamps went through float text and Prometheus

_LOCK_DEVICE = re.compile(r"^([0-9a-fA-F]+):([0-9a-fA-F]+):(\d+)$")


@dataclass(slots=True)
class Verdict:
    ok: bool
    reason: str = ""
    detail: str = ""
    path: Path | None = None
    lock_fd: int | None = None  # held flock on the model when ok: release after acting
    unreadable_processes: int = 0
    snapshot: Snapshot | None = None

    def release(self) -> None:
        if self.lock_fd is not None:
            os.close(self.lock_fd)
            self.lock_fd = None


@dataclass(frozen=True, slots=True)
class Usage:
    holders: tuple[str, ...] = ()  # "pid 123 (python): open raw/m/w.bin"
    unreadable: int = 0


# ---- pure decisions --------------------------------------------------------------------------


def valid_model_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


def is_protected(tier: str, model: str, globs: Sequence[str]) -> bool:
    """The planner's own rule (a glob without `/` matches the model name in any tier)."""
    return bool(protection(ModelFacts(tier, model, 0, 0, 0.0), globs))


def changed_since(snapshot: Snapshot, planned_bytes: int, planned_last_changed: float) -> str | None:
    """Why the model is not what the plan saw, or None when it is the same."""
    if snapshot.freed_bytes != planned_bytes:
        # Both sides by the same rule (cleaner.walk): the bytes evicting the model would free.
        return f"it would free {snapshot.freed_bytes} bytes, the plan saw {planned_bytes}"
    if snapshot.newest_change > planned_last_changed + TIME_TOLERANCE_SECONDS:
        return f"changed at {snapshot.newest_change:.3f}, after the plan's snapshot {planned_last_changed:.3f}"
    return None


def parse_lock_inodes(text: str, own_pid: int) -> dict[Inode, int]:
    """/proc/locks -> {(major, minor, inode): pid} of locks held by others (pid -1: OFD lock)."""
    held: dict[Inode, int] = {}
    for line in text.splitlines():
        tokens = line.split()
        if "->" in tokens:
            continue  # a waiter, not a holder
        for index, token in enumerate(tokens):
            match = _LOCK_DEVICE.match(token)
            if match and index > 0:
                try:
                    pid = int(tokens[index - 1])
                except ValueError:
                    break
                if pid != own_pid:
                    held[(int(match[1], 16), int(match[2], 16), int(match[3]))] = pid
                break
    return held


def parse_maps_line(line: str) -> tuple[Inode, str] | None:
    """One /proc/<pid>/maps line -> ((major, minor, inode), path) for file mappings."""
    parts = line.split(maxsplit=5)
    if len(parts) < 5:
        return None
    try:
        major, minor = (int(x, 16) for x in parts[3].split(":"))
        inode = int(parts[4])
    except ValueError:
        return None
    if inode == 0:
        return None
    path = parts[5].strip() if len(parts) > 5 else ""
    return (major, minor, inode), path


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root + "/")


# ---- the filesystem --------------------------------------------------------------------------


def _comm(proc: Path) -> str:
    try:
        return (proc / "comm").read_text().strip()
    except OSError:
        return "?"


def find_users(real_path: str, inodes: frozenset[Inode], own_pid: int, proc_root: Path = Path("/proc")) -> Usage:
    """Processes other than us that hold the model open, mapped, locked, or sit in it."""
    holders: list[str] = []
    unreadable = 0
    try:
        locks = parse_lock_inodes((proc_root / "locks").read_text(), own_pid)
    except OSError:
        locks = {}
        unreadable += 1
    for inode, pid in locks.items():
        if inode in inodes:
            holders.append(f"pid {pid}: holds a lock on a file of the model")
    for name in os.listdir(proc_root):
        if not name.isdigit() or int(name) == own_pid:
            continue
        proc = proc_root / name
        found, denied = _process_uses(proc, real_path, inodes)
        unreadable += denied
        if found:
            holders.append(f"pid {name} ({_comm(proc)}): {found}")
    return Usage(tuple(holders), unreadable)


def _process_uses(proc: Path, real_path: str, inodes: frozenset[Inode]) -> tuple[str, int]:
    """(how the process uses the model or "", 1 when its entries could not be read)."""
    try:
        cwd = os.readlink(proc / "cwd")
        if _under(cwd, real_path):
            return f"working directory {cwd}", 0
    except PermissionError:
        return "", 1
    except OSError:
        pass  # gone, or a kernel thread
    try:
        fds = os.listdir(proc / "fd")
    except PermissionError:
        return "", 1
    except OSError:
        return "", 0
    for fd in fds:
        link = proc / "fd" / fd
        try:
            target = os.readlink(link)
            if not target.startswith("/"):
                continue  # pipes, sockets, anon inodes
            if _under(target.removesuffix(" (deleted)"), real_path):
                return f"open {target}", 0
            st = os.stat(link)  # the open file itself, wherever it is seen from (containers)
        except OSError:
            continue
        if (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino) in inodes:
            return f"open {target}", 0
    try:
        with open(proc / "maps", encoding="utf-8", errors="replace") as handle:
            for line in handle:
                parsed = parse_maps_line(line)
                if parsed and (parsed[0] in inodes or _under(parsed[1], real_path)):
                    return f"memory-maps {parsed[1]}", 0
    except PermissionError:
        return "", 1
    except OSError:
        pass
    return "", 0


def model_location(models_path: Path, layout: Layout, tier: str, model: str) -> Path | None:
    """models/<tier dir>/<model>, or None when the names could lead anywhere else."""
    if tier not in layout.tiers or not valid_model_name(model):
        return None
    return models_path / layout.dir_for_tier(tier) / model


def tier_dir_inside(models_path: Path, layout: Layout, tier: str, path: Path) -> bool:
    """The tier directory really is inside the models path (no symlink leads elsewhere)."""
    real_models = os.path.realpath(models_path)
    real_tier = os.path.realpath(path.parent)
    return real_tier == os.path.join(real_models, layout.dir_for_tier(tier))


def verify_model(
    *,
    models_path: Path,
    layout: Layout,
    tier: str,
    model: str,
    planned_bytes: int,
    planned_last_changed: float,
    protect: Sequence[str] = (),
    own_pid: int | None = None,
    proc_root: Path = Path("/proc"),
    walk: Callable[[Path], Snapshot] = snapshot,
) -> Verdict:
    """All checks, cheapest first. When ok, the model's flock is held in `lock_fd`.

    Never raises OSError: a check that cannot be made (a directory we may not read, one replaced by
    a file mid-walk, a path too long, an I/O error) skips this model with `check_failed`, and the
    run goes on with the next one.
    """
    try:
        return _verify_model(
            models_path, layout, tier, model, planned_bytes, planned_last_changed, protect, own_pid, proc_root, walk
        )
    except OSError as err:
        where = f" {_shorten(os.fsdecode(err.filename))}" if err.filename else ""
        reason = err.strerror or type(err).__name__
        return Verdict(
            False, CHECK_FAILED, f"could not check{where}: {reason}", model_location(models_path, layout, tier, model)
        )


def _shorten(text: str, limit: int = 160) -> str:
    """A path for a one-line reason: a path too long for the kernel is too long for a report too."""
    return text if len(text) <= limit else f"{text[: limit // 2]}...{text[-limit // 2 :]}"


def _verify_model(
    models_path: Path,
    layout: Layout,
    tier: str,
    model: str,
    planned_bytes: int,
    planned_last_changed: float,
    protect: Sequence[str],
    own_pid: int | None,
    proc_root: Path,
    walk: Callable[[Path], Snapshot],
) -> Verdict:
    own_pid = os.getpid() if own_pid is None else own_pid
    path = model_location(models_path, layout, tier, model)
    if path is None:
        return Verdict(False, OUTSIDE, f"{tier}/{model} is not a tier/model name")
    if is_protected(tier, model, protect):
        return Verdict(False, PROTECTED, "matches cleaner.protect", path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return Verdict(False, MISSING, f"{path} does not exist", path)
    except NotADirectoryError:
        return Verdict(False, OUTSIDE, f"{path.parent} is not a directory", path)
    if not tier_dir_inside(models_path, layout, tier, path):
        return Verdict(False, OUTSIDE, f"{path.parent} resolves outside {models_path}", path)
    if stat.S_ISLNK(st.st_mode):
        return Verdict(False, OUTSIDE, f"{path} is a symlink to {os.readlink(path)}; never followed", path)
    if not (stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode)):
        return Verdict(False, UNSUPPORTED, f"{path} is neither a directory nor a file", path)
    if stat.S_ISDIR(st.st_mode) and os.path.lexists(path / KEEP_MARKER):
        return Verdict(False, PROTECTED, f"{KEEP_MARKER} marker in the model directory", path)

    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_DIRECTORY if stat.S_ISDIR(st.st_mode) else 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return Verdict(False, MISSING, f"{path} vanished", path)
    except OSError as err:
        return Verdict(False, OUTSIDE, f"{path}: {err.strerror}", path)
    verdict = Verdict(False, path=path, lock_fd=fd)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            verdict.reason, verdict.detail = CHANGED, f"{path} was replaced while being checked"
            return verdict
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            verdict.reason, verdict.detail = IN_USE, f"another process holds a flock on {path}"
            return verdict
        now = walk(path)
        verdict.snapshot = now
        why = changed_since(now, planned_bytes, planned_last_changed)
        if why:
            verdict.reason, verdict.detail = CHANGED, why
            return verdict
        usage = find_users(os.path.realpath(path), now.inodes, own_pid, proc_root)
        verdict.unreadable_processes = usage.unreadable
        if usage.holders:
            verdict.reason, verdict.detail = IN_USE, "; ".join(usage.holders[:3])
            return verdict
        verdict.ok = True
        return verdict
    finally:
        if not verdict.ok:
            verdict.release()
