"""Local folder destination: atomic delivery by hidden temporary name, fsync and rename.

A delivered file is never visible half-written. This module removes a source only by renaming
it into place, when the dispatcher says it is the source's one destination and it is consumed;
otherwise it copies, and the dispatcher's after-action removes the source later.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import hashlib
import logging
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, ClassVar, TypeAlias

from .. import fastpath, sourcefile
from ..config import LocalDestination, OnConflict, SourceConfig, real_outside, real_roots
from ..errors import (
    DeliveryError,
    PermanentDeliveryError,
    SourceVanishedError,
    TransientDeliveryError,
)
from ..models import NAME_TAKEN, FileVersion, Outcome
from . import SOURCES, MoveUnavailable, Resources, StepContext
from .common import (
    TMP_PREFIX,
    candidates,
    earlier_temps,
    fresh_salt,
    open_input,
    place,
    render_target,
    render_target_str,
    temp_name,
    translate_os_error,
    unlink_quietly,
)
from .threads import CopyThreads, mounts_below

if TYPE_CHECKING:
    from ..controls import Throttle

log = logging.getLogger(__name__)


def create(step: LocalDestination, resources: Resources) -> LocalProcessor:
    return LocalProcessor(step, resources.items.get(SOURCES))


class LocalProcessor:
    """Delivers into one folder: by copy, or by renaming a consumed source (its one destination)."""

    paces: ClassVar[bool] = True  #: a copy pays ``ctx.throttle`` per chunk (copy_data)

    def __init__(
        self, dest: LocalDestination, sources: Callable[[], Sequence[SourceConfig]] | None = None
    ) -> None:
        self.dest = dest
        #: where the destination lies inside a source, its folders are held (``Inside``)
        self._inside = Inside(dest.folder, sources)
        self.root = dest.folder
        self._root = str(dest.folder)
        self._made: set[str] = set()  #: folders made (or found) so far
        self._clone = True  #: reflinks are worth trying here (see fastpath.reflink)
        #: a copy is renamed into place by renameat2(RENAME_NOREPLACE), else linked
        self._noreplace = fastpath.ATOMIC_NOREPLACE
        self._sums: dict[Path, str] = {}  #: a verified copy's SHA-256, until it is placed
        #: source folder -> a descriptor naming it (O_PATH), for the inline moves' renames
        self._sources: dict[str, int] = {}
        #: copies run in threads, called off when their delivery is cancelled
        self._threads = CopyThreads(str(dest.folder))

    async def aclose(self) -> None:
        sources, self._sources = self._sources, {}
        for fd in sources.values():
            os.close(fd)

    def _source_dir(self, root: Path, fresh: bool = False) -> int:
        """A descriptor of a source folder, kept: one open per source, not one per file. A
        source folder replaced meanwhile is found again (``fresh``) when a name is missing."""
        key = str(root)
        fd = self._sources.get(key)
        if fd is not None and fresh:
            del self._sources[key]
            os.close(fd)
            fd = None
        if fd is None:
            fd = self._sources[key] = os.open(key, sourcefile.PATH_FLAGS | os.O_DIRECTORY)
        return fd

    def _target(self, ctx: StepContext) -> PurePosixPath:
        return render_target(self.dest.name, ctx, self.dest.naming)

    async def deliver(self, ctx: StepContext) -> Outcome:
        rel = self._target(ctx)
        folder = str(self.root / rel.parent)
        # before anything touches the folder: a stuck earlier attempt may hold its temporary
        # name, and a folder whose copies are stuck would hold this attempt's thread too
        self._threads.check(ctx, folder)
        if ctx.resuming:
            look = functools.partial(self._find_previous, ctx, rel)
            found = await self._threads.call(look, ctx, folder)
            if found is not None:
                return Outcome(str(found), detail="found delivered by an earlier attempt")
        if ctx.may_move and ctx.input is ctx.version.path:
            # The source's one destination, consumed anyway: one rename delivers it. A hard
            # link instead would leave the delivered file sharing the fate of a live source.
            try:
                return self.move_now(ctx)
            except MoveUnavailable:
                pass
        [outcome] = await self._threads.run([ctx], lambda run: [self._deliver(run[0], rel)])
        return outcome

    async def copy_batch(self, ctxs: list[StepContext]) -> list[Outcome | Exception]:
        """See ``BatchCopier``: ``_copy_batch`` in a thread (``CopyThreads.run``); every file
        fails at once (transient) while a copy into this folder is stuck."""
        try:
            return await self._threads.run(ctxs, self._copy_batch)
        except TransientDeliveryError as exc:  # refused before a thread was taken
            return [exc] * len(ctxs)

    # -- the synchronous part, run inline (links) or in a thread (copies)

    def _mkdirs(self, folder: str | Path) -> None:
        key = os.fspath(folder)  # one cache for Paths and the hot path's strings
        if key in self._made:
            return
        try:
            os.makedirs(key, exist_ok=True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:  # e.g. below /proc: no retry will make it appear
                raise PermanentDeliveryError(f"cannot create {folder}: {exc.strerror}") from exc
            raise translate_os_error(exc, f"cannot create {folder}") from exc
        self._made.add(key)

    def _forget_folders(self, exc: OSError) -> None:
        """A folder we made is gone (someone removed it): make folders again on the retry."""
        if exc.errno == errno.ENOENT:
            self._made.clear()

    def _find_previous(self, ctx: StepContext, rel: PurePosixPath) -> Path | None:
        with self._inside.holding() as held:
            return _find_previous(self.root, ctx, rel, self.dest.on_conflict, held)

    def _deliver(self, ctx: StepContext, rel: PurePosixPath) -> Outcome:
        with self._inside.holding() as held:
            tmp, out = self._stage_copy(ctx, rel, held)
            error = self._flush([(tmp, out)])[0]
            if error is not None:
                raise error
            return self._place_temp(tmp, rel, ctx, held, sync_dir=self.dest.fsync)

    # -- copying a batch in one thread (see processors.BatchCopier)

    def _copy_batch(self, ctxs: list[StepContext]) -> list[Outcome | Exception]:
        """Copy many small files in one go: each to its temporary name, then all flushed
        together (writeback started for every file before the first fsync waits), then each
        renamed into place (see _rename), then each folder flushed once. Per file an Outcome,
        or the error that file met; one file's failure is that file's alone."""
        with self._inside.holding() as held:
            return self._copy_held(ctxs, held)

    def _copy_held(self, ctxs: list[StepContext], held: Held) -> list[Outcome | Exception]:
        results: list[Outcome | Exception] = [PermanentDeliveryError("not copied") for _ in ctxs]
        staged: list[tuple[int, PurePosixPath, Path, int]] = []
        for i, ctx in enumerate(ctxs):
            try:
                rel = self._target(ctx)
                tmp, out = self._stage_copy(ctx, rel, held)
                staged.append((i, rel, tmp, out))
            except Exception as exc:
                results[i] = exc
        errors = self._flush([(tmp, out) for _, _, tmp, out in staged])
        folders: set[PurePosixPath] = set()
        for (i, rel, tmp, _), error in zip(staged, errors, strict=True):
            if error is not None:
                results[i] = error
                continue
            try:
                results[i] = self._place_temp(tmp, rel, ctxs[i], held, sync_dir=False)
                folders.add(rel.parent)
            except Exception as exc:
                results[i] = exc
        if self.dest.fsync:
            for folder in folders:
                self._threads.entering(self.root / folder)
                _fsync_dir(self.root / folder if held is None else held(folder))
        return results

    def _stage_copy(self, ctx: StepContext, rel: PurePosixPath, held: Held) -> tuple[Path, int]:
        """Copy the input to a temporary name beside ``rel`` (in its folder ``held``, if the
        destination lies in a source); returns it and its open fd (the caller flushes and
        closes it, see _flush)."""
        final_dir = self.root / rel.parent
        self._threads.check_folder(str(final_dir))  # another file's copy may be stuck there
        # the open waits on the source's side (a hung mount, an on-access scanner): stuck
        # there, the source's folder is marked hung, never this destination for it
        source_dir = ctx.input.parent
        self._threads.check_folder(str(source_dir))
        self._threads.entering(source_dir)
        fd, st = open_input(ctx)
        try:
            self._threads.entering(final_dir)
            if held is None:
                self._mkdirs(final_dir)
            else:
                final_dir = held(rel.parent)
            tmp, out = self._copy(fd, st, final_dir, ctx, rel.name)
            try:
                self._verify(fd, out, st, tmp)
            except BaseException:
                os.close(out)
                unlink_quietly(tmp)
                raise
            return tmp, out
        finally:
            os.close(fd)

    def _verify(self, src: int, out: int, st: os.stat_result, tmp: Path) -> None:
        """``verify``: the copy's size (one fstat), or its bytes against the source's (both
        read again, from the page cache where the kernel just copied them: the source is
        hashed and the copy compared with it byte for byte, which proves the same SHA-256 for
        16% to 42% less CPU than hashing both); a mismatch is transient. The SHA-256 is kept
        for the Outcome."""
        mode = self.dest.verify
        if mode == "none":
            return
        got = os.fstat(out).st_size
        if got != st.st_size:
            raise TransientDeliveryError(f"verify: {tmp} has {got} bytes of {st.st_size}")
        if mode == "sha256":
            try:
                back = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:  # the copy's own fd is write-only: read it back through its name
                    sent = sha256_if_same(src, back)
                finally:
                    os.close(back)
            except OSError as exc:
                raise translate_os_error(exc, f"cannot read {tmp} back") from exc
            if sent is None:
                raise TransientDeliveryError(f"verify: {tmp} is not what was read (SHA-256)")
            self._sums[tmp] = sent

    def _flush(self, staged: list[tuple[Path, int]]) -> list[DeliveryError | None]:
        """Flush (with ``fsync``) and close copies; per copy None or its error (the copy is
        then removed). Writeback of all of them starts before the first fsync waits. A copy
        whose temporary name no longer names the file written (``same_file``) fails."""
        errors: list[DeliveryError | None] = [None] * len(staged)
        if self.dest.fsync and len(staged) > 1:
            for _, out in staged:  # only a hint: a failure is met again by the fsync below
                fastpath.start_writeback(out)
        for i, (tmp, out) in enumerate(staged):
            try:
                if self.dest.fsync:
                    os.fsync(out)
                same_file(out, tmp)
            except OSError as exc:
                errors[i] = translate_os_error(exc, f"cannot write {tmp}")
            except DeliveryError as exc:
                errors[i] = exc
            finally:
                os.close(out)
            if errors[i] is not None:
                self._sums.pop(tmp, None)
                unlink_quietly(tmp)
        return errors

    def _place_temp(
        self, tmp: Path, rel: PurePosixPath, ctx: StepContext, held: Held, *, sync_dir: bool
    ) -> Outcome:
        """Give a complete temporary file its final name under the ``on_conflict`` policy,
        unless ``ctx.fence`` calls the delivery off first (the copy is removed)."""
        sent = self._sums.pop(tmp, None)
        into = self.root if held is None else held(rel.parent)
        try:
            ctx.fence()  # runs in a worker thread, which a cancellation does not stop
            final = place(  # no look first: the rename itself refuses a name that is taken
                lambda p: False,
                rel if held is None else PurePosixPath(rel.name),
                self.dest.on_conflict,
                lambda p, overwrite: self._rename(tmp, into / p, overwrite),
            )
        except OSError as exc:
            unlink_quietly(tmp)
            raise translate_os_error(exc, f"cannot deliver to {self.root / rel}") from exc
        except BaseException:
            unlink_quietly(tmp)
            raise
        if final is None:
            unlink_quietly(tmp)
            return Outcome(str(self.root / rel), detail=NAME_TAKEN)
        if sync_dir:
            _fsync_dir(into / final.parent)
        shown = self.root / final if held is None else self.root / rel.parent / final.name
        return Outcome(str(shown), sha256=sent)

    # -- moving inline (see processors.Mover): one rename instead of link + unlink

    def can_move_from(self, folder: Path) -> bool:
        """Whether files of ``folder`` can be renamed into this destination: one filesystem,
        and none other mounted below the destination (a rename runs on the event loop, which
        must never wait on another mount, one that may hang). Asked in a thread."""
        try:
            with self._inside.holding() as held:
                root = self.root if held is None else held(PurePosixPath())
                if held is None:
                    self._mkdirs(root)
                if os.stat(folder).st_dev != os.stat(root).st_dev:
                    return False
        except (OSError, DeliveryError):
            return False
        return not mounts_below(str(self.root))

    def move_now(self, ctx: StepContext) -> Outcome:
        """Rename the source into place, inline: the delivery and the source's removal are one
        atomic step. Raises MoveUnavailable when the filesystem cannot (the caller then takes
        the ordinary path, which links and removes the source later)."""
        rel = render_target_str(self.dest.name, ctx, self.dest.naming)
        # on the loop: a hung folder must not hold it too
        self._threads.check_folder(f"{self._root}/{rel.rpartition('/')[0]}")
        put = _replace if self.dest.on_conflict == "overwrite" else _move
        with self._inside.holding() as held:
            if held is None:
                folder = rel.rpartition("/")[0]
                self._mkdirs(f"{self._root}/{folder}" if folder else self._root)
                return self._put_source(ctx, rel, put, self._root)
            folder, _, name = rel.rpartition("/")
            into = str(held(PurePosixPath(folder)))
            outcome = self._put_source(ctx, name, put, into)
            if outcome.location.startswith(into):  # its name, not the held folder's
                shown = f"{self._root}/{folder}" if folder else self._root
                outcome = dataclasses.replace(
                    outcome, location=shown + outcome.location[len(into) :]
                )
            return outcome

    def _put_source(self, ctx: StepContext, rel: str, put: Rename, root: str) -> Outcome:
        """Rename the source itself to its final name ``rel`` under ``root``, once the name is
        checked to be the planned version (a regular file, not a link: a link is never moved
        into a destination, its target is copied instead). Plain strings, not Paths: this runs
        once per file, inline, so it only looks at files (lstat) and never opens one. ``root``
        is made already (``move_now``)."""
        version = ctx.version
        parent, _, name = version.relpath.rpartition("/")
        try:
            top = self._source_dir(version.root)
            dirfd = top
            if parent:
                dirfd = sourcefile.open_at(top, parent, sourcefile.PATH_FLAGS | os.O_DIRECTORY)
        except OSError as exc:  # a folder of the path is a link now, or gone: copy (or refuse)
            raise MoveUnavailable(
                f"{parent or version.root}: {exc.strerror}", this_file=True
            ) from None
        try:
            try:
                st = _check_name(version, dirfd, name)
            except SourceVanishedError:
                if parent or not _source_replaced(self._sources, version.root):
                    raise
                dirfd = top = self._source_dir(version.root, fresh=True)
                st = _check_name(version, dirfd, name)
            try:
                try:
                    put(name, f"{root}/{rel}", dirfd)  # the usual case: the name is free
                    final: str | PurePosixPath | None = rel
                except FileExistsError:  # taken: the on_conflict policy picks another, or none
                    final = place(
                        lambda p: False,
                        PurePosixPath(rel),
                        self.dest.on_conflict,
                        lambda p, _: put(name, f"{root}/{p}", dirfd),
                    )
            except OSError as exc:
                self._forget_folders(exc)
                raise translate_os_error(exc, f"cannot deliver to {root}/{rel}") from exc
            if final is None:
                return Outcome(f"{root}/{rel}", detail=NAME_TAKEN)
            _check_moved(version, dirfd, name, st, f"{root}/{final}")
        finally:
            if dirfd != top:
                os.close(dirfd)
        return Outcome(f"{root}/{final}", detail="moved")

    def _copy(
        self, fd: int, st: os.stat_result, folder: Path, ctx: StepContext, name: str
    ) -> tuple[Path, int]:
        """Copy ``fd`` to a new temporary file in ``folder`` for ``ctx``'s delivery of
        ``name`` (``create_temp``; mode, mtime and holes kept, see ``copy_data``); returns its
        path and the copy's fd, still open and not flushed. Removes the copy and raises if the
        source changed while it was read, or if ``ctx.fence`` raises before a chunk.
        ``ctx.throttle``: the bytes are paid for as they are written (no reflink then: the
        limit holds for every copy)."""
        mode, throttle = self.dest.file_mode, ctx.throttle
        try:
            tmp, out = create_temp(folder, ctx, name, 0o666 if mode is None else mode)
        except OSError as exc:
            self._forget_folders(exc)
            raise translate_os_error(exc, f"cannot write in {folder}") from exc
        try:
            # a reflink shares blocks copy-on-write: as independent of the source as a copy
            cloned = fastpath.reflink(fd, out) if self._clone and throttle is None else False
            if cloned is None:
                self._clone = False  # this filesystem cannot: one failed ioctl, not one per file
            if not cloned:
                copy_data(fd, out, st, throttle=throttle, check=ctx.fence)
            if mode is not None:
                os.fchmod(out, mode)
            os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
            sourcefile.check_unchanged(fd, st, str(tmp.name))
        except OSError as exc:
            os.close(out)
            unlink_quietly(tmp)
            raise translate_os_error(exc, f"cannot write {tmp}") from exc
        except BaseException:  # the source changed, the delivery ended waiting for bandwidth
            os.close(out)
            unlink_quietly(tmp)
            raise
        return tmp, out

    def _rename(self, tmp: Path, final: Path, overwrite: bool) -> None:
        """Give ``tmp`` the name ``final``; unless ``overwrite``, FileExistsError if it is
        taken, and never a file another writer put there meanwhile."""
        if overwrite:
            os.replace(tmp, final)
            return
        if self._noreplace:  # one system call that checks and renames (fastpath)
            try:
                fastpath.rename_noreplace(os.fspath(tmp), os.fspath(final))
                return
            except fastpath.RenameUnavailable:
                self._noreplace = False  # this filesystem cannot: link then unlink from now on
        # link() refuses an existing name, so no concurrent writer can be overwritten
        try:
            os.link(tmp, final, follow_symlinks=False)
        except FileExistsError:
            raise
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EMLINK, errno.EXDEV):
                raise
            if os.path.lexists(final):
                raise FileExistsError(final) from None
            os.rename(tmp, final)
            return
        os.unlink(tmp)


#: a delivery's folders held open (``Inside.holding``): a folder (relative to the destination)
#: -> a name of the very folder opened; None where the destination lies outside every source
Held: TypeAlias = Callable[[PurePosixPath], Path] | None

_NOT_HELD: contextlib.nullcontext[None] = contextlib.nullcontext()


class Inside:
    """Whether a local destination lies inside a source folder the source does not watch
    (``in/sorted`` below a non-recursive ``in``), and its folders reached there with no link
    followed.

    Whoever may write the inbox may swap the destination, or a subfolder a name template
    makes there, for a symbolic link to a folder of their choosing (/etc/cron.d, ~/.ssh),
    while the service runs or while it is stopped: the delivered file, whose bytes they chose,
    would be written where it points. Inside a source, each delivery's folders are opened from
    ``/`` with no link followed (``sourcefile.held_folder``: openat2, else O_NOFOLLOW part by
    part, missing parts made there), held open while it writes its temporary file and renames
    it, and named through their descriptors; a link on the way is refused
    (PermanentDeliveryError naming it). Outside every source: nothing (the fast path)."""

    def __init__(self, folder: Path, sources: Callable[[], Sequence[SourceConfig]] | None) -> None:
        self.folder = folder
        self._sources = sources
        self._seen: object = None  #: the sources ``_where`` was found for
        self._where: Path | None = None

    def where(self) -> Path | None:
        """The destination resolved (``config.real_outside``: no link followed inside a
        source) if it lies inside a source of the configuration in force, else None. Found
        again when the configuration's sources change (a reload)."""
        if self._sources is None:
            return None
        sources = self._sources()
        if sources is not self._seen:
            roots = real_roots(sources)
            self._where = _within(self.folder, roots)
            self._seen = sources
        return self._where

    def holding(self) -> contextlib.AbstractContextManager[Held]:
        """For one delivery, or one batch: None outside the sources, else a function giving
        a folder's name held open (``_holding``)."""
        where = self.where()
        return _NOT_HELD if where is None else _holding(where)


