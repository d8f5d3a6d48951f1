"""Which filesystem a source is on, and what that means for watching it: a network
filesystem is polled (inotify misses remote writes), a local disk runs the open-writers gate
inline. Reads ``/proc``; never opens a source file.
"""

from __future__ import annotations

import os
from pathlib import Path

NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "davfs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.davfs2",
    }
)
#: filesystems on a local disk (or in memory), where opening a regular file never waits for
#: a server: the open-writers gate runs inline there (a thread per batch costs more in GIL
#: hand-overs than the few syscalls per file it would move off the loop)
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "jfs"})


def mount_fstype(path: Path, mounts_file: str = "/proc/self/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (None if it cannot be told)."""
    try:
        with open(mounts_file, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, best_type = mnt, parts[2]
    return best_type


def is_network_fs(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse.sshfs"))


def describe_writer_check(root: Path) -> str:
    """One line for ``check``: how (and whether) files still being written are told apart."""
    try:
        with open("/proc/sys/fs/leases-enable", encoding="ascii") as fh:
            leases = fh.read().strip() == "1"
    except OSError:
        leases = False
    fstype = mount_fstype(root)
    if leases and not is_network_fs(fstype):
        if os.geteuid() == 0:
            return "leases (root: every file)"
        return (
            f"leases for files owned by uid {os.geteuid()}; others by /proc (only this user's "
            "processes are visible: a writer of another user is not seen)"
        )
    why = "leases are off (fs.leases-enable)" if not leases else f"no leases on {fstype}"
    if os.geteuid() == 0:
        return f"/proc scan ({why})"
    return f"/proc scan of this user's processes only ({why}); writers on other hosts unseen"
