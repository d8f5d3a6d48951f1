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
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from ..asyncutil import in_daemon_thread, thread_to_its_end
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
    """A destination with copies stuck past their call-off: since when (``time.monotonic``,
    the first call-off), and the threads still stuck."""

    since: float
    threads: set[asyncio.Future[Any]] = field(default_factory=set)


#: destination folder -> its stuck copies. While a folder has one, no new copy (nor any other
#: call into it) starts there: each would take one more thread, stuck too, for as long as the
#: mount hangs. One for the process, as ``_STUCK`` is
_HUNG: dict[str, _Hung] = {}


class CopyThreads:
    """One destination's copies in threads: ``run`` them, ``check`` before an attempt."""

    def __init__(self, where: str) -> None:
        self.where = where  #: the destination folder, as the log names it

    def check(self, ctx: StepContext | None = None) -> None:
        """Raise NetworkError while an earlier attempt of ``ctx``'s row is stuck in its
        thread (a new attempt would write the very temporary name that thread may still
        rename into place), or while any copy into this destination is (``check_folder``).
        A network error: a hung mount is a remote that does not answer, retried for as long
        as an outage lasts (``retry.NETWORK_FOR_S``), not a number of attempts."""
        if ctx is not None:
            held = _STUCK.get(ctx.dispatch_id)
            if held is not None and not held.done():
                raise NetworkError(
                    "an earlier attempt of this file is stuck in a system call (a hung disk or "
                    "mount?): it is tried again once that has ended"
                )
        self.check_folder()

    def check_folder(self) -> None:
        """Raise NetworkError (see ``check``), naming the folder and for how long, while a
        copy into this destination is stuck in a system call: the mount hangs, and an attempt
        now would only add a thread stuck beside it. Cheap: one dict lookup."""
        hung = _HUNG.get(self.where)
        if hung is not None:
            raise NetworkError(
                f"{self.where}: a copy into it has been stuck in a system call for "
                f"{time.monotonic() - hung.since:.0f}s (a hung disk or mount?); nothing new "
                "is started there until it has ended"
            )

    async def run(self, ctxs: list[StepContext], work: Callable[[list[StepContext]], T]) -> T:
        """``work(ctxs)`` in a worker thread. A cancellation of this call (a step's timeout,
        the stop) calls the work off (each fence refuses the next chunk and the rename from
        then on, and the copy removes its temporary file: ``called_off``) and waits for the
        thread, up to CALL_OFF_PATIENCE_S (``asyncutil.thread_to_its_end``). A thread that
        outlives that is said once per delivery, and its rows wait for it (``check``)."""
        self.check_folder()
        off = threading.Event()
        ids = [ctx.dispatch_id for ctx in ctxs]
        where = self.where

        def stuck(fut: asyncio.Future[Any]) -> None:
            hung = _HUNG.get(where)
            if hung is None:  # said once per hang of the folder, not once per file
                hung = _HUNG[where] = _Hung(time.monotonic() - CALL_OFF_PATIENCE_S)
                log.error(
                    "%s: a copy called off %gs ago has not ended (stuck in a system call: a "
                    "hung disk or mount?); its file(s) are tried again once it has, and no "
                    "new copy starts in this folder until then",
                    where,
                    CALL_OFF_PATIENCE_S,
                )
            hung.threads.add(fut)
            for i in ids:
                _STUCK[i] = fut
            fut.add_done_callback(functools.partial(_ended, where, ids))

        calls = [called_off(ctx, off) for ctx in ctxs]
        return await thread_to_its_end(
            off, functools.partial(work, calls), CALL_OFF_PATIENCE_S, stuck
        )

    async def call(self, func: Callable[[], T]) -> T:
        """``func()`` (a look into the destination: a resume's stat and clean-up) in a daemon
        thread, once ``check_folder`` lets it; a cancellation leaves it to end on its own."""
        self.check_folder()
        return await in_daemon_thread(func)


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
        log.warning(
            "%s: the stuck copies have ended after %.0fs; copies into it start again",
            where,
            time.monotonic() - hung.since,
        )
