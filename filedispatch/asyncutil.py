"""Small asyncio helpers shared by the service and the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


async def first_completed(*aws: Awaitable[Any], timeout: float | None = None) -> None:
    """Wait until the first awaitable finishes (or the timeout passes).

    Coroutines are wrapped in tasks that are cancelled afterwards; tasks passed in are the
    caller's and are left running.
    """
    own: list[asyncio.Future[Any]] = []
    waiting: list[asyncio.Future[Any]] = []
    for aw in aws:
        if isinstance(aw, asyncio.Future):
            waiting.append(aw)
        else:
            task = asyncio.ensure_future(aw)
            own.append(task)
            waiting.append(task)
    try:
        await asyncio.wait(waiting, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in own:
            fut.cancel()
        for fut in own:
            with contextlib.suppress(BaseException):
                await fut


@contextlib.asynccontextmanager
async def in_background(work: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """Run ``work`` as a task while inside; cancel it and wait for it on the way out."""
    task = asyncio.create_task(work, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def settle(*futures: asyncio.Future[Any] | None) -> None:
    """Wait until every future given (None: skipped) is done, however often this wait is
    cancelled meanwhile; then raise CancelledError if it was. For work that must not go on
    behind its caller's back: a read whose descriptor is about to be closed, a hash whose
    digest is about to be read, a copy in a thread that could still rename."""
    unfinished = [f for f in futures if f is not None and not f.done()]
    cancelled = False
    while unfinished:
        try:
            await asyncio.wait(unfinished)
        except asyncio.CancelledError:
            cancelled = True
        unfinished = [f for f in unfinished if not f.done()]
    if cancelled:
        raise asyncio.CancelledError


async def thread_to_its_end(
    off: threading.Event,
    func: Callable[[], T],
    patience_s: float,
    stuck: Callable[[asyncio.Future[T]], None] | None = None,
) -> T:
    """``func()`` in a worker thread (``asyncio.to_thread``), for work that must not go on
    behind its caller's back. A cancellation (a step's timeout, the stop) cannot stop a
    thread: it sets ``off`` (which ``func`` is to notice at its next check) and waits for the
    thread to end before it is passed on, so that nothing the thread does lands after its
    caller has moved on (a retry, a clean-up). A thread that has not started yet never runs
    ``func``, and is not waited for. The wait is ``patience_s`` at most: a thread stuck in a
    system call (a hung disk or network mount) would hold the stop and the worker for as long
    as that lasts; ``stuck(future)`` is told then (the future is done once the thread is), and
    the cancellation goes on. What the thread raised or returned after a cancellation is
    dropped."""
    started = threading.Event()

    def run() -> T:
        started.set()  # before looking at off: see below
        if off.is_set():
            raise CalledOff
        return func()

    fut = asyncio.ensure_future(asyncio.to_thread(run))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        off.set()
        # the thread has started (and may be inside func) or, if it starts now, it sees off
        if started.is_set():
            loop = asyncio.get_running_loop()
            until = loop.time() + patience_s
            while not fut.done() and (left := until - loop.time()) > 0:
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([fut], timeout=left)
            if not fut.done() and stuck is not None:
                stuck(fut)
        fut.add_done_callback(_seen)  # the outcome is moot: the caller was cancelled
        raise


class CalledOff(Exception):
    """Raised in the thread of ``thread_to_its_end`` that was called off before it began."""


def _seen(fut: asyncio.Future[Any]) -> None:
    if not fut.cancelled():
        fut.exception()
