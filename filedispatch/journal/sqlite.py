"""The SQLite journal: one row per (file version, destination step); the plan, backlog and history.

All writes go through one writer that commits many callers' changes in one transaction (group
commit), run whole on its own thread in one hop: driving a transaction statement by statement
through aiosqlite cost a loop round trip per statement, which capped dispatching near 2,000
files/s on a busy loop. Reads use an aiosqlite connection, so history queries never wait for
dispatching. The journal never touches files and never calls a processor.

A write the disk refuses (full, I/O error, read-only, locked too long) or a journal file removed
or replaced under the service is not an error for the caller: the writer keeps the batch, says
so once (``health``, ``writable``), retries it with a capped backoff and commits it when it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite

from ..errors import JournalError, JournalUnavailableError
from ..models import Dispatch, FileVersion, Status
from . import retention
from .base import (
    DUPLICATE_OF,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    HealthReport,
    JournalHealth,
    JournalState,
    NodeInfo,
    PlannedStep,
    StepResult,
    StepState,
    finish_params,
    log,
    next_health,
    planned_labels,
    resolve,
)
from .base import stored_text as _text
from .reads import COLUMNS, DELIVERED_DIGEST, SqlReads, claimed_groups

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


#: SQLite primary result codes that say the journal cannot be written now (not that this write
#: is wrong), with what the operator can do about each
_OUTAGES = {
    5: "the journal is locked by another process for too long (find it: fuser {path})",
    6: "the journal is locked by another process for too long (find it: fuser {path})",
    8: "the journal is read-only: make {path} and its folder writable",
    10: "the journal cannot be written (disk I/O error): check the disk of {path} (a full disk "
    "or a read-only remount also shows this way)",
    11: "the journal {path} is corrupted: stop filedispatch, move it aside and recover its "
    "rows (sqlite3 FILE .recover)",
    13: "the disk holding the journal {path} is full: free space there",
    14: "the journal {path} cannot be opened: check that its folder exists and is writable",
    15: "the journal is locked by another process for too long (find it: fuser {path})",
    26: "the journal {path} is not a database: stop filedispatch, move it aside and recover it "
    "(sqlite3 FILE .recover)",
}
#: of those, the ones a wait can cure when they are met while opening the journal
_TRANSIENT_AT_OPEN = frozenset({5, 6, 8, 10, 13, 15})


def _outage(exc: BaseException, path: Path) -> str | None:
    """One line for an SQLite error that means "the journal cannot be written now"; None for an
    error of one write (a constraint, a bad value), which fails that write alone."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or code is None or code & 0xFF not in _OUTAGES:
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    return f"{_OUTAGES[code & 0xFF].format(path=path)} ({exc}, {name})"


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


#: the stats rollups and the day number each counts a row under (UTC): its day (as
#: ``reads.SQLITE.day`` counts it), or the first day of its month
_ROLLUPS = {
    "stats_days": "CAST({row}.created / 86400 AS INTEGER)",
    "stats_months": "CAST(julianday({row}.created, 'unixepoch', 'start of month') "
    "- 2440587.5 AS INTEGER)",
}
#: a rollup's change for one row
_COUNT = (
    "INSERT INTO {table} VALUES ({bucket}, {row}.status, {row}.destination, {row}.extension, "
    "{sign}1, {sign}{row}.size) ON CONFLICT (day, status, destination, extension) "
    "DO UPDATE SET n = n + excluded.n, bytes = bytes + excluded.bytes"
)


def _counts(row: str, sign: str) -> str:
    """A trigger's statements: ``row`` (NEW or OLD) added to (or, ``-``, taken from) each
    rollup."""
    return "; ".join(
        _COUNT.format(table=table, bucket=bucket.format(row=row), row=row, sign=sign)
        for table, bucket in _ROLLUPS.items()
    )


