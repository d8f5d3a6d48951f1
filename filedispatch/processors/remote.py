"""What the FTP and SFTP processors share: the delivery flow (temporary name, rename,
``on_conflict``, the resume check), a small connection pool per server, and streaming from disk.

Nothing here speaks a protocol: ftp.py and sftp.py fill in the few operations that differ.
A pool never hands out a connection that failed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any, ClassVar, Generic, TypeVar
from urllib.parse import unquote

from .. import fastpath, sourcefile
from ..asyncutil import joined, settle
from ..config import FtpDestination, SftpDestination, redact_url
from ..errors import (
    DeliveryError,
    PermanentDeliveryError,
    SourceVanishedError,
    TempNameTakenError,
    TransientDeliveryError,
)
from ..models import NAME_TAKEN, Outcome
from . import Resources, StepContext, inputs
from .common import (
    aplace,
    candidates,
    choices,
    earlier_temps,
    fresh_salt,
    render_target,
    temp_name,
)

if TYPE_CHECKING:
    from ..controls import Throttle

log = logging.getLogger(__name__)

C = TypeVar("C")


class Pool(Generic[C]):
    """At most ``size`` open connections to one server, reused from one file to the next.

    A connection is handed back only when the work done with it succeeded; on any error (or
    cancellation) it is closed, so a broken connection is never reused.
    """

    def __init__(
        self,
        name: str,
        size: int,
        open_: Callable[[], Awaitable[C]],
        close: Callable[[C], Awaitable[None]],
    ) -> None:
        self.name = name
        self._open, self._close = open_, close
        self._idle: list[C] = []
        self._slots = asyncio.Semaphore(size)

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[C]:
        async with self._slots:
            conn = self._idle.pop() if self._idle else None
            if conn is None:
                conn = await self._open()
            try:
                yield conn
            except BaseException:
                await self._discard(conn)
                raise
            self._idle.append(conn)

    async def _discard(self, conn: C) -> None:
        try:
            await asyncio.shield(self._close(conn))
        except Exception as exc:  # closing a broken connection may fail too: it is gone anyway
            log.debug("closing a connection to %s: %r", self.name, exc)

    async def aclose(self) -> None:
        idle, self._idle = self._idle, []
        for conn in idle:
            await self._discard(conn)


def shared_pool(resources: Resources, key: str, make: Callable[[], Pool[C]]) -> Pool[C]:
    """The service-wide pool for ``key`` (one server, one user), made and registered once."""
    pool: Pool[C] | None = resources.items.get(key)
    if pool is None:
        pool = resources.items[key] = make()
        resources.closers.append(pool.aclose)
    return pool


class RemoteTarget:
    """The parts of an ``ftp://`` / ``sftp://`` URL, parsed once, and where a file goes there."""

    def __init__(self, dest: FtpDestination | SftpDestination, default_port: int) -> None:
        parts = dest.parts
        self.dest = dest
        self.host: str = parts.hostname or ""
        self.port: int = parts.port or default_port
        self.user = unquote(parts.username or "")
        secret = dest.password.get_secret_value() if dest.password is not None else None
        self.password = secret if secret is not None else unquote(parts.password or "")
        self.root = PurePosixPath(unquote(parts.path) or "/")
        self.display = redact_url(dest.url)

    @property
    def server(self) -> str:
        """The pool key: one pool per server and connection settings (a reload that changes
        the password or a timeout gets fresh connections; the folder does not count)."""
        dest = self.dest
        settings = dest.model_dump(
            exclude={"url", "name", "on_conflict", "retry", "timeout", "verify", "temp_name"}
        )
        held = (dest.password, getattr(dest, "passphrase", None))
        secrets = [s.get_secret_value() for s in held if s is not None]
        raw = repr((sorted(settings.items(), key=str), dest.parts.netloc, secrets))
        digest = hashlib.sha256(raw.encode()).hexdigest()[:12]
        return f"{dest.parts.scheme}://{self.user}@{self.host}:{self.port}#{digest}"

    def location(self, rel: PurePosixPath) -> str:
        """The redacted URL of a delivered file, for the journal."""
        return f"{self.display.rstrip('/')}/{rel}"

    def paths(
        self, ctx: StepContext, rel: PurePosixPath, salted: bool = False
    ) -> tuple[PurePosixPath, PurePosixPath]:
        """The remote folder and the temporary name a delivery is written under; ``salted``:
        with six random characters (``fresh_salt``) when the row has a journal token, whose
        prefix a resume lists the folder for (``earlier_temps``)."""
        folder = self.root / rel.parent
        salt = fresh_salt() if salted and ctx.journal else ""
        name = temp_name(ctx.dispatch_id, rel.name, ctx.epoch, ctx.journal, salt)
        return folder, folder / name


