"""``check --connect``: what the journal looks like to a service about to open it, asked without
writing anything (no file created, no table, no migration).

SQLite: whether its folder can be written and the file's schema version; PostgreSQL: the
server's version, the schema's, and the nodes on record, over one short connection with the
configured credentials. Never shows the password.
"""

from __future__ import annotations

import os
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import JournalError
from .backends import needs_psycopg
from .base import NodeInfo
from .sqlite_schema import MIGRATIONS as SQLITE_MIGRATIONS
from .target import Database, PostgresTarget

#: the oldest PostgreSQL whose ``pg_xact_status`` tells whether a transaction whose COMMIT went
#: unanswered committed (server_version_num)
XACT_STATUS_FROM = 130000
#: the oldest PostgreSQL the journal runs on at all (``hashtextextended`` for the name locks)
OLDEST = 110000


@dataclass(frozen=True, slots=True)
class Probe:
    """The journal as found: ``schema`` is its schema version (None: nothing there yet, the
    first start creates it) and ``newest`` the one this filedispatch brings it to;
    ``server`` and ``server_num`` the PostgreSQL version (None for SQLite); ``writable``
    whether the first start may create what is missing (SQLite: the folder; PostgreSQL: tables
    in the schema)."""

    where: str
    schema: int | None
    newest: int
    writable: bool
    server: str | None = None
    server_num: int | None = None
    nodes: list[NodeInfo] = field(default_factory=list)

    @property
    def resolves_lost_commits(self) -> bool:
        """Whether a COMMIT whose answer was lost can be told committed or not (PostgreSQL 13
        or later; SQLite has no such case)."""
        return self.server_num is None or self.server_num >= XACT_STATUS_FROM

    def problems(self) -> list[str]:
        """What would stop a service on this journal, one line each."""
        out = []
        if self.schema is not None and self.schema > self.newest:
            out.append(
                f"the journal {self.where} has schema version {self.schema}, newer than this "
                f"filedispatch knows ({self.newest}): run the newer filedispatch"
            )
        if self.server_num is not None and self.server_num < OLDEST:
            out.append(f"PostgreSQL {self.server} is too old: filedispatch needs 11 or later")
        if self.schema is None and not self.writable:
            out.append(
                f"the journal {self.where} does not exist yet, and cannot be created by this user"
            )
        return out


def probe(database: Database) -> Probe:
    """Look at the journal ``database`` names as a service would find it. Raises JournalError
    (one line, naming the journal, never the password) when it cannot be reached."""
    if isinstance(database, PostgresTarget):
        return _probe_postgres(database)
    return _probe_sqlite(Path(database))


def _probe_sqlite(path: Path) -> Probe:
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent  # the service creates the missing folders from here
    writable = os.access(folder, os.W_OK | os.X_OK)
    if not path.exists():
        return Probe(str(path), None, len(SQLITE_MIGRATIONS), writable)
    try:
        conn = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=10)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from None
    writable = writable and os.access(path, os.R_OK | os.W_OK)
    if not writable:
        raise JournalError(f"the journal {path} or its folder cannot be written by this user")
    return Probe(str(path), version, len(SQLITE_MIGRATIONS), True)


def _probe_postgres(target: PostgresTarget) -> Probe:
    with needs_psycopg():
        import psycopg

        from .pgconn import conninfo
        from .pgnodes import NODES, node_info
        from .pgschema import MIGRATIONS as PG_MIGRATIONS
    try:
        with psycopg.connect(conninfo(target)) as conn:
            server, num, has_schema, has_nodes, may_create = conn.execute(
                "SELECT current_setting('server_version'), "
                "current_setting('server_version_num')::int, "
                "to_regclass('filedispatch_schema') IS NOT NULL, "
                "to_regclass('nodes') IS NOT NULL, "
                "has_schema_privilege(current_schema(), 'CREATE')"
            ).fetchone() or (None, 0, False, False, False)
            schema = None
            if has_schema:
                row = conn.execute("SELECT version FROM filedispatch_schema").fetchone()
                schema = int(row[0]) if row else 0
            nodes = [node_info(r) for r in conn.execute(NODES).fetchall()] if has_nodes else []
    except psycopg.Error as exc:
        why = target.scrub(" ".join(str(exc).split())) or type(exc).__name__
        raise JournalError(f"cannot connect to the journal {target.shown}: {why}") from None
    return Probe(
        target.shown,
        schema,
        len(PG_MIGRATIONS),
        bool(has_schema or may_create),
        str(server),
        int(num),
        nodes,
    )