MIGRATIONS: list[list[str]] = [
    [
        """CREATE TABLE dispatches (
            id INTEGER PRIMARY KEY,
            vkey TEXT NOT NULL,           -- hash of (source, relpath, size, mtime_ns)
            source TEXT NOT NULL,
            root TEXT NOT NULL,
            relpath TEXT NOT NULL,
            filename TEXT NOT NULL,
            extension TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            rule TEXT NOT NULL,
            step INTEGER NOT NULL,
            step_key TEXT NOT NULL,       -- identifies the step and the transforms before it
            destination TEXT NOT NULL,    -- redacted
            protocol TEXT NOT NULL,
            status TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            reason TEXT,
            error_type TEXT,
            location TEXT,
            detail TEXT,
            output TEXT,                  -- a file a transform step produced for later steps
            created REAL NOT NULL,
            started REAL,
            finished REAL,
            duration_ms INTEGER,
            next_attempt REAL NOT NULL DEFAULT 0,
            UNIQUE (vkey, step_key)
        )""",
        "CREATE INDEX dispatches_pending ON dispatches (id) WHERE status = 'PENDING'",
        "CREATE INDEX dispatches_due ON dispatches (next_attempt) WHERE status = 'PENDING'",
        "CREATE INDEX dispatches_vkey ON dispatches (vkey)",
        "CREATE INDEX dispatches_created ON dispatches (created)",
        "CREATE INDEX dispatches_status_created ON dispatches (status, created)",
        "CREATE INDEX dispatches_path ON dispatches (source, relpath)",
    ],
    [  # /metrics counts outcomes incrementally, by the time they finished
        "CREATE INDEX dispatches_finished ON dispatches (finished) WHERE finished IS NOT NULL",
    ],
    [  # UNIQUE (vkey, step_key) already serves lookups by vkey: one index less per insert
        "DROP INDEX dispatches_vkey",
    ],
    [  # the source's identity (a version is also its inode and ctime); what was delivered
        "ALTER TABLE dispatches ADD COLUMN dev INTEGER",
        "ALTER TABLE dispatches ADD COLUMN ino INTEGER",
        "ALTER TABLE dispatches ADD COLUMN ctime_ns INTEGER",
        "ALTER TABLE dispatches ADD COLUMN sha256 TEXT",
    ],
    [  # one-time upgrades that need the config, done at the next start (``done`` NULL until
        # then); a journal with no rows yet has nothing to upgrade
        "CREATE TABLE upgrades (name TEXT PRIMARY KEY, done REAL)",
        # step keys name only the earlier transforms now (recovery.upgrade_step_keys)
        "INSERT INTO upgrades (name, done) SELECT 'step-keys', CASE WHEN EXISTS "
        "(SELECT 1 FROM dispatches) THEN NULL ELSE 0 END",
    ],
    [  # dedupe: content asks whether a destination already has these bytes
        "CREATE INDEX dispatches_sha256 ON dispatches (sha256, destination) "
        "WHERE sha256 IS NOT NULL AND status = 'SUCCEEDED'",
    ],
    [  # the node that claimed a row (one implicit node here; see the PostgreSQL journal)
        "ALTER TABLE dispatches ADD COLUMN node TEXT",
    ],
    [  # the label a learned rule gave the file (docs/learned-routing.md)
        "ALTER TABLE dispatches ADD COLUMN label TEXT",
    ],
    [  # history retention (docs/operations.md): the stats rollup, kept as rows are written,
        # and the compact keys of pruned versions whose source was still there
        *retention.rollup_schema(_ROLLUPS, "INTEGER", " WITHOUT ROWID"),
        f"CREATE TRIGGER stats_insert AFTER INSERT ON dispatches BEGIN {_counts('NEW', '')}; END",
        "CREATE TRIGGER stats_update AFTER UPDATE OF status, created, destination, extension, "
        "size ON dispatches WHEN OLD.status IS NOT NEW.status OR OLD.created IS NOT NEW.created "
        "OR OLD.destination IS NOT NEW.destination OR OLD.extension IS NOT NEW.extension "
        f"OR OLD.size IS NOT NEW.size BEGIN {_counts('OLD', '-')}; {_counts('NEW', '')}; END",
        f"CREATE TRIGGER stats_delete AFTER DELETE ON dispatches BEGIN {_counts('OLD', '-')}; END",
        """CREATE TABLE kept (
            vkey TEXT NOT NULL,
            step_key TEXT NOT NULL,
            status TEXT NOT NULL,
            marked INTEGER NOT NULL,      -- 0: recorded by mark-existing, never sent
            source TEXT NOT NULL,
            root TEXT NOT NULL,
            relpath TEXT NOT NULL,
            PRIMARY KEY (vkey, step_key)
        ) WITHOUT ROWID""",
        # a kept key is never planned again (``plan``, ``plan_started``, ``mark_done``)
        "CREATE TRIGGER kept_not_new BEFORE INSERT ON dispatches WHEN EXISTS (SELECT 1 FROM kept "
        "WHERE vkey = NEW.vkey AND step_key = NEW.step_key) BEGIN SELECT RAISE(IGNORE); END",
    ],
    [  # the source file's birth time where its filesystem keeps one (``birth``); NULL otherwise
        "ALTER TABLE dispatches ADD COLUMN btime_ns INTEGER",
    ],
]


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


