"""A journal upgraded while a service of an older version still runs on it.

A node of a PostgreSQL cluster keeps the schema it opened for as long as it runs: it never
reads the schema version again. Before, a newer node migrated the journal under it all the
same, and the older node went on planning rows that it named the old way
(``<token>-<row id>``) while a newer node resuming one named it the new way
(``<token>-<row id>-<planned>``): an idempotent receiver took the second for a new file. A
migration is now refused while a service of an older version holds the journal's lock. The
older node here is what such a service holds on the database (the one-service lock, its
name's lock, a live lease), made by hand: its code cannot be run here. An SQLite journal has
one service, but a command of the newer version (``history retry``, ``history forget``)
migrated it under a running service of the older one all the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from filedispatch.errors import JournalError, ServiceError
from filedispatch.journal import PostgresTarget, open_journal
from filedispatch.journal.pgschema import MIGRATIONS
from filedispatch.journal.place import journal_lock, journal_lock_when_ready
from filedispatch.journal.sqlite_schema import MIGRATIONS as SQLITE_MIGRATIONS

from .apiutil import database_config
from .conftest import run_cli, wait_until, write_config
from .pgcluster import PASSWORD, PASSWORD_ENV

#: the keys of the one-service lock and of a node name's lock, as every version since the
#: cluster (``place``) takes them
_SERVICE_LOCK, _NODE_LOCK = 0x66645F73, 0x66645F6E


def _schema_before_the_newest(url: str) -> None:
    """The journal as the version before the newest migration made it."""
    with psycopg.connect(url, password=PASSWORD, autocommit=True) as conn:
        conn.execute("CREATE TABLE filedispatch_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO filedispatch_schema VALUES (%s)", (len(MIGRATIONS) - 1,))
        for migration in MIGRATIONS[:-1]:
            for sql in migration:
                conn.execute(sql.encode())


def _version(url: str) -> int:
    with psycopg.connect(url, password=PASSWORD, autocommit=True) as conn:
        row = conn.execute("SELECT version FROM filedispatch_schema").fetchone()
    assert row is not None
    return int(row[0])


@contextlib.contextmanager
def _older_node(url: str, name: str = "old-a") -> Iterator[psycopg.Connection[Any]]:
    """A running node of a version before the newest migration, as the database sees it: the
    one-service lock (shared) and its name's lock on one session, and a live lease."""
    conn = psycopg.connect(url, password=PASSWORD, autocommit=True)
    try:
        conn.execute("SELECT pg_advisory_lock_shared(%s)", (_SERVICE_LOCK,))
        conn.execute("SELECT pg_advisory_lock(hashtextextended(%s, %s))", (name, _NODE_LOCK))
        conn.execute(
            "INSERT INTO nodes (name, epoch, started, lease_s, renewed, lease_until) "
            "VALUES (%s, nextval('node_epochs'), extract(epoch FROM now()), 30, now(), "
            "now() + interval '30 seconds')",
            (name,),
        )
        yield conn
    finally:
        conn.close()


def _plan_as_older_node(conn: psycopg.Connection[Any], name: str) -> tuple[int, float]:
    """A row the older node plans (the columns every version writes): its id and ``created``."""
    created = time.time()
    row = conn.execute(
        "INSERT INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
        "mtime_ns, rule, step, step_key, destination, protocol, status, created) "
        "VALUES (%s, 'inbox', '/in', %s, %s, 'txt', 1, 1, 'r', 0, 'k', '/out', 'local', "
        "'PENDING', %s) RETURNING id",
        (f"v-{name}", name, name, created),
    ).fetchone()
    assert row is not None
    return int(row[0]), created


async def test_a_migration_waits_for_every_node_of_an_older_version_to_stop(
    pg_url: str,
) -> None:
    """With a node of the older version running, a newer version's open refuses to migrate
    (naming the node and its session) and leaves the schema as it is; a node of the newer
    version running meanwhile does not hold it up. While the older node's lease runs after
    its session ended (killed, or cut off), it is still refused. Once the older node has
    stopped, the migration runs, and the row the older node planned keeps the name it gave
    it."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    _schema_before_the_newest(pg_url)
    with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as conn:
        token = str(conn.execute("SELECT token FROM journal_identity").fetchone()[0])  # type: ignore[index]
    with journal_lock(target, "new-b"), _older_node(pg_url) as older:
        with pytest.raises(JournalError) as refused:
            async with open_journal(target):
                pass
        said = str(refused.value)
        assert "older version" in said and "lease runs: old-a" in said, said
        assert f"server pid {older.info.backend_pid}" in said, said
        assert _version(pg_url) == len(MIGRATIONS) - 1
        row_id, created = _plan_as_older_node(older, "late.txt")
    # its session ended, its lease still runs: a node killed, or one cut off that may be back
    with pytest.raises(JournalError, match="nodes whose lease runs: old-a"):
        async with open_journal(target):
            pass
    with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as conn:  # as it stops
        conn.execute("UPDATE nodes SET lease_until = now() - interval '1 millisecond'")
    with journal_lock(target, "new-b"):
        async with open_journal(target) as journal:
            assert _version(pg_url) == len(MIGRATIONS)
            # the name the older node sent it under: <token>-<row id>
            assert journal.named(row_id, created) == (token, 0.0)


def test_a_node_started_while_a_node_of_an_older_version_runs_exits_saying_so(
    tmp_path: Path, pg_url: str
) -> None:
    """The real CLI: the start is refused with one line, exit 1, and the schema is left."""
    _schema_before_the_newest(pg_url)
    (tmp_path / "inbox").mkdir()
    cfg = write_config(
        tmp_path / "new.yml",
        {
            "database": database_config(pg_url),
            "node": "new-b",
            "api": {"enabled": False},
            "sources": [{"path": str(tmp_path / "inbox"), "name": "inbox"}],
            "rules": [{"extensions": ["txt"], "to": str(tmp_path / "out")}],
        },
    )
    with _older_node(pg_url):
        ran = run_cli("-c", cfg, "--once", timeout=120)
    assert ran.returncode == 1, ran.stderr
    assert "older version" in ran.stderr and "stop every node" in ran.stderr, ran.stderr
    assert "Traceback" not in ran.stderr and PASSWORD not in ran.stderr
    assert _version(pg_url) == len(MIGRATIONS) - 1


async def test_a_node_whose_lock_was_lost_across_an_upgrade_stops(pg_url: str) -> None:
    """A node cut off from the database long enough for its session to end, meanwhile
    upgraded by a newer version (which no lock of it held back), stops when it takes its
    lock again instead of planning rows under the schema it opened."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target):
        pass
    async with journal_lock_when_ready(target, "n1", None) as hold:
        assert hold is not None
        pid = hold.conn.info.backend_pid
        with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as conn:
            conn.execute("UPDATE filedispatch_schema SET version = version + 1")
            conn.execute("SELECT pg_terminate_backend(%s)", (pid,))
            wait_until(
                lambda: (
                    not conn.execute(
                        "SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)
                    ).fetchall()
                )
            )
        with pytest.raises(ServiceError, match="upgraded to schema version"):
            await asyncio.to_thread(hold.keep)


