"""Moving a source file where one rename cannot: whole, once, and never over another file.

A rename is atomic; a move to another filesystem (or where the kernel refuses the rename) is
a copy, a rename of the copy into place and a removal of the original, and something can
stop it between any two. Here that sequence is made safe to stop and to repeat: the copy is
written under a hidden name (never half-written under its own), a copy left by an interrupted
move is recognised instead of made again, and a source that cannot be removed takes its copy
back. Used by the after-actions (``done_dir``, ``failed_dir``) and by a retry that brings a
file back from ``failed_dir``.
"""

from __future__ import annotations

import contextlib
import errno
import filecmp
import hashlib
import logging
import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath

from . import fastpath, naming
from .errors import NewVersionError
from .processors.local import copy_data, sync_folder

log = logging.getLogger(__name__)

#: how many numbered names (``a-1.bin``, ``a-2.bin``...) are tried before a clock-based one
MAX_NUMBERED = 10_000


def numbered(target: Path) -> Iterator[Path]:
    """``target``, then ``stem-1.suffix``, ``stem-2.suffix``...: the names a moved file may
    be given when ``target`` is taken (``MAX_NUMBERED`` of them)."""
    yield target
    for n in range(1, MAX_NUMBERED):
        yield _numbered(target, n)


def _numbered(target: Path, n: int) -> Path:
    """``stem-N.suffix``, its stem cut where the number would pass 255 bytes (naming.py)."""
    return target.with_name(naming.with_suffix_number(PurePosixPath(target.name), n).name)


def free_name(target: Path) -> Path:
    """The first of ``numbered(target)`` nobody has; a clock-based name when all are taken."""
    for candidate in numbered(target):
        if not os.path.lexists(candidate):
            return candidate
    return _numbered(target, time.time_ns())


def rename_free(path: Path, target: Path) -> Path:
    """Rename ``path`` to ``target`` or, if another file takes that name meanwhile, to the
    next free name: never over an existing file. Returns the name it got. Raises
    ``fastpath.RenameUnavailable`` where no rename can do it."""
    target = free_name(target)
    while True:
        try:
            fastpath.rename_noreplace(os.fspath(path), os.fspath(target))
            return target
        except FileExistsError:
            target = free_name(target)


#: how the hidden name of a source being removed begins (``consume``); then the journal's key
#: of the version meant, a dash and a random part
GONE_PREFIX = naming.OWN_PREFIX + "gone-"


def consume(src: Path, same: Callable[[Path], bool], key: str) -> bool:
    """Remove ``src`` if it is still the file meant (``same(path)``); returns whether it was.

    A check then an unlink by name would remove whatever the name holds by then: a new
    version a writer renamed over it meanwhile (write ``.x.tmp``, rename it to ``x``: the
    usual way to write a file) would be lost, never delivered. So the file is first renamed
    to a hidden name in its own folder (one step: whatever is at ``src`` now), looked at
    there, and only then unlinked; a file that is not the one meant is put back
    (``put_back``). The hidden name carries ``key``, the journal's key of the version meant
    (``FileVersion.key``): a stop between the rename and the unlink (kill -9, power loss)
    leaves the file there, and the next start finishes the work from the journal
    (``recovery.finish_removals``). Raises FileNotFoundError when ``src`` is gone, OSError as
    ``rename``."""
    hidden = src.with_name(f"{GONE_PREFIX}{key}-{secrets.token_hex(6)}")
    os.rename(src, hidden)
    if not meant_or_put_back(hidden, src, same):
        return False
    os.unlink(hidden)
    return True


def gone_key(name: str) -> str | None:
    """The version key in a hidden name ``consume`` gave (None: not such a name)."""
    if not name.startswith(GONE_PREFIX):
        return None
    key, dash, tail = name[len(GONE_PREFIX) :].rpartition("-")
    return key if dash and key and tail else None


def meant_or_put_back(path: Path, src: Path, same: Callable[[Path], bool]) -> bool:
    """Whether the file just renamed from ``src`` to ``path`` is the one meant
    (``same(path)``; one that cannot be looked at is not); if not, it is put back
    (``put_back``). A rename takes whatever the name holds at that instant."""
    try:
        meant = same(path)
    except OSError:
        meant = False
    if not meant:
        put_back(path, src)
    return meant


def put_back(path: Path, src: Path) -> Path:
    """Give a file taken by mistake (a new version renamed over a source that was being
    consumed) its name ``src`` back, or the next free numbered name if another file has
    taken it meanwhile; the log says so. Returns where it is."""
    try:
        back = rename_free(path, src)
    except fastpath.RenameUnavailable:  # its own folder: only a plain rename's fallback
        back = free_name(src)
        os.rename(path, back)
    log.warning(
        "%s changed while it was moved or removed (a new version renamed over it): the new "
        "version is left at %s, to be dispatched on its own",
        src,
        back,
    )
    return back