def _bulk_ok(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has JSON and ``->>`` (3.38), which the bulk statements use."""
    try:
        conn.execute("SELECT '[1]' ->> 0").fetchone()
    except sqlite3.Error:
        return False
    return True


def _connect_writer(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, timeout=10)
    try:
        conn.execute("PRAGMA busy_timeout = 10000")
        # a new journal gives the pages pruning frees back to the disk a few at a time
        # (``vacuum_step``); an older one reuses them for new rows (docs/operations.md)
        if conn.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()[0] == 0:
            conn.execute("PRAGMA auto_vacuum = INCREMENTAL")
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("PRAGMA synchronous = NORMAL")
        # a damaged page found now is one line at the start, not a crash at the first write
        found = [" ".join(str(r[0]).split()) for r in conn.execute("PRAGMA quick_check(2)")]
        if found != ["ok"]:
            raise JournalError(_corrupted(path, "; ".join(found)))
        _migrate(conn)
    except BaseException:
        conn.close()
        raise
    return conn


def _corrupted(path: Path, what: str) -> str:
    return (
        f"the journal {path} is corrupted ({what}); it was left as it is. Move it aside "
        f"(mv {path} {path}.broken) and recover its rows (sqlite3 {path}.broken .recover | "
        f"sqlite3 {path}), or start with an empty journal (files still in the sources are "
        "then sent again)"
    )


def _open_error(exc: sqlite3.Error, path: Path) -> JournalError:
    """Why the journal cannot be opened, and whether waiting can help."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return JournalError(_corrupted(path, str(exc)))
    why = _outage(exc, path) or str(exc)
    if code in _TRANSIENT_AT_OPEN:
        return JournalUnavailableError(f"cannot open the journal: {why}")
    return JournalError(f"cannot open the journal {path}: {why}")


def _migrate(conn: sqlite3.Connection) -> None:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > len(MIGRATIONS):
        raise JournalError(
            f"the journal has schema version {current}, newer than this filedispatch knows"
        )
    for version in range(current, len(MIGRATIONS)):
        conn.execute("BEGIN IMMEDIATE")
        try:
            for sql in MIGRATIONS[version]:
                conn.execute(sql)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise


def read_states(path: Path, vkeys: Sequence[str]) -> dict[str, list[StepState]]:
    """For each version key: its rows' states, read through a read-only connection (safe
    while a service writes; nothing is created, so a missing journal gives ``{}``). Raises
    JournalError when the file is there but cannot be read."""
    if not path.exists():
        return {}
    out: dict[str, list[StepState]] = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    try:
        for i in range(0, len(vkeys), 500):
            chunk = list(vkeys[i : i + 500])
            keys = retention.marks(len(chunk))
            rows = conn.execute(
                "SELECT vkey, id, step_key, status, attempts FROM dispatches "
                f"WHERE vkey IN ({keys}) UNION ALL SELECT vkey, 0, step_key, status, marked "
                f"FROM kept WHERE vkey IN ({keys}) ORDER BY 2",
                chunk * 2,
            )
            for vkey, row_id, step_key, status, attempts in rows:
                out.setdefault(vkey, []).append(
                    StepState(row_id, step_key, Status(status), attempts)
                )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    finally:
        conn.close()
    return out


def read_digests(
    path: Path, wanted: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, str]]:
    """For each (destination, sha256) the journal has a delivery of: that delivery's (id,
    location), as ``delivered_digest`` finds it, read like ``read_states`` (read-only; a
    missing journal gives ``{}``). Raises JournalError when it cannot be read."""
    if not path.exists() or not wanted:
        return {}
    out: dict[tuple[str, str], tuple[int, str]] = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    try:
        for destination, sha256 in wanted:
            row = conn.execute(DELIVERED_DIGEST, (sha256, destination, DUPLICATE_OF)).fetchone()
            if row is not None:
                out[(destination, sha256)] = (int(row[0]), str(row[1]))
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    finally:
        conn.close()
    return out


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


