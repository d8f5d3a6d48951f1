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
the workers), and ``quiet_opens`` (a watch that is not woken by our own opens).
This module never decides what is delivered or when the source goes: only how fast.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import threading
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

#: inotify_add_watch(2), to take IN_OPEN out of a watch (``quiet_opens``)
_inotify_add_watch = _libc_function(
    "inotify_add_watch", ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32
)
_inotify_rm_watch = _libc_function("inotify_rm_watch", ctypes.c_int, ctypes.c_int)
#: inotify_init1(2), for a ``Doorbell``
_inotify_init1 = _libc_function("inotify_init1", ctypes.c_int)
#: the events a ``Doorbell`` rings for: a name made, removed, renamed, written or changed,
#: and the folder itself renamed (removed, its watch goes: IN_IGNORED, which always rings)
_IN_CHANGES = 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x100 | 0x200 | 0x800
_IN_OPEN = 0x20
#: what inotify_add_watch takes back of a watch's mask as /proc shows it: the events
#: (IN_ALL_EVENTS) and IN_ONLYDIR, IN_DONT_FOLLOW, IN_EXCL_UNLINK, IN_ONESHOT
_IN_ARG_BITS = 0xFFF | 0x01000000 | 0x02000000 | 0x04000000 | 0x80000000
_IN_ONLYDIR = 0x01000000

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


def inotify_fds() -> set[int]:
    """The descriptors of this process that are inotify instances (none without /proc):
    taken before and after a watch is made, the difference is its own (see ``quiet_opens``,
    and the watch's coverage check in watcher/changes.py, which holds with the switch off
    too)."""
    found = set()
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return set()
    for name in names:
        with contextlib.suppress(OSError):  # closed meanwhile
            if os.readlink(f"/proc/self/fd/{name}") == "anon_inode:inotify":
                found.add(int(name))
    return found


class Doorbell:
    """An inotify instance of our own on one folder (not its subfolders), for a thread to
    wait on (``fd`` turns readable) while the folder is quiet: the change feed's idle wait
    (watcher/changes.py). Only a wake-up: what changed is still read from the feed's own
    watch; the events queued here are read and dropped. Its watch is made by ``arm`` and
    removed by ``disarm``, so that the kernel queues nothing here while the folder is busy.
    ``knock`` turns ``knock_fd`` (an eventfd) readable for good, so that the waiter can be
    told to stop without waiting out its timeout.
    Raises OSError when no inotify instance can be made (or the switch is off)."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        if _inotify_init1 is None or _inotify_add_watch is None or _inotify_rm_watch is None:
            raise OSError(errno.ENOSYS, "no inotify here")
        fd = _inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")
        try:
            self.knock_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        except OSError:
            os.close(fd)
            raise
        self.fd = fd
        self._folder = os.fsencode(folder)
        self._wd = -1
        self._lock = threading.Lock()  # a knock from another thread never meets a closed fd
        self._closed = False

    def arm(self) -> bool:
        """Watch the folder from now on; False if it cannot be (gone, no watch left)."""
        self.drain()
        self._wd = _inotify_add_watch(self.fd, self._folder, _IN_CHANGES | _IN_ONLYDIR)
        return self._wd >= 0

    def disarm(self) -> None:
        if self._wd >= 0:
            _inotify_rm_watch(self.fd, self._wd)
            self._wd = -1
        self.drain()

    def drain(self) -> None:
        """Read and drop what is queued."""
        with contextlib.suppress(OSError):  # BlockingIOError: nothing (more) queued
            while os.read(self.fd, 65536):
                pass

    def covers(self, fd: int) -> bool:
        """Whether every folder the inotify instance ``fd`` (another's: the feed's own watch)
        watches is one this doorbell watches (armed): then a change it is told of rings here
        too. False when either cannot be read."""
        theirs = inotify_watched(fd)
        return bool(theirs) and theirs <= inotify_watched(self.fd)

    def knock(self) -> None:
        """Make ``knock_fd`` readable (from any thread; nothing once closed)."""
        with self._lock:
            if not self._closed:
                with contextlib.suppress(OSError):  # the counter is full: readable anyway
                    os.eventfd_write(self.knock_fd, 1)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            os.close(self.fd)
            os.close(self.knock_fd)


def quiet_opens(folder: str | os.PathLike[str], fds: set[int]) -> int:
    """Take ``IN_OPEN`` out of the watches on ``folder`` of the inotify instances ``fds``
    (those of the watch just made: see ``inotify_fds``; nobody else's watch is touched);
    returns how many watches were changed (0 where none could be, or the switch is off: the
    watch then goes on as it was).

    watchfiles' notify thread asks for IN_OPEN, then drops the events it gets (an open is no
    change). Every file the service opened in the folder (the open-writers gate's lease, a
    copy, an upload) made the kernel queue such an event and wake that thread: about 6 us of
    CPU a file on a 2-CPU VM, more than the lease's own system calls. No other event is
    touched, so the changes seen are the same.

    The watch is found in ``/proc/self/fdinfo/N`` (the folder's device and inode), and its
    mask set again through a descriptor of that very folder (``/proc/self/fd/M``), so a
    folder renamed or replaced meanwhile is never given a watch of ours.
    """
    if not ENABLED or not fds or _inotify_add_watch is None or _inotify_rm_watch is None:
        return 0
    try:
        top = os.open(folder, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return 0
    changed = 0
    try:
        st = os.fstat(top)
    except OSError:
        os.close(top)
        return 0
    # /proc shows the kernel's dev_t: major << 20 | minor
    want = (st.st_ino, os.major(st.st_dev) << 20 | os.minor(st.st_dev))
    try:
        for fd, (wd, ino, dev), mask in _inotify_watches(fds):
            if mask & _IN_OPEN and (ino, dev) == want:
                new = (mask & _IN_ARG_BITS & ~_IN_OPEN) | _IN_ONLYDIR
                got = _inotify_add_watch(fd, f"/proc/self/fd/{top}".encode(), new)
                if got == wd:
                    changed += 1
                elif got >= 0:  # not that watch after all (the folder went): take ours away
                    _inotify_rm_watch(fd, got)
    finally:
        os.close(top)
    return changed


def inotify_watched(fd: int) -> set[tuple[int, int]]:
    """(inode, kernel device) of each folder the inotify instance ``fd`` watches, from
    /proc/self/fdinfo (none where it cannot be read)."""
    return {(ino, dev) for _, (_, ino, dev), _ in _inotify_watches({fd})}


def _inotify_watches(fds: set[int]) -> list[tuple[int, tuple[int, int, int], int]]:
    """(inotify descriptor, (wd, inode, kernel device), mask) of each watch of the inotify
    instances ``fds``, from /proc/self/fdinfo."""
    found = []
    for fd in sorted(fds):
        try:
            with open(f"/proc/self/fdinfo/{fd}", encoding="ascii") as info:
                lines = [line.split() for line in info if line.startswith("inotify wd:")]
        except (OSError, ValueError):
            continue  # closed meanwhile, or not what we expect
        for fields in lines:
            try:
                kv = dict(field.split(":", 1) for field in fields[1:] if ":" in field)
                key = (int(kv["wd"], 16), int(kv["ino"], 16), int(kv["sdev"], 16))
                found.append((fd, key, int(kv["mask"], 16)))
            except (KeyError, ValueError):
                continue
    return found


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
