"""Source files: the one way filedispatch opens, checks, reads the head of, or renames a file of
a source. Everything inside a source is untrusted; nothing here ever reads outside it.

A name is opened relative to the source folder without following a link in any component
(``openat2(2)`` with ``RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS``, or a component-wise
``O_NOFOLLOW`` walk where the kernel lacks it), first as a handle to the name only
(``O_PATH``: a FIFO or a device is never opened, so opening has no side effect), checked on
that handle (a regular file), and only then opened for reading through ``/proc/self/fd/N``
(never blocking: ``O_NONBLOCK``), then checked again: the very version planned. After that
check nothing opens it by path again. A link is followed only where it
stays inside the source and leads to the planned file itself (see ``open_version``).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import signal
import stat
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .errors import PermanentDeliveryError, SourceVanishedError, TransientDeliveryError
from .models import FileVersion

log = logging.getLogger(__name__)

#: how a source file is opened for reading: no blocking open (FIFOs), no controlling tty
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
#: a handle to a name only (never opens the file itself: no side effect of a device or FIFO)
PATH_FLAGS = os.O_PATH | os.O_CLOEXEC

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_NO_LINKS = _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS
_SYS_OPENAT2 = 437  # the same number on every architecture (a syscall added after 5.1)


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def _find_openat2() -> Callable[..., int] | None:
    """libc's syscall(), if the running kernel has openat2 (Linux 5.6); else None."""
    try:
        syscall = ctypes.CDLL(None, use_errno=True).syscall
    except (OSError, AttributeError):
        return None
    syscall.restype = ctypes.c_long
    how = _OpenHow(os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECTORY, 0, _NO_LINKS)
    fd = syscall(_SYS_OPENAT2, -100, b".", ctypes.byref(how), ctypes.sizeof(how))
    if fd < 0:
        return None  # ENOSYS (an old kernel), or seccomp refusing it: walk instead
    os.close(fd)
    return syscall


#: None where the kernel has no openat2: the component-wise walk is used (tests switch it off)
openat2 = _find_openat2()


def _parts(relpath: str) -> list[str]:
    parts = relpath.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise OSError(errno.EINVAL, "not a plain relative path", relpath)
    return parts


def open_beneath(root: str | Path, relpath: str, flags: int = READ_FLAGS) -> int:
    """A descriptor of ``root/relpath`` reached without following any link below ``root``.

    ``flags`` are ``os.open`` flags (``READ_FLAGS``, ``PATH_FLAGS``, with ``O_DIRECTORY``...).
    Raises OSError: ELOOP (or ENOTDIR) where a component is a link, ENOENT, EACCES, EINVAL for
    a path with ``..`` or empty parts. The caller checks what it got with ``os.fstat``.
    """
    top = open_root(root)
    try:
        return open_at(top, relpath, flags)
    finally:
        os.close(top)


def open_root(root: str | Path) -> int:
    """A descriptor naming the source folder (``O_PATH``), for ``open_at``; close it after."""
    return os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


class NotRegularFile(OSError):
    """The name leads to something else than a regular file (a FIFO, a socket, a device, a
    folder): refused on its ``O_PATH`` handle, before it was ever opened. ``mode`` is its
    ``st_mode``."""

    def __init__(self, mode: int, relpath: str) -> None:
        super().__init__(errno.ENXIO, f"{_kind(mode)}, not a regular file", relpath)
        self.mode = mode


#: (pid, descriptor of /proc/PID/fd) kept open, so a reopen resolves one name only; per
#: process: after a fork (the daemon's) "self" named the parent, whose folder goes with it
_proc: tuple[int, int | None] = (0, None)


