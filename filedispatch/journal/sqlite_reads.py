"""The history reads of the SQLite journal, as typed rows: the SQL the web app, the command
line and the console ask the journal, and the web app's own pool of read-only connections.

Every SQL text here is built from fixed pieces and whitelisted column names; every value is a
bound parameter. Nothing here writes.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Literal, get_args

import aiosqlite

from ..errors import JournalError
from ..models import Dispatch, Status
from .base import (
    NULLABLE,
    Column,
    Condition,
    DayTally,
    DestinationCount,
    Detail,
    Entry,
    OutcomeGroup,
    PageQuery,
    RecordedPath,
    RetryWaiting,
    SortKey,
    StatsGroup,
    number,
)

#: every column of a row, in ``Dispatch`` order
COLUMNS = (
    "id, source, root, relpath, size, mtime_ns, rule, step, destination, protocol, status, "
    "attempts, reason, location, created, started, finished, duration_ms, next_attempt, "
    "error_type, detail, output, dev, ino, ctime_ns, sha256"
)
#: the columns of an ``Entry``, and of a ``Detail``
ENTRY_COLUMNS = (
    "id, created, finished, filename, source, destination, extension, protocol, rule, status, "
    "attempts, size, duration_ms, reason, sha256, mtime_ns"
)
DETAIL_COLUMNS = (
    ENTRY_COLUMNS + ", relpath, step, location, detail, error_type, started, next_attempt"
)
_KNOWN: frozenset[str] = frozenset(get_args(Column))
#: 1970-01-01 as a Julian day: ``julianday(...) - EPOCH_JULIAN_DAY`` is a day number
EPOCH_JULIAN_DAY = 2440587.5


def row_dispatch(r: Sequence[Any]) -> Dispatch:
    """A ``COLUMNS`` row as a ``Dispatch``."""
    values = list(r)
    values[10] = Status(values[10])
    values[5] = number(values[5])  # mtime_ns, dev, ino, ctime_ns: see sqlite._int64
    values[22:25] = map(number, values[22:25])
    return Dispatch(*values)


def _entry(r: Sequence[Any]) -> Entry:
    values = list(r[:16])
    values[15] = number(values[15])
    return Entry(*values)


def _detail(r: Sequence[Any]) -> Detail:
    values = list(r)
    values[15] = number(values[15])
    return Detail(*values)


def day_sql(column: str, *, local: bool = False) -> str:
    """SQL for the day number of an epoch-seconds ``column`` (UTC, or the local time zone of
    the process running the query with ``local``)."""
    if local:
        return (
            f"CAST(julianday({column}, 'unixepoch', 'localtime') - {EPOCH_JULIAN_DAY} AS INTEGER)"
        )
    return f"CAST({column} / 86400 AS INTEGER)"


_DAY = day_sql("created")
#: the period a row falls in, as a day number (UTC): the day itself, its Monday (1970-01-01
#: was a Thursday); months are grouped by day and folded by the caller, which costs less
#: than SQLite's strftime() on every row
_BUCKET: dict[str, str] = {"day": _DAY, "week": f"{_DAY} - ({_DAY} + 3) % 7", "month": _DAY}


def _column(name: str) -> str:
    if name not in _KNOWN:
        raise ValueError(f"not a journal column a query may name: {name!r}")
    return name


def _sort_expr(key: SortKey) -> str:
    col = _column(key.column)
    return f"IFNULL({col}, -1)" if col in NULLABLE else col


def _condition(c: Condition) -> tuple[str, Any]:
    col = _column(c.column)
    if c.op == "contains":
        text = str(c.value)
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"{col} LIKE ? ESCAPE '\\'", f"%{escaped}%"
    if c.op not in ("=", ">=", "<", "<="):
        raise ValueError(f"not a comparison a query may use: {c.op!r}")
    return f"{col} {c.op} ?", c.value


def where(conditions: Sequence[Condition]) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or nothing) and its parameters."""
    if not conditions:
        return "", []
    parts = [_condition(c) for c in conditions]
    return " WHERE " + " AND ".join(sql for sql, _ in parts), [v for _, v in parts]


def _seek(keys: Sequence[SortKey], after: Sequence[Any]) -> tuple[str, list[Any]]:
    """Rows strictly after ``after`` in the sort order (keyset pagination)."""
    exprs = [_sort_expr(k) for k in keys]
    if all(k.desc == keys[0].desc for k in keys):
        marks = ", ".join("?" * len(keys))
        return f"({', '.join(exprs)}) {'<' if keys[0].desc else '>'} ({marks})", list(after)
    parts, params = [], []
    for i, k in enumerate(keys):
        eq = [f"{e} = ?" for e in exprs[:i]]
        parts.append("(" + " AND ".join([*eq, f"{exprs[i]} {'<' if k.desc else '>'} ?"]) + ")")
        params += [*after[:i], after[i]]
    return "(" + " OR ".join(parts) + ")", params


def page_sql(query: PageQuery) -> tuple[str, list[Any]]:
    """The SQL of one page of ``ENTRY_COLUMNS`` rows and its parameters."""
    sql_where, values = where(query.conditions)
    if query.after is not None:
        seek, seek_values = _seek(query.keys, query.after)
        sql_where = f"{sql_where} AND {seek}" if sql_where else f" WHERE {seek}"
        values += seek_values
    order = ", ".join(f"{_sort_expr(k)} {'DESC' if k.desc else 'ASC'}" for k in query.keys)
    return (
        f"SELECT {ENTRY_COLUMNS} FROM dispatches{sql_where} ORDER BY {order} LIMIT ? OFFSET ?",
        [*values, query.limit, query.offset],
    )


