"""After-actions: a version whose rows are final is counted, and its source deleted, moved to
``done_dir`` or to ``failed_dir``, as ``fate.fate`` says.

Acts only once the journal has committed the outcomes (``Outcomes.when_durable``), and only on
the very file that was delivered. Never decides the fate itself, never writes the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import fastpath, relocate, sourcefile
from ..asyncutil import CalledOff, thread_to_its_end
from ..config import SourceConfig, Step, real_outside, real_roots
from ..errors import NetworkError, NewVersionError
from ..fate import Fate, fate
from ..models import FileVersion, Status
from ..processors import threads
from ..processors.threads import CALL_OFF_PATIENCE_S
from .outcomes import Outcomes
from .state import DispatchState

log = logging.getLogger("filedispatch.dispatcher")

#: the fates that act on the source file
ACTS = (Fate.DELETE, Fate.DONE_DIR, Fate.FAILED_DIR)

#: seconds a rename into a ``done_dir`` or ``failed_dir`` seen to work goes on inline before
#: its folder is looked at again in a thread (a mount made there meanwhile)
INLINE_FOR_S = 60.0

#: seconds between two looks of ``--once`` at moves that may be stuck in hung folders
HUNG_LOOK_S = 0.5

#: what a refusal says is stuck in a folder a move is stuck in
MOVE_STUCK = "a move into it has been stuck in a system call"


class AfterActions:
    """Concludes versions and acts on their sources; keeps the moves running in threads."""

    def __init__(self, state: DispatchState, outcomes: Outcomes) -> None:
        self.state = state
        self.outcomes = outcomes
        #: ``done_dir`` or ``failed_dir`` -> the moves into it run in threads (``_run``)
        self._lanes: dict[Path, _Lane] = {}
        #: (folder, source folder) -> until when (``time.monotonic``) a move from the source
        #: into the folder is renamed inline: a rename there was seen to work (one filesystem),
        #: and no mount lies below the folder. Looked at again every INLINE_FOR_S
        self._inline: dict[tuple[Path, Path], float] = {}
        #: the same, for a folder where a rename was seen to fail (another filesystem): its
        #: moves copy at once, without a rename tried first
        self._copies: dict[tuple[Path, Path], float] = {}
        #: each ``done_dir`` and ``failed_dir`` -> its links resolved at start, those inside a
        #: source excepted (``real_outside``): the folder moved into, reached later without
        #: following any link (``sourcefile.held_folder``)
        self._real = {
            folder: self._resolved(folder)
            for src in state.config.sources
            for folder in (src.done_dir, src.failed_dir)
            if folder is not None
        }

    def _resolved(self, folder: Path) -> Path:
        """``folder`` resolved (``real_outside``): no link followed inside the sources."""
        return real_outside(folder, real_roots(self.state.config.sources))

    def fate_of(
        self,
        source: SourceConfig,
        steps: Sequence[Step | None],
        statuses: Sequence[Status],
        marked: bool,
    ) -> Fate:
        """``fate.fate``, with a marked file counted as delivered under ``--consume-marked``."""
        return fate(source, steps, statuses, marked=marked and not self.state.consume_marked)

    def conclude(
        self,
        source: SourceConfig,
        version: FileVersion,
        steps: Sequence[Step | None],
        statuses: list[Status],
        *,
        marked: bool = False,
        gone: bool = False,
    ) -> None:
        """Count a version whose rows are all final, and schedule its source's after-action
        (see fate.fate). ``gone``: the delivery already renamed the source away."""
        state = self.state
        if all(s == Status.SUCCEEDED for s in statuses):
            state.summary.processed += 1
        elif all(s in (Status.SUCCEEDED, Status.FAILED) for s in statuses):
            state.summary.failed += 1
            if state.source_stops(source):
                log.error(
                    "source %s stops dispatching after a failure (stop_on_error); "
                    "fix the cause and restart",
                    source.key,
                )
        what = self.fate_of(source, steps, statuses, marked)
        if what in ACTS and not gone:
            self.outcomes.when_durable(lambda: self.act(source, version, what), version)
        else:
            self.outcomes.forget_version(version)

    def act(self, source: SourceConfig, version: FileVersion, what: Fate) -> None:
        """Delete the source, or move it to done_dir or failed_dir, if it is still the very
        file that was delivered (same device, inode, size, mtime and ctime); a file that
        changed since is a new version, dispatched on its own, and stays.

        Inline (on the loop) only what touches nothing but the source's own filesystem: an
        unlink, and a rename into a folder seen to be on that filesystem lately (``_inline``:
        a thread hop per file would cost more than the work itself). Any other move goes to
        its folder's lane (``_Lane``), whose thread makes the folder, renames or copies: a
        ``done_dir`` on a mount that hangs must never hold the loop, not even for a mkdir.
        No move starts in a folder that hangs (a call into it is stuck: ``threads``): the
        file stays where it is, and a later scan moves it.
        """
        path = version.path
        try:
            st = sourcefile.seen_as(path, source.follow_symlinks)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot check %s after dispatch: %s", path, exc.strerror or exc)
            return
        if not version.same_file(st):
            log.info("%s changed since it was dispatched; it stays (a new version)", path)
            return
        try:
            same = functools.partial(sourcefile.same_at, version, source.follow_symlinks)
            if what is Fate.DELETE:  # a symbolic link itself, never its target
                relocate.consume(path, same, version.key)
                return
            folder = source.done_dir if what is Fate.DONE_DIR else source.failed_dir
            assert folder is not None
            target = folder / version.relpath
            threads.refuse_if_hung(str(target.parent))
            unchanged = functools.partial(_unchanged, version, source.follow_symlinks)
            into = self._real.get(folder)
            if into is None:  # a folder a reload brought
                into = self._real[folder] = self._resolved(folder)
            move = _Move(
                path, target, unchanged, source.path, same, into / version.relpath, version.key
            )
            if not self._renamed_inline(folder, move):
                self._queue(folder, move)
        except NetworkError as exc:
            self._stays(path, exc)
        except NewVersionError as exc:
            log.info("%s", exc)
        except OSError as exc:
            self._failed(path, f"after-action {what} on", exc)

    def _renamed_inline(self, folder: Path, move: _Move, look: bool = False) -> bool:
        """``move`` made on the loop, if a rename into ``folder`` was seen to work lately
        (``_inline``); whether it was. ``look``: first see that the source is still the file
        delivered (``act`` has just seen it; a move that waited in a lane has not). Raises
        OSError as ``rename_free`` does."""
        key = (folder, move.source)
        if self._inline.get(key, 0.0) <= time.monotonic() or (look and not _still(move)):
            return False
        try:
            with sourcefile.held_folder(move.into.parent) as there:
                _renamed(move, there / move.into.name)
            return True
        except fastpath.RenameUnavailable:
            del self._inline[key]
            return False

    def _failed(self, path: Path, doing: str, exc: Exception) -> None:
        """An after-action on ``path`` failed: counted (``--once`` exits 1) and said, unless
        the source is gone (moved or removed already, by a resumed row or a later scan's
        settling): nothing is left to move then."""
        if isinstance(exc, FileNotFoundError) and not os.path.lexists(path):
            log.info("%s on %s: it is gone already", doing, path)
            return
        self.state.summary.unmoved += 1
        text = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        log.error("%s %s failed: %s", doing, path, text)

    def _stays(self, path: Path, why: Exception) -> None:
        """``path`` is not moved now (its folder hangs); a later scan moves it."""
        self.state.summary.unmoved += 1
        log.warning("%s stays where it is (a later scan moves it): %s", path, why)

    def _queue(self, folder: Path, move: _Move) -> None:
        lane = self._lanes.get(folder)
        if lane is None:
            lane = self._lanes[folder] = _Lane()
        lane.waiting.append(move)
        if lane.task is None:
            lane.task = asyncio.get_running_loop().create_task(self._run(folder, lane))

    async def _run(self, folder: Path, lane: _Lane) -> None:
        """The moves into ``folder``, one at a time, each in a daemon thread: never the loop's
        default executor, whose threads moves stuck in a hung folder would take one by one,
        and whose exit joins them. A cancellation (the stop, once its grace is over) calls the
        running move off as a copy's is (its ``check`` raises at its next piece, before its
        rename; ``asyncutil.thread_to_its_end``: waited for CALL_OFF_PATIENCE_S at most); its
        file, and those waiting, stay, moved at a later start."""
        try:
            while lane.waiting:
                move = lane.running = lane.waiting.popleft()
                try:
                    threads.refuse_if_hung(str(move.target.parent))
                    if not self._renamed_inline(folder, move, look=True):
                        await self._one(folder, lane, move)
                except NetworkError as exc:
                    self._stays(move.path, exc)
                except NewVersionError as exc:
                    log.info("%s", exc)
                except Exception as exc:  # said here: nobody awaits this task
                    self._failed(move.path, "after-action: moving", exc)
        finally:
            lane.running = None
            lane.task = None
            if not lane.waiting:
                del self._lanes[folder]

    async def _one(self, folder: Path, lane: _Lane, move: _Move) -> None:
        """``move`` in a daemon thread, watched: a move that has made no progress (no piece
        of its copy, no step) for CALL_OFF_PATIENCE_S is stuck in a system call, and marks
        ``folder`` hung (``threads.mark_stuck``; not called off: it may yet end) while it
        lasts; the moves waiting behind it stay where they are."""
        loop = asyncio.get_running_loop()
        key = (folder, move.source)
        rename = self._copies.get(key, 0.0) <= time.monotonic()
        off = threading.Event()
        ended = _Ended()
        progress: list[float | None] = [None]

        def check() -> None:
            if off.is_set():
                raise CalledOff
            progress[0] = time.monotonic()

        def job() -> tuple[Path, bool] | None:
            try:
                return _place(move, check, rename)
            finally:
                ended.end()

        said = (
            f"a move into it has made no progress for {CALL_OFF_PATIENCE_S:g}s (stuck in a "
            "system call: a hung disk or mount?); files to move there stay in their source "
            "folders, moved by a later scan once it has ended"
        )

        def stuck(fut: asyncio.Future[Any]) -> None:
            # alone: a move's stall may be its source's (a scanner holding its open), and a
            # mark widened from it would refuse healthy destinations of that filesystem
            threads.mark_stuck(str(folder), fut, said, stuck=MOVE_STUCK, alone=True)

        def look() -> None:  # on the loop, every CALL_OFF_PATIENCE_S while the move runs
            last, now = progress[0], time.monotonic()
            if last is not None and now - last >= CALL_OFF_PATIENCE_S:
                if threads.hung_above(str(folder)) is None and (fut := ended.future(loop)):
                    stuck(fut)
                while lane.waiting:
                    self._stays(lane.waiting.popleft().path, NetworkError(said))
                last = now  # looked at again a patience later
            wait = CALL_OFF_PATIENCE_S if last is None else last + CALL_OFF_PATIENCE_S - now
            timer[0] = loop.call_later(max(wait, 0.1), look)

        timer = [loop.call_later(CALL_OFF_PATIENCE_S, look)]
        try:
            done = await thread_to_its_end(off, job, CALL_OFF_PATIENCE_S, stuck)
        finally:
            timer[0].cancel()
        if done is None:
            return
        if not done[1]:
            self._copies[key] = time.monotonic() + INLINE_FOR_S
        elif not threads.mounts_below(str(folder)):
            self._inline[key] = time.monotonic() + INLINE_FOR_S

    async def moves_idle(self) -> None:
        """Wait until no move to a ``done_dir`` or ``failed_dir`` runs or waits, or until each
        one left has been stuck in a hung folder (``threads.hung_above``) for
        ``shutdown_grace`` (``--once``: a hung mount must not make it run for ever; those
        files stay, and the stop calls their moves off). A cancellation of this wait leaves
        them running."""
        loop = asyncio.get_running_loop()
        hung_since: float | None = None
        while tasks := [lane.task for lane in self._lanes.values() if lane.task is not None]:
            if all(threads.hung_above(str(f)) for f, lane in self._lanes.items() if lane.task):
                hung_since = loop.time() if hung_since is None else hung_since
                if loop.time() - hung_since >= self.state.config.shutdown_grace:
                    return
            else:
                hung_since = None
            await asyncio.wait(tasks, timeout=HUNG_LOOK_S)

    async def moves_done(self) -> None:
        """Wait for the after-actions running in threads (moves to another filesystem). A
        cancellation (the stop's grace is over) calls them off, and waits for each at most
        CALL_OFF_PATIENCE_S (one stuck in a hung folder's system call is left to its daemon
        thread: an interrupted move is safe, ``relocate.move_by_copy``)."""
        try:
            while tasks := [lane.task for lane in self._lanes.values() if lane.task is not None]:
                await asyncio.wait(tasks)
        except asyncio.CancelledError:
            left = [lane for lane in self._lanes.values() if lane.task is not None]
            files = sum(len(lane.waiting) + (lane.running is not None) for lane in left)
            for lane in left:
                self.state.summary.unmoved += len(lane.waiting) + (lane.running is not None)
                lane.waiting.clear()
                assert lane.task is not None
                lane.task.cancel()
            if left:
                log.warning(
                    "%d move(s) to a done_dir or failed_dir called off at the stop; their "
                    "files stay, moved at a later start",
                    files,
                )
                await asyncio.wait([lane.task for lane in left if lane.task is not None])
            raise


@dataclass(frozen=True)
class _Move:
    """A delivered file to move (``path`` of the source ``source``) to ``target``, if
    ``unchanged()`` still says it is the file delivered."""

    path: Path
    target: Path
    unchanged: Callable[[], bool]
    source: Path
    #: whether the file at a path is the one delivered (``relocate.consume``)
    same: Callable[[Path], bool]
    #: ``target`` under its folder's real path, as resolved at start: where the file goes,
    #: reached without following a link (``sourcefile.held_folder``)
    into: Path
    #: the journal's key of the version delivered (``relocate.consume``)
    key: str


@dataclass
class _Lane:
    """The moves into one ``done_dir`` or ``failed_dir``: one at a time, so that a hung one
    holds one thread, not one per file."""

    waiting: deque[_Move] = field(default_factory=deque)
    running: _Move | None = None
    task: asyncio.Task[None] | None = None


def _place(move: _Move, check: Callable[[], None], rename: bool) -> tuple[Path, bool] | None:
    """In a lane's thread: make ``move``'s folder and rename the file into it, or where no
    rename can (or ``rename`` is false), copy it (``relocate.move_by_copy``, which sees the
    source unchanged itself); the folder is reached without following a link and held open
    meanwhile (``sourcefile.held_folder``). Returns where it went and whether by a rename; None
    if the source is gone."""
    check()
    with sourcefile.held_folder(move.into.parent) as there:
        check()
        target = there / move.into.name
        if not rename:
            return _copied(move, target, check), False
        try:
            if not move.unchanged():
                raise NewVersionError(
                    f"{move.path} changed since it was dispatched; it stays (a new version)"
                )
        except FileNotFoundError:
            return None
        try:
            return move.into.with_name(_renamed(move, target).name), True
        except fastpath.RenameUnavailable:
            return _copied(move, target, check), False


def _copied(move: _Move, target: Path, check: Callable[[], None]) -> Path:
    """``move``'s file copied to ``target`` (a name in its folder held open), then its source
    removed (``relocate.move_by_copy``); returns where the file went, by its real path."""
    placed = relocate.move_by_copy(
        move.path,
        target,
        move.unchanged,
        check,
        any_free_name=True,
        same=move.same,
        key=move.key,
    )
    return move.into.with_name(placed.name)


def _renamed(move: _Move, target: Path) -> Path:
    """``move``'s file renamed to ``target`` (a name in its folder held open), then looked at
    there: a rename takes whatever the name holds by then, and a new version renamed over the
    source since it was last looked at is not the file delivered: it is put back
    (``relocate.put_back``), to be dispatched on its own, and OSError raised. Returns where
    the file went."""
    placed = relocate.rename_free(move.path, target)
    if not relocate.meant_or_put_back(placed, move.path, move.same):
        raise NewVersionError(f"{move.path} changed as it was moved; the new version stays")
    return placed


def _still(move: _Move) -> bool:
    """Whether ``move``'s source is still the file delivered (a look on its own filesystem,
    as ``act`` makes), before a move waiting in a lane is renamed inline."""
    try:
        return move.unchanged()
    except OSError:
        return False  # gone, or not to be seen: the thread's move says why


class _Ended:
    """Whether a lane thread's work has ended, as a future made only when one is asked for
    (a stuck move's mark): none for a move that ends in time, which is nearly every one."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ended = False
        self._fut: asyncio.Future[None] | None = None

    def end(self) -> None:
        """Said by the thread as its work ends."""
        with self._lock:
            self._ended = True
            fut = self._fut
        if fut is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed
                fut.get_loop().call_soon_threadsafe(_finish, fut)

    def future(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None] | None:
        """A future done once the work has ended; None if it has already."""
        with self._lock:
            if self._ended:
                return None
            if self._fut is None:
                self._fut = loop.create_future()
            return self._fut


def _finish(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


def _unchanged(version: FileVersion, follow_symlinks: bool) -> bool:
    """Whether the source is still the very file of ``version`` (for a move by copy)."""
    return version.same_file(sourcefile.seen_as(version.path, follow_symlinks))


def check_unchanged(version: FileVersion, follow_symlinks: bool) -> str | None:
    """Before a retry: time has passed, and a source that changed since (a chmod, a rewrite)
    is a new version, dispatched on its own; this one must not send its bytes too. Returns
    why this version cannot be sent any more, or None. An error other than a vanished file
    is left to the delivery, which meets it again and says why."""
    try:
        st = sourcefile.seen_as(version.path, follow_symlinks)
    except FileNotFoundError:
        return f"the file {version.path} vanished before it was sent"
    except OSError:
        return None
    return None if version.same_file(st) else sourcefile.describe_change(version, st)