def _distinct_ids(params: list[tuple[Any, ...]]) -> bool:
    """A bulk update applies rows in no set order: only safe when each id comes once."""
    return len({p[-1] for p in params}) == len(params)


class SqliteReader(SqlReads):
    """A small pool of read-only connections to the journal file (the web app's, the command
    line's): a slow history query never waits behind, or holds up, the dispatcher's reads."""

    def __init__(self, conns: Sequence[aiosqlite.Connection]) -> None:
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in conns:
            self._free.put_nowait(conn)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, size: int = 2) -> AsyncIterator[SqliteReader]:
        """Raises JournalError when the file is missing or is not a journal."""
        conns: list[aiosqlite.Connection] = []
        try:
            for _ in range(size):
                conn = await aiosqlite.connect(f"{path.as_uri()}?mode=ro", uri=True)
                conns.append(conn)
                await conn.execute("PRAGMA busy_timeout = 10000")
                await conn.execute("PRAGMA query_only = 1")
            await conns[0].execute("SELECT 1 FROM dispatches LIMIT 1")
        except sqlite3.Error as exc:
            for conn in conns:
                await conn.close()
            raise JournalError(f"cannot read the journal {path}: {exc}") from exc
        try:
            yield cls(conns)
        finally:
            for conn in conns:
                await conn.close()

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = await self._free.get()
        try:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc
        finally:
            self._free.put_nowait(conn)


def _nothing(conn: sqlite3.Connection) -> None:
    """A write that changes nothing: committed after everything queued before it."""


class _Inbox(queue.SimpleQueue[tuple[Op[Any] | Rows, asyncio.Future[Any]] | None]):
    """The writer thread's queue. Outcomes gathered in one turn of the event loop (workers that
    finish together) go into it as one item at the end of the turn, not one item each: fewer
    wake-ups of the writer thread, so fewer hand-overs of the GIL. Any other item put in the
    same turn (a write, the close's None) hands them over first, so the queue order holds.
    Only the loop's thread puts; the writer thread only takes."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        #: the outcomes' rows and their callers' futures, not handed over yet
        self.gathered: tuple[list[Any], list[asyncio.Future[None]]] | None = None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        self.hand_over()  # gathered before this item: committed before it too
        super().put(item)

    def gather(self, params: Sequence[Any]) -> asyncio.Future[None]:
        """Queue finished rows' parameters for the end of this turn; done once durable."""
        fut: asyncio.Future[None] = self.loop.create_future()
        if self.gathered is None:
            self.gathered = ([], [])
            self.loop.call_soon(self.hand_over)
        self.gathered[0].extend(params)
        self.gathered[1].append(fut)
        return fut

    def hand_over(self) -> None:
        gathered, self.gathered = self.gathered, None
        if gathered is None:
            return
        params, futures = gathered
        batch: asyncio.Future[None] = self.loop.create_future()

        def settle(done: asyncio.Future[None]) -> None:
            error = JournalError("cancelled") if done.cancelled() else done.exception()
            resolve(futures, [error] * len(futures))

        batch.add_done_callback(settle)
        super().put((Rows(_FINISH, params, _FINISH_BULK), batch))


