"""Small asyncio helpers shared by the service and the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import queue
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


async def joined(future: asyncio.Future[T]) -> T:
    """The result of ``future`` (work already running in a thread), awaited to its end: a
    cancellation of this wait is raised only once the work is done. A bare ``await`` on an
    executor's future, when cancelled, cancels the future and returns at once while its
    thread goes on: a hash then read without its last chunk, a read of a descriptor about
    to be closed."""
    await settle(future)
    return future.result()


async def to_thread_joined(func: Callable[..., T], *args: Any) -> T:
    """``func(*args)`` in the loop's default executor, awaited with ``joined``."""
    return await joined(asyncio.get_running_loop().run_in_executor(None, func, *args))


#: seconds an idle thread of ``in_daemon_thread`` waits for more work before it ends
DAEMON_IDLE_S = 60.0


class _DaemonThreads:
    """Daemon threads for calls that may never return (a system call on a hung mount): one
    is started when none is idle, an idle one ends after DAEMON_IDLE_S. Unlike the loop's
    default executor, nothing joins them: neither ``asyncio.run`` nor the interpreter's
    exit waits for a stuck one, and a stuck one takes no thread from anyone else."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._idle = 0  #: threads waiting for a job; a job is put only for one of them

    def submit(self, job: Callable[[], None]) -> None:
        with self._lock:
            if self._idle:
                self._idle -= 1
                self._jobs.put(job)
                return
        threading.Thread(target=self._serve, args=(job,), name="fd-blocking", daemon=True).start()

    def _serve(self, job: Callable[[], None]) -> None:
        while True:
            job()
            with self._lock:
                self._idle += 1
            while True:
                try:
                    job = self._jobs.get(timeout=DAEMON_IDLE_S)
                    break
                except queue.Empty:
                    with self._lock:
                        if self._jobs.empty():  # no job was put for this thread: it ends
                            self._idle -= 1
                            return


_DAEMONS = _DaemonThreads()


def in_daemon_thread(func: Callable[..., T], *args: Any) -> asyncio.Future[T]:
    """``func(*args)`` in a daemon thread of our own (as ``asyncio.to_thread``, but never the
    loop's default executor); the future is done once ``func`` has returned or raised.
    Cancelling the future does not stop the call (nothing can), and the call never holds the
    process's exit."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def done(ok: bool, value: Any) -> None:
        if fut.done():  # cancelled: nobody waits
            return
        if ok:
            fut.set_result(value)
        else:
            fut.set_exception(value)

    def job() -> None:
        value: Any
        try:
            ok, value = True, func(*args)
        except BaseException as exc:  # handed to the future, never to this thread
            ok, value = False, exc
        with contextlib.suppress(RuntimeError):  # the loop is closed: abandoned long ago
            loop.call_soon_threadsafe(done, ok, value)

    _DAEMONS.submit(job)
    return fut


async def thread_to_its_end(
    off: threading.Event,
    func: Callable[[], T],
    patience_s: float,
    stuck: Callable[[asyncio.Future[T]], None] | None = None,
) -> T:
    """``func()`` in a daemon thread (``in_daemon_thread``), for work that must not go on
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

    fut = in_daemon_thread(run)
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
