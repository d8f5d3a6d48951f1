"""Small asyncio helpers shared by the service and the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Coroutine
from typing import Any


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
