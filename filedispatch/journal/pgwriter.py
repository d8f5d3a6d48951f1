"""The PostgreSQL journal's writer and its connections: opening (connect, migrate, the read
pool), one writer task that commits every queued write in one transaction on a connection of
its own (group commit, in queue order, each write in a savepoint; a write marked
``own_transaction`` is committed alone), the pooled reads, closing.

A server that goes away, refuses a login or runs out of disk is not an error for the caller:
the writer holds the batch, says so once (``health``, ``writable``), reconnects with a capped
backoff and commits the batch once the server takes it. A batch whose COMMIT was sent but
never answered is not run again blindly: the server is asked whether that transaction committed
(``pg_xact_status``), and a committed batch keeps the results of its one run. Knows no table:
the writes it runs are the journal's.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any, Self

import psycopg
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from ..errors import JournalError, JournalUnavailableError
from . import identity
from .base import RETRY_FIRST_S, RETRY_MAX_S, HealthReport, JournalState, log, next_health, resolve
from .pgconn import (
    CONNECT_TIMEOUT_S,
    Conn,
    PgOp,
    T,
    configure,
    connect,
    conninfo,
    outage,
    pg,
)
from .pgschema import journal_token, migrate
from .target import PostgresTarget

#: another transaction's locks (a deadlock, a lock wait past ``lock_timeout``): the batch was
#: rolled back and is tried again at once, up to CONFLICT_RETRIES times, then held as in an
#: outage
_CONFLICTS = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)
CONFLICT_RETRIES = 20

#: the batch's transaction id, read right before its COMMIT (NULL: it wrote nothing); from
#: PostgreSQL 13 (before, an unanswered COMMIT's batch is run again, as any other)
_XID = "SELECT pg_current_xact_id_if_assigned()::text"
_XID_SINCE = 130000
#: ends the session that still holds the unanswered transaction (the same backend and the same
#: transaction: never another session), so that the server decides its fate now
_END_DOUBT = (
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
    "WHERE pid = %s AND backend_xid::text = %s"
)
#: committed, aborted or in progress; NULL when the id is too old to tell
_FATE = "SELECT pg_xact_status(%s::xid8)"


class _InDoubt(Exception):
    """The COMMIT of a batch was sent and its answer lost (the connection broke meanwhile):
    the server may have committed it or not. Holds what deciding needs, and the results of the
    batch's run, which are the batch's if it committed."""

    def __init__(self, xid: str, pid: int, results: list[Any]) -> None:
        super().__init__(xid)
        self.xid, self.pid, self.results = xid, pid, results


def own_transaction(op: PgOp[T]) -> PgOp[T]:
    """Mark ``op`` to be committed in a transaction of its own, never in a group batch: for a
    write whose row locks other sessions wait for (the dead-epoch verdict's, which a renewal of
    the entry waits behind), so they are held for that write alone, not until a batch of
    thousands of other writes commits (e6 review). Returns ``op``."""
    setattr(op, _OWN, True)
    return op


_OWN = "_filedispatch_own_transaction"


def _alone(item: tuple[PgOp[Any], asyncio.Future[Any]]) -> bool:
    return bool(getattr(item[0], _OWN, False))


class PgWriter(HealthReport, identity.Named):
    """The writer and the read pool of a PostgreSQL journal; open it with
    ``async with cls.open(target)``."""

    def __init__(self, target: PostgresTarget, conn: Conn, pool: AsyncConnectionPool) -> None:
        HealthReport.__init__(self)
        self.target = target
        self._conn: Conn | None = conn  # the writer's; None while it is being replaced
        self._pool = pool
        self._inbox: asyncio.Queue[tuple[PgOp[Any], asyncio.Future[Any]] | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        #: a write taken from the inbox that goes in the next batch (``own_transaction``)
        self._held: tuple[PgOp[Any], asyncio.Future[Any]] | None = None
        self._give_up = asyncio.Event()

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, target: PostgresTarget, /, *, hold: bool = True) -> AsyncIterator[Self]:
        """Connect and migrate; raises JournalUnavailableError while the server cannot be
        reached (waiting may help), JournalError for anything else, each naming the database
        without its password."""
        try:
            conn = await connect(target)
        except psycopg.Error as exc:
            raise JournalUnavailableError(
                f"cannot open the journal {target.shown}: {target.scrub(str(exc))}"
            ) from None
        pool: AsyncConnectionPool | None = None
        try:
            await migrate(conn)
            token, old, names = await journal_token(conn)
            pool = AsyncConnectionPool(
                conninfo(target),
                kwargs={"autocommit": True},
                min_size=1,
                max_size=4,
                open=False,
                timeout=CONNECT_TIMEOUT_S,
                configure=configure,
                check=AsyncConnectionPool.check_connection,
                name="filedispatch-journal",
            )
            await pool.open(wait=True, timeout=CONNECT_TIMEOUT_S)
        except Exception as exc:
            await conn.close()
            if pool is not None:
                await pool.close()
            if isinstance(exc, JournalError):
                raise
            why = target.scrub(str(exc))
            if outage(exc):  # a PoolTimeout is an OperationalError too
                raise JournalUnavailableError(
                    f"cannot open the journal {target.shown}: {why}"
                ) from None
            raise JournalError(f"cannot open the journal {target.shown}: {why}") from None
        if old is not None:
            identity.moved(target.shown, old, token)
        journal = cls(target, conn, pool)
        journal.token = token
        journal.earlier, journal.plain_upto = names
        if not hold:
            journal.stop_retrying()
        journal._task = asyncio.create_task(journal._writer(), name="journal-writer")
        try:
            yield journal
        finally:
            await journal._close()

    async def _close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            self.stop_retrying()
            self._inbox.put_nowait(None)  # commit what is queued, then stop
            try:
                await asyncio.wait_for(asyncio.shield(task), 30)
            except TimeoutError:
                log.error("the journal writer did not finish within 30s; closing without it")
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        held, self._held = self._held, None
        if held is not None and not held[1].done():
            held[1].set_exception(JournalError("the journal is closed"))
        while not self._inbox.empty():  # a write nobody will commit must not hang its caller
            item = self._inbox.get_nowait()
            if item is not None and not item[1].done():
                item[1].set_exception(JournalError("the journal is closed"))
        if self._conn is not None:
            await self._conn.close()
        await self._pool.close()

    @property
    def where(self) -> str:
        return self.target.shown

    # ------------------------------------------------------------------ the writer

    async def _writer(self) -> None:
        while True:
            first, self._held = self._held or await self._inbox.get(), None
            if first is None:
                return
            batch = [first]
            stop = False
            while not _alone(first) and len(batch) < 5000 and not self._inbox.empty():
                item = self._inbox.get_nowait()
                if item is None:
                    stop = True
                    break
                if _alone(item):  # ends this batch and goes alone in the next
                    self._held = item
                    break
                batch.append(item)
            try:
                results = await self._commit_held([op for op, _ in batch])
            except JournalError as exc:
                results = [exc] * len(batch)
            except Exception as exc:  # a bug in an op: fail this batch only
                log.error("journal write failed: %s", self.target.scrub(str(exc)))
                results = [JournalError(f"journal write failed: {exc}")] * len(batch)
            resolve([fut for _, fut in batch], results)
            if stop:
                return

    async def _commit_held(self, ops: list[PgOp[Any]]) -> list[Any]:
        """Commit ``ops``; while the server refuses them, hold them and try again (1 s
        doubling to 30 s) until they are committed, or until ``stop_retrying``."""
        delay = RETRY_FIRST_S
        conflicts = 0
        doubt: _InDoubt | None = None
        while True:
            if self._give_up.is_set() and not self.health.ok:
                raise JournalError(f"not recorded, the journal is failing: {self.health.error}")
            try:
                # a batch whose COMMIT went unanswered runs again only if the server did not
                # commit it: a claim run twice would take other rows and leave the first
                # run's IN_PROGRESS, under a live epoch, with no worker
                if doubt is not None and await self._decide(doubt):
                    results = doubt.results
                else:
                    doubt = None
                    results = await self._commit(ops)
            except Exception as exc:
                if isinstance(exc, _InDoubt):
                    doubt = exc
                    exc = exc.__cause__ if isinstance(exc.__cause__, Exception) else exc
                elif isinstance(exc, _CONFLICTS) and conflicts < CONFLICT_RETRIES:
                    conflicts += 1  # rolled back, the connection is fine: again, at once
                    await asyncio.sleep(0.02 * conflicts)
                    continue
                elif not outage(exc):
                    raise
                await self._drop_connection()
                why = (
                    f"the journal database {self.target.shown} cannot take writes: "
                    f"{self.target.scrub(' '.join(str(exc).split()))}"
                )
                self._report(JournalState.FAILING, why)
                if self._give_up.is_set():
                    raise JournalError(f"not recorded, the journal is failing: {why}") from None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._give_up.wait(), delay)
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if not self.health.ok:
                self._report(JournalState.OK, None)
            return results

    async def _commit(self, ops: list[PgOp[Any]]) -> list[Any]:
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await connect(self.target)
            await self._session(conn)
        results: list[Any] = []
        xid: str | None = None
        pid, committing = 0, False
        try:
            async with conn.transaction():
                for op in ops:
                    try:
                        async with conn.transaction():  # a savepoint: one bad write fails alone
                            results.append(await op(conn))
                    except psycopg.Error as exc:
                        if outage(exc):
                            raise
                        results.append(JournalError(self.target.scrub(str(exc))))
                if conn.info.server_version >= _XID_SINCE:
                    cur = await conn.execute(_XID)
                    row = await cur.fetchone()
                    xid = None if row is None else row[0]
                pid = conn.info.backend_pid
                committing = xid is not None  # what fails from here on is the COMMIT itself
        except Exception as exc:
            if xid is not None and committing and outage(exc):
                raise _InDoubt(xid, pid, results) from exc
            raise
        return results

    async def _decide(self, doubt: _InDoubt) -> bool:
        """Whether the server committed the unanswered transaction; raises an outage while
        it cannot tell yet (the old session still holds it open: it is ended first)."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = await connect(self.target)
            await self._session(conn)
        xid32 = str(int(doubt.xid) & 0xFFFFFFFF)  # pg_stat_activity shows the 32-bit id
        await conn.execute(_END_DOUBT, (doubt.pid, xid32))
        try:
            cur = await conn.execute(_FATE, (doubt.xid,))
        except psycopg.errors.InvalidParameterValue:  # "in the future": a server that never
            return False  # saw it (another one took over): it did not commit here
        row = await cur.fetchone()
        fate = None if row is None else row[0]
        if fate == "in progress":
            raise psycopg.OperationalError("the unanswered commit is not decided yet")
        log.warning(
            "the journal's commit of %d write(s) went unanswered: %s",
            len(doubt.results),
            "it was made, they are not run again"
            if fate == "committed"
            else "it was not made, they are run again"
            if fate == "aborted"
            else "the database cannot tell (the transaction is too old), they are run again",
        )
        return fate == "committed"

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _session(self, conn: Conn) -> None:
        """What a new writer connection's session needs before its first batch (nothing
        here; the journal sets the limits its lease asks for)."""

    def _report(self, state: JournalState, error: str | None) -> None:
        self._set_health(
            next_health(self.health, state, error, self.target.shown, self._give_up.is_set())
        )

    def stop_retrying(self) -> None:
        """From now on a write the server refuses fails at once (``JournalError``)."""
        self._give_up.set()

    def _enqueue(self, op: PgOp[Any]) -> asyncio.Future[Any]:
        if self._task is None or self._task.done():
            raise JournalError("the journal is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._inbox.put_nowait((op, fut))
        return fut

    async def write(self, op: PgOp[T]) -> T:
        """Run ``op`` inside the next group commit and return its result once committed."""
        result: T = await self._enqueue(op)
        return result

    async def flush(self) -> None:
        """Return once every write queued before this call is committed."""
        await self.write(_nothing)

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read on a pooled connection; ``sql`` marks parameters with ``?``."""
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(pg(sql), params)
                return list(await cur.fetchall())
        except PoolTimeout:  # the server is gone
            raise JournalError(
                f"journal read failed: no connection to {self.target.shown} within "
                f"{CONNECT_TIMEOUT_S:g}s"
            ) from None
        except psycopg.Error as exc:
            raise JournalError(f"journal read failed: {self.target.scrub(str(exc))}") from None


async def _nothing(conn: Conn) -> None:
    """A write that changes nothing: committed after everything queued before it."""
