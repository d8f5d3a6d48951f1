"""Where the journal lives and who may write it: the path (or database) the config and ``--db``
name, and the lock that keeps a second service off one journal.

Never opens the journal itself (``backends`` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import JournalError, JournalUnavailableError, ServiceError
from .backends import needs_psycopg, when_ready
from .base import default_path
from .locks import SCHEMA_LOCK, SERVICE_LOCK, flocked, held, open_lock_file
from .target import Database, PostgresTarget

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger(__name__)


def state_tag(database: Database) -> str:
    """A short name of the journal (8 hex digits) for the files the service keeps in its state
    folder, which services of other journals may share (every PostgreSQL journal's is the
    per-user state folder): each service removes only its own."""
    return hashlib.blake2b(
        str(database).encode("utf-8", "surrogateescape"), digest_size=4
    ).hexdigest()


def journal_path(config: Config | None, db: Path | None = None) -> Database:
    """``--db`` (``db``), then the config's ``database:``, then the per-user state folder:
    a path (SQLite) or a ``PostgresTarget``."""
    chosen = db or (config.database if config is not None else None) or default_path()
    if isinstance(chosen, Path):
        return chosen.expanduser().absolute()
    return chosen.target()


def state_folder(database: Database) -> Path:
    """Where the service keeps its own files (work folder, learned models): beside an SQLite
    journal, else the per-user state folder."""
    return database.parent if isinstance(database, Path) else default_path().parent


@contextlib.contextmanager
def journal_lock(database: Database, node: str | None = None) -> Iterator[None]:
    """One service per SQLite journal: two would dispatch the same files twice (and each would
    resume the other's work at its start). A file lock beside an SQLite journal.

    A PostgreSQL journal takes one service per ``node`` name (session advisory locks, freed
    the moment a process dies): several nodes share it, none with another's name; without a
    ``node`` (mark-existing) the lock is exclusive, refused while any service runs.

    Raises ServiceError when another process holds the lock (or it cannot be taken).
    """
    if isinstance(database, PostgresTarget):
        with _database_lock(database, node):
            yield
    else:
        with _file_lock(database):
            yield


#: the seed of a node name's lock key (the name's 64-bit hash)
_NODE_LOCK = 0x66645F6E


class NameLock:
    """A running service's hold on its journal: for PostgreSQL, the session advisory locks
    on one connection. The database drops them with that connection (a restart, a
    ``pg_terminate_backend``), and then a second service with this node's name could start:
    ``keep`` notices, connects again and takes them again."""

    #: seconds ``keep`` waits for the server to end the old session it asked to end
    ENDING_S = 10.0

    def __init__(self, target: PostgresTarget | None, node: str | None, conn: Any) -> None:
        self.target, self.node, self.conn = target, node, conn
        #: the server's (pid, backend_start) of the lock's session, to end it if it outlives
        #: its connection here (see keep)
        self.session = _session(conn) if target is not None else None

    def keep(self) -> None:
        """Blocking (call it in a thread): check the hold; take it again if its connection
        is gone. A connection that went silent (``interrupt``) may leave its session alive
        on the server, holding the locks until the server's own keepalives end it (two
        hours by default): that session, known by its pid and start time, is ended first
        (``pg_terminate_backend``: a role may end its own sessions). Raises ServiceError
        when another process took the lock meanwhile, JournalError while the database cannot
        be reached (tried again at the next call)."""
        if self.target is None:
            return
        with contextlib.suppress(Exception):
            self.conn.execute("SELECT 1")
            return
        with contextlib.suppress(Exception):
            self.conn.close()
        conn = _lock_connection(self.target, JournalError)
        try:
            self._end_old_session(conn)
            _take(conn, self.target, self.node, again=True)
            session = _session(conn)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                conn.close()
            if isinstance(exc, ServiceError | JournalError) or not isinstance(exc, Exception):
                raise
            why = self.target.scrub(" ".join(str(exc).split())) or type(exc).__name__
            raise JournalError(
                f"cannot take the journal's lock again on {self.target.shown}: {why}"
            ) from None
        self.conn, self.session = conn, session
        log.info("the journal's lock is held again (its connection was lost)")

    def _end_old_session(self, conn: Any) -> None:
        """End the lock's old session if the server still has it, and wait until it is gone
        (at most ``ENDING_S``)."""
        if self.session is None:
            return
        same = "FROM pg_stat_activity WHERE pid = %s AND backend_start = %s"
        rows = conn.execute(f"SELECT pg_terminate_backend(pid) {same}", self.session)
        if not rows.fetchall():
            return  # gone already (the usual case: a restart, a terminated backend)
        log.warning(
            "the journal lock's old session (server pid %d) outlived its connection here: "
            "it was ended",
            self.session[0],
        )
        deadline = time.monotonic() + self.ENDING_S
        while conn.execute(f"SELECT 1 {same}", self.session).fetchall():
            if time.monotonic() > deadline:
                raise JournalError(f"the lock's old session (pid {self.session[0]}) did not end")
            time.sleep(0.05)

    def interrupt(self) -> None:
        """From another thread: end a ``keep`` blocked on a connection that went silent. Its
        socket is shut down (not closed: the descriptor stays the connection's), so the
        blocked call fails at once, and ``keep`` connects again."""
        conn = self.conn
        if conn is None:
            return
        with contextlib.suppress(Exception):
            sock = socket.socket(fileno=os.dup(conn.fileno()))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()


def _session(conn: Any) -> tuple[int, Any] | None:
    """The server's (pid, backend_start) of ``conn``'s session; None if it cannot be read."""
    try:
        row = conn.execute(
            "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"
        ).fetchone()
    except Exception:
        return None
    return (int(row[0]), row[1]) if row else None


@contextlib.asynccontextmanager
async def journal_lock_when_ready(
    database: Database, node: str | None, stop: asyncio.Event | None
) -> AsyncIterator[NameLock | None]:
    """``journal_lock`` for a running service: a PostgreSQL database that cannot be reached
    yet (a host booting before its database, a restart) is waited for as ``when_ready``
    says, rather than an exit. The hold (see ``NameLock.keep``), or None when ``stop`` came
    first. Raises ServiceError as ``journal_lock`` does when another process holds it, and
    without ``stop`` (a run that must not wait) when the database cannot be reached."""
    if not isinstance(database, PostgresTarget):
        with journal_lock(database, node):
            yield NameLock(None, node, None)
        return
    if stop is None:
        conn = _lock_connection(database)
    else:
        conn = await when_ready(
            lambda: asyncio.to_thread(_lock_connection, database, JournalUnavailableError),
            stop,
            JournalUnavailableError,
        )
        if conn is None:
            yield None
            return
    held = NameLock(database, node, conn)
    try:
        _take(conn, database, node)
        yield held
    finally:
        held.close()


def _lock_connection(target: PostgresTarget, error: type[Exception] = ServiceError) -> Any:
    """A connection to hold the lock on; raises ``error`` naming the database (never its
    password) when it cannot be made."""
    try:
        with needs_psycopg():
            import psycopg

            from .pgconn import conninfo
    except JournalError as exc:
        raise ServiceError(str(exc)) from None
    try:
        return psycopg.connect(conninfo(target), autocommit=True)
    except psycopg.Error as exc:
        raise error(
            f"cannot reach the journal database {target.shown} to take its lock: "
            f"{target.scrub(' '.join(str(exc).split()))}"
        ) from None


@contextlib.contextmanager
def _database_lock(target: PostgresTarget, node: str | None) -> Iterator[None]:
    """The locks, on a connection of their own, closed at the end."""
    conn = _lock_connection(target)
    try:
        _take(conn, target, node)
        yield
    finally:
        conn.close()


def _take(conn: Any, target: PostgresTarget, node: str | None, again: bool = False) -> None:
    """Take the locks on ``conn``; ServiceError when another process holds one, or when the
    journal was upgraded to a schema this code does not know while its lock was lost
    (``again``)."""
    from .pgschema import MIGRATIONS, schema_version  # psycopg is there: ``conn`` is its

    # first, so that a session holding the one-service lock without it is an older version's
    conn.execute("SELECT pg_advisory_lock_shared(%s, %s)", (SCHEMA_LOCK, len(MIGRATIONS)))
    if again and (found := schema_version(conn)) > len(MIGRATIONS):
        raise ServiceError(
            f"the journal {target.shown} was upgraded to schema version {found} by a newer "
            f"filedispatch while this one's lock was lost (this one knows {len(MIGRATIONS)}): "
            "this one stops; upgrade it"
        )
    if node is None:
        row = conn.execute("SELECT pg_try_advisory_lock(%s)", (SERVICE_LOCK,)).fetchone()
    else:
        row = conn.execute("SELECT pg_try_advisory_lock_shared(%s)", (SERVICE_LOCK,)).fetchone()
    if not row or not row[0]:
        raise ServiceError(
            f"another filedispatch is {'now ' if again else 'already '}running on the journal "
            f"{target.shown}"
        )
    if node is not None:
        # a 64-bit hash of the name (hashtextextended, PostgreSQL 11 and later): with the
        # 32-bit hashtext two names could share a lock, found by a review by brute force
        # (node-35394 and node-42840), and refuse each other
        row = conn.execute(
            "SELECT pg_try_advisory_lock(hashtextextended(%s, %s))", (node, _NODE_LOCK)
        ).fetchone()
        if not row or not row[0]:
            if again:
                raise ServiceError(
                    f"another filedispatch took the node name {node!r} on the journal "
                    f"{target.shown} while this one's lock was lost with its connection: "
                    "this one stops; give each host its own name (node: in the config)"
                )
            raise ServiceError(
                f"another filedispatch is already running as node {node!r} on the journal "
                f"{target.shown}: give this one another name (node: in the config) or "
                "stop the other"
            )


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    fd = open_lock_file(path, ServiceError)
    try:
        if not flocked(fd):
            raise ServiceError(f"another filedispatch is already running on the journal {path}")
        try:  # for people, and for a migration in this process (``locks.migrating``)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            log.warning("cannot write the pid into %s.lock: %s", path, exc.strerror or exc)
        with held(fd):
            yield
    finally:
        os.close(fd)