CHUNK = 1024 * 1024  #: bytes read from disk at a time: memory stays flat whatever the size


async def copy_to(
    fd: int,
    st: os.stat_result,
    write: Callable[[Any], Awaitable[object]],  # takes bytes or a bytearray (see Chunk)
    chunk: int = CHUNK,
    digest: Any = None,
    throttle: Throttle | None = None,
    fence: Callable[[], None] | None = None,
    whole: bytes | None = None,
) -> None:
    """Stream ``st.st_size`` bytes of the open file to ``write``, a chunk at a time.
    ``whole``: every byte of it, read and checked already (``inputs.Source.data``): sent from
    memory, with no read.

    Data already in the page cache is read inline with ``RWF_NOWAIT``, which never blocks;
    what is not is read in a daemon thread (``inputs.read``: a slow disk never stalls the
    loop, and a read stuck on a hung mount holds no thread of anyone else's), the next chunk
    while the current one is sent: at most two chunks are in memory (three while
    a chunk is being hashed). ``digest`` (a hashlib object) is fed every byte sent, in order:
    no second read; a large chunk is hashed in a worker thread while it is sent (hashlib
    lets go of the GIL), so hashing costs the event loop no time. ``throttle``: each chunk
    (then at most ``throttle.chunk`` bytes) is paid for before it is written. ``fence``
    (``StepContext.fence``) is called before each chunk is written: its error stops the
    upload short of its end.
    Raises SourceVanishedError when the file changed while it was sent, before its last
    chunk goes (the caller removes what was sent; the new version is dispatched on its own).
    Cancelled, it returns without waiting for a read still running (which may never end):
    ``fd`` is to be closed with ``inputs.close``, which waits for that read.
    """
    loop = asyncio.get_running_loop()
    size, offset = st.st_size, 0
    nowait = _NOWAIT
    if throttle is not None:
        chunk = min(chunk, throttle.chunk)

    def read(at: int) -> asyncio.Future[bytes]:
        return inputs.read(fd, min(chunk, size - at), at)

    pending: asyncio.Future[bytes] | None = None
    hashing: asyncio.Future[None] | None = None  # the chunk before this one, being hashed
    try:
        while offset < size:
            data: Chunk = b""
            if whole is not None:
                data = whole[offset : offset + chunk]
            elif pending is None and nowait:
                data, nowait = fastpath.read_cached(fd, min(chunk, size - offset), offset)
            if not data:
                data = await asyncio.shield(pending or read(offset))
                pending = None
                if not data:
                    break
            offset += len(data)
            if offset < size and not nowait and whole is None:
                pending = read(offset)
            if offset >= size and whole is None:  # every byte is read: a change since is
                sourcefile.check_unchanged(fd, st, "the file")  # caught before the last chunk
            if digest is not None:
                if hashing is not None:  # in order: one chunk's hash at a time
                    await joined(hashing)
                    hashing = None
                if len(data) >= HASH_AWAY:
                    hashing = loop.run_in_executor(None, digest.update, data)
                else:
                    digest.update(data)
            if throttle is not None:
                await throttle.take(len(data))
            if fence is not None:
                fence()
            await write(data)
        if hashing is not None:
            await joined(hashing)
            hashing = None
    finally:
        # sending failed: the hash must end before the digest is read. Not cut short by a
        # second cancellation (aiohttp cancels a request's writer from more than one place
        # once the answer is in): the digest of a delivery the server confirmed would be
        # recorded without its last chunk. A read still running is not waited for (it may
        # be stuck on a hung mount): ``inputs.close`` closes the fd once it has returned
        await settle(hashing)
    if offset != size:
        raise SourceVanishedError("the file shrank while it was sent")


async def send_source(
    source: inputs.Source, write: Callable[[Any], Awaitable[object]], digest: Any, ctx: StepContext
) -> None:
    """``copy_to`` of an opened source (``inputs.opened``) with its step's throttle and fence."""
    await copy_to(
        source.fd,
        source.st,
        write,
        digest=digest,
        throttle=ctx.throttle,
        fence=ctx.fence,
        whole=source.data,
    )


_NOWAIT = fastpath.NOWAIT_READS  #: FILEDISPATCH_FASTPATH=0: every read in the executor
#: chunks of this size or more are hashed in a worker thread; smaller ones cost less inline
HASH_AWAY = 256 * 1024
#: what ``copy_to`` hands its writer
Chunk = bytes | bytearray