class SqliteJournal(SqlReads, HealthReport):
    """The journal in one SQLite file; open it with ``async with SqliteJournal.open(path)``."""

    def __init__(
        self,
        path: Path,
        executor: ThreadPoolExecutor,
        writer: sqlite3.Connection,
        reader: aiosqlite.Connection,
    ) -> None:
        HealthReport.__init__(self)
        self.path = path
        self._executor = executor
        self._w = writer  # used only on the executor's single thread
        self._r = reader
        # Writes go straight to the writer thread, not through a task on the loop: a loop busy
        # moving a burst of files must not hold back the commits that work is waiting for.
        self._inbox = _Inbox(asyncio.get_running_loop())
        self._loop = asyncio.get_running_loop()
        self._bulk = False  #: the SQLite can run a batch of rows as one JSON statement
        self._thread: asyncio.Future[None] | None = None
        self._read_lock = asyncio.Lock()
        #: (device, inode) of the open database: the path must keep naming this file
        self._identity: tuple[int, int] = (0, 0)
        #: set: a write the journal refuses fails at once instead of being held (stopping)
        self._give_up = threading.Event()
        self._held: JournalHealth = JournalHealth()  # the writer thread's view
        self.node: str | None = None  #: the implicit node's name, once joined
        self._lease_s = 0.0
        self._joined = 0.0

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
            writer = await loop.run_in_executor(executor, _connect_writer, path)
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
            raise _open_error(exc, path) from exc
        journal = cls(path, executor, writer, reader)
        journal._identity = (st.st_dev, st.st_ino)
        if not hold:
            journal.stop_retrying()
        journal._bulk = await loop.run_in_executor(executor, _bulk_ok, writer)
        journal._thread = loop.run_in_executor(executor, journal._writer)
        try:
            yield journal
        finally:
            await journal._close()

    async def _close(self) -> None:
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
        await self._r.close()
        if finished:
            await self._loop.run_in_executor(self._executor, self._w.close)
        self._executor.shutdown(wait=finished)

    @property
    def where(self) -> str:
        return str(self.path)

    def reader(self, size: int = 2) -> contextlib.AbstractAsyncContextManager[SqliteReader]:
        """A pool of ``size`` read-only connections of their own (the web app's)."""
        return SqliteReader.open(self.path, size)

    # ------------------------------------------------------------------ the writer

    def _writer(self) -> None:
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
                why = held.error if held else _outage(exc, self.path)
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
        conn = self._w
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
                        if op.bulk and self._bulk and _distinct_ids(params):
                            conn.execute(op.bulk, (json.dumps(params),))
                        else:
                            conn.executemany(op.sql, params)
                        res: Any = None
                    except sqlite3.Error as exc:
                        if _outage(exc, self.path):
                            raise  # the whole transaction is held and tried again
                        res = JournalError(str(exc))
                    results += [res] * (j - i + 1)
                    i = j + 1
                    continue
                try:
                    results.append(op(conn))
                except sqlite3.Error as exc:
                    if _outage(exc, self.path):
                        raise
                    results.append(JournalError(str(exc)))
                i += 1
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return results

    async def write(self, op: Op[T] | Rows) -> T:
        """Run ``op`` inside the next group commit and return its result once committed."""
        result: T = await self._enqueue(op)
        return result

    async def flush(self) -> None:
        """Return once every write queued before this call is committed."""
        await self.write(_nothing)

    def _enqueue(self, op: Op[Any] | Rows, gather: bool = False) -> asyncio.Future[Any]:
        if self._thread is None or self._thread.done():
            raise JournalError("the journal is closed")
        if gather and isinstance(op, Rows):
            return self._inbox.gather(op.params)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._inbox.put((op, fut))
        return fut

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
            payload = _json(params) if self._bulk else None
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
        takeover: bool = False,
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
        rows = await self.read("SELECT COUNT(*) FROM dispatches WHERE status='IN_PROGRESS'")
        return [NodeInfo(self.node, True, self._lease_s, 0.0, self._joined, (), int(rows[0][0]))]

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

    # ------------------------------------------------------------------ history

    async def retry(self, dispatch_id: int) -> bool:
        """Re-queue a FAILED row (and the rows after it in its chain); False if not FAILED.

        Raises JournalError at once while the journal is failing (``health``).
        """
        self._require_writable()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT vkey, rule, step FROM dispatches WHERE id=? AND status='FAILED'",
                (dispatch_id,),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE dispatches SET status='PENDING', attempts=0, next_attempt=0, started=NULL, "
                "reason=NULL, error_type=NULL, finished=NULL, detail='retry requested' "
                "WHERE vkey=? AND rule=? AND step>=? AND status='FAILED'",
                tuple(row),
            )
            return True

        return await self.write(op)

    async def unkeyed(
        self, limit: int = 1000, after: str = ""
    ) -> list[tuple[str, str, str, str, int, int]]:
        """Versions recorded before a version was also its inode and ctime (``ino IS NULL``):
        (vkey, source, root, relpath, size, mtime_ns), at most ``limit`` of them, in key order
        from the first key above ``after`` (pass the last key of a batch for the next one: the
        index is walked once in all, not once per batch)."""
        rows = await self.read(
            "SELECT vkey, source, root, relpath, size, mtime_ns FROM dispatches "
            "WHERE vkey > ? AND ino IS NULL GROUP BY vkey ORDER BY vkey LIMIT ?",
            (after, limit),
        )
        return [tuple(r) for r in rows]

    async def rekey(
        self, found: Sequence[tuple[str, str, int, int, int]], missing: Sequence[str]
    ) -> int:
        """Give old rows the key their file has now: ``found`` is (old vkey, new vkey, dev,
        ino, ctime_ns) for files still there with the recorded size and mtime; ``missing``
        are old vkeys whose file is gone or changed (marked checked with ino 0, so they are
        not looked at again). Returns the rows re-keyed. A row whose new key is already
        planned keeps its old key (its history stays; the new row says what happens now).
        """

        def op(conn: sqlite3.Connection) -> int:
            changed = conn.executemany(
                "UPDATE OR IGNORE dispatches SET vkey=?, dev=?, ino=?, ctime_ns=? "
                "WHERE vkey=? AND ino IS NULL",
                [(new, dev, ino, ctime, old) for old, new, dev, ino, ctime in found],
            ).rowcount
            conn.executemany(
                "UPDATE dispatches SET ino=0 WHERE vkey=? AND ino IS NULL",
                [(old,) for old in missing] + [(old,) for old, *_ in found],
            )
            return changed

        return await self.write(op)

    async def requeue_unrun(self, steps: Sequence[tuple[str, str]]) -> int:
        """Queue again FAILED rows no attempt made ("not run" behind a step that failed), given
        as (vkey, step_key): the steps before them succeed now. Returns the rows queued."""

        def op(conn: sqlite3.Connection) -> int:
            return conn.executemany(
                "UPDATE dispatches SET status='PENDING', next_attempt=0, finished=NULL, "
                "started=NULL WHERE vkey=? AND step_key=? AND status='FAILED' AND attempts=0",
                steps,
            ).rowcount

        return await self.write(op)

    async def upgrade_due(self, name: str) -> bool:
        """Whether the one-time upgrade ``name`` (a row of ``upgrades``) is still to be done."""
        rows = await self.read("SELECT 1 FROM upgrades WHERE name=? AND done IS NULL", (name,))
        return bool(rows)

    async def rekey_steps(self, keys: Mapping[str, str], now: float) -> int:
        """Give rows the step keys of today (``keys``: old step key -> new one) and record the
        ``step-keys`` upgrade done, in one transaction. Idempotent: a key already changed is not
        found again. A row whose new key its version has already keeps its old one (as in
        ``rekey``). Returns the rows changed."""
        pairs = [(new, old) for old, new in keys.items() if old != new]

        def op(conn: sqlite3.Connection) -> int:
            sql = "UPDATE OR IGNORE dispatches SET step_key=? WHERE step_key=?"
            changed = conn.executemany(sql, pairs).rowcount
            conn.execute("UPDATE upgrades SET done=? WHERE name='step-keys'", (now,))
            return changed

        return await self.write(op)

    async def forget(
        self,
        dispatch_id: int | None = None,
        *,
        source: str | None = None,
        relpath: str | None = None,
    ) -> int:
        """Delete history so the file is sent again at the next rescan or start; the rows removed.

        Raises JournalError at once while the journal is failing (``health``).
        """
        self._require_writable()

        def op(conn: sqlite3.Connection) -> int:
            if dispatch_id is not None:
                cur = conn.execute(
                    "DELETE FROM dispatches WHERE id=? AND status != 'IN_PROGRESS'", (dispatch_id,)
                )
            else:
                cur = conn.execute(
                    "DELETE FROM dispatches WHERE relpath=? AND (? IS NULL OR source=?) "
                    "AND status != 'IN_PROGRESS'",
                    (relpath, source, source),
                )
                conn.execute(retention.FORGET_KEPT, (relpath, source, source))
            return cur.rowcount

        return await self.write(op)

    async def mark_done(self, steps: Iterable[PlannedStep]) -> int:
        """Record steps as SUCCEEDED without sending (dirsend's --store-only)."""
        steps = list(steps)
        now = time.time()
        new = await self.plan(steps, now)

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE dispatches SET status='SUCCEEDED', finished=?, duration_ms=0, "
                "detail='marked as already dispatched (mark-existing): not sent' "
                "WHERE vkey=? AND step_key=? AND status='PENDING'",
                [(now, s.version.key, s.step_key) for s in steps],
            )

        await self.write(op)
        return new

    # ------------------------------------------------------------------ retention

    async def prune(
        self, vkeys: Sequence[str], keep: Sequence[str], before: float
    ) -> tuple[int, int]:
        """In one transaction: delete the rows of those ``vkeys`` whose every row SUCCEEDED and
        finished before ``before`` (any other is left whole), keeping the compact key of those
        also in ``keep`` (their source is still there). Returns (rows deleted, versions
        whose key was kept)."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            found = [
                r[0]
                for r in conn.execute(
                    retention.PRUNABLE.format(keys=retention.marks(len(vkeys))), [*vkeys, before]
                )
            ]
            if not found:
                return 0, 0
            wanted = set(keep)
            kept = [k for k in found if k in wanted]
            if kept:
                conn.execute(retention.KEEP.format(keys=retention.marks(len(kept))), kept)
            marks = retention.marks(len(found))
            return conn.execute(retention.DELETE.format(keys=marks), found).rowcount, len(kept)

        return await self.write(op) if vkeys else (0, 0)

    async def drop_kept(self, vkeys: Sequence[str]) -> int:
        """Forget the kept keys of these versions (their source is gone); the keys removed."""

        def op(conn: sqlite3.Connection) -> int:
            marks = retention.marks(len(vkeys))
            return conn.execute(retention.DROP_KEPT.format(keys=marks), list(vkeys)).rowcount

        return await self.write(op) if vkeys else 0

    async def vacuum_step(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the filesystem (a journal created with
        ``auto_vacuum = INCREMENTAL``; an older one keeps them for new rows); returns the free
        pages left that a later step can give back (0 when none or not possible)."""

        def op(conn: sqlite3.Connection) -> int:
            if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                return 0
            conn.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
            return int(conn.execute("PRAGMA freelist_count").fetchone()[0])

        return await self.write(op)

    async def integrity_check(self) -> str:
        rows = await self.read("PRAGMA integrity_check")
        return str(rows[0][0]) if rows else "no answer"
