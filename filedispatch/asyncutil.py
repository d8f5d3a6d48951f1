"""Small asyncio helpers shared by the service and the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine
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


class Interrupted(Exception):
    """``cancel_when``'s event came first: the work was cancelled, and has ended."""


async def cancel_when(event: asyncio.Event, work: Coroutine[Any, Any, T]) -> T:
    """Run ``work`` and return its result; if ``event`` is set first, cancel the work, wait
    for it to end (its cleanup runs) and raise Interrupted. A work that ends anyway (it had
    finished, or it ignores the cancellation) gives its result or its error. Cancelling the
    caller cancels the work too."""
    task = asyncio.ensure_future(work)
    try:
        await first_completed(task, event.wait())
    except asyncio.CancelledError:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise
    if not task.done():
        task.cancel()
        try:
            return await task
        except asyncio.CancelledError:
            raise Interrupted from None
    return task.result()


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