def _proc_fd() -> int | None:
    """A descriptor of this process's ``/proc/self/fd`` (handles are reopened through it);
    None without /proc."""
    global _proc
    pid = os.getpid()
    if _proc[0] != pid:
        try:
            fd: int | None = os.open(f"/proc/{pid}/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = None
        # the parent's descriptor is not closed here: a daemon closes what it inherited and
        # its number may name another file by now
        _proc = (pid, fd)
    return _proc[1]


def reopen(handle: int, relpath: str, flags: int = READ_FLAGS) -> int | None:
    """Open the file an ``O_PATH`` ``handle`` names, with ``flags``, if it is a regular file;
    None where /proc is not mounted (the caller then opens the checked name itself).

    Raises NotRegularFile (nothing was opened: no FIFO unblocked its writer, no device saw an
    open), OSError(ELOOP) for a symbolic link (the handle of a link, ``O_NOFOLLOW``), or the
    error of the open."""
    st = os.fstat(handle)
    if not stat.S_ISREG(st.st_mode):
        if stat.S_ISLNK(st.st_mode):
            raise OSError(errno.ELOOP, "a symbolic link", relpath)
        raise NotRegularFile(st.st_mode, relpath)
    proc = _proc_fd()
    if proc is None:
        return None
    return os.open(str(handle), flags & ~os.O_NOFOLLOW, dir_fd=proc)


def open_at(top: int, relpath: str, flags: int = READ_FLAGS) -> int:
    """``open_beneath`` from a descriptor of the source folder (one per batch of files).

    Without ``O_PATH`` in ``flags``, only a regular file is opened (see ``reopen``): anything
    else raises NotRegularFile without having been opened. Without /proc the checked name is
    opened again (``O_NONBLOCK`` still keeps a FIFO swapped in meanwhile from blocking)."""
    if flags & os.O_PATH:
        return _open_at(top, relpath, flags)
    handle = _open_at(top, relpath, PATH_FLAGS)
    try:
        fd = reopen(handle, relpath, flags)
    finally:
        os.close(handle)
    return _open_at(top, relpath, flags) if fd is None else fd


def _open_at(top: int, relpath: str, flags: int) -> int:
    if "/" not in relpath:  # one component: O_NOFOLLOW says it all, and costs no ctypes call
        if relpath in ("", ".", ".."):
            raise OSError(errno.EINVAL, "not a plain relative path", relpath)
        return os.open(relpath, flags | os.O_NOFOLLOW, dir_fd=top)
    parts = _parts(relpath)
    if openat2 is not None:
        if flags & os.O_PATH:  # openat2 refuses every other flag beside O_PATH
            flags &= os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY
        how = _OpenHow(flags, 0, _NO_LINKS)
        fd = int(openat2(_SYS_OPENAT2, top, os.fsencode(relpath), ctypes.byref(how), 24))
        if fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), relpath)
        return fd
    return _walk(top, parts, flags)


def _walk(top: int, parts: list[str], flags: int) -> int:
    """The component-wise ``O_NOFOLLOW`` walk, for kernels without openat2."""
    folder = top
    try:
        for part in parts[:-1]:
            # O_PATH | O_NOFOLLOW on a link gives the link, which O_DIRECTORY then refuses
            nxt = os.open(
                part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder
            )
            if folder != top:
                os.close(folder)
            folder = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW, dir_fd=folder)
    finally:
        if folder != top:
            os.close(folder)


#: how ``held_folder`` opens a folder: a handle to it only
_FOLDER_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC

#: a folder held open is named through its descriptor here (no /proc: by its real path)
_FD_NAMES = Path("/proc/self/fd") if os.path.isdir("/proc/self/fd") else None


@contextlib.contextmanager
def held_folder(folder: Path, make: bool = True) -> Iterator[Path]:
    """``folder`` (absolute, its links resolved once at start: ``config.real_outside``), made
    where it is missing (``make``; else FileNotFoundError) and held open while the ``with``
    lasts; yields a name of the very folder opened (``/proc/self/fd/N``), for a move into it
    by ``rename_free`` or ``move_by_copy``, or for a look at what it holds.

    No symbolic link is followed on the way to it (``sourcefile.open_beneath`` from ``/``), and
    each missing part is made then opened the same way, relative to the one above: a
    ``done_dir`` inside a hostile inbox, or one of its subfolders, replaced by a link to
    somewhere else (/etc/cron.d...) is refused with OSError, never moved into. The name
    yielded goes to the folder opened, whatever is renamed or linked in its place meanwhile.
    """
    path = os.fspath(folder)
    try:
        try:
            fd = open_beneath("/", path.lstrip("/"), _FOLDER_FLAGS)
        except FileNotFoundError:
            if not make:
                raise
            fd = _made(path)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
            raise
        raise OSError(
            exc.errno,
            f"{path}: a symbolic link or a file stands in its path; nothing is moved "
            f"through it ({exc.strerror})",
        ) from exc
    try:
        yield folder if _FD_NAMES is None else _FD_NAMES / str(fd)
    finally:
        os.close(fd)


