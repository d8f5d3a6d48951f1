"""The SQLite journal's file: opening the writer's connection (WAL, a quick check for damage),
the numbered migrations with the stats rollups' triggers, and what an SQLite error code means
for the operator (an outage the writer waits out, or a journal that cannot be opened). Nothing
here reads or writes a row of history.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from ..errors import JournalError, JournalUnavailableError
from . import identity, retention, uploads
from .locks import migrating

#: the one-row table that holds the journal's identity token, 8 lowercase hex characters
IDENTITY_TABLE = "CREATE TABLE journal_identity (token TEXT NOT NULL)"
#: the place the token was made for (``identity``), added by a later migration
IDENTITY_PLACE = ["ALTER TABLE journal_identity ADD COLUMN place TEXT"]

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


def outage(exc: BaseException, path: Path) -> str | None:
    """One line for an SQLite error that means "the journal cannot be written now"; None for an
    error of one write (a constraint, a bad value), which fails that write alone."""
    code = getattr(exc, "sqlite_errorcode", None)
    if not isinstance(exc, sqlite3.Error) or code is None or code & 0xFF not in _OUTAGES:
        return None
    name = getattr(exc, "sqlite_errorname", "") or ""
    return f"{_OUTAGES[code & 0xFF].format(path=path)} ({exc}, {name})"


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


#: an update trigger's event and its condition: a grouped column changed
_CHANGED = (
    "AFTER UPDATE OF status, created, destination, extension, size ON dispatches WHEN "
    "(OLD.status IS NOT NEW.status OR OLD.created IS NOT NEW.created "
    "OR OLD.destination IS NOT NEW.destination OR OLD.extension IS NOT NEW.extension "
    "OR OLD.size IS NOT NEW.size)"
)
SETTLED = retention.SETTLED
COUNTED = retention.COUNTED


def _counting(statuses: str) -> list[str]:
    """The four rollup triggers, counting only rows whose status is among ``statuses`` (an
    SQL list, e.g. ``retention.COUNTED``): an insert, an update's old row taken away and its
    new row added (two triggers, each with its own WHEN), a delete."""
    new, old = f"NEW.status IN {statuses}", f"OLD.status IN {statuses}"
    return [
        f"CREATE TRIGGER stats_insert AFTER INSERT ON dispatches WHEN {new} "
        f"BEGIN {_counts('NEW', '')}; END",
        f"CREATE TRIGGER stats_update {_CHANGED} AND {old} BEGIN {_counts('OLD', '-')}; END",
        f"CREATE TRIGGER stats_settle {_CHANGED} AND {new} BEGIN {_counts('NEW', '')}; END",
        f"CREATE TRIGGER stats_delete AFTER DELETE ON dispatches WHEN {old} "
        f"BEGIN {_counts('OLD', '-')}; END",
    ]


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
    [  # the rollups count settled rows only (``retention.SETTLED``): a file's insert as
        # PENDING or IN_PROGRESS and its claim write no rollup; its settling adds it once
        "DROP TRIGGER stats_insert",
        "DROP TRIGGER stats_update",
        "DROP TRIGGER stats_delete",
        *retention.settled_only(_ROLLUPS),
        *_counting(SETTLED),
    ],
    [  # the rollups count PENDING rows too (``retention.COUNTED``): only the rows in flight
        # are read from the table, so a large backlog does not slow the stats down
        "DROP TRIGGER stats_insert",
        "DROP TRIGGER stats_update",
        "DROP TRIGGER stats_settle",
        "DROP TRIGGER stats_delete",
        *retention.recount(_ROLLUPS),
        *_counting(COUNTED),
    ],
    [  # the S3 multipart uploads open, by run (journal/uploads.py; was a file per run)
        uploads.SCHEMA.format(real="REAL") + " WITHOUT ROWID",
    ],
    [  # the journal's identity token (``journal_token``), made once here: it goes into the
        # temporary names of deliveries, so that two journals never write one temporary file
        IDENTITY_TABLE,
        "INSERT INTO journal_identity (token) VALUES (lower(hex(randomblob(4))))",
    ],
    [  # the place the token was made for (``identity``; NULL: bound at the next open), and
        # the highest row id ever given: a row id names a delivery outside the journal (an
        # HTTP Idempotency-Key, an S3 object's filedispatch-id), so it is never given again,
        # whatever deleted the newest row (``history forget``, pruning). SQLite hands out
        # the largest id plus one: a row given an id at or below the mark is moved above it
        *IDENTITY_PLACE,
        "CREATE TABLE id_mark (id INTEGER NOT NULL)",
        "INSERT INTO id_mark SELECT COALESCE(MAX(id), 0) FROM dispatches",
        "CREATE TRIGGER id_mark_delete AFTER DELETE ON dispatches "
        "WHEN OLD.id > (SELECT id FROM id_mark) BEGIN UPDATE id_mark SET id = OLD.id; END",
        "CREATE TRIGGER id_mark_insert AFTER INSERT ON dispatches "
        "WHEN NEW.id <= (SELECT id FROM id_mark) "
        "BEGIN UPDATE dispatches SET id = (SELECT id FROM id_mark) + 1 WHERE id = NEW.id; END",
    ],
    [  # the tokens the journal had before a rebind, with the highest row id of each: a row
        # planned under one keeps its delivery's name (``identity.Named.named``)
        identity.TOKENS_TABLE.format(bigint="INTEGER"),
        # and the rows planned so far keep the name they were sent under, ``<token>-<id>``
        *(sql.format(bigint="INTEGER") for sql in identity.PLAIN_UPTO),
    ],
]


def bulk_ok(conn: sqlite3.Connection) -> bool:
    """Whether this SQLite has JSON and ``->>`` (3.38), which the bulk statements use."""
    try:
        conn.execute("SELECT '[1]' ->> 0").fetchone()
    except sqlite3.Error:
        return False
    return True


def journal_token(conn: sqlite3.Connection, path: Path) -> tuple[str, str | None, identity.Names]:
    """The journal's identity token (``Journal.token``), made once by the migration to
    schema version 14 and made again when the file at ``path`` is not where it was made (a
    copy: ``identity``); the token it replaced then (else None); and what names the rows
    planned before (``identity.Names``)."""
    place = identity.sqlite_place(path)
    row = _identity(conn)
    bind = identity.rebind(row, place)
    if bind is not None:
        conn.execute("BEGIN IMMEDIATE")
        try:
            row = _identity(conn)  # as it is under the lock
            bind = identity.rebind(row, place)
            if bind is not None:
                conn.execute(identity.BIND.format(p="?"), bind)
                if bind[0] != row[0]:  # the rows planned so far keep their token
                    conn.execute(identity.KEEP_TOKEN.format(p="?"), (row[0],))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    earlier = tuple((int(u), str(t)) for u, t in conn.execute(identity.READ_TOKENS))
    [(plain,)] = conn.execute(identity.READ_PLAIN_UPTO).fetchall()
    if bind is None or bind[0] == row[0]:
        return str(row[0]), None, (earlier, int(plain))
    return bind[0], str(row[0]), (earlier, int(plain))


def _identity(conn: sqlite3.Connection) -> tuple[str, str | None]:
    row = conn.execute(identity.READ_IDENTITY).fetchone()
    if row is None:  # the migration wrote it: only a hand-edited journal lacks it
        raise JournalError("the journal has no identity token (table journal_identity is empty)")
    return str(row[0]), row[1]


def connect_writer(path: Path) -> sqlite3.Connection:
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
        _migrate(conn, path)
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


def open_error(exc: sqlite3.Error, path: Path) -> JournalError:
    """Why the journal cannot be opened, and whether waiting can help."""
    code = (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF
    if code in (11, 26):  # SQLITE_CORRUPT, SQLITE_NOTADB
        return JournalError(_corrupted(path, str(exc)))
    why = outage(exc, path) or str(exc)
    if code in _TRANSIENT_AT_OPEN:
        return JournalUnavailableError(f"cannot open the journal: {why}")
    return JournalError(f"cannot open the journal {path}: {why}")


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    current = int(conn.execute("PRAGMA user_version").fetchone()[0])
    if current > len(MIGRATIONS):
        raise JournalError(
            f"the journal has schema version {current}, newer than this filedispatch knows"
        )
    if current == len(MIGRATIONS):
        return
    with migrating(path):  # never under a service of an older version
        _migrate_from(conn, int(conn.execute("PRAGMA user_version").fetchone()[0]))


def _migrate_from(conn: sqlite3.Connection, current: int) -> None:
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