def _within(folder: Path, roots: list[Path]) -> Path | None:
    """``folder`` resolved as ``config.real_outside`` does if it lies in one of ``roots``."""
    try:
        resolved = real_outside(folder, roots)
    except OSError:  # a loop of links: as written (where no link will be followed)
        resolved = Path(os.path.abspath(folder))
    return resolved if any(resolved == r or r in resolved.parents for r in roots) else None


@contextlib.contextmanager
def _holding(root: Path) -> Iterator[Held]:
    """Folders below ``root`` opened on first use with no link followed, made where missing,
    and held until the ``with`` ends; yields the function giving each one's held name."""
    names: dict[PurePosixPath, Path] = {}
    with contextlib.ExitStack() as stack:

        def folder(rel: PurePosixPath) -> Path:
            name = names.get(rel)
            if name is None:
                path = root / rel
                try:
                    name = names[rel] = stack.enter_context(sourcefile.held_folder(path))
                except OSError as exc:
                    raise _refused(path, exc) from exc
            return name

        yield folder


def _refused(path: Path, exc: OSError) -> DeliveryError:
    """The error of a delivery whose folder ``path`` could not be held: for good, naming the
    link, where a link (or a file) stands in its path."""
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
        return translate_os_error(exc, f"cannot create {path}")
    link = next((p for p in (*reversed(path.parents), path) if os.path.islink(p)), None)
    what = f"{link} is a symbolic link" if link else "a symbolic link or a file stands in its path"
    return PermanentDeliveryError(
        f"{path} lies inside a source folder and {what}: nothing is delivered through it"
    )


