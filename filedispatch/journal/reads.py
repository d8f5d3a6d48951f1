"""The history reads, as typed rows: the SQL the web app, the command line and the console ask
the journal, written once for both backends (``?`` marks a parameter; a ``Dialect`` gives the
few pieces that differ).

Every SQL text here is built from fixed pieces and whitelisted column names; every value is a
bound parameter. Nothing here writes.
"""

from __future__ import annotations

import abc
import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, get_args

from ..models import Dispatch, FileVersion, Status
from ..reporting import Period
from . import retention
from .base import (
    DUPLICATE_OF,
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
    Waiting,
    number,
)
from .retention import IN_FLIGHT, KeptKey, OldRow

#: every column of a row, in ``Dispatch`` order
COLUMNS = (
    "id, source, root, relpath, size, mtime_ns, rule, step, destination, protocol, status, "
    "attempts, reason, location, created, started, finished, duration_ms, next_attempt, "
    "error_type, detail, output, dev, ino, ctime_ns, sha256, label, btime_ns"
)
#: the columns of an ``Entry``, and of a ``Detail``
ENTRY_COLUMNS = (
    "id, created, finished, filename, source, destination, extension, protocol, rule, status, "
    "attempts, size, duration_ms, reason, sha256, mtime_ns, label, btime_ns"
)
DETAIL_COLUMNS = (
    ENTRY_COLUMNS + ", relpath, step, location, detail, error_type, started, next_attempt, node"
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
    values[27] = number(values[27])  # btime_ns
    return Dispatch(*values)


def claimed_groups(vkeys: Sequence[str], rows: Sequence[Any], now: float) -> list[list[Dispatch]]:
    """A claim's answer: ``rows`` (``vkey, step_key`` and ``COLUMNS``) grouped by version in
    ``vkeys`` order; the rows the claim marked IN_PROGRESS say so."""
    groups: dict[str, list[Dispatch]] = {v: [] for v in vkeys}
    for r in rows:
        d = row_dispatch(r[2:])
        d.step_key = r[1]
        if d.status == Status.PENDING and d.next_attempt <= now:
            d.status = Status.IN_PROGRESS  # ``started`` still tells of earlier claims
        groups[r[0]].append(d)
    return list(groups.values())


def _entry(r: Sequence[Any]) -> Entry:
    return Entry(*_entry_values(r[:18]))


def _detail(r: Sequence[Any]) -> Detail:
    return Detail(*_entry_values(r))


def _entry_values(r: Sequence[Any]) -> list[Any]:
    values = list(r)
    values[15] = number(values[15])  # mtime_ns
    values[17] = number(values[17])  # btime_ns
    return values


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the backends' SQL says differently."""

    #: a case-insensitive (for ASCII at least) pattern match
    like: str
    #: the sum of an expression over a group, 0 (not NULL) for no rows
    total: Callable[[str], str]
    #: the day number (days since 1970-01-01) of an epoch-seconds column, UTC or local time
    day: Callable[[str, bool], str]
    #: whether a text value may hold a NUL character (PostgreSQL's may not)
    nul_in_text: bool = True


def _sqlite_day(column: str, local: bool) -> str:
    if local:  # the local time zone of the process running the query
        return (
            f"CAST(julianday({column}, 'unixepoch', 'localtime') - {EPOCH_JULIAN_DAY} AS INTEGER)"
        )
    return f"CAST({column} / 86400 AS INTEGER)"


def _postgres_day(column: str, local: bool) -> str:
    if local:  # the session's TimeZone, which the journal sets to this process's zone
        return f"FLOOR(EXTRACT(EPOCH FROM TO_TIMESTAMP({column})::timestamp) / 86400)::bigint"
    return f"FLOOR({column} / 86400)::bigint"


SQLITE = Dialect("LIKE", lambda e: f"TOTAL({e})", _sqlite_day)
POSTGRES = Dialect("ILIKE", lambda e: f"COALESCE(SUM({e}), 0)", _postgres_day, False)


def _column(name: str) -> str:
    if name not in _KNOWN:
        raise ValueError(f"not a journal column a query may name: {name!r}")
    return name


def _sort_expr(key: SortKey) -> str:
    col = _column(key.column)
    return f"COALESCE({col}, -1)" if col in NULLABLE else col


def _condition(c: Condition, dialect: Dialect) -> tuple[str, list[Any]]:
    col = _column(c.column)
    if isinstance(c.value, str) and "\0" in c.value and not dialect.nul_in_text:
        return "1 = 0", []  # no row holds such a text, and the server would refuse the value
    if c.op == "contains":
        text = str(c.value)
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return f"{col} {dialect.like} ? ESCAPE '\\'", [f"%{escaped}%"]
    if c.op not in ("=", ">=", "<", "<="):
        raise ValueError(f"not a comparison a query may use: {c.op!r}")
    return f"{col} {c.op} ?", [c.value]


def where(conditions: Sequence[Condition], dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """`` WHERE ...`` (or nothing) and its parameters."""
    if not conditions:
        return "", []
    parts = [_condition(c, dialect) for c in conditions]
    return " WHERE " + " AND ".join(sql for sql, _ in parts), [v for _, vs in parts for v in vs]


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


def page_sql(query: PageQuery, dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """The SQL of one page of ``ENTRY_COLUMNS`` rows and its parameters."""
    sql_where, values = where(query.conditions, dialect)
    if query.after is not None:
        seek, seek_values = _seek(query.keys, query.after)
        sql_where = f"{sql_where} AND {seek}" if sql_where else f" WHERE {seek}"
        values += seek_values
    order = ", ".join(f"{_sort_expr(k)} {'DESC' if k.desc else 'ASC'}" for k in query.keys)
    return (
        f"SELECT {ENTRY_COLUMNS} FROM dispatches{sql_where} ORDER BY {order} LIMIT ? OFFSET ?",
        [*values, query.limit, query.offset],
    )


def stats_sql(conditions: Sequence[Condition], dialect: Dialect = SQLITE) -> tuple[str, list[Any]]:
    """The SQL of ``stats`` and its parameters: rows grouped by the UTC day they were created
    on (a day number): the caller folds the days into weeks or months
    with ``reporting.period_start``, the one rule the command line uses too (and cheaper than
    SQLite's strftime() on every row)."""
    sql_where, params = where(conditions, dialect)
    day = dialect.day("created", False)
    return (
        f"SELECT {day} AS bucket, status, destination, extension, "
        f"COUNT(*), {dialect.total('size')} FROM dispatches{sql_where} "
        "GROUP BY bucket, status, destination, extension",
        params,
    )


#: (id, location) of the first delivery of some bytes to a destination, duplicates passed
#: over; parameters (sha256, destination, DUPLICATE_OF). Also read by the command line's
#: simulations (``read_digests``)
DELIVERED_DIGEST = (
    "SELECT id, COALESCE(location, destination) FROM dispatches "
    "WHERE sha256=? AND destination=? AND status='SUCCEEDED' "
    "AND (detail IS NULL OR detail NOT LIKE ? || '%') ORDER BY id LIMIT 1"
)


#: the columns the rollup (``stats_days``) is grouped by, beside the day
_ROLLUP_COLUMNS = frozenset({"status", "destination", "extension"})


def rollup_sql(
    conditions: Sequence[Condition], dialect: Dialect = SQLITE, period: Period = "day"
) -> tuple[str, list[Any]] | None:
    """``stats_sql``'s answer from a rollup kept as rows are written, a table a few thousand
    rows long instead of every row in the window: ``stats_days`` (a row per day, status,
    destination and extension), or for ``period`` month and a window of whole months
    ``stats_months`` (the same per month, under the day number of its first day). For
    ``period`` week the days are summed per ISO week in SQL, under the day number of its
    Monday (day 0, 1970-01-01, was a Thursday: a day ``d``'s Monday is ``d - (d + 3) % 7``):
    a seventh of the groups to hand back. Folding by ``reporting.period_start`` gives the
    same weeks and months either way. The rollups count every row but those IN_PROGRESS
    (``retention.COUNTED``), which are counted from the table, per day. None when a
    condition cannot be answered from the rollup (another column, or a ``created`` bound
    inside a day)."""
    kept: list[Condition] = []
    days: list[tuple[str, int]] = []  #: (op, day number): a bound on ``created`` at midnight
    for c in conditions:
        if c.column in _ROLLUP_COLUMNS:
            kept.append(c)
        elif (
            c.column == "created"
            and c.op in (">=", "<")
            and isinstance(c.value, int | float)
            and c.value % 86400 == 0
        ):
            days.append((c.op, int(c.value // 86400)))
        else:
            return None
    sql_where, params = where(kept, dialect)
    clauses = [sql_where.removeprefix(" WHERE ")] if sql_where else []
    clauses += [f"day {op} ?" for op, _ in days]
    params += [day for _, day in days]
    whole_months = period == "month" and all(_month_start(day) for _, day in days)
    # the rollups count every row but those in flight (IN_PROGRESS: the work under way, a few
    # hundred rows at most), counted here (the index on status and created finds them)
    on_way, on_way_params = where(conditions, dialect)
    in_flight = f"status IN {IN_FLIGHT}"
    on_way = f"{on_way} AND {in_flight}" if on_way else f" WHERE {in_flight}"
    day = dialect.day("created", False)
    bucket = "day"
    if period == "week":
        bucket, day = _monday("day"), _monday(f"({day})")
    return (
        f"SELECT {bucket} AS week, status, destination, extension, SUM(n), SUM(bytes) "
        f"FROM {'stats_months' if whole_months else 'stats_days'} "
        f"WHERE {' AND '.join([*clauses, 'n > 0'])} "
        f"GROUP BY {bucket}, status, destination, extension UNION ALL "
        f"SELECT {day} AS bucket, status, destination, extension, COUNT(*), "
        f"{dialect.total('size')} FROM dispatches{on_way} "
        "GROUP BY bucket, status, destination, extension",
        params + on_way_params,
    )


def _monday(day: str) -> str:
    """The day number of the Monday of the ISO week of day number ``day`` (an expression)."""
    return f"{day} - ({day} + 3) % 7"


def _month_start(day: int) -> bool:
    return (dt.date(1970, 1, 1) + dt.timedelta(days=day)).day == 1


class SqlReads(abc.ABC):
    """The ``JournalReader`` methods over one ``read(sql, params)``."""

    dialect: ClassVar[Dialect] = SQLITE

    @abc.abstractmethod
    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of one query; raises JournalError when the journal cannot be read."""

    async def counts(self) -> dict[str, int]:
        rows = await self.read("SELECT status, COUNT(*) FROM dispatches GROUP BY status")
        return {str(s): int(n) for s, n in rows}

    async def count_entries(self, conditions: Sequence[Condition]) -> int:
        sql_where, params = where(conditions, self.dialect)
        rows = await self.read(f"SELECT COUNT(*) FROM dispatches{sql_where}", params)
        return int(rows[0][0])

    async def page(self, query: PageQuery) -> list[Entry]:
        return [_entry(r) for r in await self.read(*page_sql(query, self.dialect))]

    async def get(self, dispatch_id: int) -> Dispatch | None:
        rows = await self.read(f"SELECT {COLUMNS} FROM dispatches WHERE id=?", (dispatch_id,))
        return row_dispatch(rows[0]) if rows else None

    async def upgrade_due(self, name: str) -> bool:
        """Whether the one-time upgrade ``name`` (a row of ``upgrades``) is still to be done."""
        rows = await self.read("SELECT 1 FROM upgrades WHERE name=? AND done IS NULL", (name,))
        return bool(rows)

    async def detail(self, dispatch_id: int) -> Detail | None:
        rows = await self.read(
            f"SELECT {DETAIL_COLUMNS} FROM dispatches WHERE id = ?", (dispatch_id,)
        )
        return _detail(rows[0]) if rows else None

    async def stats(
        self, conditions: Sequence[Condition], period: Period = "day"
    ) -> list[StatsGroup]:
        """Counts and bytes per day (``reporting`` folds the days into weeks or months), from
        the rollups where the conditions allow it, else from the rows."""
        query = rollup_sql(conditions, self.dialect, period)
        rows = await self.read(*(query or stats_sql(conditions, self.dialect)))
        return [StatsGroup(int(d), s, dest, ext, int(n), int(b)) for d, s, dest, ext, n, b in rows]

    async def outcomes(
        self, after: float, upto: float, buckets_ms: Sequence[int]
    ) -> list[OutcomeGroup]:
        total = self.dialect.total
        within = ", ".join(
            total(f"CASE WHEN duration_ms <= {int(b)} THEN 1 ELSE 0 END") for b in buckets_ms
        )
        rows = await self.read(
            f"SELECT destination, status, COUNT(*), {total('size')}, COUNT(duration_ms), "
            f"{total('duration_ms')}, {within} FROM dispatches "
            "WHERE finished > ? AND finished <= ? GROUP BY destination, status",
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
            f"SELECT {self.dialect.day('COALESCE(finished, created)', True)} AS day, "
            "COUNT(CASE WHEN status='SUCCEEDED' THEN 1 END), "
            "COUNT(CASE WHEN status='FAILED' THEN 1 END), "
            "COUNT(CASE WHEN status IN ('PENDING', 'IN_PROGRESS') THEN 1 END), "
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

    async def delivered_digest(self, destination: str, sha256: str) -> tuple[int, str] | None:
        """(id, location) of the first SUCCEEDED dispatch that sent bytes with this SHA-256
        (hex) to ``destination`` (as the rows show it, redacted), or None. Rows recorded as
        duplicates (``DUPLICATE_OF`` in their detail) name that dispatch, and are passed over."""
        rows = await self.read(DELIVERED_DIGEST, (sha256, destination, DUPLICATE_OF))
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    async def waiting_by_destination(self, now: float) -> list[Waiting]:
        """Per destination: the PENDING rows not due before ``now`` (held for a window or a
        retry), and when the first of them is due."""
        rows = await self.read(
            "SELECT destination, COUNT(*), MIN(next_attempt) FROM dispatches "
            "WHERE status='PENDING' AND next_attempt > ? GROUP BY destination",
            (now,),
        )
        return [Waiting(str(d), int(n), float(t)) for d, n, t in rows]

    # ------------------------------------------------------------------ what retention asks

    async def oldest(self, after_id: int, limit: int) -> list[OldRow]:
        """Up to ``limit`` rows with ids above ``after_id``, oldest first (pass the last id for
        the next ones: the primary key is walked once in all)."""
        rows = await self.read(retention.OLDEST, (after_id, limit))
        return [OldRow(int(i), str(v), float(c), str(r), str(p)) for i, v, c, r, p in rows]

    async def kept_keys(self, after: str, limit: int) -> list[KeptKey]:
        """Up to ``limit`` pruned versions whose key is kept, in key order from above ``after``."""
        rows = await self.read(retention.KEPT, (after, limit))
        return [KeptKey(str(v), str(r), str(p)) for v, r, p in rows]

    async def row_count(self) -> int:
        """How many rows the journal holds (the rollup and the rows in flight: no table
        scan)."""
        rows = await self.read(retention.ROW_COUNT)
        return int(rows[0][0])

    async def ping(self) -> None:
        await self.read("SELECT 1 FROM dispatches LIMIT 1")

    # ------------------------------------------------------------------ what the work asks

    async def next_due(self) -> float | None:
        """When the earliest waiting retry becomes due (None when nothing is pending)."""
        rows = await self.read("SELECT MIN(next_attempt) FROM dispatches WHERE status='PENDING'")
        return float(rows[0][0]) if rows and rows[0][0] is not None else None

    async def active_version_keys(self) -> set[str]:
        """Keys of versions that still have PENDING or IN_PROGRESS rows."""
        rows = await self.read(
            "SELECT DISTINCT vkey FROM dispatches WHERE status IN ('PENDING', 'IN_PROGRESS')"
        )
        return {r[0] for r in rows}

    async def version_states(
        self, versions: Sequence[FileVersion]
    ) -> dict[str, list[tuple[str, str, int]]]:
        """For each version key: (step_key, status, attempts) of its rows (for after-actions
        on files seen again)."""
        keys = [v.key for v in versions]
        out: dict[str, list[tuple[str, str, int]]] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = await self.read(
                retention.STATES.format(keys=retention.marks(len(chunk))), chunk * 2
            )
            for k, step_key, status, attempts in rows:
                out.setdefault(k, []).append((step_key, status, attempts))
        return out

    async def versions(self, vkeys: Sequence[str]) -> dict[str, FileVersion]:
        """The file version each of these keys stands for (read from one of its rows), by
        key; a key with no row (pruned by retention, or another journal's) is left out."""
        keys = list(dict.fromkeys(vkeys))
        out: dict[str, FileVersion] = {}
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            rows = await self.read(
                f"SELECT vkey, {COLUMNS} FROM dispatches "
                f"WHERE vkey IN ({retention.marks(len(chunk))})",
                chunk,
            )
            for r in rows:
                if r[0] not in out:
                    out[r[0]] = row_dispatch(r[1:]).version
        return out

    async def unfinished(self) -> int:
        """How many rows are PENDING or IN_PROGRESS (an index range, not a table scan)."""
        rows = await self.read(
            "SELECT COUNT(*) FROM dispatches WHERE status IN ('PENDING', 'IN_PROGRESS')"
        )
        return int(rows[0][0])

    async def progress(self, since: float) -> tuple[int, int]:
        """(rows finished since ``since``, rows still to do), from one snapshot and two index
        ranges: a large journal is never counted whole."""
        rows = await self.read(
            "SELECT (SELECT COUNT(*) FROM dispatches WHERE finished >= ?), "
            "(SELECT COUNT(*) FROM dispatches WHERE status IN ('PENDING', 'IN_PROGRESS'))",
            (since,),
        )
        return int(rows[0][0]), int(rows[0][1])
