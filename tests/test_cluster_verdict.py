"""The verdict that a node's epoch is dead (issue 12; the b6 review of 03b0d3e), against a real
PostgreSQL (tests/pgcluster.py): work is never taken over from a live epoch, a dead epoch's
work never waits for ever, and a starting node is never told it is alone beside a live one.

Where a test must hold a statement in mid-run to choose an interleaving, it does so on that
statement's own session only (a gate the test opens), standing for a statement slowed by a
loaded server; nothing waits for a duration: each wait is for a state, with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import psycopg

from filedispatch.cluster import Membership
from filedispatch.errors import FencedError, JournalError
from filedispatch.journal import PlannedStep, PostgresTarget, StepResult, open_journal
from filedispatch.journal.pgnodes import DEAD_ENTRIES, requeue_orphans
from filedispatch.models import FileVersion, Status

from .conftest import until
from .pgcluster import PASSWORD, PASSWORD_ENV
from .test_cluster import PgProxy, _held_renewal, _past


def _version(name: str) -> FileVersion:
    return FileVersion("s", Path("/in"), f"{name}.bin", 1, 1, ino=3, ctime_ns=1)


def _step(version: FileVersion) -> PlannedStep:
    return PlannedStep(version, "r", 0, "k0", "/out", "local")


async def _connect(url: str, autocommit: bool = True) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, password=PASSWORD, autocommit=autocommit)


async def _row(db: psycopg.AsyncConnection[Any], row_id: int) -> tuple[Any, ...]:
    cur = await db.execute("SELECT status, epoch FROM dispatches WHERE id=%s", [row_id])
    return tuple(await cur.fetchone() or ())


async def _dead_node_with_a_row(target: PostgresTarget, db: psycopg.AsyncConnection[Any]) -> int:
    """Node ``d`` claims a version of the shared source ``s``, then dies (its lease ran out, as
    after a kill -9): the id of its row, IN_PROGRESS under its dead epoch."""
    async with open_journal(target) as d:
        await d.join("d", 60.0, frozenset({"s"}))
        await d.plan([_step(_version("x"))])
        [[row]] = await d.claim(10, time.time())
    await db.execute(
        "UPDATE nodes SET lease_until = clock_timestamp() - interval '1 second' WHERE name='d'"
    )
    return row.id


#: a stand-in for ``clock_timestamp()`` in the sessions whose search_path puts ``public``
#: first: it waits while the test holds advisory lock 4242, then gives the real clock
_GATE = """CREATE FUNCTION public.clock_timestamp() RETURNS timestamptz
LANGUAGE plpgsql VOLATILE AS $$ BEGIN
  PERFORM pg_advisory_lock_shared(4242); PERFORM pg_advisory_unlock_shared(4242);
  RETURN pg_catalog.clock_timestamp(); END $$"""


async def test_a_slow_reaper_never_requeues_a_row_a_live_node_claimed_during_its_run(
    pg_url: str,
) -> None:
    """Node d died with a row in progress. Node b's requeue (``requeue_orphans``) takes its
    view of the nodes, then is slow (held here at its first reading of the clock). Meanwhile
    node c joins, its own requeue puts d's row back, and c claims it under its live epoch.
    When b's requeue goes on, it must leave the row to c. Before (b6 review): it locked the
    row, found it changed, and judged its new epoch in its old view, which had no entry for
    c's epoch ("no entry: dead"): the row went back to the queue under c's feet, c's outcome
    was refused, and another live node claimed the file again."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with (
        await _connect(pg_url) as db,
        await _connect(pg_url) as gate,
        await _connect(pg_url, autocommit=False) as reaper,
    ):
        row_id = await _dead_node_with_a_row(target, db)
        await db.execute(_GATE)
        await gate.execute("SELECT pg_advisory_lock(4242)")
        await reaper.execute("SET search_path = public, pg_catalog")
        slow = asyncio.create_task(requeue_orphans(reaper))

        async def held() -> bool:
            cur = await db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'advisory' "
                "AND query LIKE '%%dispatches%%'"
            )
            return bool((await cur.fetchone() or [0])[0])

        await until(held, 60)
        async with open_journal(target) as c:
            await c.join("c", 60.0, frozenset({"s"}))  # its join queues d's row's requeue
            claimed = await until(lambda: c.claim(10, time.time()), 60)
            assert [r.id for r in claimed[0]] == [row_id]
            assert await _row(db, row_id) == ("IN_PROGRESS", c.epoch)
            await gate.execute("SELECT pg_advisory_unlock(4242)")
            await slow
            await reaper.commit()
            after = await _row(db, row_id)
            async with open_journal(target) as e:  # another live node, while c runs the row
                await e.join("e", 60.0, frozenset({"s"}))
                again = [r.id for group in await e.claim(10, time.time()) for r in group]
            refused = None
            try:  # c delivered the file: its outcome
                await c.finish([StepResult(row_id, Status.SUCCEEDED, 1, epoch=c.epoch)])
            except FencedError as exc:
                refused = exc
            cur = await db.execute(
                "SELECT lease_until > clock_timestamp() FROM nodes WHERE name='c'"
            )
            c_alive = (await cur.fetchone() or [False])[0]
    assert c_alive, "precondition: c's lease held all along"
    assert (after, again) == (("IN_PROGRESS", c.epoch), []), (
        f"b's requeue took live node c's row (now {after}), and node e claimed it too "
        f"({again}): two live nodes run the same row"
    )
    assert refused is None, f"c's outcome was refused: {refused}"


