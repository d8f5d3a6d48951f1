"""History retention's SQL, written once for both backends (``?`` marks a parameter): the
stats rollups' tables, the versions old enough to prune, pruning them while keeping a compact
key of what was sent, and the kept keys' sweep. The triggers that keep the rollups and the
``kept`` table are in each backend's migrations.

Nothing here touches a file: whether a source still exists is the caller's question
(``filedispatch.retention``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

#: rows walked in id order from a cursor: (id, vkey, created, root, relpath)
OLDEST = "SELECT id, vkey, created, root, relpath FROM dispatches WHERE id > ? ORDER BY id LIMIT ?"

#: of the given versions (``{keys}``: that many ``?``), those whose every row SUCCEEDED and
#: finished before ``?``: the only versions pruning ever removes. A pruned row's id is never
#: given again, the newest's included (SQLite's ``id_mark``; PostgreSQL's sequence)
PRUNABLE = (
    "SELECT vkey FROM dispatches WHERE vkey IN ({keys}) GROUP BY vkey "
    "HAVING SUM(CASE WHEN status = 'SUCCEEDED' THEN 0 ELSE 1 END) = 0 AND MAX(finished) < ?"
)

#: the compact key of each step of a pruned version whose source is still there: a scan that
#: meets the file again finds it done (``marked``: 0 for a row mark-existing recorded)
KEEP = (
    "INSERT INTO kept (vkey, step_key, status, marked, source, root, relpath) "
    "SELECT vkey, step_key, status, CASE WHEN attempts = 0 THEN 0 ELSE 1 END, source, root, "
    "relpath FROM dispatches WHERE vkey IN ({keys}) ON CONFLICT (vkey, step_key) DO NOTHING"
)

DELETE = "DELETE FROM dispatches WHERE vkey IN ({keys})"

#: kept keys in key order from a cursor, one row per version: (vkey, root, relpath)
KEPT = (
    "SELECT vkey, MIN(root), MIN(relpath) FROM kept WHERE vkey > ? GROUP BY vkey "
    "ORDER BY vkey LIMIT ?"
)

DROP_KEPT = "DELETE FROM kept WHERE vkey IN ({keys})"

#: ``forget``: the kept keys of a path go with its rows
FORGET_KEPT = "DELETE FROM kept WHERE relpath = ? AND (? IS NULL OR source = ?)"

#: the rows of a version as the planner asks for them, the kept keys of pruned ones included
STATES = (
    "SELECT vkey, step_key, status, attempts FROM dispatches WHERE vkey IN ({keys}) "
    "UNION ALL SELECT vkey, step_key, status, marked FROM kept WHERE vkey IN ({keys})"
)


#: the statuses the stats rollups counted from migration 11 (SQLite; 8 on PostgreSQL) on:
#: settled rows only. That left a backlog of PENDING rows to be counted from the table at
#: every read, so the next migration counts PENDING rows too (``COUNTED``)
SETTLED = "('SUCCEEDED', 'FAILED')"
#: the statuses the stats rollups count: all but IN_PROGRESS. A claim (PENDING to
#: IN_PROGRESS) takes a row out and its outcome puts it back; a row the inline lanes insert
#: IN_PROGRESS is counted once, when it settles. The rows IN_PROGRESS (the work in flight, a
#: few hundred at most) are counted from the table itself (``reads.rollup_sql``, ``ROW_COUNT``)
COUNTED = "('PENDING', 'SUCCEEDED', 'FAILED')"
IN_FLIGHT = "('IN_PROGRESS')"

#: how many rows the journal holds: the rollup's sum (a small table) and the rows in flight
#: (found by the index on status)
ROW_COUNT = (
    "SELECT (SELECT COALESCE(SUM(n), 0) FROM stats_days) + "
    f"(SELECT COUNT(*) FROM dispatches WHERE status IN {IN_FLIGHT})"
)


def settled_only(rollups: Mapping[str, str]) -> list[str]:
    """The statements that take the counts of unsettled rows out of each rollup (the
    migration to settled-only rollups; the triggers are the backend's own)."""
    return [f"DELETE FROM {table} WHERE status NOT IN {SETTLED}" for table in rollups]


def recount(rollups: Mapping[str, str]) -> list[str]:
    """The statements that fill each rollup again from the rows, the ``COUNTED`` ones (a
    migration that changes what the rollups count; the triggers are the backend's own)."""
    return [
        sql
        for table, bucket in rollups.items()
        for sql in (
            f"DELETE FROM {table}",
            f"INSERT INTO {table} SELECT {bucket.format(row='dispatches')}, status, "
            "destination, extension, COUNT(*), COALESCE(SUM(size), 0) FROM dispatches "
            f"WHERE status IN {COUNTED} GROUP BY 1, 2, 3, 4",
        )
    ]


def rollup_schema(rollups: Mapping[str, str], integer: str, options: str = "") -> list[str]:
    """The statements creating each stats rollup (``rollups``: table -> the day number it
    counts a row under, ``{row}`` naming the table) and filling it from the rows already
    there; ``integer`` is the backend's 64-bit integer type."""
    return [
        sql
        for table, bucket in rollups.items()
        for sql in (
            f"""CREATE TABLE {table} (
            day {integer} NOT NULL,     -- days since 1970-01-01 (UTC)
            status TEXT NOT NULL,
            destination TEXT NOT NULL,
            extension TEXT NOT NULL,
            n {integer} NOT NULL,       -- rows
            bytes {integer} NOT NULL,   -- their sizes' sum
            PRIMARY KEY (day, status, destination, extension)
        ){options}""",
            f"INSERT INTO {table} SELECT {bucket.format(row='dispatches')}, status, "
            "destination, extension, COUNT(*), COALESCE(SUM(size), 0) FROM dispatches "
            "GROUP BY 1, 2, 3, 4",
        )
    ]


def marks(n: int) -> str:
    """``n`` parameter marks, comma-separated."""
    return ",".join("?" * n)


@dataclass(frozen=True, slots=True)
class OldRow:
    """A row met walking the journal oldest first (``Journal.oldest``)."""

    id: int
    vkey: str
    created: float
    root: str
    relpath: str


@dataclass(frozen=True, slots=True)
class KeptKey:
    """A pruned version whose compact key is kept (``Journal.kept_keys``)."""

    vkey: str
    root: str
    relpath: str
