"""The SQLite journal's one writer: a thread that commits every caller's queued writes in one
transaction (group commit), merging ``Rows`` of one statement; while the journal refuses
writes (a full disk, a file removed or replaced under the service) it holds the batch, says
so once and tries again. It runs what it is given; the statements are its callers'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from ..errors import JournalError
from .base import (
    RETRY_FIRST_S,
    RETRY_MAX_S,
    JournalHealth,
    JournalState,
    log,
    next_health,
    resolve,
)
from .sqlite_schema import outage

T = TypeVar("T")
#: a write: a function run on the writer thread inside the group transaction
Op = Callable[[sqlite3.Connection], T]


#: how often an idle writer checks that the path still names the open journal
IDENTITY_EVERY_S = 2.0


class _Held(Exception):  # never reaches a caller: the batch is held
    """On the writer thread: the journal cannot take this batch now."""

    def __init__(self, state: JournalState, error: str) -> None:
        super().__init__(error)
        self.state = state
        self.error = error


@dataclass(frozen=True, slots=True)
class Rows:
    """A write of many parameter rows for one statement; the writer merges these.

    ``bulk`` is the same write as one statement over a JSON array of the rows: SQLite then
    runs every row in one call, with the GIL released, instead of handing the GIL back and
    forth with the event loop once per row.
    """

    sql: str
    params: list[tuple[Any, ...]]
    bulk: str | None = None


def _distinct_ids(params: list[tuple[Any, ...]]) -> bool:
    """A bulk update applies rows in no set order: only safe when each id comes once."""
    return len({p[-1] for p in params}) == len(params)


def nothing(conn: sqlite3.Connection) -> None:
    """A write that changes nothing: committed after everything queued before it."""


class _Inbox(queue.SimpleQueue[tuple[Op[Any] | Rows, asyncio.Future[Any]] | None]):
    """The writer thread's queue. Rows of one statement gathered in one turn of the event loop
    (outcomes of workers that finish together) go into it as one item at the end of the turn,
    not one item each: fewer wake-ups of the writer thread, so fewer hand-overs of the GIL.
    Any other item put in the same turn (a write, the close's None) hands them over first, so
    the queue order holds. Only the loop's thread puts; the writer thread only takes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: the statement gathered, its rows and their callers' futures, not handed over yet
        self.gathered: tuple[Rows, list[Any], list[asyncio.Future[None]]] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.hand_over()  # gathered before this item: committed before it too
        super().put(item)

    def gather(self, rows: Rows) -> asyncio.Future[None]:
        """Queue ``rows`` for the end of this turn, with the rows of the same statement
        gathered in it; the future is done once they are durable."""
        if self.gathered is not None and self.gathered[0].sql != rows.sql:
            self.hand_over()
        fut: asyncio.Future[None] = self.loop.create_future()
        if self.gathered is None:
            self.gathered = (rows, [], [])
            self.loop.call_soon(self.hand_over)
        self.gathered[1].extend(rows.params)
        self.gathered[2].append(fut)
        return fut

    def hand_over(self) -> None:
        gathered, self.gathered = self.gathered, None
        if gathered is None:
            return
        rows, params, futures = gathered
        batch: asyncio.Future[None] = self.loop.create_future()

        def settle(done: asyncio.Future[None]) -> None:
            error = JournalError("cancelled") if done.cancelled() else done.exception()
            resolve(futures, [error] * len(futures))

        batch.add_done_callback(settle)
        super().put((Rows(rows.sql, params, rows.bulk), batch))


class GroupWriter:
    """Commits queued writes on its own thread, many callers' in one transaction."""

    def __init__(
        self,
        path: Path,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
        identity: tuple[int, int],
        health: Callable[[JournalHealth], None],
    ) -> None:
        self.path = path
        self._executor = executor
        self._conn = conn  # used only on the executor's single thread
        # Writes go straight to the writer thread, not through a task on the loop: a loop busy
        # moving a burst of files must not hold back the commits that work is waiting for.
        self._loop = asyncio.get_running_loop()
        self._inbox = _Inbox(self._loop)
        self.bulk = False  #: the SQLite can run a batch of rows as one JSON statement
        self._thread: asyncio.Future[None] | None = None
        #: (device, inode) of the open database: the path must keep naming this file
        self._identity = identity
        #: set: a write the journal refuses fails at once instead of being held (stopping)
        self._give_up = threading.Event()
        self._held: JournalHealth = JournalHealth()  # the writer thread's view
        self._set_health = health  #: told on the loop when the writer's view changes

    def start(self) -> None:
        """Start the thread (on the executor's one worker)."""
        self._thread = self._loop.run_in_executor(self._executor, self._run)

    async def stop(self) -> bool:
        """Commit what is queued and end the thread (within 30 s); a write nobody will commit
        then fails with JournalError. False if the thread did not finish in time."""
        thread, self._thread = self._thread, None
        finished = True
        if thread is not None:
            self.stop_retrying()
            self._inbox.put(None)  # commit what is queued, then stop
            try:
                await asyncio.wait_for(asyncio.shield(thread), 30)
            except TimeoutError:
                finished = False
                log.error("the journal writer did not finish within 30s; closing without it")
        while not self._inbox.empty():  # a write nobody will commit must not hang its caller
            item = self._inbox.get_nowait()
            if item is not None and not item[1].done():
                item[1].set_exception(JournalError("the journal is closed"))
        return finished

    async def close(self, finished: bool) -> None:
        """After ``stop``: close the connection on its thread (if the thread finished, else
        it is left to it) and the executor."""
        if finished:
            await self._loop.run_in_executor(self._executor, self._conn.close)
        self._executor.shutdown(wait=finished)

    def enqueue(self, op: Op[Any] | Rows, gather: bool = False) -> asyncio.Future[Any]:
        """Queue ``op`` for the next group commit; the future gives its result once committed.
        ``gather``: rows (no result wanted) that may go with the same statement's other rows
        of this turn of the loop, as one item (``_Inbox``)."""
        if self._thread is None or self._thread.done():
            raise JournalError("the journal is closed")
        if gather and isinstance(op, Rows):
            return self._inbox.gather(op)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._inbox.put((op, fut))
        return fut

    def _run(self) -> None:
        """The writer thread: take what is queued, commit it as one transaction, report back."""
        while True:
            try:
                first = self._inbox.get(timeout=IDENTITY_EVERY_S)
            except queue.Empty:
                self._check_while_idle()
                continue
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < 5000:
                try:
                    item = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                    break
                batch.append(item)
            try:
                results = self._commit_held([op for op, _ in batch])
            except JournalError as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # sqlite3.Error, or a bug in an op: fail this batch only
                log.error("journal write failed: %s", exc)
                results = [JournalError(f"journal write failed: {exc}")] * len(batch)
            try:
                self._loop.call_soon_threadsafe(resolve, [fut for _, fut in batch], results)
            except RuntimeError:  # the loop is gone: nobody is waiting any more
                return
            if stop:
                return

    def _commit_held(self, ops: list[Op[Any] | Rows]) -> list[Any]:
        """On the writer thread: commit ``ops``; while the journal refuses them, hold them and
        try again (1 s doubling to 30 s) until they are committed, or until ``stop_retrying``.

        Callers keep waiting meanwhile, so nothing that waits for a write (a claim, a planned
        row, an after-action) goes ahead of the journal.
        """
        delay = RETRY_FIRST_S
        while True:
            if self._give_up.is_set() and not self._held.ok:
                raise JournalError(f"not recorded, the journal is failing: {self._held.error}")
            try:
                self._check_identity()
                results = self._commit(ops)
            except (sqlite3.Error, _Held) as exc:
                held = exc if isinstance(exc, _Held) else None
                why = held.error if held else outage(exc, self.path)
                if why is None:
                    raise
                self._report(held.state if held else JournalState.FAILING, why)
                if self._give_up.is_set():
                    raise JournalError(f"not recorded, the journal is failing: {why}") from exc
                self._give_up.wait(delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if not self._held.ok:
                self._report(JournalState.OK, None)
            return results

    def _check_identity(self) -> None:
        """Raise ``_Held`` unless the path still names the open database (same device, inode):
        a write into a journal that was removed or replaced would be lost at the next start."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            raise _Held(
                JournalState.REMOVED,
                f"the journal file {self.path} was removed or renamed while filedispatch ran: "
                "dispatching stops. Put the same file back to resume, or restart filedispatch "
                "(with an empty journal, files still in the sources are sent again)",
            ) from None
        except OSError as exc:
            raise _Held(
                JournalState.FAILING, f"cannot check the journal file {self.path}: {exc}"
            ) from None
        if (st.st_dev, st.st_ino) != self._identity:
            raise _Held(
                JournalState.REPLACED,
                f"the journal file {self.path} was replaced by another file while filedispatch "
                "ran: dispatching stops. Put the original back to resume, or restart "
                "filedispatch to use the new file",
            )

    def _check_while_idle(self) -> None:
        """No write queued: still notice a removed or replaced file (and its return)."""
        try:
            self._check_identity()
        except _Held as held:
            if (held.state, held.error) != (self._held.state, self._held.error):
                self._report(held.state, held.error)
            return
        if self._held.state in (JournalState.REMOVED, JournalState.REPLACED):
            self._report(JournalState.OK, None)

    def _report(self, state: JournalState, error: str | None) -> None:
        """On the writer thread: record an attempt's outcome, log a change once, tell the loop."""
        now = next_health(self._held, state, error, str(self.path), self._give_up.is_set())
        self._held = now
        with contextlib.suppress(RuntimeError):  # the loop is gone
            self._loop.call_soon_threadsafe(self._set_health, now)

    def stop_retrying(self) -> None:
        """From now on a write the journal refuses fails at once (``JournalError``) rather than
        being held: a stopping service must not wait for a disk to be freed."""
        self._give_up.set()

    def _commit(self, ops: list[Op[Any] | Rows]) -> list[Any]:
        """On the writer thread: one transaction for every op; ``Rows`` of one statement merged."""
        conn = self._conn
        results: list[Any] = []
        conn.execute("BEGIN IMMEDIATE")
        try:
            i = 0
            while i < len(ops):
                op = ops[i]
                if isinstance(op, Rows):
                    j, params = i, list(op.params)
                    while j + 1 < len(ops):
                        nxt = ops[j + 1]
                        if not isinstance(nxt, Rows) or nxt.sql != op.sql:
                            break
                        params += nxt.params
                        j += 1
                    try:
                        if op.bulk and self.bulk and _distinct_ids(params):
                            conn.execute(op.bulk, (json.dumps(params),))
                        else:
                            conn.executemany(op.sql, params)
                        res: Any = None
                    except sqlite3.Error as exc:
                        if outage(exc, self.path):
                            raise  # the whole transaction is held and tried again
                        res = JournalError(str(exc))
                    results += [res] * (j - i + 1)
                    i = j + 1
                    continue
                try:
                    results.append(op(conn))
                except sqlite3.Error as exc:
                    if outage(exc, self.path):
                        raise
                    results.append(JournalError(str(exc)))
                i += 1
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results
