"""The change feed of one source folder: watchfiles' Rust watcher, paced for both latency and
an idle service.

watchfiles' ``RustNotify.watch`` (the loop under ``watchfiles.awatch``) sleeps ``step_ms``
between looks at what its notify thread collected, and returns a batch one quiet step after
the last change it saw (its docstring, watchfiles 1.x). So a change waits one to two steps,
and an idle watch wakes (and takes the GIL) once per step: with a fixed step, low latency and
a quiet idle service exclude each other. Here the step follows the traffic:

- **hot** (``HOT_STEP_MS``): while changes keep coming, and for ``COOL_AFTER_MS`` after the
  last batch. A steady stream's files are seen 2 to 4 ms after they land.
- **idle** (``IDLE_STEP_MS``): after ``COOL_AFTER_MS`` without a change; five wake-ups a
  second. The first change after a quiet spell is seen within one to two idle steps (200 to
  400 ms); the files after it, hot again.

Bursts are not cut into more batches than before: the next watch starts only once the event
loop took the previous batch, and everything that arrived meanwhile comes in one batch.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from watchfiles import Change
from watchfiles._rust_notify import RustNotify

#: the step while changes come (ms): a file is seen 1 to 2 steps after it lands
HOT_STEP_MS = 2
#: the step of an idle watch (ms): its wake-ups per second, and the first file's extra wait
IDLE_STEP_MS = 200
#: how long without a change (ms) before the watch goes idle
COOL_AFTER_MS = 5000
#: longest a batch is grouped once a change was seen (ms), however busy the folder
DEBOUNCE_MS = 50

Changes = set[tuple[Change, str]]


class _Stop:
    """A thread-safe ``is_set`` for the Rust loop: the asyncio event it mirrors is only read
    and set on the event loop."""

    def __init__(self) -> None:
        self._flag = threading.Event()

    def is_set(self) -> bool:
        return self._flag.is_set()

    def set(self) -> None:
        self._flag.set()


async def watch_changes(
    root: Path,
    stop: asyncio.Event,
    *,
    recursive: bool,
    force_polling: bool,
    poll_delay_ms: int,
) -> AsyncGenerator[Changes, None]:
    """Batches of ``(Change, path)`` under ``root`` until ``stop`` is set (then it ends).

    Raises what ``RustNotify`` raises: FileNotFoundError if ``root`` is gone at the start,
    OSError or ``WatchfilesRustInternalError`` if the watch fails later (the caller rescans
    and watches again). Unreadable subfolders are passed over, as watchfiles'
    ``ignore_permission_denied`` does.
    """
    halt = _Stop()
    loop = asyncio.get_running_loop()
    notify = RustNotify([str(root)], False, force_polling, poll_delay_ms, recursive, True)
    # a thread of its own: an idle watch holds it for as long as the folder is quiet, which
    # the shared default executor (a few threads for every stat and hash) cannot spare
    thread = ThreadPoolExecutor(1, thread_name_prefix=f"watch {root.name}")
    waiter = loop.create_task(stop.wait())
    waiter.add_done_callback(lambda _: halt.set())
    hot = False
    try:
        while not stop.is_set():
            step, timeout = (HOT_STEP_MS, COOL_AFTER_MS) if hot else (IDLE_STEP_MS, 0)
            raw = await loop.run_in_executor(thread, notify.watch, DEBOUNCE_MS, step, timeout, halt)
            if raw == "stop":
                return
            if raw == "timeout":  # quiet for COOL_AFTER_MS
                hot = False
                continue
            if raw == "signal":  # only the main thread takes signals; this is not it
                raise RuntimeError("the watch thread unexpectedly received a signal")
            hot = True
            yield {(Change(change), path) for change, path in raw}
    finally:  # a watch still running (its awaiter cancelled) returns within a step: the
        # close queued behind it in the same thread then ends the notify thread
        halt.set()
        waiter.cancel()
        thread.submit(notify.close)
        thread.shutdown(wait=False)
