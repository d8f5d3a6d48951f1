"""Opening and reading the file an upload sends (HTTP, S3, FTP, SFTP, a command, a callable)
off the event loop: in daemon threads (``asyncutil.in_daemon_thread``), never the loop's
default executor. Such a file may be on a hung mount or held by an on-access scanner.

A call that never returns then holds only its own thread: not the loop, not another
source's threads, not the stop; an attempt ends at its step's ``timeout`` all the same, and
its folder is refused (``threads.refuse_if_hung``) until the stuck call has returned. Reads
of data in the page cache stay inline (``RWF_NOWAIT``: ``remote``), except a small file's,
read whole in its open's thread: one hop per file, and no read on the loop that an on-access
scanner's permission check (``FAN_ACCESS_PERM``) could hold, which RWF_NOWAIT does not skip.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

from .. import naming, sourcefile
from ..asyncutil import in_daemon_thread
from ..errors import SourceVanishedError
from . import StepContext, threads
from .common import open_input

log = logging.getLogger(__name__)

T = TypeVar("T")

#: descriptor -> its reads still running in their threads; while there are, ``close`` waits
#: (a number closed under a read not yet begun could name another file by then)
_READING: dict[int, set[asyncio.Future[Any]]] = {}
#: descriptors ``close`` was asked to close while reads of them still ran
_CLOSING: set[int] = set()


#: files up to this size are read whole in their open's thread (``Source.data``)
WHOLE_MAX = 64 * 1024


class Source(NamedTuple):
    """The file a step sends, open (``opened``)."""

    fd: int
    st: os.stat_result
    #: every byte of a file of at most WHOLE_MAX bytes, read right after the open and
    #: checked to be the planned version after the read; None for a larger file
    data: bytes | None


def _open(ctx: StepContext) -> Source:
    fd, st = open_input(ctx)
    if st.st_size > WHOLE_MAX:
        return Source(fd, st, None)
    try:
        return Source(fd, st, read_checked(fd, st))
    except BaseException:
        os.close(fd)
        raise


def read_checked(fd: int, st: os.stat_result) -> bytes:
    """All ``st.st_size`` bytes of the open file ``fd`` in one read, its identity checked
    after the read (as ``remote.copy_to`` does before its last chunk); blocking. Raises
    SourceVanishedError when the file changed or shrank since ``st``."""
    data = os.pread(fd, st.st_size, 0)
    sourcefile.check_unchanged(fd, st, "the file")
    if len(data) != st.st_size:
        raise SourceVanishedError("the file shrank while it was sent")
    return data


@contextlib.asynccontextmanager
async def opened(ctx: StepContext) -> AsyncIterator[Source]:
    """``open_input(ctx)`` (and a small file's bytes) in a daemon thread, closed on the
    way out (``close``). Raises NetworkError at once, without a thread, while an earlier
    open or read in the file's folder is stuck (``threads.refuse_if_hung``). Cancelled (the
    step's ``timeout``, the stop) while the open, or a read (``read``), has not returned:
    the folder is marked hung until it has, and a descriptor opened after all is closed."""
    folder = str(ctx.input.parent)
    threads.refuse_if_hung(folder)
    opening = in_daemon_thread(_open, ctx)
    try:
        source = await _watched(folder, opening, "opening")
    except asyncio.CancelledError:
        if not opening.done():
            opening.add_done_callback(_close_opened)
        raise
    try:
        yield source
    except asyncio.CancelledError:
        reads = [f for f in _READING.get(source.fd, ()) if not f.done()]
        if reads:
            _left(folder, reads, "reading")
        raise
    finally:
        close(source.fd)


async def content_sha256(ctx: StepContext) -> str:
    """The hex SHA-256 of the step's input (``naming.content_sha256``) read in a daemon
    thread, refused and marked as ``opened`` does (``in_source_thread``): for a name by
    content (``{sha256}``) or a resume's look at an earlier delivery, which would otherwise
    read the whole file on the event loop."""
    if ctx.sha256 is not None:
        return ctx.sha256
    return await in_source_thread(
        ctx.input.parent, "hashing", naming.content_sha256, ctx.version, ctx.input
    )


async def in_source_thread(folder: Path, doing: str, func: Callable[..., T], *args: Any) -> T:
    """``func(*args)``, a call into the source folder ``folder`` (a look, a hash), in a daemon
    thread: refused at once while a call there is stuck (``threads.refuse_if_hung``); when
    this wait is cancelled (the step's ``timeout``, the stop) before the call returns, the
    folder is marked hung until it has (``doing`` says what it was doing)."""
    where = str(folder)
    threads.refuse_if_hung(where)
    return await _watched(where, in_daemon_thread(func, *args), doing)


async def _watched(folder: str, call: asyncio.Future[T], doing: str) -> T:
    """``call`` (into ``folder``, in a daemon thread) awaited; a cancellation of this wait
    while it runs marks ``folder`` hung until it has returned (``_left``)."""
    try:
        return await asyncio.shield(call)
    except asyncio.CancelledError:
        if not call.done():
            _left(folder, [call], doing)
        raise


def read(fd: int, count: int, offset: int) -> asyncio.Future[bytes]:
    """``os.pread(fd, count, offset)`` in a daemon thread. Await it with ``asyncio.shield``
    (a cancelled wait leaves the read to end on its own); ``close`` keeps ``fd`` open until
    it has."""
    fut = in_daemon_thread(os.pread, fd, count, offset)
    _READING.setdefault(fd, set()).add(fut)
    fut.add_done_callback(lambda f: _read_ended(fd, f))
    return fut


def close(fd: int) -> None:
    """Close ``fd`` now, or once the last of its reads (``read``) has returned."""
    if _READING.get(fd):
        _CLOSING.add(fd)
    else:
        os.close(fd)


def _read_ended(fd: int, fut: asyncio.Future[Any]) -> None:
    reads = _READING.get(fd)
    if reads is None:
        return
    reads.discard(fut)
    if not reads:
        del _READING[fd]
        if fd in _CLOSING:
            _CLOSING.discard(fd)
            os.close(fd)


def _close_opened(fut: asyncio.Future[Source]) -> None:
    """An open left behind by its cancelled attempt has returned: its descriptor goes."""
    if not fut.cancelled() and fut.exception() is None:
        os.close(fut.result().fd)


def _left(folder: str, calls: list[asyncio.Future[Any]], doing: str) -> None:
    """``calls`` into ``folder`` outlived their attempt: said once per hang of the folder, and
    the folder (or, with another of its filesystem, the folder both are in) refused until
    they have returned (``threads.mark_stuck``)."""
    for call in calls:
        threads.mark_stuck(
            folder,
            call,
            f"{doing} a file to send has not returned by the end of its attempt (stuck in a "
            "system call: a hung disk or mount, an on-access scanner?); no file of this folder "
            "is sent until it has",
            stuck=f"{doing} a file in it to send it has been stuck in a system call",
            ended="the stuck open or read of a file to send has returned",
        )