#: bytes one kernel copy call is asked for: large enough that a big file takes few calls,
#: small enough that no single call (which cannot be interrupted) runs for long
_KERNEL_CHUNK = 64 * 1024 * 1024
_CHUNK = 1024 * 1024  #: the read/write loop's buffer
#: what copy_file_range(2) or sendfile(2) fail with where they cannot copy between these files
#: (another filesystem on a kernel that refuses that, a filesystem without the call, seccomp)
_NO_KERNEL_COPY = {
    errno.EXDEV,
    errno.EINVAL,
    errno.ENOSYS,
    errno.EOPNOTSUPP,
    errno.EPERM,
    errno.EBADF,
}


#: the ways ``copy_data`` copies an extent, each the fallback of the one before
COPY_WAYS = ("copy_file_range", "sendfile", "read/write")


def _source_replaced(sources: dict[str, int], root: Path) -> bool:
    """Whether the descriptor kept of ``root`` (in ``sources``) no longer names the folder
    at that path."""
    fd = sources.get(str(root))
    try:
        kept, now = os.fstat(fd) if fd is not None else None, os.stat(root)
    except OSError:
        return False
    return kept is None or (kept.st_dev, kept.st_ino) != (now.st_dev, now.st_ino)


def _check_moved(
    version: FileVersion, dirfd: int, name: str, st: os.stat_result, final: str
) -> None:
    """Whether the file renamed to ``final`` is the version meant (``st``): a writer may have
    renamed a new version over the source between the check and the rename. If it is not,
    it is put back in the source folder ``dirfd``, under ``name`` or, if yet another file took
    that name meanwhile, the next free numbered one (``stem-1.ext``...), never left in the
    destination recorded nowhere; SourceVanishedError says where it went."""
    try:
        got = os.lstat(final)
    except OSError:
        return  # gone already (a consumer of the destination): it was ours a moment ago
    if (got.st_dev, got.st_ino) == (st.st_dev, st.st_ino):
        return
    back = _put_back(final, name, dirfd)
    where = f"put back as {back}" if back else f"left at {final}: it could not be put back"
    log.warning(
        "%s was replaced while it was moved (a new version renamed over it): the new version "
        "is %s, to be dispatched on its own",
        version.relpath,
        where,
    )
    raise SourceVanishedError(f"{version.relpath} was replaced while it was moved; {where}")


