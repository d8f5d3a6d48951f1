"""Deliveries that run in a worker thread (local copies), and what a cancellation does to
them: a thread cannot be stopped, so it is called off and waited for, a while.

Without this a step's ``timeout`` (``asyncio.wait_for``) ended the delivery while its thread
went on, and the retry of the same claim wrote the same temporary name: the old thread's
rename then published the retry's half-written copy (a6 review: 1.25 MiB of an 8 MiB file).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..asyncutil import thread_to_its_end
from ..errors import NetworkError
from . import StepContext, called_off

log = logging.getLogger(__name__)

T = TypeVar("T")

#: seconds a cancelled delivery waits for its called-off thread. A healthy disk ends any
#: chunk of a copy (64 MiB), an fsync or a rename well within it; past it the thread is stuck
#: in a system call (a hung disk or network mount), and the stop or the worker goes on.
CALL_OFF_PATIENCE_S = 10.0


#: row -> the thread of an attempt of it that outlived its call-off. One for the process, not
#: one per processor: a reload that changes a step's settings makes a new processor, and its
#: retry of the row must still wait (d6 review)
_STUCK: dict[int, asyncio.Future[Any]] = {}


@dataclass
class _Hung:
    """A folder with calls stuck in it (copies past their call-off, a start-up sweep not
    returned yet): since when (``time.monotonic``), the threads still stuck, what the
    refusal says is stuck, and what the log says once they have ended."""

    since: float
    threads: set[asyncio.Future[Any]] = field(default_factory=set)
    stuck: str = "a copy into it has been stuck in a system call"
    ended: str = "the stuck copies have ended"
    #: a mark that shows nothing of its filesystem (``_widened`` leaves it out): a start-up
    #: sweep's (``sweeping``), or a move's, whose stall may be the source's side as well
    alone: bool = False
    #: a mark widened to the folder that stuck calls of one filesystem share (``_widened``)
    wide: bool = False
    #: mount points below a widened mark: other filesystems, not refused with it
    below: frozenset[str] = frozenset()


#: folder -> the calls stuck in it (a copy, a resume's look, a move), keyed by the folder the
#: call was working in, not the destination's root: one hung mount below a destination
#: (``name: {relpath}``, a mount per site) stops only what is written there. A second folder
#: of the same filesystem with a stuck call widens the mark to the folder both are in (at
#: most its mount point: ``_widened``): a mount hangs as a whole, and marks kept per folder
#: would let each new subfolder (a per-file ``{relpath}``) take one more stuck thread. While a
#: folder, or a folder above it, has one, no new call into it starts: each would take one
#: more thread, stuck too, for as long as the mount hangs. One for the process, as
#: ``_STUCK`` is
_HUNG: dict[str, _Hung] = {}

#: the folder each copy thread is working in (``CopyThreads.entering``), told to ``stuck``
_PLACE = threading.local()


def hung_above(folder: str) -> tuple[str, _Hung] | None:
    """The hung folder ``folder`` is in (itself, or a folder above it), or None. Cheap: no
    lookup at all while nothing hangs, else one per level of the path."""
    if not _HUNG:
        return None
    at = folder.rstrip("/") or "/"
    passed: list[str] = []  #: the folders below ``at`` on the way up
    while True:
        hung = _HUNG.get(at)
        if hung is not None and not (hung.below and any(p in hung.below for p in passed)):
            return at, hung
        passed.append(at)
        up = os.path.dirname(at)
        if up == at:
            return None
        at = up


def refuse_if_hung(folder: str) -> None:
    """Raise NetworkError, naming the hung folder and for how long, while a call into
    ``folder`` (or a folder above it) is stuck in a system call: the mount hangs, and a call
    now would only add a thread stuck beside it."""
    found = hung_above(folder)
    if found is not None:
        at, hung = found
        raise NetworkError(
            f"{at}: {hung.stuck} for {time.monotonic() - hung.since:.0f}s (a hung disk or "
            "mount?); nothing new is started there until it has ended"
        )


def sweeping(folder: str, sweep: asyncio.Future[Any]) -> None:
    """A start-up sweep of ``folder``'s temporary files runs in a daemon thread (``sweep``),
    beside the start rather than before it: a hung destination must hold neither the other
    destinations nor the stop. Until it has returned, ``folder`` is refused as a hung one is
    (``refuse_if_hung``): a copy there now could have its temporary file swept away, and
    were the folder hung, it would only add a stuck thread."""
    hung = _HUNG.get(folder)
    if hung is None:
        hung = _HUNG[folder] = _Hung(
            time.monotonic(),
            stuck="its start-up sweep of temporary files has been running",
            ended="the start-up sweep of temporary files has returned",
            alone=True,
        )
    hung.threads.add(sweep)
    sweep.add_done_callback(functools.partial(_ended, folder, []))


class CopyThreads:
    """One destination's copies in threads: ``run`` them, ``check`` before an attempt."""

    def __init__(self, where: str) -> None:
        self.where = where  #: the destination folder, as the log names it

    def check(self, ctx: StepContext | None = None, folder: str | None = None) -> None:
        """Raise NetworkError while an earlier attempt of ``ctx``'s row is stuck in its
        thread (a new attempt would write the very temporary name that thread may still
        rename into place), or while a call into ``folder`` (default: the destination's) is
        (``check_folder``). A network error: a hung mount is a remote that does not answer,
        retried for as long as an outage lasts (``retry.NETWORK_FOR_S``), not a number of
        attempts."""
        if ctx is not None:
            held = _STUCK.get(ctx.dispatch_id)
            if held is not None and not held.done():
                raise NetworkError(
                    "an earlier attempt of this file is stuck in a system call (a hung disk or "
                    "mount?): it is tried again once that has ended"
                )
        self.check_folder(folder)

    def check_folder(self, folder: str | None = None) -> None:
        """``refuse_if_hung(folder)``, the destination's folder by default."""
        refuse_if_hung(self.where if folder is None else folder)

    @staticmethod
    def entering(folder: str | os.PathLike[str]) -> None:
        """Said by the work of ``run`` (in its thread) as it starts on a folder: were it to
        stick there, that folder is the one marked hung. Outside ``run``: nothing."""
        place = getattr(_PLACE, "place", None)
        if place is not None:
            place[0] = os.fspath(folder)

    async def run(self, ctxs: list[StepContext], work: Callable[[list[StepContext]], T]) -> T:
        """``work(ctxs)`` in a worker thread. A cancellation of this call (a step's timeout,
        the stop) calls the work off (each fence refuses the next chunk and the rename from
        then on, and the copy removes its temporary file: ``called_off``) and waits for the
        thread, up to CALL_OFF_PATIENCE_S (``asyncutil.thread_to_its_end``). A thread that
        outlives that is said once per hang of the folder it was working in (``entering``;
        the destination's folder until it says one), and its rows and that folder wait for it
        (``check``)."""
        self.check_folder()
        off = threading.Event()
        calls = [called_off(ctx, off) for ctx in ctxs]
        return await self._to_its_end(off, [c.dispatch_id for c in ctxs], self.where, work, calls)

    async def call(self, func: Callable[[], T], ctx: StepContext, folder: str) -> T:
        """``func()`` (a look into ``folder``: a resume's stat and clean-up) in a daemon
        thread, once ``check`` lets it. A cancellation waits for it as for a copy (``run``),
        and a call stuck past that marks ``folder`` hung as a stuck copy does: later attempts
        there are refused at once, without a thread."""
        self.check(ctx, folder)
        return await self._to_its_end(threading.Event(), [ctx.dispatch_id], folder, func)

    async def _to_its_end(
        self, off: threading.Event, ids: list[int], folder: str, func: Callable[..., T], *args: Any
    ) -> T:
        place = [folder]  #: the folder the thread works in (``entering``)

        def job() -> T:
            _PLACE.place = place
            try:
                return func(*args)
            finally:
                _PLACE.place = None

        def stuck(fut: asyncio.Future[Any]) -> None:
            said = (
                f"a copy called off {CALL_OFF_PATIENCE_S:g}s ago has not ended (stuck in a "
                "system call: a hung disk or mount?); its file(s) are tried again once it has, "
                "and no new copy starts in this folder until then"
            )
            mark_stuck(place[0], fut, said, ids)

        return await thread_to_its_end(off, job, CALL_OFF_PATIENCE_S, stuck)