def stats_sql(
    conditions: Sequence[Condition], period: Literal["day", "week", "month"]
) -> tuple[str, list[Any]]:
    """The SQL of ``stats`` and its parameters."""
    sql_where, params = where(conditions)
    return (
        f"SELECT {_BUCKET[period]} AS bucket, status, destination, extension, "
        f"COUNT(*), TOTAL(size) FROM dispatches{sql_where} "
        "GROUP BY bucket, status, destination, extension",
        params,
    )


class SqliteReads(abc.ABC):
    """The ``JournalReader`` methods over one ``read(sql, params)``."""

    @abc.abstractmethod
    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query; raises JournalError when the journal cannot be read."""

    async def counts(self) -> dict[str, int]:
        rows = await self.read("SELECT status, COUNT(*) FROM dispatches GROUP BY status")
        return {str(s): int(n) for s, n in rows}

    async def count_entries(self, conditions: Sequence[Condition]) -> int:
        sql_where, params = where(conditions)
        rows = await self.read(f"SELECT COUNT(*) FROM dispatches{sql_where}", params)
        return int(rows[0][0])

    async def page(self, query: PageQuery) -> list[Entry]:
        return [_entry(r) for r in await self.read(*page_sql(query))]

    async def get(self, dispatch_id: int) -> Dispatch | None:
        rows = await self.read(f"SELECT {COLUMNS} FROM dispatches WHERE id=?", (dispatch_id,))
        return row_dispatch(rows[0]) if rows else None

    async def detail(self, dispatch_id: int) -> Detail | None:
        rows = await self.read(
            f"SELECT {DETAIL_COLUMNS} FROM dispatches WHERE id = ?", (dispatch_id,)
        )
        return _detail(rows[0]) if rows else None

    async def stats(
        self, conditions: Sequence[Condition], period: Literal["day", "week", "month"]
    ) -> list[StatsGroup]:
        rows = await self.read(*stats_sql(conditions, period))
        return [StatsGroup(int(d), s, dest, ext, int(n), int(b)) for d, s, dest, ext, n, b in rows]

    async def outcomes(
        self, after: float, upto: float, buckets_ms: Sequence[int]
    ) -> list[OutcomeGroup]:
        within = ", ".join(f"TOTAL(duration_ms <= {int(b)})" for b in buckets_ms)
        rows = await self.read(
            "SELECT destination, status, COUNT(*), TOTAL(size), COUNT(duration_ms), "
            f"TOTAL(duration_ms), {within} FROM dispatches WHERE finished > ? AND finished <= ? "
            "GROUP BY destination, status",
            (after, upto),
        )
        return [
            OutcomeGroup(
                dest, status, int(n), int(size), int(timed), float(total), tuple(map(int, rest))
            )
            for dest, status, n, size, timed, total, *rest in rows
        ]

    async def retry_waiting(self) -> RetryWaiting:
        rows = await self.read(
            "SELECT COUNT(*), MIN(next_attempt) FROM dispatches "
            "WHERE status='PENDING' AND attempts > 0"
        )
        count, first = rows[0] if rows else (0, None)
        return RetryWaiting(int(count or 0), first if count else None)

    async def by_destination(self) -> list[DestinationCount]:
        rows = await self.read(
            "SELECT destination, status, COUNT(*) FROM dispatches GROUP BY destination, status"
        )
        return [DestinationCount(d, s, int(n)) for d, s, n in rows]

    async def recent(self, limit: int, status: Status | None = None) -> list[Dispatch]:
        sql_where, params = ("WHERE status=? ", [status.value]) if status else ("", [])
        rows = await self.read(
            f"SELECT {COLUMNS} FROM dispatches {sql_where}ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
        return [row_dispatch(r) for r in rows]

    async def day_tallies(self) -> list[DayTally]:
        rows = await self.read(
            f"SELECT {day_sql('COALESCE(finished, created)', local=True)} AS day, "
            "SUM(status='SUCCEEDED'), SUM(status='FAILED'), "
            "SUM(status IN ('PENDING', 'IN_PROGRESS')), "
            "SUM(CASE WHEN status='SUCCEEDED' THEN size ELSE 0 END) "
            "FROM dispatches GROUP BY day ORDER BY day"
        )
        return [
            DayTally(int(day), int(ok or 0), int(failed or 0), int(waiting or 0), int(sent or 0))
            for day, ok, failed, waiting, sent in rows
        ]

    async def recorded_paths(self, relpath: str, absolute: str) -> list[RecordedPath]:
        rows = await self.read(
            "SELECT DISTINCT source, relpath FROM dispatches WHERE relpath=? "
            "OR root || '/' || relpath = ?",
            (relpath, absolute),
        )
        return [RecordedPath(s, r) for s, r in rows]

    async def first_failures(
        self, relpath: str | None = None, absolute: str | None = None
    ) -> list[int]:
        sql_where, params = "status='FAILED'", []
        if relpath is not None or absolute is not None:
            sql_where += " AND (relpath=? OR root || '/' || relpath = ?)"
            params = [relpath, absolute]
        rows = await self.read(
            f"SELECT MIN(id) FROM dispatches WHERE {sql_where} AND step = (SELECT MIN(step) "
            "FROM dispatches d WHERE d.vkey=dispatches.vkey AND d.rule=dispatches.rule "
            "AND d.status='FAILED') GROUP BY vkey, rule ORDER BY MIN(id)",
            params,
        )
        return [int(r[0]) for r in rows]

    async def ping(self) -> None:
        await self.read("SELECT 1 FROM dispatches LIMIT 1")


class SqliteReader(SqliteReads):
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
