"""The SQLite journal: one row per (file version, destination step); the plan, backlog and history.

All writes go through one writer that commits many callers' changes in one transaction (group
commit), run whole on its own thread in one hop: driving a transaction statement by statement
through aiosqlite cost a loop round trip per statement, which capped dispatching near 2,000
files/s on a busy loop. Reads use an aiosqlite connection, so history queries never wait for
dispatching. The journal never touches files and never calls a processor.

A write the disk refuses (full, I/O error, read-only, locked too long) or a journal file removed
or replaced under the service is not an error for the caller: the writer keeps the batch, says
so once (``health``, ``writable``), retries it with a capped backoff and commits it when it can.

``SqliteJournal`` here is the lifecycle and the write path (plan, claim, finish); its parts:
``sqlite_writer`` (the group-commit thread), ``sqlite_schema`` (opening the file, migrations,
what an error code means), ``sqlite_upkeep`` (history edits, retention), ``sqlite_reads``
(the read-only pools and looks); the history reads are ``reads.SqlReads``, shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from ..errors import JournalError
from ..models import Dispatch, FileVersion
from . import identity
from .base import (
    HealthReport,
    NodeInfo,
    PlannedStep,
    StepResult,
    finish_params,
    planned_labels,
)
from .base import stored_text as _text
from .reads import COLUMNS, claimed_groups
from .sqlite_reads import SqliteReader
from .sqlite_schema import bulk_ok, connect_writer, journal_token, open_error
from .sqlite_upkeep import SqliteUpkeep
from .sqlite_writer import GroupWriter, Op, Rows, nothing
from .uploads import UploadRecords

T = TypeVar("T")


_FINISH = (
    "UPDATE dispatches SET status=?, attempts=?, reason=?, error_type=?, location=?, detail=?, "
    "finished=?, duration_ms=?, next_attempt=?, output=COALESCE(?, output), "
    "sha256=COALESCE(?, sha256) WHERE id=?"
)
_FINISH_BULK = (
    "UPDATE dispatches SET status=r.value->>0, attempts=r.value->>1, reason=r.value->>2, "
    "error_type=r.value->>3, location=r.value->>4, detail=r.value->>5, finished=r.value->>6, "
    "duration_ms=r.value->>7, next_attempt=r.value->>8, "
    "output=COALESCE(r.value->>9, output), sha256=COALESCE(r.value->>10, sha256) "
    "FROM json_each(?) AS r WHERE dispatches.id=r.value->>11"
)


#: new rows, one parameter tuple each (``_plan_params``)
_PLAN = (
    "INSERT OR IGNORE INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
    "mtime_ns, rule, step, step_key, destination, protocol, dev, ino, ctime_ns, btime_ns, status, "
    "created, started) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,'{status}',?,{started})"
)


#: the same rows as one JSON array, inserted IN_PROGRESS (``plan_started``)
_PLAN_BULK = (
    "INSERT OR IGNORE INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
    "mtime_ns, rule, step, step_key, destination, protocol, dev, ino, ctime_ns, btime_ns, status, "
    "created, started, node) SELECT value->>0, value->>1, value->>2, value->>3, value->>4, "
    "value->>5, value->>6, value->>7, value->>8, value->>9, value->>10, value->>11, value->>12, "
    "value->>13, value->>14, value->>15, value->>16, 'IN_PROGRESS', ?2, ?2, ?3 "
    "FROM json_each(?1)"
)


def _plan_params(steps: Iterable[PlannedStep], now: float) -> list[tuple[Any, ...]]:
    return [
        (
            s.version.key,
            _text(s.version.source),
            str(s.version.root),
            _text(s.version.relpath),
            _text(s.version.name),
            _text(s.version.extension),
            s.version.size,
            _int64(s.version.mtime_ns),
            s.rule,
            s.step,
            s.step_key,
            _text(s.destination),
            s.protocol,
            _int64(s.version.dev) or None,
            _int64(s.version.ino) or None,
            _int64(s.version.ctime_ns) or None,
            None if s.version.btime_ns is None else _int64(s.version.btime_ns),
            now,
        )
        for s in steps
    ]


_INT64 = range(-(2**63), 2**63)


def _set_labels(conn: sqlite3.Connection, steps: Iterable[PlannedStep]) -> None:
    """Record the learned labels of rows just planned (in their transaction); a row planned
    before keeps the label it was given then, as its delivery may already have used it."""
    labelled = planned_labels(steps)
    if labelled:
        conn.executemany(
            "UPDATE dispatches SET label=? WHERE vkey=? AND step_key=? AND label IS NULL",
            labelled,
        )


def _int64(value: int) -> int | bytes:
    """A number from stat() as SQLite can keep it exactly.

    SQLite integers are signed 64-bit (and it turns larger ones into lossy REALs), but an mtime
    in nanoseconds passes 2**63 after 2262-04-11 (ext4 stores dates up to 2446, tmpfs far
    beyond) and inode and device numbers are unsigned 64-bit. Such a value is stored as its
    decimal digits in a BLOB, which no column affinity converts; ``number`` reads it back.
    """
    return value if value in _INT64 else str(value).encode()


def _json(params: list[tuple[Any, ...]]) -> str | None:
    """The rows as one JSON array; None when a row holds a BLOB-kept number (JSON has none)."""
    try:
        return json.dumps(params)
    except TypeError:
        return None


class SqliteJournal(SqliteUpkeep, UploadRecords, identity.Named):
    """The journal in one SQLite file; open it with ``async with SqliteJournal.open(path)``."""

    #: one service holds the file: every upload another run began is an orphan
    _GONE = "epoch <> ?"

    def __init__(
        self,
        path: Path,
        executor: ThreadPoolExecutor,
        conn: sqlite3.Connection,
        reader: aiosqlite.Connection,
        identity: tuple[int, int],
    ) -> None:
        HealthReport.__init__(self)
        self.path = path
        #: the one writer, on ``conn``; ``identity``: the (device, inode) the path must name
        self.writer = GroupWriter(path, executor, conn, identity, self._set_health)
        self._r = reader
        self._read_lock = asyncio.Lock()
        self.node: str | None = None  #: the implicit node's name, once joined
        self._lease_s = 0.0
        self._joined = 0.0
        #: this run's token on the uploads it begins (``UploadRecords``): new at each open
        self._run = time.time_ns()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, path: str | os.PathLike[str], /, *, hold: bool = True
    ) -> AsyncIterator[SqliteJournal]:
        """Open (create, migrate) the journal; raises JournalError with one line saying why
        not and what to do, JournalUnavailableError when waiting may help (a full disk).

        ``hold``: writes the journal refuses are held and retried (the service); without it
        they fail at once (one-shot commands).
        """
        path = Path(path).absolute()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o600))
        except OSError as exc:
            raise JournalError(f"cannot create the journal {path}: {exc.strerror or exc}") from exc
        loop = asyncio.get_running_loop()
        executor = ThreadPoolExecutor(1, thread_name_prefix="journal-writer")
        writer: sqlite3.Connection | None = None
        reader: aiosqlite.Connection | None = None
        try:
            writer = await loop.run_in_executor(executor, connect_writer, path)
            token, old, names = await loop.run_in_executor(executor, journal_token, writer, path)
            reader = await aiosqlite.connect(path, isolation_level=None)
            await reader.execute("PRAGMA busy_timeout = 10000")
            await reader.execute("PRAGMA query_only = 1")
            st = os.stat(path)
        except (sqlite3.Error, JournalError, OSError) as exc:
            if writer is not None:
                await loop.run_in_executor(executor, writer.close)
            if reader is not None:
                await reader.close()
            executor.shutdown()
            if isinstance(exc, JournalError):
                raise
            if isinstance(exc, OSError):
                raise JournalError(f"cannot open the journal {path}: {exc}") from exc
            raise open_error(exc, path) from exc
        if old is not None:
            identity.moved(str(path), old, token)
        journal = cls(path, executor, writer, reader, (st.st_dev, st.st_ino))
        journal.token = token
        journal.earlier, journal.plain_upto = names
        if not hold:
            journal.stop_retrying()
        journal.writer.bulk = await loop.run_in_executor(executor, bulk_ok, writer)
        journal.writer.start()
        try:
            yield journal
        finally:
            await journal._close()

    async def _close(self) -> None:
        finished = await self.writer.stop()
        await self._r.close()
        await self.writer.close(finished)

    @property
    def where(self) -> str:
        return str(self.path)

    def reader(self, size: int = 2) -> contextlib.AbstractAsyncContextManager[SqliteReader]:
        """A pool of ``size`` read-only connections of their own (the web app's)."""
        return SqliteReader.open(self.path, size)

    # ------------------------------------------------------------------ writes and reads

    def stop_retrying(self) -> None:
        """From now on a write the journal refuses fails at once (``JournalError``) rather than
        being held: a stopping service must not wait for a disk to be freed."""
        self.writer.stop_retrying()

    async def write(self, op: Op[T] | Rows) -> T:
        """Run ``op`` inside the next group commit and return its result once committed."""
        result: T = await self._enqueue(op)
        return result

    async def flush(self) -> None:
        """Return once every write queued before this call is committed."""
        await self.write(nothing)

    def _enqueue(self, op: Op[Any] | Rows, gather: bool = False) -> asyncio.Future[Any]:
        return self.writer.enqueue(op, gather)

    def _upload_rows(self, sql: str, params: list[tuple[Any, ...]]) -> asyncio.Future[None]:
        return self._enqueue(Rows(sql, params))

    def _upload_run(self) -> tuple[str | None, int | None]:
        return self.node, self._run

    def _gone_params(self) -> tuple[Any, ...]:
        return (self._run,)

    async def read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[Any]:
        """A read on the reader connection (sees everything committed)."""
        try:
            async with self._read_lock, self._r.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc

    # ------------------------------------------------------------------ planning and work

    async def plan(self, steps: Iterable[PlannedStep], now: float | None = None) -> int:
        """Insert PENDING rows for steps not planned before; returns how many are new."""
        now = time.time() if now is None else now
        steps = list(steps)
        params = _plan_params(steps, now)
        if not params:
            return 0

        def op(conn: sqlite3.Connection) -> int:
            # executemany, not the JSON form: rows a rescan offers again are mostly known, and
            # the JSON form parses every row's fields before the unique key turns it away;
            # rowcount, not total_changes, which counts the rollup's trigger changes too
            new = conn.executemany(_PLAN.format(status="PENDING", started="NULL"), params).rowcount
            _set_labels(conn, steps)
            return new

        return await self.write(op)

    def plan_started(
        self, steps: Sequence[PlannedStep], now: float
    ) -> asyncio.Future[list[int | None]]:
        """Insert rows already IN_PROGRESS (work the caller starts at once, with no claim).

        The future gives each step's new row id, or None where the step was planned before
        (that row is left alone). Once it is done, a crash leaves the rows to be resumed at
        start-up. It is queued at once, so a caller can plan its next batch before it works
        on this one.
        """
        params = _plan_params(steps, now)

        def op(conn: sqlite3.Connection) -> list[int | None]:
            # rowids grow past the largest one, and only this thread writes: the new rows are
            # the ones above the old maximum
            top = conn.execute("SELECT COALESCE(MAX(id), 0) FROM dispatches").fetchone()[0]
            payload = _json(params) if self.writer.bulk else None
            if payload is not None:  # one statement, and one row back: no GIL hand-over per row
                conn.execute(_PLAN_BULK, (payload, now, self.node))
                new = json.loads(
                    conn.execute(
                        "SELECT json_group_object(vkey || step_key, id) FROM dispatches "
                        "WHERE id > ?",
                        (top,),
                    ).fetchone()[0]
                )
            else:
                conn.executemany(_PLAN.format(status="IN_PROGRESS", started="?18"), params)
                if self.node is not None:
                    conn.execute("UPDATE dispatches SET node=? WHERE id > ?", (self.node, top))
                new = dict(
                    conn.execute("SELECT vkey || step_key, id FROM dispatches WHERE id > ?", (top,))
                )
            return [new.pop(p[0] + p[10], None) for p in params]  # a repeat gets None

        return self._enqueue(op)

    # ------------------------------------------------------------------ the one node

    async def join(
        self,
        node: str,
        lease_s: float,
        shared: frozenset[str] = frozenset(),
    ) -> int:
        """SQLite has one implicit node: its name goes on the rows it claims; epoch 0."""
        self.node, self._lease_s, self._joined = node, lease_s, time.time()
        return 0

    async def renew(self) -> bool:
        """The one node's lease never runs out."""
        return True

    async def take_listing(self, source: str) -> bool:
        """The one node lists every source."""
        return True

    async def leave(self) -> None:
        """Nothing to give up."""

    async def nodes(self) -> list[NodeInfo]:
        """The implicit node (none before ``join``)."""
        if self.node is None:
            return []
        [(busy, waiting)] = await self.read(
            "SELECT COALESCE(SUM(status='IN_PROGRESS'), 0), COALESCE(SUM(status='PENDING'), 0) "
            "FROM dispatches WHERE status IN ('IN_PROGRESS', 'PENDING')"
        )
        return [NodeInfo(self.node, True, self._lease_s, 0.0, self._joined, (), busy, waiting)]

    def forget_nodes(self, after_s: float) -> asyncio.Future[list[str]]:
        """The one node is never forgotten."""
        done: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        done.set_result([])
        return done

    async def hand_over(self, old: str, new: str) -> int:
        """An SQLite journal has one node: nothing to hand over."""
        raise JournalError(
            f"the journal {self.path} is an SQLite file, used by one service only: its work "
            "is that service's whatever its node name, and there is nothing to hand over"
        )

    async def record_failed_name(self, version: FileVersion, rule: str, reason: str) -> None:
        """A file that cannot even be planned (an undecodable name): one FAILED row says why."""
        now = time.time()
        await self.plan([PlannedStep(version, rule, 0, "name", "-", "-")], now)

        def op(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE dispatches SET status='FAILED', reason=?, finished=? "
                "WHERE vkey=? AND step_key='name' AND status='PENDING'",
                (reason, now, version.key),
            )

        await self.write(op)

    async def claim(
        self, limit: int, now: float, skip_sources: frozenset[str] = frozenset()
    ) -> list[list[Dispatch]]:
        """Take due PENDING work, grouped by file version (all of a version's rows, any status).

        The due PENDING rows of the returned versions are marked IN_PROGRESS in the same
        transaction, so a crash leaves them recognisable as possibly started.
        """

        def op(conn: sqlite3.Connection) -> list[list[Dispatch]]:
            # the partial index walks PENDING rows in arrival order and stops at the LIMIT
            found = conn.execute(
                "SELECT vkey, source FROM dispatches INDEXED BY dispatches_pending "
                "WHERE status='PENDING' AND next_attempt <= ? ORDER BY id LIMIT ?",
                (now, limit * 4),
            ).fetchall()
            vkeys = list(dict.fromkeys(v for v, s in found if s not in skip_sources))[:limit]
            if not vkeys:
                return []
            marks = ",".join("?" * len(vkeys))
            rows = conn.execute(
                f"SELECT vkey, step_key, {COLUMNS} FROM dispatches WHERE vkey IN ({marks}) "
                "ORDER BY rule, step, id",
                vkeys,
            ).fetchall()
            conn.execute(
                # ``started`` is the first try's (the retry policy's ``for`` counts from it)
                "UPDATE dispatches SET status='IN_PROGRESS', started=COALESCE(started, ?), node=? "
                f"WHERE vkey IN ({marks}) AND status='PENDING' AND next_attempt <= ?",
                (now, self.node, *vkeys, now),
            )
            return claimed_groups(vkeys, rows, now)

        return await self.write(op)

    async def finish(self, results: Sequence[StepResult], now: float | None = None) -> None:
        """Record outcomes: SUCCEEDED/FAILED are final, PENDING waits for ``next_attempt``."""
        await self.finish_soon(results, now)

    def finish_soon(
        self, results: Sequence[StepResult], now: float | None = None
    ) -> asyncio.Future[None]:
        """Queue outcomes for the next group commit; the future is done once they are durable.

        Writes are committed in the order they were queued, so when this future is done every
        write queued before it is committed too.
        """
        params = finish_params(results, time.time() if now is None else now)
        return self._enqueue(Rows(_FINISH, params, _FINISH_BULK), gather=True)

    def resume_interrupted(self) -> asyncio.Future[int]:
        """At start-up: rows a crash left IN_PROGRESS become PENDING again, due at once.

        Queued, not awaited by the service: on a full disk it waits with the other writes, and
        every write queued after it (claims first of all) is committed after it.
        """

        def op(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE dispatches SET status='PENDING', next_attempt=0, "
                "detail='resumed after an interruption' WHERE status='IN_PROGRESS'"
            )
            return cur.rowcount

        return self._enqueue(op)