class FreezeProxy(PgProxy):
    """Once a connection has passed on a message holding ``trigger`` from its client, nothing
    more passes on it either way, and it stays open: the client frozen (SIGSTOP, a VM paused)
    or cut off without a reset right after that statement."""

    def __init__(self, target_port: int, trigger: bytes) -> None:
        self.trigger = trigger
        self.frozen = 0
        self.kept: list[Any] = []  # a stream closes its socket when collected
        super().__init__(target_port)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.kept.append((sr, sw, cr, cw))
        frozen = asyncio.Event()

        async def up() -> None:
            while data := await cr.read(65536):
                if frozen.is_set():
                    return
                sw.write(data)
                await sw.drain()
                if self.trigger in data:
                    self.frozen += 1
                    frozen.set()
            if not frozen.is_set():  # a frozen client closes nothing
                sw.close()

        async def down() -> None:
            while data := await sr.read(65536):
                if frozen.is_set():
                    return
                cw.write(data)
                await cw.drain()
            if not frozen.is_set():
                cw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)

    def close(self) -> None:
        self.lt.call(self._unfreeze())
        super().close()

    async def _unfreeze(self) -> None:
        """Close the frozen connections' sockets, so their tasks end before the loop does."""
        for _sr, sw, _cr, cw in self.kept:
            sw.close()
            cw.close()
        await asyncio.sleep(0)


async def test_a_restarted_node_frozen_in_its_first_join_does_not_keep_the_dead_epochs_work(
    pg_url: str,
) -> None:
    """Node d died (its lease ran out) with a row in progress. A new service of the same name
    starts and sends its first join, which locks d's entry (ON CONFLICT DO UPDATE), and is
    frozen (or cut off without a reset) before its COMMIT. Every other node's requeue skips
    the locked entry (SKIP LOCKED); the server must end the frozen session after half a
    lease, as it does any other lease statement's, so the dead epoch's row is requeued.
    docs/cluster.md: a renewal frozen with the entry locked delays a verdict by half a lease
    at most; no dead epoch's work waits for ever. Before (b6 review, a regression of 03b0d3e
    whose verdict skips a locked entry): the row stayed IN_PROGRESS for as long as the
    connection lived."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    port = int(pg_url.rsplit(":", 1)[1].split("/", 1)[0])
    proxy = FreezeProxy(port, b"INSERT INTO nodes")
    try:
        async with await _connect(pg_url) as db:
            row_id = await _dead_node_with_a_row(target, db)
            cur = await db.execute("SELECT epoch FROM nodes WHERE name='d'")
            dead = (await cur.fetchone() or [None])[0]
            frozen_target = PostgresTarget(proxy.url(pg_url), PASSWORD_ENV)
            async with open_journal(frozen_target) as twin, open_journal(target) as b:
                joining = asyncio.create_task(twin.join("d", 2.0, frozenset({"s"})))

                async def locked() -> bool:
                    cur = await db.execute(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = "
                        "'idle in transaction' AND query LIKE 'INSERT INTO nodes%%'"
                    )
                    return bool((await cur.fetchone() or [0])[0])

                await until(locked, 60)
                await b.join("b", 2.0, frozenset({"s"}))

                async def requeued() -> bool:
                    async with await _connect(pg_url, autocommit=False) as reaper:
                        await requeue_orphans(reaper)
                        await reaper.commit()
                    return (await _row(db, row_id))[0] == "PENDING"

                # a lease of 2 s: half a lease is the documented delay; 15 leases are plenty
                deadline = time.monotonic() + 30.0
                while not await requeued() and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                state = await _row(db, row_id)
                joining.cancel()
                with contextlib.suppress(asyncio.CancelledError, JournalError):
                    await joining
    finally:
        proxy.close()
    assert state[0] == "PENDING", (
        f"dead epoch {dead}'s row is still {state} 30 s (15 leases) after its lease ran out: "
        "the frozen first join's lock on the node entry hides it from every requeue"
    )


async def test_a_node_starting_beside_a_renewal_the_database_takes_is_not_told_it_is_alone(
    pg_url: str,
) -> None:
    """Node a's renewal reaches the database before its lease ends, and its transaction is held
    until after that end (the pattern of test_cluster's ``_held_renewal``). A service starting
    meanwhile asks whether it is alone (``Membership.alone``, which decides at its start
    whether every temporary name in the local destinations is a crash's leftover and removes
    them all): the answer comes from ``NODES``, a snapshot read on ``now()`` that does not see
    the renewal, so a is "not alive" and the service is told it is alone, while the renewal
    then commits and a goes on under the same epoch, its copies in progress removed under it.
    docs/cluster.md: one that is renewed was never found dead. Now ``NODES`` gives the one
    verdict (``gone``): an entry a renewal holds counts as alive."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with (
        await _connect(pg_url) as db,
        await _connect(pg_url, autocommit=False) as locker,
    ):
        for attempt in range(5):  # a new node each time the machine was too slow (rare)
            name = f"a{attempt}"
            async with open_journal(target) as a:
                await a.join(name, 60.0, frozenset({name}))
                assert await a.take_listing(name)
                held = await _held_renewal(a, db, locker)
                if held is None:
                    continue
                await until(lambda: _past(db, held[1] + 0.1), 60)  # noqa: B023
                async with open_journal(target) as b:
                    alone = await Membership(b, "b", 60.0).alone()
                await locker.rollback()
                renewed = await held[0]
                break
        else:
            raise AssertionError("the renewal never reached the database in time")
    assert renewed, "precondition: the database took the renewal"
    assert not alone, "a starting node was told it is alone beside a node whose renewal was taken"