def _copy(
    src: Path, dst: Path, check: Callable[[], None] | None = None, follow: bool = True
) -> os.stat_result:
    """``shutil.copy2`` (bytes, mode, times, extended attributes; a link's target), made in
    the kernel where it can and keeping a sparse file's holes (``processors.local.copy_data``;
    ``check`` is called before each piece); returns the copy's stat. ``dst`` is our hidden
    name, which anyone who may write in its folder can know: what is there (a crash's
    leftover, or a link someone planted) is removed, never opened, and ``dst`` created new
    (O_EXCL, O_NOFOLLOW), so a link is never written through; mode, times and attributes are
    set through the copy's descriptor, never by name (a name swapped for a link meanwhile
    would have them set on what it points to). ``follow``: false, a link at ``src`` is
    refused (ELOOP) rather than read; anything but a regular file is refused (EINVAL)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)  # a link goes, never the file it points to
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
    # O_NONBLOCK: a FIFO put in its place must not hold the open for ever
    how = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    with open(os.open(src, how), "rb") as fin:
        st = os.fstat(fin.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, f"{src} is not a regular file; it is not copied")
        os.set_blocking(fin.fileno(), True)
        with open(os.open(dst, flags, 0o666), "wb") as fout:
            return _copied(fin.fileno(), fout.fileno(), st, check)


def _copied(
    fin: int, fout: int, st: os.stat_result, check: Callable[[], None] | None
) -> os.stat_result:
    """``_copy``'s work, between the two files open: bytes, attributes, mode and times."""
    copy_data(fin, fout, st, check=check)
    for name in _xattrs(fin):
        with contextlib.suppress(OSError):  # as copy2: what the target refuses is left
            os.setxattr(fout, name, os.getxattr(fin, name))
    os.fchmod(fout, stat.S_IMODE(st.st_mode))
    os.utime(fout, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.fsync(fout)  # on disk before the source goes: a power loss must not take both
    return os.fstat(fout)


def _xattrs(fd: int) -> list[str]:
    """The extended attributes of the file open as ``fd`` (none where the filesystem has none)."""
    try:
        return os.listxattr(fd)
    except OSError:
        return []


def move_by_copy(
    src: Path,
    target: Path,
    unchanged: Callable[[], bool],
    check: Callable[[], None] | None = None,
    *,
    any_free_name: bool,
    same: Callable[[Path], bool] | None = None,
    key: str = "",
    follow: bool = True,
) -> Path:
    """Move ``src`` to ``target`` by copying (in a thread: it reads and writes the bytes).

    The copy (bytes, mode, mtime, holes: ``_copy``; a link's target) is written under a hidden
    name beside ``target``, then ``unchanged()`` must still say the source is the file meant
    (else OSError, and the copy goes), then the copy gets its name, then ``src`` is removed.
    ``any_free_name``: the copy may take the next free numbered name (``done_dir``,
    ``failed_dir``), and a file among those names with ``src``'s size, mtime and bytes is a
    copy an interrupted move already placed: only ``src`` is removed then. Otherwise the copy
    takes ``target`` or nothing (FileExistsError).

    ``follow``: whether a link at ``src`` is copied as its target (a source that follows
    links) or refused (``_copy``).

    ``check`` (if given) is called before each piece of the copy and before the rename: what
    it raises ends the move there, the hidden copy removed (a move called off at a stop).
    ``same(path)`` (if given): whether the file at ``path`` is the one meant (of the version
    whose journal key is ``key``); ``src`` is then removed with ``consume``, so a new version
    renamed over it as the move ends is left, never removed (the copy placed is of the
    version meant, which no longer has a name).
    The copy and its name are flushed to disk (fsync of the file, then of its folder) before
    ``src`` is removed: a power loss never leaves neither. A stop before the rename leaves at
    worst the hidden copy (replaced by the next attempt);
    a source that cannot be removed (EPERM, EROFS...) takes its placed copy back and the
    error is raised: the file is never in both places. Returns where the file is now.
    """
    if any_free_name:
        placed = _placed_before(src, target)
        if placed is not None:
            if not unchanged():
                raise NewVersionError(f"{src} changed while it was moved; it stays (a new version)")
            _remove(src, same, key)
            return placed
    # one hidden name per source and target: a crash's leftover is overwritten next time
    tag = hashlib.sha256(os.fsencode(src)).hexdigest()[:12]
    head = f".filedispatch-move-{tag}-"
    tmp = target.with_name(head + naming.shorten(target.name, len(head)))
    try:
        made = _copy(src, tmp, check, follow)
        if not unchanged():
            raise NewVersionError(f"{src} changed while it was moved; it stays (a new version)")
        if check is not None:
            check()
        there = os.lstat(tmp)  # a file renamed onto our hidden name would be placed as ours
        if (there.st_dev, there.st_ino) != (made.st_dev, made.st_ino):
            raise OSError(f"{tmp} was replaced by another file while {src} was copied; it stays")
        if any_free_name:
            placed = rename_free(tmp, target)
        else:
            fastpath.rename_noreplace(os.fspath(tmp), os.fspath(target))
            placed = target
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    sync_folder(placed.parent)  # the copy's name too, before the source goes
    try:
        _remove(src, same, key)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(placed)
        raise
    return placed


def _remove(src: Path, same: Callable[[Path], bool] | None, key: str) -> None:
    """``src`` removed once its copy is placed; gone already, it is not missed (the copy is
    then the file's only place, and is kept)."""
    with contextlib.suppress(FileNotFoundError):
        if same is None:
            os.unlink(src)
        else:
            consume(src, same, key)


def _placed_before(src: Path, target: Path) -> Path | None:
    """A file among ``target``'s numbered names that is already a whole copy of ``src``."""
    try:
        st = os.stat(src)
    except OSError:
        return None
    for candidate in numbered(target):
        try:
            there = os.lstat(candidate)
        except FileNotFoundError:
            return None  # names are taken in order: none after a free one
        except OSError:
            continue
        if (there.st_size, there.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
            continue
        if (there.st_dev, there.st_ino) == (st.st_dev, st.st_ino):
            continue  # the source itself (a done_dir inside the source): not a copy
        with contextlib.suppress(OSError):
            if filecmp.cmp(src, candidate, shallow=False):
                return candidate
    return None
