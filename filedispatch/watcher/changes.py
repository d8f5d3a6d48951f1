"""The change feed of one source folder: watchfiles' Rust watcher, paced for both latency and
an idle service.

watchfiles' ``RustNotify.watch`` (the loop under ``watchfiles.awatch``) sleeps ``step_ms``
between looks at what its notify thread collected, and returns a batch one quiet step after
the last change it saw (its docstring, watchfiles 1.x). So a change waits one to two steps,
and an idle watch wakes (and takes the GIL) once per step: with a fixed step, low latency and
a quiet idle service exclude each other. Here the step follows the traffic (``PACE``):

- **hot**, a 2 ms step, for a second after each batch: a steady stream's files are seen 2 to
  4 ms after they land (500 looks a second, while there is work anyway);
- **warm**, 20 ms, until 30 s after the last batch: a file every few seconds is seen within
  20 to 40 ms, for 50 looks a second;
- **idle**, 200 ms, after that. Between two looks the watch thread waits on a
  ``fastpath.Doorbell`` of the folder (``_idle_wait``), so the first file after a quiet
  spell is looked for as soon as the kernel has an event for it, at the hot step, rather
  than 200 to 400 ms later (two idle steps: one to see the change, one to see it is over);
  a burst into an idle folder lost that much at its start (s8: 0.3 s of a 10,000-file
  burst's 1.4 s, on a tmpfs). The doorbell watches the folder itself, not its subfolders:
  where the watch covers subfolders too (a recursive source that has some), the idle wait
  still looks once per idle step, so a first change deeper down is seen within it. Where
  the doorbell covers every folder the watch does (the default, a source that is not
  recursive, or a recursive one without subfolders), every change rings it, and the idle
  wait looks only every ``QUIET_LOOK_MS`` besides: five looks a second, each a Python call
  and a Rust one taking the GIL, were most of an idle service's CPU (s9: 23 of its 36 ms
  in 30 s). A stop knocks the waiting thread awake (``Doorbell.knock``).

A polled folder (``force_polling``: a network filesystem, a shared source) is never hot: its
changes come once per poll, so it starts over at warm. Nor is a batch that only modifies files
the batch before it named: a file written slowly (a log, a long download) would otherwise keep
the watch hot for as long as it grows, at up to 500 batches a second for one file; warm, it
costs 50 at most, and a file that is new, removed or renamed makes it hot again.

Bursts are not cut into more batches than before: the next watch starts only once the event
loop took the previous batch, and everything that arrived meanwhile comes in one batch.
"""

from __future__ import annotations

import asyncio
import functools
import select
import threading
from collections.abc import AsyncGenerator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

from watchfiles import Change
from watchfiles._rust_notify import RustNotify

from .. import fastpath

#: (step, how long it lasts without a change) in ms, hot to idle: a batch starts over at the
#: first, a quiet spell moves on to the next; the last lasts until a change comes
PACE = ((2, 1_000), (20, 30_000), (200, 0))
#: the pace of a run that ends once its backlog is done (``--once``): no idle level, since
#: such a run is never idle for long, and its stop then waits at most a warm step for the
#: watch thread (the Rust loop sees the stop only between two steps), not an idle one
SHORT_RUN_PACE = PACE[:2]
#: longest a batch is grouped once a change was seen (ms), however busy the folder
DEBOUNCE_MS = 50
#: the idle wait's longest sleep (ms) between two looks on a doorbell that covers every
#: folder of the watch: each change rings it, so a look only makes sure (one 2 ms look of
#: the watch thread with the GIL every 5 s, against five a second at the idle step)
QUIET_LOOK_MS = 5_000

Changes = set[tuple[Change, str]]
#: what a look of ``RustNotify.watch`` returns: the changes, or why there are none
Looked = Literal["signal", "stop", "timeout"] | set[tuple[int, str]]


def _idle_wait(
    notify: RustNotify,
    bell: fastpath.Doorbell,
    step_ms: int,
    look_ms: int,
    halt: threading.Event,
    covered: Callable[[], bool] | None = None,
) -> Looked:
    """The idle level's watch, in the watch thread, until a change comes (or ``halt``, told
    by ``bell.knock()``): wait for ``bell`` to ring; rung, look at the ``look_ms`` step (the
    hot one) for up to ``step_ms`` for watchfiles' thread to have the change; not rung, look
    once. The first wait is ``step_ms`` (a change made before the bell was armed); the later
    ones too unless ``covered()`` says the bell watches every folder the feed's watch does
    (no subfolder watched: a change deeper down would not ring), then QUIET_LOOK_MS. Returns
    what ``RustNotify.watch`` does, never "timeout". The wait holds no GIL and takes no CPU."""
    if not bell.arm():  # the folder is gone, or no watch is left: the plain idle step
        return notify.watch(DEBOUNCE_MS, step_ms, 0, halt)
    try:
        poller = select.poll()
        poller.register(bell.fd, select.POLLIN)
        poller.register(bell.knock_fd, select.POLLIN)
        wait_ms = step_ms
        while True:
            woken = {fd for fd, _ in poller.poll(wait_ms)}
            if halt.is_set():
                return "stop"
            rung = bell.fd in woken
            if rung:
                bell.drain()
            raw = notify.watch(DEBOUNCE_MS, look_ms, step_ms if rung else 1, halt)
            if raw != "timeout":
                return raw
            quiet = covered is not None and covered()
            wait_ms = max(step_ms, QUIET_LOOK_MS) if quiet else step_ms
    finally:
        bell.disarm()