#: the lock ``gone()`` takes on the dead entries, as another node's requeue takes it (held
#: until its transaction commits, which a loaded server can make take seconds)
_VERDICT = DEAD_ENTRIES


async def _join_behind_overlapping_verdicts(
    pg_url: str, journal: Any, lease: float
) -> tuple[bool, Exception | None]:
    """Node a's entry is dead; ``journal`` joins as a while two other nodes' requeues (their
    open transactions, sessions b and c) hold the verdict's lock on that entry one after
    the other, overlapping: whether a second lock passed the first (the overlap), and the
    error the join ended with (None: it joined)."""
    async with (
        await _connect(pg_url) as db,
        await _connect(pg_url, autocommit=False) as b,
        await _connect(pg_url, autocommit=False) as c,
    ):
        await db.execute(  # killed -9, or frozen: its lease ran out
            "UPDATE nodes SET lease_until = clock_timestamp() - interval '1 second' WHERE name='a'"
        )
        await b.execute(_VERDICT)  # node b's requeue, its transaction still open
        joining = asyncio.create_task(journal.join("a", lease, frozenset()))

        async def waiting() -> bool:
            cur = await db.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND query LIKE 'INSERT INTO nodes%%'"
            )
            return joining.done() or bool((await cur.fetchone() or [0])[0])

        await until(waiting, 60)
        await c.execute(_VERDICT)  # node c's requeue passes a waiting join
        cur = await c.execute("SELECT 1 FROM nodes WHERE name='a' FOR KEY SHARE NOWAIT")
        overlapped = await cur.fetchone() is not None
        await b.commit()  # b's batch ends; c's still runs
        # c's batch runs for three leases at most (the join ends first if it gives up)
        deadline = time.monotonic() + 3 * lease
        while not joining.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await c.commit()
        try:
            await joining
        except JournalError as exc:
            return overlapped, exc
    return overlapped, None