def _made(path: str) -> int:
    """``held_folder`` where a part of ``path`` is missing: from ``/``, each part opened
    (O_NOFOLLOW) relative to the one above, made first where it is missing."""
    flags = _FOLDER_FLAGS | os.O_NOFOLLOW
    fd = os.open("/", flags)
    try:
        for part in path.split("/"):
            if not part:
                continue
            try:
                below = os.open(part, flags, dir_fd=fd)
            except FileNotFoundError:
                with contextlib.suppress(FileExistsError):  # made by another meanwhile
                    os.mkdir(part, 0o777, dir_fd=fd)
                below = os.open(part, flags, dir_fd=fd)
            fd, above = below, fd
            os.close(above)
    except BaseException:
        os.close(fd)
        raise
    return fd


def inside(root: str | Path, path: str) -> str | None:
    """``path``, links resolved, relative to the resolved ``root``; None if it leaves it."""
    real_root = os.path.realpath(root)
    real = os.path.realpath(path)
    if real == real_root:
        return ""
    if not real.startswith(real_root.rstrip("/") + "/"):
        return None
    return real[len(real_root.rstrip("/")) + 1 :]


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def describe_change(version: FileVersion, st: os.stat_result) -> str:
    """Why the name of ``version``, whose lstat is ``st``, is no longer that version: for the
    journal (a link out of the source, a FIFO, or simply a newer version)."""
    rel = version.relpath
    if inside(version.root, str(version.path)) is None:
        return (
            f"{rel} is a symbolic link (or lies below one) that leads outside the source: "
            "not followed"
        )
    if stat.S_ISLNK(st.st_mode):
        return f"{rel} was replaced by a symbolic link: not followed"
    if not stat.S_ISREG(st.st_mode):
        return f"{rel} is now {_kind(st.st_mode)}: not read"
    return f"{version.path} changed since it was seen; its new version is dispatched on its own"


def _named(exc: OSError, version: FileVersion) -> OSError:
    """``exc`` naming the source's whole path (the cause kept with our error: a
    PermissionError there makes the dispatcher try again later, see _source_unreadable)."""
    return OSError(exc.errno, exc.strerror, str(version.path))


def _refusal(version: FileVersion, exc: OSError) -> Exception:
    rel = version.relpath
    if exc.errno == errno.ENOENT:
        return SourceVanishedError(f"the file {version.path} vanished before it could be sent")
    if isinstance(exc, NotRegularFile):  # refused on its handle: never opened
        return SourceVanishedError(f"{rel} is now {_kind(exc.mode)}: not read")
    if exc.errno == errno.ENXIO:  # a socket (or a FIFO opened for writing) cannot be opened
        return SourceVanishedError(f"{rel} is no longer a regular file: not read")
    if exc.errno in (errno.EWOULDBLOCK, errno.ETXTBSY):
        return SourceVanishedError(f"{rel} is held by another process (a lease): not read")
    return _unreadable(version.path, exc)


#: this process ran short of descriptors or memory: the file is fine, a later try may work
_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS, errno.EINTR})


def _unreadable(path: Path, exc: OSError) -> PermanentDeliveryError | TransientDeliveryError:
    text = f"cannot read {path}: {exc.strerror or exc}"
    if exc.errno in _RESOURCE_ERRNOS:
        return TransientDeliveryError(text)
    return PermanentDeliveryError(text)


def _open_link(version: FileVersion, flags: int) -> int:
    """``version`` is reached through a link: follow it only inside the source, to the very
    file planned (a link that leads elsewhere, or was swapped in for the file, is refused)."""
    real = inside(version.root, str(version.path))
    if real is None:
        raise SourceVanishedError(
            f"{version.relpath} is a symbolic link (or lies below one) that leads outside "
            "the source: not followed"
        )
    try:
        return open_beneath(os.path.realpath(version.root), real, flags)
    except OSError as exc:  # it moved again meanwhile
        raise _refusal(version, exc) from _named(exc, version)


def open_version(version: FileVersion, flags: int = READ_FLAGS) -> tuple[int, os.stat_result]:
    """Open the planned ``version`` of a source file; returns its descriptor and its fstat.

    The descriptor is a regular file with the planned device, inode, size, mtime and ctime;
    read from it, never from the path again. A link is followed only inside the source and
    only to that planned file (so with ``follow_symlinks: false`` a link swapped in for the
    file is refused, and with ``true`` the link planned still works).

    Raises SourceVanishedError when the file is gone, changed, replaced (by a link, a FIFO,
    another file) or held; PermanentDeliveryError when it cannot be read (EACCES...).
    """
    try:
        fd = open_beneath(version.root, version.relpath, flags)
    except OSError as exc:
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR, errno.EXDEV):
            raise _refusal(version, exc) from _named(exc, version)
        fd = _open_link(version, flags)
    try:
        st = os.fstat(fd)
    except OSError as exc:
        os.close(fd)
        raise _refusal(version, exc) from None
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise SourceVanishedError(f"{version.relpath} is now {_kind(st.st_mode)}: not read")
    if not version.same_file(st):
        os.close(fd)
        raise SourceVanishedError(
            f"{version.relpath} changed after it was seen (another file, or a link to one, "
            "is at its name now); its new version is dispatched on its own"
        )
    return fd, st