def _put_back(final: str, name: str, dirfd: int) -> str | None:
    """``final`` renamed into the folder ``dirfd`` under ``name``, or the first free numbered
    name after it; the name it got, None if it could not be moved."""
    for candidate in candidates(PurePosixPath(name), "rename"):
        try:
            _move(final, candidate.name, dst_dir_fd=dirfd)
            return candidate.name
        except FileExistsError:
            continue
        except (OSError, MoveUnavailable):
            return None
    return None


def _check_name(version: FileVersion, dirfd: int, name: str) -> os.stat_result:
    """The planned version at ``name`` in ``dirfd``, looked at: never opened, never followed."""
    try:
        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
    except FileNotFoundError:
        raise SourceVanishedError(
            f"the file {version.path} vanished before it could be sent"
        ) from None
    except OSError as exc:
        raise PermanentDeliveryError(f"cannot read {version.path}: {exc.strerror}") from exc
    if stat.S_ISLNK(st.st_mode):  # followed within the source by the copying path
        raise MoveUnavailable(f"{version.relpath} is a symbolic link", this_file=True)
    if not stat.S_ISREG(st.st_mode):
        raise SourceVanishedError(f"{version.relpath} is no longer a regular file: not moved")
    if not version.same_file(st):
        raise SourceVanishedError(
            f"{version.relpath} changed after it was seen; its new version is dispatched on its own"
        )
    return st