def mark_stuck(
    where: str,
    fut: asyncio.Future[Any],
    said: str,
    ids: list[int] | None = None,
    stuck: str = _Hung.stuck,
    ended: str = _Hung.ended,
    alone: bool = False,
) -> None:
    """A call working in ``where`` is stuck in a system call; ``fut`` is done once its
    thread has ended. Until then ``where`` is hung (``refuse_if_hung``), and so, when another
    folder of its filesystem has a stuck call too, is the folder both are in (``_widened``);
    ``ids``' rows wait for it (``CopyThreads.check``). ``said`` is logged once per hang of the
    folder; ``stuck`` is what a refusal says is stuck there, ``ended`` what the log says once
    every stuck call there has returned. ``alone``: the stall may not be ``where``'s own (a
    move waits on its source as much as on its target): ``where`` is marked, never widened
    over, nor counted to widen another mark."""
    wide = None if alone else _widened(where)
    for key, text in ((where, said), (wide, None)):
        if key is None:
            continue
        hung = _HUNG.get(key)
        if hung is None:  # said once per hang of the folder, not once per file
            hung = _HUNG[key] = _Hung(
                time.monotonic() - CALL_OFF_PATIENCE_S,
                stuck=stuck,
                ended=ended,
                alone=alone and key == where,
            )
            if text is not None:
                log.error("%s: %s", key, text)
        if fut not in hung.threads:
            hung.threads.add(fut)
            fut.add_done_callback(functools.partial(_ended, key, ids or []))
    for i in ids or []:
        _STUCK[i] = fut