#: doorbells at once in the process. Each is an inotify instance, and a user may have few
#: (fs.inotify.max_user_instances, often 128, for all of its processes), which the sources'
#: own watches need first: past this many, a source's idle watch goes without one (its first
#: file is then seen within 200 to 400 ms, as before doorbells)
DOORBELLS = 4
_DOORBELLS = threading.BoundedSemaphore(DOORBELLS)


def _doorbell(
    root: Path, force_polling: bool, pace: Sequence[tuple[int, int]]
) -> fastpath.Doorbell | None:
    """A ``fastpath.Doorbell`` for the idle wait (``_ring_off`` when done), or None: a polled
    folder (its changes come once per poll), a pace with one level, DOORBELLS taken, no
    inotify instance to spare, or the switch off."""
    if force_polling or len(pace) < 2 or not fastpath.ENABLED:
        return None
    if not _DOORBELLS.acquire(blocking=False):
        return None
    try:
        return fastpath.Doorbell(root)
    except OSError:
        _DOORBELLS.release()
        return None


def _ring_off(bell: fastpath.Doorbell) -> None:
    """Close a doorbell of ``_doorbell`` and give its place back."""
    try:
        bell.close()
    finally:
        _DOORBELLS.release()


def _watch_count(fd: int) -> int | None:
    """How many folders the inotify instance ``fd`` watches (its ``inotify wd:`` lines in
    /proc/self/fdinfo, see proc(5)); None when it cannot be read."""
    try:
        with open(f"/proc/self/fdinfo/{fd}", encoding="ascii", errors="replace") as info:
            return sum(1 for line in info if line.startswith("inotify wd:"))
    except OSError:
        return None


#: told ``(True, count)`` once the watch is set up, ``count`` giving the folders it covers
#: now (None: not known, as for polling), and ``(False, None)`` as it ends
OnWatch = Callable[[bool, Callable[[], int | None] | None], None]


async def watch_changes(
    root: Path,
    stop: asyncio.Event,
    *,
    recursive: bool,
    force_polling: bool,
    poll_delay_ms: int,
    on_watch: OnWatch | None = None,
    pace: Sequence[tuple[int, int]] | None = None,
) -> AsyncGenerator[Changes, None]:
    """Batches of ``(Change, path)`` under ``root`` until ``stop`` is set (then it ends).

    Raises what ``RustNotify`` raises: FileNotFoundError if ``root`` is gone at the start,
    OSError or ``WatchfilesRustInternalError`` if the watch fails later (the caller rescans
    and watches again). Unreadable subfolders are passed over, as watchfiles'
    ``ignore_permission_denied`` does. ``pace``: ``PACE`` unless given (``SHORT_RUN_PACE``).
    """
    pace = PACE if pace is None else pace
    halt = threading.Event()  # read by the Rust loop each step (``is_set``)
    loop = asyncio.get_running_loop()
    before = None if force_polling else fastpath.inotify_fds()
    notify = RustNotify([str(root)], False, force_polling, poll_delay_ms, recursive, True)
    created = set() if before is None else fastpath.inotify_fds() - before
    if created:  # the service's own opens of the folder's files wake no thread
        fastpath.quiet_opens(root, created)
    if on_watch is not None:
        # a folder the kernel refuses a watch (fs.inotify.max_user_watches reached) is passed
        # over by the watch without a word: its owner compares this count with the folders
        fd = next(iter(created)) if len(created) == 1 else None
        on_watch(True, None if fd is None else functools.partial(_watch_count, fd))
    bell = _doorbell(root, force_polling, pace)
    covered = None
    if bell is not None and len(created) == 1:
        covered = functools.partial(bell.covers, next(iter(created)))

    def halt_now() -> None:  # the Rust loop reads ``halt``, the idle wait is knocked awake
        halt.set()
        if bell is not None:
            bell.knock()

    # a thread of its own: an idle watch holds it for as long as the folder is quiet, which
    # the shared default executor (a few threads for every stat and hash) cannot spare
    thread = ThreadPoolExecutor(1, thread_name_prefix=f"watch {root.name}")
    waiter = loop.create_task(stop.wait())
    waiter.add_done_callback(lambda _: halt_now())
    level = len(pace) - 1  # idle until the first change
    # a polled folder's changes come once per poll: looking every 2 ms in between only costs
    hottest = 1 if force_polling else 0
    named: set[str] = set()  # the paths the last batch named
    try:
        while not stop.is_set():
            step, lasts = pace[level]
            if bell is not None and level == len(pace) - 1:
                raw = await loop.run_in_executor(
                    thread, _idle_wait, notify, bell, step, pace[0][0], halt, covered
                )
            else:
                raw = await loop.run_in_executor(
                    thread, notify.watch, DEBOUNCE_MS, step, lasts, halt
                )
            if raw == "stop":
                return
            if raw == "timeout":  # quiet for that long: a longer step
                level = min(level + 1, len(pace) - 1)
                continue
            if raw == "signal":  # only the main thread takes signals; this is not it
                raise RuntimeError("the watch thread unexpectedly received a signal")
            batch = {(Change(change), path) for change, path in raw}
            paths = {path for _, path in batch}
            growing = paths <= named and all(c == Change.modified for c, _ in batch)
            level, named = max(hottest, 1) if growing else hottest, paths
            yield batch
    finally:  # a watch still running (its awaiter cancelled) returns within a step: the
        # close queued behind it in the same thread then ends the notify thread
        halt_now()
        waiter.cancel()
        if on_watch is not None:
            on_watch(False, None)  # its descriptor is about to close (its number reused)
        thread.submit(notify.close)
        if bell is not None:
            thread.submit(_ring_off, bell)  # after the wait in flight, if any
        thread.shutdown(wait=False)
