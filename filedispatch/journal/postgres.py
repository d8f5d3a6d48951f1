"""The PostgreSQL journal (psycopg 3): the rows of the SQLite journal, in a database server.

Here the work itself (planning, claiming, recording outcomes, fenced by the node's epoch) and
the command line's short reads; the writer and its connections are in ``pgwriter.py``, the
schema in ``pgschema.py``, the upkeep writes in ``pgupkeep.py``, the leases in ``pgnodes.py``.
Never logs the password; never touches a file or calls a processor.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from typing import Any

import psycopg
from psycopg_pool import AsyncConnectionPool

from ..errors import FencedError, JournalError
from ..models import Dispatch, FileVersion, Status
from .base import (
    DUPLICATE_OF,
    NodeInfo,
    PlannedStep,
    StepResult,
    StepState,
    finish_params,
    planned_labels,
    stored_text,
)
from .pgconn import (
    CONNECT_TIMEOUT_S,
    Conn,
    conninfo,
    limit_waits,
    pg,
    stat_text,
)
from .pgnodes import ALIVE, PgNodes, gone, requeue_orphans
from .pgupkeep import PgUpkeep
from .reads import COLUMNS, DELIVERED_DIGEST, POSTGRES, SqlReads, claimed_groups, row_dispatch
from .target import PostgresTarget
from .uploads import UploadRecords

#: planned rows come as one array per column and are inserted in one statement; the constants
#: are status, created, started, node and epoch
_PLAN = (
    "INSERT INTO dispatches (vkey, source, root, relpath, filename, extension, size, mtime_ns, "
    "rule, step, step_key, destination, protocol, dev, ino, ctime_ns, owner, btime_ns, status, "
    "created, started, node, epoch) "
    "SELECT u.vk, u.src, u.root, u.rel, u.fn, u.ext, u.size, u.mt::numeric, u.rule, u.step, "
    "u.sk, u.dest, u.proto, u.dev::numeric, u.ino::numeric, u.ct::numeric, u.owner, "
    "u.bt::numeric, %s, %s, %s, %s, %s::bigint "
    "FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::bigint[], %s::text[], %s::text[], %s::int[], %s::text[], %s::text[], %s::text[], "
    "%s::text[], %s::text[], %s::text[], %s::text[], %s::text[]) "
    "AS u(vk, src, root, rel, fn, ext, size, mt, rule, step, sk, dest, proto, dev, ino, ct, "
    "owner, bt) WHERE NOT EXISTS (SELECT 1 FROM kept k WHERE k.vkey = u.vk AND k.step_key = u.sk) "
    "ON CONFLICT (vkey, step_key) DO NOTHING"
)


def _plan_columns(
    steps: Iterable[PlannedStep], owner: Callable[[str], str | None]
) -> list[list[Any]]:
    rows = [
        (
            s.version.key,
            stored_text(s.version.source),
            str(s.version.root),
            stored_text(s.version.relpath),
            stored_text(s.version.name),
            stored_text(s.version.extension),
            s.version.size,
            str(s.version.mtime_ns),
            s.rule,
            s.step,
            s.step_key,
            stored_text(s.destination),
            s.protocol,
            stat_text(s.version.dev or None),
            stat_text(s.version.ino or None),
            stat_text(s.version.ctime_ns or None),
            owner(s.version.source),
            stat_text(s.version.btime_ns),
        )
        for s in steps
    ]
    return [list(col) for col in zip(*rows, strict=True)] if rows else []


#: the labels of rows just planned, as the SQLite journal's ``_set_labels`` records them
_LABELS = (
    "UPDATE dispatches d SET label = u.label FROM unnest(%s::text[], %s::text[], %s::text[]) "
    "AS u(label, vk, sk) WHERE d.vkey = u.vk AND d.step_key = u.sk AND d.label IS NULL"
)


async def _set_labels(conn: Conn, steps: Sequence[PlannedStep]) -> None:
    """Record the learned labels of rows just planned (in their transaction); a row planned
    before keeps the label it was given then, as its delivery may already have used it."""
    labelled = planned_labels(steps)
    if labelled:
        await conn.execute(_LABELS.encode(), [list(col) for col in zip(*labelled, strict=True)])


#: one outcome, fenced: the row must still carry the claim's token (the last %s)
_FINISH = (
    "UPDATE dispatches SET status=%s, attempts=%s, reason=%s, error_type=%s, location=%s, "
    "detail=%s, finished=%s, duration_ms=%s, next_attempt=%s, output=COALESCE(%s, output), "
    "sha256=COALESCE(%s, sha256) WHERE id=%s AND epoch IS NOT DISTINCT FROM %s"
)
#: many outcomes (distinct rows) in one statement, each fenced by its own claim's token; the
#: rows it changed
_FINISH_BULK = (
    "UPDATE dispatches d SET status=u.st, attempts=u.att, reason=u.rsn, error_type=u.et, "
    "location=u.loc, detail=u.det, finished=u.fin, duration_ms=u.dur, next_attempt=u.nxt, "
    "output=COALESCE(u.outp, d.output), sha256=COALESCE(u.sha, d.sha256) "
    "FROM unnest(%s::text[], %s::int[], %s::text[], %s::text[], %s::text[], %s::text[], "
    "%s::float8[], %s::bigint[], %s::float8[], %s::text[], %s::text[], %s::bigint[], "
    "%s::bigint[]) AS u(st, att, rsn, et, loc, det, fin, dur, nxt, outp, sha, id, ep) "
    "WHERE d.id = u.id AND d.epoch IS NOT DISTINCT FROM u.ep RETURNING d.id"
)


class PostgresJournal(PgUpkeep, SqlReads, UploadRecords):
    """The journal in a PostgreSQL database; open it with
    ``async with PostgresJournal.open(target)``. The writer and the pool are ``PgWriter``'s,
    the upkeep writes ``PgUpkeep``'s, the history reads ``SqlReads``'s, the leases
    ``PgNodes``'s and the S3 upload ledger ``UploadRecords``'; here: planning, claiming and
    recording the work."""

    dialect = POSTGRES
    #: an upload is an orphan once no live node holds its epoch: its node's lease ran out, or
    #: the node joined again since (``gone``: the same verdict as for the rows in progress)
    _GONE = gone("uploads.epoch")

    def __init__(self, target: PostgresTarget, conn: Conn, pool: AsyncConnectionPool) -> None:
        super().__init__(target, conn, pool)
        self._nodes = PgNodes(target, self._enqueue, self.read)

    async def _session(self, conn: Conn) -> None:
        """A new writer connection gets the limits of this node's lease (``limit_waits``)."""
        if self._nodes.lease_s:
            await limit_waits(conn, self._nodes.lease_s)

    async def _close(self) -> None:
        await super()._close()
        await self._nodes.close()

    @contextlib.asynccontextmanager
    async def _self_reader(self) -> AsyncIterator[PostgresJournal]:
        yield self

    def reader(self, size: int = 2) -> contextlib.AbstractAsyncContextManager[PostgresJournal]:
        """The journal's own pool serves the web app's reads too."""
        return self._self_reader()

    # ------------------------------------------------------------------ planning and work

    async def plan(self, steps: Iterable[PlannedStep], now: float | None = None) -> int:
        """Insert PENDING rows for steps not planned before; returns how many are new."""
        now = time.time() if now is None else now
        steps = list(steps)
        columns = _plan_columns(steps, self._owner)
        if not columns:
            return 0

        async def op(conn: Conn) -> int:
            cur = await conn.execute(_PLAN.encode(), ("PENDING", now, None, None, None, *columns))
            new = max(cur.rowcount, 0)
            await _set_labels(conn, steps)
            return new

        return await self.write(op)

    def plan_started(
        self, steps: Sequence[PlannedStep], now: float
    ) -> asyncio.Future[list[int | None]]:
        """Insert rows already IN_PROGRESS; each step's new id, None where planned before."""
        columns = _plan_columns(steps, self._owner)
        keys = [s.version.key + s.step_key for s in steps]
        node, epoch = self.node, self.epoch

        async def op(conn: Conn) -> list[int | None]:
            if not columns:
                return []
            cur = await conn.execute(
                (_PLAN + " RETURNING vkey || step_key, id").encode(),
                ("IN_PROGRESS", now, now, node, epoch, *columns),
            )
            new = {k: int(i) for k, i in await cur.fetchall()}
            return [new.pop(k, None) for k in keys]  # a repeat gets None

        return self._enqueue(op)

    async def record_failed_name(self, version: FileVersion, rule: str, reason: str) -> None:
        """A file that cannot even be planned (an undecodable name): one FAILED row says why."""
        now = time.time()
        await self.plan([PlannedStep(version, rule, 0, "name", "-", "-")], now)

        async def op(conn: Conn) -> None:
            await conn.execute(
                "UPDATE dispatches SET status='FAILED', reason=%s, finished=%s "
                "WHERE vkey=%s AND step_key='name' AND status='PENDING'",
                (reason, now, version.key),
            )

        await self.write(op)

    async def claim(
        self, limit: int, now: float, skip_sources: frozenset[str] = frozenset()
    ) -> list[list[Dispatch]]:
        """Take due PENDING work, grouped by file version (all of a version's rows, any status).

        The due rows are locked (``FOR UPDATE SKIP LOCKED``: rows another claim holds are
        passed over) and marked IN_PROGRESS in the same transaction.
        """

        node, epoch = self.node, self.epoch

        async def op(conn: Conn) -> list[list[Dispatch]]:
            if epoch is not None:  # a node whose lease ran out claims nothing
                cur = await conn.execute(ALIVE, (node, epoch))
                if await cur.fetchone() is None:
                    return []
            cur = await conn.execute(
                "SELECT vkey, source FROM dispatches WHERE status='PENDING' "
                "AND next_attempt <= %s AND (owner IS NULL OR owner = %s) "
                "ORDER BY id LIMIT %s FOR UPDATE SKIP LOCKED",
                (now, node, limit * 4),
            )
            found = await cur.fetchall()
            vkeys = list(dict.fromkeys(v for v, s in found if s not in skip_sources))[:limit]
            if not vkeys:
                return []
            cur = await conn.execute(
                f"SELECT vkey, step_key, {COLUMNS} FROM dispatches WHERE vkey = ANY(%s) "
                "ORDER BY rule, step, id",
                (vkeys,),
            )
            rows = await cur.fetchall()
            cur = await conn.execute(
                # ``started`` is the first try's (the retry policy's ``for`` counts from it)
                "UPDATE dispatches SET status='IN_PROGRESS', started=COALESCE(started, %s), "
                "node=%s, epoch=%s "
                "WHERE vkey = ANY(%s) AND status='PENDING' AND next_attempt <= %s "
                "AND (owner IS NULL OR owner = %s) RETURNING id",
                (now, node, epoch, vkeys, now, node),
            )
            taken = {int(i) for (i,) in await cur.fetchall()}
            found_due = {
                d.id
                for d in map(row_dispatch, (r[2:] for r in rows))
                if d.status == Status.PENDING and d.next_attempt <= now
            }
            # a version one of whose due rows another node took meanwhile (the lock covered
            # only the rows found): ours go back, so no version runs on two nodes at once
            groups, back = [], []
            for group in claimed_groups(vkeys, rows, now):
                due = [d.id for d in group if d.id in found_due]
                if all(i in taken for i in due):
                    for d in group:  # their outcomes are fenced by this claim's token
                        d.epoch = epoch
                    groups.append(group)
                else:
                    back += [i for i in due if i in taken]
            if back:
                await conn.execute(
                    "UPDATE dispatches SET status='PENDING', epoch=NULL WHERE id = ANY(%s)",
                    (back,),
                )
            return groups

        return await self.write(op)

    async def finish(self, results: Sequence[StepResult], now: float | None = None) -> None:
        """Record outcomes: SUCCEEDED/FAILED are final, PENDING waits for ``next_attempt``."""
        await self.finish_soon(results, now)

    def finish_soon(
        self, results: Sequence[StepResult], now: float | None = None
    ) -> asyncio.Future[None]:
        """Queue outcomes for the next group commit; the future is done once they (and every
        write queued before them) are committed."""
        # each outcome is fenced by the token its row was claimed with, never by the node's
        # current one: after the node joined again, a late outcome of a claim it lost must not
        # land on the row it (or another node) claimed anew
        current, node = self.epoch, self.node
        tokens = [current if r.epoch is None else r.epoch for r in results]
        at = time.time() if now is None else now
        params = [(*p, t) for p, t in zip(finish_params(results, at), tokens, strict=True)]

        async def op(conn: Conn) -> FencedError | None:
            if not params:
                return None
            ids = [p[-2] for p in params]
            if len(set(ids)) == len(ids):
                columns = [list(c) for c in zip(*params, strict=True)]
                cur = await conn.execute(_FINISH_BULK.encode(), columns)
                done = len(await cur.fetchall())
            else:  # the same row twice: in order, one statement each
                done = 0
                async with conn.cursor() as cur:
                    for p in params:
                        await cur.execute(_FINISH.encode(), p)
                        done += max(cur.rowcount, 0)
                ids = list(dict.fromkeys(ids))
            if done >= len(ids):
                return None
            return FencedError(
                f"{len(ids) - done} outcome(s) refused: node {node} no longer holds the rows "
                "(its lease ran out and its work went back to the queue); not recorded, and "
                "nothing is done to the source on their account"
            )

        return self._enqueue(op)

    def resume_interrupted(self) -> asyncio.Future[int]:
        """At start-up: rows a crash left IN_PROGRESS become PENDING again, due at once."""

        return self._enqueue(requeue_orphans)

    # ------------------------------------------------------------------ nodes and leases

    @property
    def node(self) -> str | None:
        """This service's node name, once joined."""
        return self._nodes.node

    @property
    def epoch(self) -> int | None:
        """Its fencing token, new at each join."""
        return self._nodes.epoch

    def _upload_rows(self, sql: str, params: list[tuple[Any, ...]]) -> asyncio.Future[None]:
        async def op(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(pg(sql), params)

        return self._enqueue(op)

    def _upload_run(self) -> tuple[str | None, int | None]:
        return self.node, self.epoch

    def _owner(self, source: str) -> str | None:
        """The node a planned row belongs to: None (any node) for a shared source."""
        return None if source in self._nodes.shared else self.node

    async def join(
        self,
        node: str,
        lease_s: float,
        shared: frozenset[str] = frozenset(),
    ) -> int:
        """Register as ``node`` with a lease of ``lease_s`` seconds on the database's clock; a
        node of that name whose lease ran out is replaced, a live one refuses (NodeConflictError)
        unless it is this service's own join whose answer was lost. Work no live node holds is
        queued to go back to PENDING. On the lease connection (``pgnodes``); raises JournalError
        when it cannot reach the database."""
        return await self._nodes.join(node, lease_s, shared)

    async def renew(self) -> bool:
        """Renew the lease and the listing leases held, on the lease connection (never behind
        the writer); queue the requeue of the work of nodes whose lease ran out. False when this
        node's lease had run out (it must join again); JournalError when the database cannot
        be reached in a third of a lease."""
        return await self._nodes.renew()

    async def take_listing(self, source: str) -> bool:
        """Take the listing lease of a shared source if it is free or ran out, or keep it."""
        return await self._nodes.take_listing(source)

    async def leave(self) -> None:
        """End the lease and the listing leases now, so other nodes take over at once."""
        await self._nodes.leave()

    async def nodes(self) -> list[NodeInfo]:
        """Every node the journal knows, by name, with its listings and rows in flight."""
        return await self._nodes.nodes()

    def forget_nodes(self, after_s: float) -> asyncio.Future[list[str]]:
        """See ``Journal.forget_nodes``: queued on the writer, logged once done."""
        return self._nodes.forget(after_s)

    async def hand_over(self, old: str, new: str) -> int:
        """See ``Journal.hand_over``: one transaction on the writer."""
        return await self._nodes.hand_over(old, new)

    async def mark_done(self, steps: Iterable[PlannedStep]) -> int:
        """Record steps as SUCCEEDED without sending (dirsend's --store-only)."""
        steps = list(steps)
        now = time.time()
        new = await self.plan(steps, now)

        async def op(conn: Conn) -> None:
            async with conn.cursor() as cur:
                await cur.executemany(
                    "UPDATE dispatches SET status='SUCCEEDED', finished=%s, duration_ms=0, "
                    "detail='marked as already dispatched (mark-existing): not sent' "
                    "WHERE vkey=%s AND step_key=%s AND status='PENDING'",
                    [(now, s.version.key, s.step_key) for s in steps],
                )

        await self.write(op)
        return new


@contextlib.asynccontextmanager
async def open_reader(target: PostgresTarget) -> AsyncIterator[PostgresJournal]:
    """The journal for the command line's reads (it never holds a write)."""
    async with PostgresJournal.open(target, hold=False) as journal:
        yield journal


def read_states(target: PostgresTarget, vkeys: Sequence[str]) -> dict[str, list[StepState]]:
    """For each version key: its rows' states (see the SQLite journal's ``read_states``),
    through a short synchronous connection (the command line's simulations). Raises
    JournalError naming the database when it cannot be read."""
    out: dict[str, list[StepState]] = {}
    if not vkeys:
        return out
    try:
        with psycopg.connect(conninfo(target), connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            rows = conn.execute(
                "SELECT vkey, id, step_key, status, attempts FROM dispatches "
                "WHERE vkey = ANY(%s) UNION ALL SELECT vkey, 0, step_key, status, marked "
                "FROM kept WHERE vkey = ANY(%s) ORDER BY 2",
                (list(vkeys), list(vkeys)),
            ).fetchall()
    except psycopg.Error as exc:
        raise JournalError(
            f"cannot read the journal {target.shown}: {type(exc).__name__}"
        ) from None
    for vkey, row_id, step_key, status, attempts in rows:
        out.setdefault(vkey, []).append(StepState(int(row_id), step_key, Status(status), attempts))
    return out


def read_digests(
    target: PostgresTarget, wanted: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, str]]:
    """For each (destination, sha256) the journal has a delivery of: its (id, location) (see
    the SQLite journal's ``read_digests``). Raises JournalError naming the database when it
    cannot be read."""
    out: dict[tuple[str, str], tuple[int, str]] = {}
    if not wanted:
        return out
    try:
        with psycopg.connect(conninfo(target), connect_timeout=int(CONNECT_TIMEOUT_S)) as conn:
            for destination, sha256 in wanted:
                row = conn.execute(
                    pg(DELIVERED_DIGEST), (sha256, destination, DUPLICATE_OF)
                ).fetchone()
                if row is not None:
                    out[(destination, sha256)] = (int(row[0]), str(row[1]))
    except psycopg.Error as exc:
        raise JournalError(
            f"cannot read the journal {target.shown}: {type(exc).__name__}"
        ) from None
    return out