class RemoteProcessor(ABC, Generic[C]):
    """Delivers into one folder of one file server, over pooled connections of type ``C``.

    The flow: the resume check (when a crash or a lost connection may have hit an earlier
    attempt), folders created once (safely against other connections making them too), the
    file streamed to a hidden temporary name (its SHA-256 computed on the way), checked as
    ``verify`` says, then renamed to the name ``on_conflict`` picks. A partial upload never
    has the final name, unless ``temp_name: false`` says the server cannot rename.
    """

    kind: ClassVar[str]
    default_port: ClassVar[int]
    #: errors after which the connection still works (a refused command)
    refusals: ClassVar[tuple[type[Exception], ...]] = ()
    paces: ClassVar[bool] = True  #: ``upload`` pays ``ctx.throttle`` per chunk (copy_to)
    #: every attempt's temporary name has a random part (``RemoteTarget.paths``): for a
    #: protocol with no exclusive create, so that no one can plant a link at it in advance
    salted: ClassVar[bool] = False

    def __init__(self, dest: FtpDestination | SftpDestination, resources: Resources) -> None:
        self.dest = dest
        self.target = RemoteTarget(dest, self.default_port)
        self.pool: Pool[C] = shared_pool(
            resources,
            f"{self.kind}:{self.target.server}",
            lambda: Pool(self.target.display, dest.pool_size, self.connect, self.disconnect),
        )
        self._made: set[PurePosixPath] = set()  # folders known to exist on the server

    async def aclose(self) -> None:
        return None  # the pool belongs to the service's resources

    # -- what each protocol provides

    @abstractmethod
    async def connect(self) -> C: ...

    @abstractmethod
    async def disconnect(self, conn: C) -> None: ...

    @abstractmethod
    async def mkdir(self, conn: C, folder: PurePosixPath) -> None:
        """Make one folder whose parent exists; raise (a refusal) when it cannot."""

    @abstractmethod
    async def is_dir(self, conn: C, path: PurePosixPath) -> bool: ...

    @abstractmethod
    async def upload(
        self,
        conn: C,
        source: inputs.Source,
        path: PurePosixPath,
        digest: Any,
        ctx: StepContext,
        fresh: bool = False,
    ) -> None:
        """Stream the open file to ``path`` (use ``copy_to``, passing ``digest`` on, the
        context's ``throttle`` and ``fence``, and the bytes read already, ``source.data``).
        ``fresh``: ``path`` is a temporary name of ours, to be created anew, never opened
        through whatever is there already (a link someone planted) where the protocol can
        say so (SFTP; FTP cannot)."""

    @abstractmethod
    async def exists(self, conn: C, path: PurePosixPath) -> bool: ...

    @abstractmethod
    async def size(self, conn: C, path: PurePosixPath) -> int | None:
        """The size of the file at ``path``; None when there is none."""

    @abstractmethod
    async def sha256(self, conn: C, path: PurePosixPath) -> str:
        """The hex SHA-256 of the file at ``path``, as the server sees it. Raises
        PermanentDeliveryError when the server cannot tell it."""

    async def read_sha256(self, conn: C, path: PurePosixPath) -> str:
        """The hex SHA-256 of the file at ``path``: asked of the server where it can tell,
        else read back (slow for big files: used by a resume only, see ``_find_previous``)."""
        return await self.sha256(conn, path)

    @abstractmethod
    async def rename(
        self, conn: C, src: PurePosixPath, dst: PurePosixPath, overwrite: bool
    ) -> None: ...

    @abstractmethod
    async def delete(self, conn: C, path: PurePosixPath) -> None:
        """Remove a file; raise when it cannot."""

    @abstractmethod
    async def remove(self, conn: C, path: PurePosixPath) -> None:
        """Remove a file, ignoring every error (used for clean-up only)."""

    @abstractmethod
    async def listdir(self, conn: C, folder: PurePosixPath) -> list[str]:
        """The names in ``folder`` (hidden ones included); empty when there is no such
        folder or the server refuses to list it (what is not listed is left behind, never
        published). Used only by a resumed delivery (see ``_remove_earlier``)."""

    @abstractmethod
    def check_name(self, path: PurePosixPath) -> None:
        """Raise PermanentDeliveryError when the protocol cannot carry this name."""

    @abstractmethod
    def translate(self, exc: Exception) -> DeliveryError | None:
        """The protocol's error in our tree; None for an error that is not the protocol's."""

    # -- the flow

    async def deliver(self, ctx: StepContext) -> Outcome:
        rel = render_target(self.dest.name, ctx, self.dest.naming)
        self.check_name(self.target.root / rel)
        try:
            async with self.pool.connection() as conn:
                return await self._deliver(conn, ctx, rel)
        except DeliveryError:
            raise
        except Exception as exc:
            error = self.translate(exc)
            if error is None:
                raise
            raise error from exc

    async def _deliver(self, conn: C, ctx: StepContext, rel: PurePosixPath) -> Outcome:
        root = self.target.root
        folder, tmp = self.target.paths(ctx, rel, self.salted)
        if ctx.resuming:
            found = await self._find_previous(conn, ctx, rel, tmp)
            if found is not None:
                return Outcome(
                    self.target.location(found), detail="found delivered by an earlier attempt"
                )
        await self.makedirs(conn, folder)

        async def exists(p: PurePosixPath) -> bool:
            return await self.exists(conn, root / p)

        if not self.dest.temp_name:
            return await self._deliver_in_place(conn, ctx, rel, exists)

        try:
            sent = await self._send(conn, ctx, tmp, fresh=True)
        except TempNameTakenError:  # a folder planted at our name: a name no one knows instead
            _, tmp = self.target.paths(ctx, rel, salted=True)
            sent = await self._send(conn, ctx, tmp, fresh=True)

        async def put(p: PurePosixPath, overwrite: bool) -> None:
            ctx.fence()  # the last moment this delivery can still be called off
            await self._rename(conn, tmp, root / p, overwrite)

        cleanup: tuple[type[Exception], ...] = (DeliveryError, *self.refusals)
        try:
            final = await aplace(exists, rel, self.dest.on_conflict, put)
        except cleanup:
            await self.remove(conn, tmp)
            raise
        if final is None:
            await self.remove(conn, tmp)
            return Outcome(self.target.location(rel), detail=NAME_TAKEN)
        return Outcome(self.target.location(final), sha256=sent)

    async def _deliver_in_place(
        self,
        conn: C,
        ctx: StepContext,
        rel: PurePosixPath,
        exists: Callable[[PurePosixPath], Awaitable[bool]],
    ) -> Outcome:
        """``temp_name: false``: the upload writes the final name itself (a reader may see it
        partial, and a crash may leave it so)."""
        for candidate, overwrite in choices(rel, self.dest.on_conflict):
            if overwrite or not await exists(candidate):
                sent = await self._send(conn, ctx, self.target.root / candidate)
                return Outcome(self.target.location(candidate), sha256=sent)
        return Outcome(self.target.location(rel), detail=NAME_TAKEN)

    async def _send(
        self, conn: C, ctx: StepContext, path: PurePosixPath, fresh: bool = False
    ) -> str:
        """Upload the input to ``path`` (``fresh``: see ``upload``) and check it as ``verify``
        says; the SHA-256 sent.
        On any failure the file at ``path`` is removed, a cancellation (the step's
        ``timeout``, a stop) included."""
        digest = hashlib.sha256()
        cleanup: tuple[type[Exception], ...] = (DeliveryError, *self.refusals)
        async with inputs.opened(ctx) as source:
            try:
                await self.upload(conn, source, path, digest, ctx, fresh)
                sent = digest.hexdigest()
                await self._verify(conn, path, source.st.st_size, sent)
            except cleanup:
                await self.remove(conn, path)
                raise
            except asyncio.CancelledError:
                # the connection may be mid-transfer (it is dropped): a partial file under
                # the final name (temp_name: false) would pass for the file at the next
                # attempt
                await asyncio.shield(self._remove_aside(path))
                raise
        return sent

    async def _remove_aside(self, path: PurePosixPath) -> None:
        """Remove ``path`` over a connection of its own, within the connect timeout (twice,
        for the login and the removal); says so in the log when it cannot, never raises."""
        try:
            async with asyncio.timeout(2 * self.dest.connect_timeout):
                conn = await self.connect()
                try:
                    await self.remove(conn, path)
                finally:
                    await self.disconnect(conn)
        except Exception as exc:
            log.warning(
                "%s: cannot remove the unfinished upload %s (removed at the next attempt "
                "with a temporary name): %s",
                self.target.display,
                path,
                self.translate(exc) or exc,
            )

    async def _verify(self, conn: C, path: PurePosixPath, size: int, sent: str) -> None:
        """A mismatch is transient: the next attempt uploads again."""
        mode = self.dest.verify
        if mode == "size":
            got = await self.size(conn, path)
            if got != size:
                raise TransientDeliveryError(
                    f"{self.target.display}: verify: {got} bytes arrived of {size} sent"
                )
        elif mode == "sha256":
            arrived = await self.sha256(conn, path)
            if arrived.lower() != sent:
                raise TransientDeliveryError(
                    f"{self.target.display}: verify: the SHA-256 that arrived ({arrived}) is "
                    f"not the one sent ({sent})"
                )

    async def makedirs(self, conn: C, folder: PurePosixPath) -> None:
        """Make ``folder`` and its parents, level by level, safe against other connections
        doing the same: "exists" is success once a check sees a folder there, and a level
        whose parent vanished meanwhile is tried again from the top (3 rounds at most)."""
        if folder in self._made:
            return
        levels = [p for p in reversed((folder, *folder.parents)) if p != p.parent]
        for round_ in range(3):
            try:
                for level in levels:
                    if level in self._made:
                        continue
                    try:
                        await self.mkdir(conn, level)
                    except self.refusals:
                        if not await self.is_dir(conn, level):
                            raise
                    self._made.add(level)
                return
            except self.refusals:
                self._made.difference_update(levels)  # someone removed a level: look again
                if round_ == 2:
                    raise

    async def _rename(
        self, conn: C, src: PurePosixPath, dst: PurePosixPath, overwrite: bool
    ) -> None:
        """Rename, with the fallbacks a server may need: replacing a file it will not rename
        over (``overwrite`` only) by deleting it first; a server that renames nothing is told
        plainly, with what to set instead."""
        try:
            await self.rename(conn, src, dst, overwrite)
            return
        except self.refusals as exc:
            error = self.translate(exc)
            if overwrite and await self.exists(conn, dst):
                log.info("%s: cannot rename over %s: deleting it first", self.target.display, dst)
                await self.delete(conn, dst)
                await self.rename(conn, src, dst, False)
                return
            if isinstance(error, PermanentDeliveryError):
                raise PermanentDeliveryError(
                    f"{error}; this server may not rename files: set temp_name: false to "
                    "upload under the final name (see docs/destinations-remote.md)"
                ) from exc
            raise

    async def _find_previous(
        self, conn: C, ctx: StepContext, rel: PurePosixPath, tmp: PurePosixPath
    ) -> PurePosixPath | None:
        """After a crash or a failed attempt: our file at a candidate name, with our size and
        our bytes. The size alone took another's file for ours (another journal's delivery of a
        file of the same name and size into this folder, or a user's): ours was never sent,
        the row SUCCEEDED and the source was consumed (k7 review). A candidate of our size is
        read back and compared (the server's hash where it has one); a read that fails counts
        as not ours (the delivery then goes on as ``on_conflict`` says)."""
        await self._remove_earlier(conn, ctx, rel.name, tmp)
        want = ctx.version.size
        if ctx.input != ctx.version.path:  # a transform's output, in our own work folder
            try:
                want = ctx.input.stat().st_size
            except OSError:
                return None
        ours: str | None = None
        for cand in candidates(rel, self.dest.on_conflict):
            got = await self.size(conn, self.target.root / cand)
            if got is None:
                return None
            if got != want:
                continue
            if ours is None:
                ours = await inputs.content_sha256(ctx)
            unreadable: tuple[type[Exception], ...] = (DeliveryError, *self.refusals)
            try:
                theirs = await self.read_sha256(conn, self.target.root / cand)
            except unreadable as exc:
                log.info(
                    "%s: cannot read %s back to tell whether an earlier attempt delivered it "
                    "(%s); taken for another file",
                    self.target.display,
                    cand,
                    exc,
                )
                continue
            if theirs == ours:
                return cand
        return None

    async def _remove_earlier(
        self, conn: C, ctx: StepContext, name: str, tmp: PurePosixPath
    ) -> None:
        """Remove what earlier attempts of this row left under a temporary name: ``tmp``
        itself, and with a journal token every temporary name of this row in the folder
        (``earlier_temps``), whatever name an earlier attempt rendered (a ``{now}``
        template, a reload, another claim's epoch). Each earlier claimant's lease ran out
        before the row came back, so its fence refuses any further chunk or rename of that
        copy. Without a token (no journal) only names of this file ``name``."""
        await self.remove(conn, tmp)
        if not ctx.epoch and not ctx.journal:
            return
        names = await self.listdir(conn, tmp.parent)
        for stale in earlier_temps(names, ctx.dispatch_id, name, ctx.journal):
            if stale != tmp.name:
                await self.remove(conn, tmp.parent / stale)
