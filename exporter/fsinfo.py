"""Facts about the filesystem under the models path: its type, its size, the inotify watch limit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Filesystems where inotify cannot see writes made by other clients or hosts.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "sshfs", "gpfs", "beegfs"}
)


def mount_fstype(path: str, mountinfo: str | None = None) -> str:
    """The filesystem type of the mount holding `path`, from /proc/self/mountinfo."""
    if mountinfo is None:
        try:
            mountinfo = Path("/proc/self/mountinfo").read_text()
        except OSError:
            return ""
    real = os.path.realpath(path)
    best, best_type = "", ""
    for line in mountinfo.splitlines():
        fields = line.split(" - ", 1)
        if len(fields) != 2:
            continue
        left, right = fields[0].split(), fields[1].split()
        if len(left) < 5 or not right:
            continue
        mount_point = left[4].replace("\\040", " ")
        inside = real == mount_point or real.startswith(mount_point.rstrip("/") + "/")
        if inside and len(mount_point) >= len(best):
            best, best_type = mount_point, right[0]
    return best_type


def network_filesystem(path: str, mountinfo: str | None = None) -> str:
    """The type name when `path` is on a network or FUSE filesystem, else ''."""
    fstype = mount_fstype(path, mountinfo)
    if fstype in NETWORK_FS or fstype.startswith("fuse"):
        return fstype
    return ""


def watch_limit() -> int | None:
    try:
        return int(Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    except (OSError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class FsUsage:
    size_bytes: int
    avail_bytes: int


def filesystem_usage(path: str) -> FsUsage | None:
    try:
        st = os.statvfs(path)
    except OSError:
        return None
    return FsUsage(st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize)