#: a service of an older version on an SQLite journal, as its lock file shows it: held
#: (``flock``) with the holder's pid in it; it stops when its stdin closes
_OLDER_SERVICE = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()}\\n".encode())
print("held", flush=True)
sys.stdin.read()
"""


def _sqlite_journal_before_the_newest(tmp_path: Path) -> Path:
    path = tmp_path / "j.db"
    with contextlib.closing(sqlite3.connect(path)) as conn:
        for migration in SQLITE_MIGRATIONS[:-1]:
            for sql in migration:
                conn.execute(sql)
        conn.execute(f"PRAGMA user_version = {len(SQLITE_MIGRATIONS) - 1}")
        conn.commit()
    return path


async def test_a_command_of_a_newer_version_does_not_migrate_an_sqlite_journal_in_use(
    tmp_path: Path,
) -> None:
    """An SQLite journal of the schema before the newest, its service (of that version)
    running: a newer version's open refuses to migrate it, naming the service's pid, and
    leaves it as it is; once the service has stopped, the open migrates it."""
    path = _sqlite_journal_before_the_newest(tmp_path)
    older = subprocess.Popen(
        [sys.executable, "-c", _OLDER_SERVICE, f"{path}.lock"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert older.stdout is not None and older.stdout.readline() == "held\n"
        with pytest.raises(JournalError) as refused:
            async with open_journal(path, hold=False):
                pass
        assert f"older version runs on it (pid {older.pid})" in str(refused.value)
        with sqlite3.connect(path) as conn:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
        assert version == len(SQLITE_MIGRATIONS) - 1
    finally:
        older.communicate("", timeout=30)
    async with open_journal(path, hold=False):
        pass
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == len(SQLITE_MIGRATIONS)


#: a command of the newer version opening the journal (as ``history`` does), its pid first
_NEWER_OPEN = """
import asyncio, os, sys
from pathlib import Path
from filedispatch.journal import open_journal
print("pid", os.getpid(), flush=True)
async def main():
    async with open_journal(Path(sys.argv[1]), hold=False):
        pass
try:
    asyncio.run(main())
except Exception as exc:
    print("refused", exc, flush=True)
    sys.exit(1)
"""


def _in_own_pid_namespace(args: list[str]) -> list[str]:
    """``args`` run as pid 1 of a new pid namespace (as a container's main process is)."""
    probe = subprocess.run(
        ["unshare", "--pid", "--fork", "true"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid: {probe.stderr.strip()}")
    return ["unshare", "--pid", "--fork", *args]


def test_a_newer_command_in_another_container_does_not_migrate_an_sqlite_journal_in_use(
    tmp_path: Path,
) -> None:
    """The older service runs as pid 1 of its container, and a newer version's command as
    pid 1 of another, on the same journal: refused as on one host. Before, the lock held by
    another process was taken for this one's own because the pid written in it was the same
    (found by the session-9 review, rev9): the journal was migrated under the running older
    service."""
    path = _sqlite_journal_before_the_newest(tmp_path)
    older = subprocess.Popen(
        _in_own_pid_namespace([sys.executable, "-c", _OLDER_SERVICE, f"{path}.lock"]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert older.stdout is not None and older.stdout.readline() == "held\n"
        newer = subprocess.run(
            _in_own_pid_namespace([sys.executable, "-c", _NEWER_OPEN, str(path)]),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        with contextlib.closing(sqlite3.connect(path)) as conn:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
    finally:
        older.communicate("", timeout=30)
    said = newer.stdout + newer.stderr[-2000:]
    assert said.startswith("pid 1\n"), said
    assert "older version runs on it (pid 1)" in said, said
    assert version == len(SQLITE_MIGRATIONS) - 1, f"migrated under the older service: {said}"
