"""After-actions: a version whose rows are final is counted, and its source deleted, moved to
``done_dir`` or to ``failed_dir``, as ``fate.fate`` says.

Acts only once the journal has committed the outcomes (``Outcomes.when_durable``), and only on
the very file that was delivered. Never decides the fate itself, never writes the journal.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import stat
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

from .. import fastpath, relocate, sourcefile
from ..asyncutil import CalledOff, thread_to_its_end
from ..config import SourceConfig, Step
from ..errors import NetworkError
from ..fate import Fate, fate
from ..models import FileVersion, Status
from ..processors import threads
from ..processors.threads import CALL_OFF_PATIENCE_S
from .outcomes import Outcomes
from .state import DispatchState

log = logging.getLogger("filedispatch.dispatcher")

#: the fates that act on the source file
ACTS = (Fate.DELETE, Fate.DONE_DIR, Fate.FAILED_DIR)


class AfterActions:
    """Concludes versions and acts on their sources; keeps the moves running in threads."""

    def __init__(self, state: DispatchState, outcomes: Outcomes) -> None:
        self.state = state
        self.outcomes = outcomes
        #: after-actions that move a file to another filesystem, each a task that waits its
        #: turn in its folder, then copies in a daemon thread
        self._moving: set[asyncio.Task[None]] = set()
        #: folder moved into -> its lock: one move by copy at a time per ``done_dir`` or
        #: ``failed_dir``, so a hung one holds one thread, not one per file
        self._lanes: dict[Path, asyncio.Lock] = {}

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

        Inline: an unlink or a same-filesystem rename is one quick syscall, and a thread hop
        per file would cost more than the work itself. A move to another filesystem copies
        the bytes, so it runs in a daemon thread, one at a time per folder (``_move``). No
        move starts in a folder that hangs (a call into it is stuck: ``threads``): the file
        stays where it is, and a later scan moves it.
        """
        path = version.path
        try:
            st = _identity(path, source.follow_symlinks)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot check %s after dispatch: %s", path, exc.strerror or exc)
            return
        if not version.same_file(st):
            log.info("%s changed since it was dispatched; it stays (a new version)", path)
            return
        try:
            if what is Fate.DELETE:
                os.unlink(path)  # a symbolic link itself, never its target
                return
            folder = source.done_dir if what is Fate.DONE_DIR else source.failed_dir
            assert folder is not None
            target = folder / version.relpath
            threads.refuse_if_hung(str(target.parent))
            target.parent.mkdir(parents=True, exist_ok=True)
            relocate.rename_free(path, target)
        except fastpath.RenameUnavailable:
            assert folder is not None
            unchanged = functools.partial(_unchanged, version, source.follow_symlinks)
            move = functools.partial(
                relocate.move_by_copy, path, target, unchanged, any_free_name=True
            )  # told a check that raises once the move is called off (see _move)
            task = asyncio.get_running_loop().create_task(self._move(folder, path, move))
            self._moving.add(task)
            task.add_done_callback(self._moving.discard)
        except NetworkError as exc:
            log.warning("%s stays where it is (a later scan moves it): %s", path, exc)
        except OSError as exc:
            log.error("after-action %s on %s failed: %s", what, path, exc.strerror or exc)

    async def _move(
        self, folder: Path, path: Path, move: Callable[[Callable[[], None]], Path]
    ) -> None:
        """``move(check)`` (a move by copy into ``folder``) in a daemon thread once the moves
        before it into ``folder`` have ended: never the loop's default executor, whose
        threads moves stuck in a hung folder would take one by one, and whose exit joins
        them. A cancellation (the stop, once its grace is over) calls the move off as a
        copy's is (``check`` raises at its next piece, before its rename;
        ``asyncutil.thread_to_its_end``: waited for CALL_OFF_PATIENCE_S at most); its file
        stays, moved at a later start. A folder that hangs meanwhile is refused: the file
        stays, for a later scan."""
        lane = self._lanes.setdefault(folder, asyncio.Lock())
        off = threading.Event()

        def check() -> None:
            if off.is_set():
                raise CalledOff

        try:
            async with lane:
                threads.refuse_if_hung(str(folder))
                await thread_to_its_end(off, functools.partial(move, check), CALL_OFF_PATIENCE_S)
        except NetworkError as exc:
            log.warning("%s stays where it is (a later scan moves it): %s", path, exc)
        except Exception as exc:  # said here: nobody awaits this task
            log.error("after-action: moving %s by copying failed: %s", path, exc)

    async def moves_idle(self) -> None:
        """Wait until no move to another filesystem is running or waiting (a cancellation of
        this wait leaves them running)."""
        while self._moving:
            await asyncio.wait(set(self._moving))

    async def moves_done(self) -> None:
        """Wait for the after-actions running in threads (moves to another filesystem). A
        cancellation (the stop's grace is over) calls them off, and waits for each at most
        CALL_OFF_PATIENCE_S (one stuck in a hung folder's system call is left to its daemon
        thread: an interrupted move is safe, ``relocate.move_by_copy``)."""
        try:
            await self.moves_idle()
        except asyncio.CancelledError:
            left = set(self._moving)
            for task in left:
                task.cancel()
            if left:
                log.warning(
                    "%d move(s) to a done_dir or failed_dir called off at the stop; their "
                    "files stay, moved at a later start",
                    len(left),
                )
                await asyncio.wait(left)
            raise


def _identity(path: Path, follow_symlinks: bool) -> os.stat_result:
    """The source as its version saw it: the link's target where links are followed."""
    st = os.lstat(path)
    if follow_symlinks and stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    return st


def _unchanged(version: FileVersion, follow_symlinks: bool) -> bool:
    """Whether the source is still the very file of ``version`` (for a move by copy)."""
    return version.same_file(_identity(version.path, follow_symlinks))


def check_unchanged(version: FileVersion, follow_symlinks: bool) -> str | None:
    """Before a retry: time has passed, and a source that changed since (a chmod, a rewrite)
    is a new version, dispatched on its own; this one must not send its bytes too. Returns
    why this version cannot be sent any more, or None. An error other than a vanished file
    is left to the delivery, which meets it again and says why."""
    try:
        st = _identity(version.path, follow_symlinks)
    except FileNotFoundError:
        return f"the file {version.path} vanished before it was sent"
    except OSError:
        return None
    return None if version.same_file(st) else sourcefile.describe_change(version, st)
