"""The speed-ups, behind one switch: ``FILEDISPATCH_FASTPATH=0`` turns every one of them off.

Each fast path here has a plain twin with the same guarantees (a delivery never replaces a
file it did not mean to, never shares fate with a live source); the plain twins are what a
system without these calls runs, so CI runs the crash, move and copy tests with the switch
off too. What the switch covers: ``renameat2(RENAME_NOREPLACE)`` (inline moves, and copies
renamed into place; off, a copy is linked then unlinked) and ``sync_file_range`` (ctypes),
reflinks (``FICLONE``), kernel copies (``copy_file_range``, ``sendfile``; off, a local
copy reads and writes, holes still kept), ``RWF_NOWAIT`` reads (``read_cached``: HTTP, FTP,
SFTP; off, every read in a thread), and the dispatcher's inline
lanes (the inline move and the batched copies; with the switch off every file goes through
the workers).
This module never decides what is delivered or when the source goes: only how fast.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
from typing import Any

#: False when the environment says ``FILEDISPATCH_FASTPATH=0`` (read once, at import)
ENABLED = os.environ.get("FILEDISPATCH_FASTPATH", "1").strip() != "0"


def _libc_function(name: str, *argtypes: Any) -> Any:
    """A function of the C library that Python does not wrap, or None where there is none."""
    if not ENABLED:
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_SYNC_FILE_RANGE_WRITE = 2
_FICLONE = 0x40049409  #: ioctl(dst, FICLONE, src): Linux 4.5 (btrfs, XFS with reflink, ...)
#: renameat2(2): Linux 3.15, glibc 2.28
_renameat2 = _libc_function(
    "renameat2", ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint
)
#: sync_file_range(2): starts writing a file back without waiting
_sync_file_range = _libc_function(
    "sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint
)

#: the dispatcher's inline lanes (an inline rename per file, copies in batches) are used
INLINE_LANES = ENABLED
#: local copies are made in the kernel (``processors.local.copy_data``: copy_file_range,
#: else sendfile; off, a read/write loop)
KERNEL_COPY = ENABLED
#: reads of cached data without a thread hop (``preadv(RWF_NOWAIT)``) are tried
NOWAIT_READS = ENABLED and hasattr(os, "RWF_NOWAIT")
#: an atomic "rename unless the name is taken" exists (else: a check, then a rename)
ATOMIC_NOREPLACE = _renameat2 is not None


class RenameUnavailable(Exception):
    """This filesystem cannot rename here (another filesystem, no RENAME_NOREPLACE support)."""


def rename_noreplace(
    src: str, dst: str, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD
) -> None:
    """Rename ``src`` to ``dst`` unless ``dst`` exists (FileExistsError then). A relative name
    is taken in the folder of its ``*_dir_fd`` (a descriptor, as for ``renameat``).

    Fast: ``renameat2(RENAME_NOREPLACE)``, which checks and renames in one step in the kernel.
    Plain (the switch off, or an old system): a check then ``rename()``; a file another writer
    creates at ``dst`` in the microseconds between the two would be replaced. Not a hard link
    then unlink: that would leave the delivered file sharing the source's inode after a crash
    between the two, and the link moves the source's ctime, so it would look like a new version.
    Raises RenameUnavailable where no rename can do it (EXDEV: another filesystem).
    """
    if _renameat2 is not None:
        if (
            _renameat2(
                src_dir_fd, os.fsencode(src), dst_dir_fd, os.fsencode(dst), _RENAME_NOREPLACE
            )
            == 0
        ):
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            raise FileExistsError(err, os.strerror(err), dst)
        if err in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EPERM, errno.EOPNOTSUPP):
            raise RenameUnavailable(os.strerror(err))  # e.g. a mount point inside the target
        raise OSError(err, os.strerror(err), dst)
    src_fd = None if src_dir_fd == _AT_FDCWD else src_dir_fd
    dst_fd = None if dst_dir_fd == _AT_FDCWD else dst_dir_fd
    try:
        os.lstat(dst, dir_fd=dst_fd)
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    except FileNotFoundError:
        pass
    try:
        os.rename(src, dst, src_dir_fd=src_fd, dst_dir_fd=dst_fd)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise RenameUnavailable(exc.strerror) from exc
        raise


def start_writeback(fd: int) -> None:
    """Start writing ``fd``'s dirty pages back without waiting (a hint; no-op when off)."""
    if _sync_file_range is not None:
        _sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def reflink(src_fd: int, dst_fd: int) -> bool | None:
    """Make ``dst_fd`` share ``src_fd``'s blocks copy-on-write (Linux ``FICLONE``).

    True: cloned. False: not this time (the source is on another filesystem). None: the
    destination's filesystem cannot clone (or the switch is off): stop asking for it.
    A reflink is a copy, not a link: writing to the source later never changes the clone.
    """
    if not ENABLED:
        return None
    try:
        fcntl.ioctl(dst_fd, _FICLONE, src_fd)
    except OSError as exc:
        return False if exc.errno == errno.EXDEV else None
    return True


def read_cached(fd: int, n: int, at: int) -> tuple[bytes | bytearray, bool]:
    """Up to ``n`` bytes of ``fd`` from offset ``at`` that are in the page cache, read without
    blocking (``preadv(RWF_NOWAIT)``), and whether to go on trying: b"" when none is cached
    (read them in a thread), and False once the filesystem cannot say (or the switch is off).
    A fresh buffer per call is handed on as it is, with no copy."""
    if not NOWAIT_READS:
        return b"", False
    buf = bytearray(n)
    try:
        got = os.preadv(fd, [buf], at, os.RWF_NOWAIT)
    except BlockingIOError:
        return b"", True
    except OSError:  # EOPNOTSUPP/EINVAL: this filesystem cannot say; use the executor
        return b"", False
    if got < n:
        del buf[got:]
    return buf, True
