"""Facts about the filesystem under the models path: its type, its size, the inotify watch limit."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Filesystems where inotify cannot see writes made by other clients or hosts.
NETWORK_FS = frozenset(
    {"nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "lustre", "afs", "sshfs", "gpfs", "beegfs"}
)

# Filesystems whose directories count their subdirectories in st_nlink (2 + subdirectories; ext4
# says 1 past 65,000 of them): a directory with st_nlink 2 has none and need not be listed to find
# them. Others (btrfs, overlayfs' merged directories, many FUSE filesystems) say 1 or a constant.
COUNTS_SUBDIRS = frozenset({"ext2", "ext3", "ext4", "xfs", "tmpfs"})


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


def subdir_counting_device(path: str, mountinfo: str | None = None) -> int | None:
    """st_dev of `path` when its filesystem counts subdirectories in st_nlink, else None."""
    if mount_fstype(path, mountinfo) not in COUNTS_SUBDIRS:
        return None
    try:
        return os.stat(path).st_dev
    except OSError:
        return None


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
