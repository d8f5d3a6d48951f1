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
from collections.abc import Callable
from typing import Any, TypeVar

from ..asyncutil import thread_to_its_end
from ..errors import TransientDeliveryError
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


class CopyThreads:
    """One destination's copies in threads: ``run`` them, ``check`` before a retry."""

    def __init__(self, where: str) -> None:
        self.where = where  #: the destination, as the log names it

    def check(self, ctx: StepContext) -> None:
        """Raise TransientDeliveryError while an earlier attempt of ``ctx``'s row is stuck in
        its thread: a new attempt would write the very temporary name that thread may still
        rename into place."""
        held = _STUCK.get(ctx.dispatch_id)
        if held is not None and not held.done():
            raise TransientDeliveryError(
                "an earlier attempt of this file is stuck in a system call (a hung disk or "
                "mount?): it is tried again once that has ended"
            )

    async def run(self, ctxs: list[StepContext], work: Callable[[list[StepContext]], T]) -> T:
        """``work(ctxs)`` in a worker thread. A cancellation of this call (a step's timeout,
        the stop) calls the work off (each fence refuses the next chunk and the rename from
        then on, and the copy removes its temporary file: ``called_off``) and waits for the
        thread, up to CALL_OFF_PATIENCE_S (``asyncutil.thread_to_its_end``). A thread that
        outlives that is said once per delivery, and its rows wait for it (``check``)."""
        off = threading.Event()
        ids = [ctx.dispatch_id for ctx in ctxs]

        def stuck(fut: asyncio.Future[Any]) -> None:
            log.error(
                "%s: a copy called off %gs ago has not ended (stuck in a system call: a hung "
                "disk or mount?); its file(s) are tried again once it has",
                self.where,
                CALL_OFF_PATIENCE_S,
            )
            for i in ids:
                _STUCK[i] = fut
            fut.add_done_callback(lambda _: [_STUCK.pop(i, None) for i in ids])

        calls = [called_off(ctx, off) for ctx in ctxs]
        return await thread_to_its_end(
            off, functools.partial(work, calls), CALL_OFF_PATIENCE_S, stuck
        )