async def test_a_first_join_behind_other_nodes_requeues_is_not_refused(pg_url: str) -> None:
    """Node a was killed; its entry is dead. It starts again while two other nodes' requeues
    (their writers' batches, which take seconds on a loaded server) hold ``gone()``'s share
    lock on that dead entry one after the other, overlapping: PostgreSQL lets a new share
    lock pass a waiting updater, so the join waits as long as the overlap lasts. Before
    7fe02b1 the first join had no server-side limit and joined as soon as the overlap ended;
    now it carries the lease's lock_timeout (a third of a lease: 667 ms for a 2 s lease) and
    fails ("lock timeout"), the start logs an ERROR and tries again 1 s, 2 s, 4 s ... later,
    each try as short, so the start is held off for as long as the requeues overlap.
    (c6 review of 7fe02b1.) Now the verdict takes KEY SHARE locks, which a join's upsert (a
    NO KEY UPDATE) does not wait for."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target) as old:
        await old.join("a", 2.0, frozenset())
    async with open_journal(target) as new:
        overlapped, refused = await _join_behind_overlapping_verdicts(pg_url, new, 2.0)
    assert overlapped, "precondition: a second share lock passes a waiting join"
    assert refused is None, (
        f"node a's first join was refused while other nodes' requeues held its dead entry: "
        f"{refused}"
    )


async def test_a_rejoin_behind_other_nodes_requeues_is_not_refused(pg_url: str) -> None:
    """As test_cluster_verdict's first join behind overlapping requeues, but for a node that
    lost its lease (frozen, its entry dead) and joins again on the same journal: its lease
    connection still carries the lease's statement and lock timeouts (pgnodes.py
    ``_settings``: ``self.lease_s`` is set from the first join on), so the rejoin is refused
    after a third of a lease ("lock timeout") while the requeues overlap: the case 1d75888
    lifted for the first join only, and the one where the dead entry is most likely to be
    share-locked (a rejoin always follows a dead entry). (d6 review.) Now the verdict takes
    KEY SHARE locks, which a join's upsert (a NO KEY UPDATE) does not wait for."""
    async with open_journal(PostgresTarget(pg_url, PASSWORD_ENV)) as journal:
        await journal.join("a", 2.0, frozenset())
        _, refused = await _join_behind_overlapping_verdicts(pg_url, journal, 2.0)
    assert refused is None, (
        f"node a's rejoin was refused while other nodes' requeues held its dead entry: {refused}"
    )


async def test_a_rejoined_node_renews_while_another_nodes_writer_commits_a_long_batch(
    pg_url: str,
) -> None:
    """Node a froze past its lease (epoch E1 dead). Node b's writer runs a requeue, which
    judges E1 dead and takes the verdict's KEY SHARE lock on a's entry, and then a long batch
    of other writes (thousands of outcomes on a loaded server). Node a joins again: its
    upsert does not wait (498efbf), but PostgreSQL carries KEY SHARE lockers over to the row
    version of a non-key update, so the lock sits on a's new entry, whose renewals (FOR
    UPDATE) waited for b's batch to commit and were refused after a third of a lease, again
    and again while such batches follow each other, till E2's lease ran out (e6 review of
    498efbf). Now the requeue commits in a transaction of its own. Each wait here is for a
    state; b's long batch is a write held open by the test until a has renewed."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    gate, running, blocking = asyncio.Event(), asyncio.Event(), asyncio.Event()

    async def long_write(conn: Any) -> None:  # stands for a batch that takes a while
        running.set()
        await gate.wait()

    async def blocker(conn: Any) -> None:  # holds b's writer till the two are queued
        blocking.set()
        await queued.wait()

    async def flag(event: asyncio.Event) -> bool:
        return event.is_set()

    queued = asyncio.Event()
    async with (
        await _connect(pg_url) as db,
        open_journal(target) as a,
        open_journal(target) as b,
    ):
        await b.join("b", 60.0, frozenset())
        await b.flush()  # the requeue b's join queued is done: the one below is the test's
        old = await a.join("a", 2.0, frozenset({"s"}))
        await a.plan([_step(_version("x"))])
        [[row]] = await a.claim(10, time.time())
        await db.execute(  # frozen past its lease, with a row in progress
            "UPDATE nodes SET lease_until = clock_timestamp() - interval '1 second' WHERE name='a'"
        )
        held = asyncio.ensure_future(b.write(blocker))
        await until(lambda: flag(blocking), 60)
        requeue = b.resume_interrupted()  # queued behind the blocker, then the long write:
        batch = b._enqueue(long_write)  # one batch before this change
        queued.set()
        await until(lambda: flag(running), 60)
        try:
            new = await a.join("a", 2.0, frozenset({"s"}))
            assert new != old
            refused: Exception | None = None
            try:
                renewed = await a.renew()
            except JournalError as exc:
                refused, renewed = exc, False
        finally:
            gate.set()
            await asyncio.gather(held, requeue, batch)
        assert await requeue == 1 and await _row(db, row.id) == ("PENDING", None)
    assert renewed and refused is None, (
        "node a's renewal of its new epoch waited behind another node's requeue of its old "
        f"one, held till that node's writer committed a long batch: {refused}"
    )