def open_input(version: FileVersion, path: Path) -> tuple[int, os.stat_result]:
    """Open what a step delivers: the source (``open_version``) or a transform's output in
    the chain's own work folder (never a link, never blocking). Raises as open_version."""
    if path is version.path or path == version.path:
        return open_version(version)
    try:
        fd = os.open(path, READ_FLAGS | os.O_NOFOLLOW)
    except FileNotFoundError:
        raise SourceVanishedError(f"the file {path} vanished before it could be sent") from None
    except OSError as exc:
        raise _unreadable(path, exc) from exc
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PermanentDeliveryError(f"{path} is {_kind(st.st_mode)}: not read")
    return fd, st


def identity(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime_ns, ctime_ns): what must not move while a file is sent."""
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


def entries_beneath(top: str | Path, recursive: bool = True) -> Iterator[os.DirEntry[str]]:
    """Every entry of the folder ``top`` and, if ``recursive``, of the folders below it (each
    folder's entry comes before what it holds); no link followed, a folder that cannot be
    listed passed over. Walked with a list, not by recursion: ``os.walk`` recurses in Python
    3.11, and a folder nested a thousand deep (a hostile inbox may hold one) raised
    RecursionError."""
    pending = [os.fspath(top)]
    while pending:
        try:
            with os.scandir(pending.pop()) as listing:
                for entry in listing:
                    yield entry
                    try:
                        if recursive and entry.is_dir(follow_symlinks=False):
                            pending.append(entry.path)
                    except OSError:
                        continue
        except OSError:
            continue


def seen_as(path: Path, follow_symlinks: bool) -> os.stat_result:
    """The source file at ``path`` as its version saw it: the link's target where its source
    follows links (``follow_symlinks``), else the entry itself. OSError as ``lstat``."""
    st = os.lstat(path)
    if follow_symlinks and stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    return st


def same_at(version: FileVersion, follow_symlinks: bool, path: Path) -> bool:
    """Whether the file at ``path`` (the source, renamed by us: its ctime moved) is the very
    file of ``version`` (``seen_as``, ``FileVersion.same_file``). OSError as ``lstat``."""
    return version.same_file(seen_as(path, follow_symlinks), renamed=True)


def check_unchanged(fd: int, before: os.stat_result, what: str) -> None:
    """Raise SourceVanishedError if the open file changed since ``before`` (checked once its
    bytes are read: a writer that came back meanwhile makes a new version, sent on its own;
    what was sent of this one must be discarded by the caller)."""
    if identity(os.fstat(fd)) != identity(before):
        raise SourceVanishedError(
            f"{what} changed while it was sent; its new version is dispatched on its own"
        )


def recheck(version: FileVersion, path: Path, what: str) -> None:
    """After code that was handed a *path* (a command, a Python step) ran: the name must still
    lead, inside the source and without a link, to a regular file (a link only to the planned
    file itself, as ``open_version`` allows: ``follow_symlinks: true``), or be gone (the code
    consumed it). Raises SourceVanishedError otherwise: the code may then have read something
    else than the source, and its result is not trusted. A file merely changed meanwhile is a
    new version, which the after-action's identity check keeps and sends on its own."""
    if path != version.path:
        return  # a transform's output, in the chain's own work folder
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise SourceVanishedError(f"while {what} ran: cannot look at {path}: {exc}") from None
    if stat.S_ISREG(st.st_mode) and inside(version.root, str(path)) == version.relpath:
        return
    if stat.S_ISLNK(st.st_mode) and _link_to_planned(version, path):
        return  # a link followed (follow_symlinks: true), still to the very file planned
    raise SourceVanishedError(f"while {what} ran: {describe_change(version, st)}")


def _link_to_planned(version: FileVersion, path: Path) -> bool:
    """Whether the link at ``path`` leads, inside the source, to the planned file itself (its
    device and inode: the rule ``open_version`` applies to a link)."""
    if inside(version.root, str(path)) is None:
        return False
    try:
        st = os.stat(path)
    except OSError:
        return False
    if not stat.S_ISREG(st.st_mode) or not version.ino:
        return False
    return st.st_ino == version.ino and (not version.dev or st.st_dev == version.dev)


def read_head(version: FileVersion, size: int) -> bytes | None:
    """Up to ``size`` first bytes of the planned version (None if it cannot be read now)."""
    try:
        fd, _ = open_version(version)
    except (SourceVanishedError, PermanentDeliveryError):
        return None
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- open writers


#: a batch's lease check: (O_PATH handle of a regular file, its fstat, its relpath) -> True
#: (open for writing), False (not), (device, inode) (ask /proc), None (cannot be opened now)
Lease = Callable[[int, os.stat_result, str], bool | tuple[int, int] | None]


class WriterCheck:
    """Whether files are still open for writing by anyone, for the readiness gate.

    Asks for a read lease (``F_SETLEASE F_RDLCK``), which Linux refuses while any process
    holds the file open for writing, and gives it back at once; where a lease cannot be had
    (another owner without CAP_LEASE, NFS, ``fs.leases-enable = 0``) it looks through
    ``/proc/*/fd`` for a writer. ``unknown`` counts files it could not tell about.
    """

    def __init__(self) -> None:
        self.unknown = 0
        self.why_unknown: str | None = None

    def busy(self, root: Path, versions: Iterable[FileVersion]) -> set[str]:
        """The relpaths of ``versions`` that are not complete: someone holds the file open for
        writing, or it is no longer that version (changed since it was seen: look again).
        It opens files (regular ones only, see ``reopen``): on a local disk only, or in a
        thread. Six system calls a file (seven where SIGIO is not ignored); files found by
        an event on a local disk are gated by ``look`` instead, in the watcher's look."""
        busy: set[str] = set()
        ask_proc: dict[tuple[int, int], str] = {}
        try:
            top = open_root(root)
        except OSError:
            return busy  # the source is gone: nothing of it is handed on anyway
        lease = self.leaser(top)
        try:
            for version in versions:
                rel = version.relpath
                answer = self._lease(top, root, version, lease)
                if answer is True:
                    busy.add(rel)
                elif isinstance(answer, tuple):
                    ask_proc[answer] = rel
        finally:
            os.close(top)
        if ask_proc:
            self.ask_proc(ask_proc, busy)
        return busy

    def ask_proc(self, ask: dict[tuple[int, int], str], busy: set[str]) -> None:
        """Add to ``busy`` the relpaths of ``ask`` ((device, inode) -> relpath: files no lease
        could be had on) that ``/proc`` shows open for writing; count the ones it cannot tell."""
        writers, complete = proc_writers()
        busy.update(rel for key, rel in ask.items() if key in writers)
        if not complete:
            left = [rel for key, rel in ask.items() if key not in writers]
            self.unknown += len(left)
            self.why_unknown = "no lease and not every process's open files are readable"

    @staticmethod
    def leaser(top: int) -> Lease:
        """The lease check for one batch of files of the source folder ``top``: called with an
        ``O_PATH`` handle of a regular file (already checked), its fstat and its relpath, it
        answers True (someone holds it open for writing), False (nobody does), (device,
        inode) (no lease can be had: ask /proc), or None (it cannot be opened now: gone, or
        unreadable, which its delivery reports).

        What is the same for the whole batch is found once: this process's ``/proc/PID/fd``
        (the reopen goes through it) and whether SIGIO is ignored (a writer opening the file
        while we hold the lease makes the kernel signal us, SIGIO by default, whose default
        action would end the process: the service ignores it, which saves a call per file;
        elsewhere SIGURG, ignored, is asked for)."""
        proc = _proc_fd()
        setsig = signal.getsignal(signal.SIGIO) is not signal.SIG_IGN
        os_open, fcntl_, close = os.open, fcntl.fcntl, os.close
        setlease, rdlck, sigurg = fcntl.F_SETLEASE, fcntl.F_RDLCK, signal.SIGURG

        def lease(handle: int, st: os.stat_result, rel: str) -> bool | tuple[int, int] | None:
            try:
                if proc is not None:
                    fd = os_open(str(handle), READ_FLAGS, dir_fd=proc)
                else:  # no /proc: the checked name again (O_NONBLOCK: a FIFO never blocks)
                    fd = open_at(top, rel)
            except OSError:
                return None  # gone meanwhile, or unreadable: the delivery will say why
            try:
                if setsig:
                    fcntl_(fd, fcntl.F_SETSIG, sigurg)
                fcntl_(fd, setlease, rdlck)
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return True
                return st.st_dev, st.st_ino  # EACCES (not ours), EINVAL (no leases here)
            finally:
                # closing gives the lease back: a writer opening the file meanwhile waits that long
                close(fd)
            return False

        return lease

    def look(
        self, top: int, rel: str, lease: Lease
    ) -> tuple[os.stat_result, bool | tuple[int, int] | None]:
        """The watcher's look at a one-component name ``rel`` of the source folder ``top``: its
        lstat (from an ``O_PATH | O_NOFOLLOW`` handle: a link is not followed, nothing is
        opened) and, for a regular file, the lease check on that very handle (see
        ``leaser``; None for anything else). One look then gives both the version and
        whether it is still being written. Raises OSError (ENOENT...) as lstat would."""
        handle = os.open(rel, PATH_FLAGS | os.O_NOFOLLOW, dir_fd=top)
        try:
            st = os.fstat(handle)
            if not stat.S_ISREG(st.st_mode):
                return st, None
            return st, lease(handle, st, rel)
        finally:
            os.close(handle)

    def _lease(
        self,
        top: int,
        root: Path,
        version: FileVersion,
        lease: Lease,
    ) -> bool | tuple[int, int] | None:
        """True: open for writing, or changed; False: complete; (dev, ino): ask /proc; None:
        gone or not a regular file (nothing to hand on; a FIFO or device is never opened)."""
        found = _handle(top, root, version.relpath)
        if found is None:
            return None
        handle, st = found
        try:
            if not stat.S_ISREG(st.st_mode):
                return None
            if not version.same_file(st):
                return True  # a newer version (a writer came and went): look again
            # nobody holds it open for writing, and it was the version seen a moment before
            # the lease (one that changed within those microseconds is caught by the
            # identity check each delivery makes on its own descriptor)
            return lease(handle, st, version.relpath)
        finally:
            os.close(handle)


def _handle(top: int, root: Path, rel: str) -> tuple[int, os.stat_result] | None:
    """An ``O_PATH`` handle of ``rel`` and its fstat (a link followed only inside the source,
    as ``open_version`` does); None if it is gone or a link leads outside."""
    try:
        handle = _open_at(top, rel, PATH_FLAGS)
    except OSError:  # a link in a folder of the path (openat2 refuses it)
        handle = None
    if handle is not None:
        try:
            st = os.fstat(handle)
            if not stat.S_ISLNK(st.st_mode):
                return handle, st
        except OSError:
            pass
        os.close(handle)
    try:  # a followed link: the gate looks at its target, inside the source only
        real = inside(root, os.path.join(root, rel))
        if not real:
            return None
        handle = open_beneath(os.path.realpath(root), real, PATH_FLAGS)
    except OSError:
        return None
    try:
        return handle, os.fstat(handle)
    except OSError:
        os.close(handle)
        return None


def proc_writers(proc: str = "/proc") -> tuple[set[tuple[int, int]], bool]:
    """(device, inode) of every file some process holds open for writing, and whether every
    process could be looked at (another user's need root or CAP_SYS_PTRACE)."""
    found: set[tuple[int, int]] = set()
    complete = True
    me = str(os.getpid())
    for pid in _pids(proc):
        if pid == me:
            continue
        try:
            fds = os.listdir(f"{proc}/{pid}/fd")
        except FileNotFoundError:
            continue
        except OSError:
            complete = False
            continue
        for fd in fds:
            try:
                with open(f"{proc}/{pid}/fdinfo/{fd}", "rb") as fh:
                    flags = next(
                        int(line.split()[1], 8) for line in fh if line.startswith(b"flags:")
                    )
                if flags & os.O_ACCMODE == os.O_RDONLY:
                    continue
                st = os.stat(f"{proc}/{pid}/fd/{fd}")
            except (OSError, StopIteration, ValueError, IndexError):
                continue
            if stat.S_ISREG(st.st_mode):
                found.add((st.st_dev, st.st_ino))
    return found, complete


def _pids(proc: str) -> Iterator[str]:
    with contextlib.suppress(OSError):
        yield from (p for p in os.listdir(proc) if p.isdigit())