def _widened(where: str) -> str | None:
    """Where a stuck call in ``where`` shows a whole filesystem to hang: when another folder
    of the same mount (``/proc/self/mountinfo``, by path: nothing is asked of the mount) has
    a stuck call too, the folder both are in, or the mount point if that is lower; marked
    too, with those folders' stuck calls, and the mounts below it left out (``_Hung.below``).
    None while ``where`` is the only one, or where the folder both are in is ``/`` (paths
    through a symbolic link can look like one mount; a whole root is never refused)."""
    mounts = _mount_points()
    mount = _mount_of(where, mounts)
    others = [
        key
        for key, hung in _HUNG.items()
        if key != where and not (hung.alone or hung.wide) and _mount_of(key, mounts) == mount
    ]
    if not others:
        return None
    shared = os.path.commonpath([where, *others])
    wide = shared if len(shared) > len(mount) else mount
    if wide == "/":
        return None
    hung = _HUNG.get(wide)
    if hung is None:
        below = frozenset(mounts_below(wide, mounts))
        hung = _HUNG[wide] = _Hung(time.monotonic() - CALL_OFF_PATIENCE_S, wide=True, below=below)
        hung.stuck = f"calls into {len(others) + 1} of its folders have been stuck"
        log.error(
            "%s: calls into %s and %s are stuck (one filesystem: the mount hangs?); nothing new "
            "starts anywhere in %s until they have ended",
            wide,
            where,
            ", ".join(others),
            wide,
        )
    for key in others:
        for fut in _HUNG[key].threads - hung.threads:
            hung.threads.add(fut)
            fut.add_done_callback(functools.partial(_ended, wide, []))
    return wide


def _mount_points() -> list[str]:
    """The mount points this process sees (``/proc/self/mountinfo``; none where unreadable)."""
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    points = []
    for line in lines:
        fields = line.split(" ")
        if len(fields) > 4:  # octal escapes: a space is \040
            points.append(re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[4]))
    return points


def mounts_below(folder: str, mounts: list[str] | None = None) -> list[str]:
    """The mount points strictly below ``folder`` (other filesystems in it), by name, among
    ``mounts`` (default: those this process sees now)."""
    points = _mount_points() if mounts is None else mounts
    return [m for m in points if _under(m, folder) and m != folder]


def _under(path: str, folder: str) -> bool:
    """Whether ``path`` is ``folder`` or below it (by name)."""
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _mount_of(path: str, mounts: list[str]) -> str:
    """The mount point ``path`` is on, by name: the longest of ``mounts`` above it."""
    return max((m for m in mounts if _under(path, m)), key=len, default="/")


def _ended(where: str, ids: list[int], fut: asyncio.Future[Any]) -> None:
    """A stuck copy's thread has ended: its rows, and once its folder has no stuck copy left,
    the folder, may be tried again."""
    for i in ids:
        if _STUCK.get(i) is fut:
            del _STUCK[i]
    hung = _HUNG.get(where)
    if hung is None:
        return
    hung.threads.discard(fut)
    if not hung.threads:
        del _HUNG[where]
        took = time.monotonic() - hung.since
        if took >= CALL_OFF_PATIENCE_S:  # not said for a sweep that took no time to speak of
            log.warning("%s: %s after %.0fs; copies into it start again", where, hung.ended, took)