def copy_data(
    src: int,
    dst: int,
    st: os.stat_result,
    first: int | None = None,
    throttle: Throttle | None = None,
    check: Callable[[], None] | None = None,
) -> None:
    """Copy the ``st.st_size`` bytes of the open file ``src`` to ``dst`` (empty, open for
    writing), by the kernel where it can, keeping holes as holes.

    A sparse source (fewer blocks than its size needs) is copied one data extent at a time,
    found with SEEK_DATA/SEEK_HOLE, and the copy is given its full size with ftruncate: a
    4 TiB file with 1 MiB of data writes 1 MiB. Each extent goes by copy_file_range(2) (which
    may share blocks on filesystems with reflinks, copy-on-write), else sendfile(2), else a
    pread/write loop (the only way when FILEDISPATCH_FASTPATH=0); ``first`` (an index in
    COPY_WAYS) skips the ones before it, so that tests run every way. A file that shrinks
    while it is read ends the copy early; the caller's check of size and mtime then refuses
    the copy. ``throttle`` (a destination's bandwidth): each piece, then at most
    ``throttle.chunk`` bytes, is paid for before it is copied (this runs in a worker thread:
    ``take_blocking``). ``check`` is called before each piece (a step's fence: it raises to
    end the copy). OSError on a failed read or write; TransientDeliveryError when the
    delivery ends while it waits for bandwidth; what ``check`` raises.
    """
    size = st.st_size
    if size == 0:
        return
    extents = _data_extents(src, size) if st.st_blocks * 512 < size else [(0, size)]
    if first is None:
        first = 0 if fastpath.KERNEL_COPY else len(COPY_WAYS) - 1
    method = first  # see COPY_WAYS
    most = _KERNEL_CHUNK if throttle is None else throttle.chunk
    paid = 0  # bytes paid for and not copied yet (a way that failed copied nothing)
    end = 0
    for start, stop in extents:
        pos = start
        while pos < stop:
            count = min(stop - pos, most)
            if check is not None:
                check()
            if throttle is not None and paid < count:
                throttle.take_blocking(count - paid)
                paid = count
            try:
                if method == 0:
                    n = os.copy_file_range(src, dst, count, pos, pos)
                elif method == 1:
                    if os.lseek(dst, 0, os.SEEK_CUR) != pos:
                        os.lseek(dst, pos, os.SEEK_SET)
                    n = os.sendfile(dst, src, pos, count)
                else:
                    n = _pread_write(src, dst, pos, count)
            except OSError as exc:
                if method < 2 and exc.errno in _NO_KERNEL_COPY:
                    method += 1  # the failed call wrote nothing: go on from pos the next way
                    continue
                raise
            if n == 0:  # the file is shorter than it was: the caller sees the change
                return
            pos += n
            paid = max(paid - n, 0)
        end = stop
    if end < size:
        os.ftruncate(dst, size)  # a hole at the end: the copy gets its full size


