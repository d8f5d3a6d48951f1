"""A file's birth (creation) time, where the kernel and the filesystem keep one: statx(2)
through the C library, as Python 3.11's ``os.stat`` gives no ``st_birthtime`` on Linux.

Only reads metadata; never opens, changes or decides anything about a file. Where statx is
missing (glibc before 2.28, a kernel before 4.11, another system) or the filesystem keeps no
birth time (an older kernel's tmpfs, many network and FUSE filesystems), the answer is None.
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
import threading
from typing import Any

from .models import FileVersion

#: statx(2) mask bit: the birth time is wanted / was given
STATX_BTIME = 0x800
_AT_FDCWD = -100
#: take what the client has cached (a network filesystem is not asked to sync first)
_AT_STATX_DONT_SYNC = 0x4000
#: ``struct statx`` is 256 bytes; stx_mask is its first u32, stx_btime (s64 seconds, u32
#: nanoseconds) starts at byte 80
_STATX_SIZE = 256
_MASK = struct.Struct("=I")
_BTIME_AT = 80
_TIMESTAMP = struct.Struct("=qI")


def _load() -> Any:
    try:
        fn = ctypes.CDLL(None, use_errno=True).statx
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_uint, ctypes.c_void_p)
    fn.restype = ctypes.c_int
    return fn


_statx = _load()
#: each thread's statx buffer, made once (a new 256-byte ctypes buffer per file cost more than
#: the system call)
_local = threading.local()


def birth_time_ns(path: str | os.PathLike[str]) -> int | None:
    """The birth time of ``path`` (symbolic links followed), in nanoseconds since the epoch,
    or None where the system or the filesystem does not say, or the file cannot be stat'ed
    (gone meanwhile, no permission). Never raises OSError."""
    global _statx
    if _statx is None:
        return None
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = ctypes.create_string_buffer(_STATX_SIZE)
    if _statx(_AT_FDCWD, os.fsencode(path), _AT_STATX_DONT_SYNC, STATX_BTIME, buf) != 0:
        if ctypes.get_errno() == errno.ENOSYS:  # the C library has it, the kernel does not
            _statx = None
        return None
    if not _MASK.unpack_from(buf, 0)[0] & STATX_BTIME:
        return None
    seconds, nanoseconds = _TIMESTAMP.unpack_from(buf, _BTIME_AT)
    return int(seconds) * 1_000_000_000 + int(nanoseconds)


def born(version: FileVersion) -> FileVersion:
    """``version``, its birth time (``btime_ns``; None where unknown) filled in: the same
    object (the birth time is no part of its key or equality, and a copy would lose the key
    and path it worked out already)."""
    version.note_birth(birth_time_ns(version.path))
    return version


#: whether this system can give birth times at all (each filesystem may still not)
AVAILABLE = _statx is not None