def _data_extents(fd: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of each run of data in the file, holes left out; the whole file where
    the filesystem cannot tell."""
    extents: list[tuple[int, int]] = []
    pos = 0
    try:
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:  # no data past pos: the rest is a hole
                    break
                raise
            stop = min(os.lseek(fd, start, os.SEEK_HOLE), size)
            extents.append((start, stop))
            pos = stop
    except OSError:
        return [(0, size)]
    return extents


def _pread_write(src: int, dst: int, pos: int, count: int) -> int:
    data = os.pread(src, min(count, _CHUNK), pos)
    view = memoryview(data)
    done = 0
    while done < len(view):
        done += os.pwrite(dst, view[done:], pos + done)
    return len(data)


#: rename(src, dst, src_dir_fd): ``src`` is a name in the folder ``src_dir_fd``
Rename = Callable[[str, str, int], None]
_AT_FDCWD = -100


def _move(src: str, dst: str, src_dir_fd: int = _AT_FDCWD, dst_dir_fd: int = _AT_FDCWD) -> None:
    """Rename ``src`` to the free name ``dst``; FileExistsError if it is taken (see
    fastpath.rename_noreplace: atomic where the kernel offers it). A relative name is taken in
    the folder of its ``*_dir_fd``."""
    try:
        fastpath.rename_noreplace(src, dst, src_dir_fd, dst_dir_fd)
    except fastpath.RenameUnavailable as exc:
        raise MoveUnavailable(str(exc)) from exc


def _replace(src: str, dst: str, src_dir_fd: int = _AT_FDCWD) -> None:
    """``on_conflict: overwrite``: an ordinary rename, which replaces ``dst`` atomically."""
    try:
        os.replace(src, dst, src_dir_fd=None if src_dir_fd == _AT_FDCWD else src_dir_fd)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            raise MoveUnavailable(exc.strerror or str(exc)) from exc
        raise


def sha256_if_same(src: int, copy: int) -> str | None:
    """The SHA-256 (hex) of ``src`` if ``copy`` holds the very same bytes, else None. One
    hash, and a byte comparison (memcmp) of the copy, chunk by chunk."""
    digest, offset = hashlib.sha256(), 0
    while True:
        data = os.pread(src, _CHUNK, offset)
        if os.pread(copy, _CHUNK, offset) != data:
            return None
        if not data:
            return digest.hexdigest()
        digest.update(data)
        offset += len(data)


def _holds_ours(ctx: StepContext, path: Path, got: os.stat_result) -> bool:
    """Whether the file at ``path`` (``got``: its lstat, of our size and mtime) is our earlier
    delivery: the version itself (a move renamed it there: its device and inode), or a file
    with the input's very bytes. Size and mtime alone took a file someone put there with our
    name, size and mtime (both readable in the inbox) for ours, and the source was consumed
    (k7 review). When the input cannot be opened any more (gone, changed), size and mtime
    decide, as before: nothing of ours is left to send. Blocking."""
    version = ctx.version
    if (
        ctx.input == version.path
        and version.ino
        and got.st_ino == version.ino
        and (not version.dev or got.st_dev == version.dev)
    ):
        return True
    try:
        src, _ = open_input(ctx)
    except (OSError, SourceVanishedError):
        return True
    try:
        try:
            copy = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            return False
        try:  # swapped for something else since the lstat: not ours
            return stat.S_ISREG(os.fstat(copy).st_mode) and sha256_if_same(src, copy) is not None
        except OSError:
            return False
        finally:
            os.close(copy)
    finally:
        os.close(src)


def _find_previous(
    root: Path, ctx: StepContext, rel: PurePosixPath, on_conflict: OnConflict, held: Held
) -> Path | None:
    """After a crash or a failed attempt: a regular file at one of our candidate names under
    ``root`` with the input's size and mtime that holds our delivery (``_holds_ours``); what
    earlier attempts left under a temporary name is removed first (``_remove_earlier``).
    ``held``: the folders of a destination inside a source (``Inside.holding``)."""
    folder = root / rel.parent if held is None else held(rel.parent)
    _remove_earlier(folder, ctx, rel.name)
    want = (ctx.version.size, ctx.version.mtime_ns)
    if ctx.input != ctx.version.path:  # a transform's output, in our own work folder
        try:
            st = ctx.input.stat()
            want = (st.st_size, st.st_mtime_ns)
        except OSError:
            return None
    for cand in candidates(rel, on_conflict):
        path = folder / cand.name
        try:
            got = path.stat(follow_symlinks=False)  # a link planted there is not ours
        except OSError:
            return None
        if (
            stat.S_ISREG(got.st_mode)
            and (got.st_size, got.st_mtime_ns) == want
            and _holds_ours(ctx, path, got)
        ):
            return root / cand
    return None


#: how a temporary file is created: a new file or nothing, never through a link
_CREATE_NEW = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW


def create_temp(folder: Path, ctx: StepContext, name: str, perm: int) -> tuple[Path, int]:
    """Create a new temporary file in ``folder`` for ``ctx``'s delivery of ``name`` and open
    it for writing (mode ``perm`` before the umask); returns its path and fd.

    Nothing already at the name is ever opened (O_EXCL, O_NOFOLLOW): anyone who may write in
    the destination folder can know the next temporary name (``temp_name``), and a symbolic
    or hard link planted there would have the file it points to overwritten. What is there is
    removed only when it is a plain file of ours (regular, one link, owned by this process's
    user: a copy an earlier attempt left); anything else is left as it is, with a warning,
    and the copy takes a salted name no one could know (``temp_name``'s ``salt``). Raises
    OSError as ``os.open`` does, or TransientDeliveryError when every name tried was taken.
    """
    tmp = folder / temp_name(ctx.dispatch_id, name, ctx.epoch, ctx.journal)
    for _ in range(4):
        try:
            return tmp, os.open(tmp, _CREATE_NEW, perm)
        except FileExistsError:
            pass
        if _ours(tmp):
            unlink_quietly(tmp)
            continue
        log.warning(
            "%s is already there and is not a file of ours (a link someone put there?): left "
            "as it is; this copy takes another temporary name",
            tmp,
        )
        tmp = folder / temp_name(ctx.dispatch_id, name, ctx.epoch, ctx.journal, fresh_salt())
    raise TransientDeliveryError(f"cannot create a temporary file in {folder}: {tmp} is taken")


def same_file(fd: int, path: Path) -> None:
    """Raise TransientDeliveryError unless ``path`` names the very file open as ``fd`` (device
    and inode): another writer of the folder may have renamed a file of theirs onto our
    temporary name while we wrote, and a rename by name would then publish theirs as our
    delivery. Checked just before the rename, it leaves a window of the few system calls
    between; a rename cannot be asked to move only a given inode. Raises OSError if ``path``
    cannot be looked at (gone: FileNotFoundError)."""
    ours, there = os.fstat(fd), os.lstat(path)
    if (ours.st_dev, ours.st_ino) != (there.st_dev, there.st_ino):
        raise TransientDeliveryError(
            f"{path} was replaced by another file while it was written (another writer in "
            "that folder?): not published; the copy is made again"
        )


def _ours(path: Path) -> bool:
    """Whether ``path`` is a plain file this process may take for its own: a regular file
    with one link, owned by our user (or gone already)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and st.st_uid == os.geteuid()


def _remove_earlier(folder: Path, ctx: StepContext, name: str) -> None:
    """Remove what earlier attempts of a resumed row left in ``folder`` under a temporary
    name: the name this attempt writes, and with a journal token (or several nodes' claims,
    each writing a name of its own) every temporary name of the row in the folder, whatever
    name an earlier attempt rendered (``earlier_temps``; an earlier claimant's lease ran out
    before the row came back: its fence refuses its rename). Only this journal's
    (``ctx.journal``): another journal's row of the same id is not this row."""
    unlink_quietly(folder / temp_name(ctx.dispatch_id, name, ctx.epoch, ctx.journal))
    if not ctx.epoch and not ctx.journal:
        return
    try:
        with os.scandir(folder) as entries:
            names = [e.name for e in entries]
    except OSError:  # no folder yet (the earlier attempt never made it), or unreadable
        return
    for stale in earlier_temps(names, ctx.dispatch_id, name, ctx.journal):
        unlink_quietly(folder / stale)


def _fsync_dir(folder: Path) -> None:
    """``sync_folder``, its errors passed over: the delivery is in place already, and a
    folder that cannot be flushed only weakens its durability."""
    with contextlib.suppress(OSError):
        sync_folder(folder)


def sync_folder(folder: Path) -> None:
    """fsync ``folder`` (a name given in it is durable then); a filesystem that cannot sync a
    folder (EINVAL on some network ones) is left as it is. OSError as ``open``, ``fsync``."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def sweep_temporaries(
    roots: Iterable[Path], journal: str = "", sources: Sequence[Path] = ()
) -> int:
    """Remove temporary files a crash left in local destinations; returns how many.

    Called at start-up, before any copy into ``roots`` can start (``threads.sweeping``), and
    only when no other node of this journal is live, so every temporary name of this journal
    (its token ``journal``) found is stale, and so is one of the form before journals had
    tokens (``.filedispatch-tmp-<id>-``). Another journal's (another token) is left alone:
    it may be that journal's copy in progress. An old-form name of a row id of exactly eight
    digits reads like a token, and stays too. ``sources``: the source folders, resolved; a
    destination inside one is reached with no link followed there (``Inside``), so a link
    swapped in for it leads the sweep nowhere.
    """
    removed = 0
    for root in roots:
        where = _within(root, list(sources)) if sources else None
        try:
            with (
                contextlib.nullcontext(root)
                if where is None
                else sourcefile.held_folder(where, make=False) as there
            ):
                removed += _swept(there, journal)
        except OSError:
            continue  # missing, or a link where none may be: nothing of ours to sweep
    if removed:
        log.info("removed %d temporary file(s) left by an interrupted run", removed)
    return removed


def _swept(root: Path, journal: str) -> int:
    """``sweep_temporaries`` in one destination folder; how many were removed."""
    removed = 0
    for entry in sourcefile.entries_beneath(root):
        if _stale_temp(entry.name, journal):
            try:
                os.unlink(entry.path)
                removed += 1
            except OSError:
                pass
    return removed


def _stale_temp(name: str, journal: str) -> bool:
    """Whether ``name`` is a temporary name of the journal ``journal``, or of the old form."""
    if not name.startswith(TMP_PREFIX):
        return False
    if journal and name.startswith(f"{TMP_PREFIX}{journal}-"):
        return True
    head = name[len(TMP_PREFIX) :].partition("-")[0]
    return head.isdigit() and len(head) != 8  # an old-form row id, not another token
