"""Several nodes on one PostgreSQL journal: leases, fencing, shared sources, the nodes API.

A real cluster (tests/pgcluster.py); the journal-level tests open the journal twice as two
nodes would; the end-to-end tests run two real services (the CLI as subprocesses) on one
database and one inbox, and kill one of them with SIGKILL. Nothing waits for a duration: each
test waits for a state, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import signal
import time
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from filedispatch.cluster import Membership
from filedispatch.config import Config
from filedispatch.dispatcher import Dispatcher
from filedispatch.errors import FencedError, JournalError, NodeConflictError
from filedispatch.journal import (
    OpenUpload,
    PlannedStep,
    PostgresTarget,
    StepResult,
    open_journal,
)
from filedispatch.journal.pgnodes import requeue_orphans
from filedispatch.journal.place import journal_lock_when_ready
from filedispatch.models import FileVersion, Status
from filedispatch.processors import Registry
from filedispatch.processors.common import TMP_PREFIX

from .apiutil import database_config
from .conftest import (
    ServiceProcess,
    delivered,
    journal_rows,
    old,
    run_cli,
    until,
    wait_until,
    write_config,
)
from .ops import console
from .pgcluster import PASSWORD, PASSWORD_ENV
from .servers import HttpReceiver


def _step(version: FileVersion) -> PlannedStep:
    return PlannedStep(version, "r", 0, "k0", "/out", "local")


async def _until(predicate: Any, timeout: float = 30.0) -> None:
    """Wait for an async predicate to hold (polled), failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        assert time.monotonic() < deadline, "the state was not reached in time"
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------ the journal


async def _lease_gone(journal: Any, name: str) -> None:
    """Wait until the lease of node ``name`` ran out on the database's clock."""

    async def gone() -> bool:
        return any(n.name == name and not n.alive for n in await journal.nodes())

    await _until(gone)


async def test_a_stale_nodes_late_outcome_is_refused(tmp_path: Path, pg_url: str) -> None:
    """Node a claims, its lease runs out, node b requeues and claims the row: a's outcome is
    refused (FencedError), the row stays b's, and b's outcome is taken."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    version = FileVersion("in", tmp_path, "a.txt", 1, 1, ino=7, ctime_ns=1)
    async with open_journal(target) as a, open_journal(target) as b:
        await a.join("a", 0.5, frozenset({"in"}))
        await b.join("b", 30.0, frozenset({"in"}))
        await a.plan([_step(version)])
        [[row]] = await a.claim(10, time.time())
        assert row.status == Status.IN_PROGRESS

        await _lease_gone(b, "a")
        assert await b.renew()  # b reaps a's work
        [[again]] = await b.claim(10, time.time())
        assert again.id == row.id

        with pytest.raises(FencedError, match="node a no longer holds"):
            await a.finish([StepResult(row.id, Status.SUCCEEDED, 1, location="/late")])
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["node"], rec["location"]) == ("IN_PROGRESS", "b", None)

        await b.finish([StepResult(again.id, Status.SUCCEEDED, 1, location="/out/a.txt")])
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["node"], rec["location"]) == ("SUCCEEDED", "b", "/out/a.txt")
        assert not await a.renew()  # a learns that its lease ran out


async def test_a_late_outcome_of_a_lost_claim_is_refused_after_the_node_joins_again(
    tmp_path: Path, pg_url: str
) -> None:
    """A node whose lease ran out joins again (a new epoch) and claims its own old row anew:
    the outcome of the first claim is fenced by the token that claim carried, not by the
    node's current one, so it is refused; the new claim's outcome is taken."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    version = FileVersion("in", tmp_path, "a.txt", 1, 1, ino=7, ctime_ns=1)
    async with open_journal(target) as a:
        await a.join("a", 0.5, frozenset({"in"}))
        await a.plan([_step(version)])
        [[row]] = await a.claim(10, time.time())
        assert row.epoch == a.epoch

        await _lease_gone(a, "a")
        assert not await a.renew()
        await a.join("a", 30.0, frozenset({"in"}))  # the old epoch's rows go back to the queue
        [[again]] = await a.claim(10, time.time())
        assert again.id == row.id and again.epoch == a.epoch != row.epoch

        late = StepResult(row.id, Status.SUCCEEDED, 1, location="/late", epoch=row.epoch)
        with pytest.raises(FencedError, match="1 outcome"):
            await a.finish([late])
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["epoch"], rec["location"]) == ("IN_PROGRESS", a.epoch, None)

        await a.finish(
            [StepResult(again.id, Status.SUCCEEDED, 1, location="/out/a.txt", epoch=again.epoch)]
        )
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["location"]) == ("SUCCEEDED", "/out/a.txt")


class PgProxy:
    """A TCP proxy before PostgreSQL, on a loop thread of its own; a subclass passes the
    bytes on (``_client``), holding some back as its case needs."""

    def __init__(self, target_port: int) -> None:
        from .servers import LoopThread

        self.target_port = target_port
        self.lt = LoopThread()
        self.port = self.lt.call(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    def url(self, url: str) -> str:
        """``url`` (a database's), through this proxy."""
        port = urllib.parse.urlsplit(url).port
        return url.replace(f":{port}/", f":{self.port}/")

    def close(self) -> None:
        self.server.close()
        self.lt.close()


class CommitCutProxy(PgProxy):
    """Once armed, it lets through the COMMIT of the first transaction that sent
    ``trigger``, then cuts the connection before the server's answer reaches the client: the
    server commits, and the client never learns it (a network cut or a server crash right
    after a commit). After the x12 review's reproducer."""

    def __init__(self, target_port: int, trigger: bytes) -> None:
        self.trigger = trigger
        self.armed = False
        self.cuts = 0
        super().__init__(target_port)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        cut = asyncio.Event()

        async def up() -> None:
            seen = False
            while data := await cr.read(65536):
                seen = seen or self.trigger in data
                if self.armed and seen and b"COMMIT" in data:
                    self.armed = False
                    cut.set()  # the answer never reaches the client
                    sw.write(data)
                    await sw.drain()
                    self.cuts += 1
                    break
                if b"COMMIT" in data or b"ROLLBACK" in data:
                    seen = False
                sw.write(data)
                await sw.drain()
            cw.close()
            sw.close()

        async def down() -> None:
            while data := await sr.read(65536):
                if cut.is_set():
                    break
                cw.write(data)
                await cw.drain()
            cw.close()
            sw.close()

        await asyncio.gather(up(), down(), return_exceptions=True)


class SilentLockProxy(PgProxy):
    """Once ``silenced``, the connections that took a node's name lock before (they sent
    ``pg_try_advisory_lock(hashtextextended``) pass nothing more either way, and stay open:
    a peer gone silent without a reset (a NAT or a firewall that dropped the connection's
    state, a database host lost with its power). Connections made since pass. After the z12
    review's reproducer."""

    def __init__(self, target_port: int) -> None:
        self.silenced = False
        self.held = 0  #: messages held back so far
        super().__init__(target_port)

    async def _client(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection("127.0.0.1", self.target_port)
        locked = False

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter, up: bool) -> None:
            nonlocal locked
            while data := await r.read(65536):
                if up and not self.silenced and b"pg_try_advisory_lock(hashtextextended" in data:
                    locked = True
                if locked and self.silenced:
                    self.held += 1
                    return  # silent: nothing more passes, and nothing is closed
                w.write(data)
                await w.drain()
            w.close()

        await asyncio.gather(pipe(cr, sw, True), pipe(sr, cw, False), return_exceptions=True)


@pytest.mark.parametrize("write", ["claim", "plan_started"])
async def test_a_write_whose_commit_answer_is_lost_is_not_run_again(
    tmp_path: Path, pg_url: str, write: str
) -> None:
    """The COMMIT of a claim (or of rows inserted IN_PROGRESS) reaches the server, its answer
    is lost: the writer asks the server whether it committed instead of running the batch
    again, so the caller gets the rows that batch took (run again, a claim took nothing and
    left its first rows IN_PROGRESS under a live epoch, with no worker, for good)."""
    trigger = b"SET status='IN_PROGRESS'" if write == "claim" else b"RETURNING vkey || step_key"
    proxy = CommitCutProxy(int(urllib.parse.urlsplit(pg_url).port or 0), trigger)
    versions = [
        FileVersion("in", tmp_path, f"f{i}.txt", 1, 1, ino=i + 1, ctime_ns=1) for i in range(5)
    ]
    try:
        async with open_journal(PostgresTarget(proxy.url(pg_url), PASSWORD_ENV)) as j:
            await j.join("n", 30.0, frozenset({"in"}))
            if write == "claim":
                await j.plan([_step(v) for v in versions])
                proxy.armed = True
                got: list[int | None] = [g[0].id for g in await j.claim(10, time.time())]
            else:
                proxy.armed = True
                got = list(await j.plan_started([_step(v) for v in versions], time.time()))
            assert proxy.cuts == 1
        rows = journal_rows(pg_url)
        assert len(rows) == 5 and {r["status"] for r in rows} == {"IN_PROGRESS"}
        assert sorted(got, key=lambda i: i or 0) == sorted(r["id"] for r in rows)
    finally:
        proxy.close()


async def test_a_second_live_node_with_the_same_name_is_refused(pg_url: str) -> None:
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target) as a, open_journal(target) as b:
        await a.join("same", 30.0)
        with pytest.raises(NodeConflictError, match="another live node is named 'same'"):
            await b.join("same", 30.0)
        assert [n.name for n in await b.nodes()] == ["same"]


async def test_a_local_sources_rows_are_claimed_by_its_own_node_only(
    tmp_path: Path, pg_url: str
) -> None:
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    mine = FileVersion("local", tmp_path, "m.txt", 1, 1, ino=1, ctime_ns=1)
    both = FileVersion("nfs", tmp_path, "s.txt", 1, 1, ino=2, ctime_ns=1)
    async with open_journal(target) as a, open_journal(target) as b:
        await a.join("a", 30.0, frozenset({"nfs"}))
        await b.join("b", 30.0, frozenset({"nfs"}))
        await a.plan([_step(mine), _step(both)])
        assert [[d.relpath for d in g] for g in await b.claim(10, time.time())] == [["s.txt"]]
        assert [[d.relpath for d in g] for g in await a.claim(10, time.time())] == [["m.txt"]]


async def test_one_node_at_a_time_holds_a_shared_sources_listing(pg_url: str) -> None:
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target) as a, open_journal(target) as b:
        await a.join("a", 0.5, frozenset({"nfs"}))
        await b.join("b", 30.0, frozenset({"nfs"}))
        assert await a.take_listing("nfs")
        assert not await b.take_listing("nfs")

        async def b_took_over() -> bool:
            return await b.take_listing("nfs")

        await _until(b_took_over)  # once a's lease has run out
        nodes = {n.name: n for n in await b.nodes()}
        assert nodes["b"].listing == ("nfs",) and nodes["a"].listing == ()


async def test_sqlite_has_one_implicit_node_named_on_its_rows(tmp_path: Path) -> None:
    version = FileVersion("in", tmp_path, "a.txt", 1, 1, ino=3, ctime_ns=1)
    async with open_journal(tmp_path / "j.db") as j:
        assert await j.join("solo", 30.0) == 0
        await j.plan([_step(version)])
        [[row]] = await j.claim(10, time.time())
        [node] = await j.nodes()
        assert (node.name, node.alive, node.in_flight) == ("solo", True, 1)
        await j.finish([StepResult(row.id, Status.SUCCEEDED, 1, location="/out/a.txt")])
        assert await j.renew() and await j.take_listing("in")
        detail = await j.detail(row.id)
        assert detail is not None and detail.node == "solo"


async def test_a_node_woken_past_its_lease_knows_before_its_expiry_timer_runs(
    tmp_path: Path,
) -> None:
    """After a freeze (SIGSTOP, a suspended VM) the loop may run a worker before the expiry
    timer: ``holds`` reads the clock, so no delivery starts on a lease that ran out."""
    async with open_journal(tmp_path / "j.db") as journal:
        # a lease long enough that a busy machine's stall between join and holds() stays
        # inside it; the freeze below outlasts it whatever the load (a sleep is a lower bound)
        membership = Membership(journal, "solo", 2.0)
        await membership.join()
        assert membership.holds()
        time.sleep(2.1)  # the whole loop frozen past the lease: no callback can run meanwhile
        assert membership.alive.held.is_set()  # the timer has not run yet
        assert not membership.holds()


async def test_a_version_claimed_while_the_lease_is_in_doubt_goes_back_to_the_queue(
    tmp_path: Path,
) -> None:
    """A worker that takes a claimed version while the lease may have run out starts nothing
    and puts the rows back to PENDING: the lease may yet be renewed on the same epoch, and then
    nothing else would requeue rows left IN_PROGRESS (they stayed there for good)."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    src = old(inbox / "a.txt", b"payload")
    config = Config.model_validate(
        {  # shared: through the queue, as on a cluster (never an inline lane)
            "sources": [{"path": str(inbox), "name": "in", "shared": True}],
            "rules": [{"name": "all", "glob": "*", "to": str(out)}],
            "workers": 1,
        }
    )
    version = FileVersion.from_stat("in", inbox, "a.txt", os.stat(src))
    async with open_journal(tmp_path / "j.db") as journal:
        dispatcher = Dispatcher(config, journal, Registry(), workdir=tmp_path / "work")
        held = [False]
        dispatcher.state.holds_lease = lambda epoch: held[0]
        await dispatcher.offer(config.sources[0], [version])
        stop = asyncio.Event()
        task = asyncio.create_task(dispatcher.run(stop))
        try:

            async def given_back() -> bool:
                [row] = await journal.recent(10)
                return row.status == Status.PENDING and row.started is not None  # was claimed

            await _until(given_back)
            assert not out.exists()  # nothing was started
            held[0] = True

            async def done() -> bool:
                [row] = await journal.recent(10)
                return row.status == Status.SUCCEEDED

            await _until(done)
            assert (out / "a.txt").read_bytes() == b"payload"
        finally:
            stop.set()
            await task


async def test_the_lease_is_renewed_while_the_writer_waits(pg_url: str) -> None:
    """A node's renewals do not queue behind its other journal writes: while the writer is
    held for longer than a lease by a real statement (a lock wait on a lock this test holds),
    the lease is still renewed on the database's clock and the node keeps it."""
    import psycopg

    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with (
        open_journal(target) as journal,
        await psycopg.AsyncConnection.connect(pg_url, password=PASSWORD, autocommit=True) as db,
    ):
        membership = Membership(journal, "busy", 3.0)
        await membership.join()
        stop = asyncio.Event()
        renewing = asyncio.create_task(membership.run(stop))
        await db.execute("SELECT pg_advisory_lock(4242)")

        async def held(conn: Any) -> None:
            await conn.execute("SET LOCAL lock_timeout = 0")  # wait as long as the test holds
            await conn.execute("SELECT pg_advisory_xact_lock(4242)")

        busy = asyncio.ensure_future(journal.write(held))
        try:

            async def writer_waits() -> bool:
                cur = await db.execute(
                    "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
                )
                return await cur.fetchone() is not None

            await _until(writer_waits)
            cur = await db.execute("SELECT now() + interval '3 seconds'")
            (past_a_lease,) = await cur.fetchone() or (None,)

            async def renewed_past_a_lease() -> bool:
                cur = await db.execute(
                    "SELECT renewed > %s AND lease_until > now() FROM nodes WHERE name = 'busy'",
                    (past_a_lease,),
                )
                row = await cur.fetchone()
                return bool(row and row[0])

            await _until(renewed_past_a_lease, 60)
            assert not busy.done()  # the writer still waits: the renewals went around it
            assert membership.alive.held.is_set()
            [node] = await journal.nodes()  # a read on the pool, beside the waiting writer
            assert (node.name, node.alive) == ("busy", True)
        finally:
            await db.execute("SELECT pg_advisory_unlock(4242)")
            await busy
            stop.set()
            await renewing


async def test_the_lease_connection_comes_back_after_a_database_restart(
    pg_cluster: Any, pg_url: str
) -> None:
    """The lease's own connection is lost with the server; a renewal then fails at once
    (JournalError, not a hang), and the next one after the restart connects again."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target) as journal:
        await journal.join("phoenix", 60.0)
        assert await journal.renew()
        pg_cluster.stop()
        try:
            with pytest.raises(JournalError, match="no lease statement on"):
                await journal.renew()
        finally:
            pg_cluster.start()
        assert await journal.renew()
        assert [(n.name, n.alive) for n in await journal.nodes()] == [("phoenix", True)]


# ------------------------------------------------------------------ two real services


class SlowReceiver(HttpReceiver):
    """An HTTP receiver that takes ``delay`` seconds per upload (delivery-bound work)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        super().__init__()

    async def _handle(self, request: Any) -> Any:
        await asyncio.sleep(self.delay)
        return await super()._handle(request)


@pytest.fixture
def slow_receiver() -> Iterator[SlowReceiver]:
    server = SlowReceiver(0.02)
    yield server
    server.close()


def _node_config(
    root: Path,
    url: str,
    node: str,
    to: Any,
    port: int | None = None,
    after: str = "keep",
    source: dict[str, Any] | None = None,
    rules: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> Path:
    return write_config(
        root / f"{node}.yml",
        {
            "database": database_config(url),
            "node": node,
            "lease": "2s",
            "workers": 4,
            "sources": [
                {
                    "path": str(root / "inbox"),
                    "name": "inbox",
                    "shared": True,
                    "settle": 0,
                    "poll_interval": 0.2,
                    "rescan": 1,
                    "after": after,
                    **(source or {}),
                }
            ],
            "rules": rules or [{"extensions": ["txt"], "to": to}],
            "api": {"enabled": port is not None, "port": port or 0},
            **{"monitor": {"enabled": False}, **extra},
        },
    )


def _configs(root: Path, url: str, to: Any, **extra: Any) -> list[Path]:
    paths = []
    for node in ("n1", "n2"):
        paths.append(_node_config(root, url, node, to, **extra))
    return paths


def _nodes_of_rows(url: str) -> Counter[str]:
    return Counter(r["node"] for r in journal_rows(url, "status='SUCCEEDED'"))


def _http_burst(
    root: Path, url: str, receiver: SlowReceiver, count: int, **extra: Any
) -> tuple[ServiceProcess, ServiceProcess]:
    """Two nodes on one shared inbox sending to ``receiver``, and ``count`` files in it."""
    (root / "inbox").mkdir()
    to = {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}
    cfg1, cfg2 = _configs(root, url, to, **extra)
    nodes = ServiceProcess(cfg1).start(), ServiceProcess(cfg2).start()
    for i in range(count):
        old(root / "inbox" / f"f{i:04d}.txt", f"file {i}".encode())
    return nodes


def test_two_nodes_share_one_inbox_and_deliver_each_file_once(
    tmp_path: Path, pg_url: str, slow_receiver: SlowReceiver
) -> None:
    count = 400
    # the default lease: an HTTP upload cannot be found delivered, so one redone after a lease
    # ran out arrives twice (see docs/cluster.md); a 2 s lease can run out on a busy machine
    n1, n2 = _http_burst(tmp_path, pg_url, slow_receiver, count, lease="30s")
    try:
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == count, 180)
        paths = Counter(r.path for r in slow_receiver.received)
        assert len(paths) == count and set(paths.values()) == {1}, paths.most_common(3)
        by_node = _nodes_of_rows(pg_url)
        assert set(by_node) == {"n1", "n2"}, by_node  # both delivered
        listers = [
            "n1" if "lists it now" in n1.log() else "",
            "n2" if "lists it now" in n2.log() else "",
        ]
        assert [n for n in listers if n], (n1.log(), n2.log())
    finally:
        assert n1.stop() == 0, n1.log()
        assert n2.stop() == 0, n2.log()
    assert len(journal_rows(pg_url)) == count


# ------------------------------------------------------------------ the failure scenarios
#
# Each runs two real services on one database and one shared inbox, delivering every file to
# two local folders (two steps) and consuming its source, and checks what issue 12 promises:
# every file arrives exactly once in each folder (no copy under another name, no temporary
# left), the journal has one SUCCEEDED row per file and step, and no source left the inbox
# before its rows were committed (checked while every node is frozen or dead, so nothing moves
# between reading the inbox and reading the journal).

DESTS = ("out1", "out2")
#: seconds a scenario may take in all: thousands of files through two nodes and a database on a
#: busy 2-core machine (each wait inside is for a state, with its own generous deadline)
SCENARIO_TIMEOUT_S = 1200


def _pair(
    root: Path, url: str, after: str = "delete", **source: Any
) -> tuple[ServiceProcess, ServiceProcess]:
    """Two nodes, n1 started first (so it lists the inbox), delivering to both ``DESTS``."""
    (root / "inbox").mkdir()
    to = [str(root / d) for d in DESTS]
    cfg1, cfg2 = (
        _node_config(root, url, node, to, after=after, source=source) for node in ("n1", "n2")
    )
    n1 = ServiceProcess(cfg1).start()
    wait_until(lambda: "this node lists it now" in n1.log(), 60)
    return n1, ServiceProcess(cfg2).start()


def _burst(root: Path, count: int) -> dict[str, bytes]:
    expected = {f"f{i:04d}.txt": f"file {i} ".encode() * 40 for i in range(count)}
    for name, data in expected.items():
        old(root / "inbox" / name, data)
    return expected


def _succeeded(url: str) -> int:
    return len(journal_rows(url, "status='SUCCEEDED'"))


def _no_source_removed_early(root: Path, url: str, names: Iterable[str]) -> int:
    """With every node frozen or dead: each file gone from the inbox has a committed
    SUCCEEDED row for every step. Returns how many were gone."""
    left = {p.name for p in (root / "inbox").iterdir()}
    rows = Counter(r["relpath"] for r in journal_rows(url, "status='SUCCEEDED'"))
    gone = [n for n in names if n not in left]
    early = [n for n in gone if rows[n] < len(DESTS)]
    assert not early, f"removed before their rows were committed: {early[:5]}"
    return len(gone)


def _frozen_check(root: Path, url: str, names: Iterable[str], *nodes: ServiceProcess) -> int:
    """``_no_source_removed_early`` with ``nodes`` stopped (SIGSTOP) for the look."""
    for n in nodes:
        n.signal(signal.SIGSTOP)
    try:
        return _no_source_removed_early(root, url, names)
    finally:
        for n in nodes:
            n.signal(signal.SIGCONT)


def _all_done(root: Path, url: str, count: int) -> bool:
    return _succeeded(url) == count * len(DESTS) and not any((root / "inbox").iterdir())


def _delivered_exactly_once(root: Path, url: str, expected: dict[str, bytes]) -> None:
    for d in DESTS:
        got = delivered(root / d)
        temps = [k for k in got if Path(k).name.startswith(TMP_PREFIX)]
        assert not temps, f"temporary files left in {d}: {temps[:5]}"
        extra = sorted(set(got) - set(expected))
        assert not extra, f"delivered twice or under another name in {d}: {extra[:5]}"
        assert got == expected, f"missing or wrong in {d}"
    rows = journal_rows(url)
    per_step = Counter((r["relpath"], r["step_key"]) for r in rows if r["status"] == "SUCCEEDED")
    each = Counter((r["relpath"], r["step_key"]) for r in rows)
    extra = [
        {k: r[k] for k in ("id", "relpath", "vkey", "status", "node", "reason")}
        for r in rows
        if each[r["relpath"], r["step_key"]] > 1
    ]
    assert len(rows) == len(expected) * len(DESTS), (len(rows), extra[:8])
    assert len(per_step) == len(expected) * len(DESTS) and set(per_step.values()) == {1}


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_two_nodes_deliver_3000_files_from_one_shared_folder_exactly_once(
    tmp_path: Path, pg_url: str
) -> None:
    count = 3000
    n1, n2 = _pair(tmp_path, pg_url)
    try:
        expected = _burst(tmp_path, count)
        wait_until(lambda: _succeeded(pg_url) >= 200, 120)
        _frozen_check(tmp_path, pg_url, expected, n1, n2)  # mid-burst
        wait_until(lambda: _all_done(tmp_path, pg_url, count), 600)
        _delivered_exactly_once(tmp_path, pg_url, expected)
        assert set(_nodes_of_rows(pg_url)) == {"n1", "n2"}  # both delivered
    finally:
        _stop(n1, n2)


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_the_other_node_finishes_after_the_lister_is_killed(tmp_path: Path, pg_url: str) -> None:
    """SIGKILL the node that lists the shared inbox mid-burst: within about one lease the other
    lists it, requeues the dead node's claimed work, and every file arrives exactly once (the
    dead node's interrupted copies are found delivered, not sent again)."""
    count = 1500
    n1, n2 = _pair(tmp_path, pg_url)
    try:
        expected = _burst(tmp_path, count)
        wait_until(lambda: _nodes_of_rows(pg_url)["n1"] >= 20, 120)
        n2.signal(signal.SIGSTOP)  # so nothing moves while the dead node's leftovers are read
        try:
            n1.kill()
            assert _no_source_removed_early(tmp_path, pg_url, expected) < count  # mid-burst
        finally:
            n2.signal(signal.SIGCONT)
        wait_until(lambda: "this node lists it now" in n2.log(), 60)
        wait_until(lambda: _all_done(tmp_path, pg_url, count), 600)
        _delivered_exactly_once(tmp_path, pg_url, expected)
        assert _nodes_of_rows(pg_url)["n2"] > 0
    finally:
        _stop(n1, n2)


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_a_node_killed_during_its_after_actions(tmp_path: Path, pg_url: str) -> None:
    """SIGKILL the node that does not list, while it moves the sources it delivered to
    done_dir: what it delivered and committed is moved by the lister (it finds those versions
    final), its claimed work is redone by the other; each file is moved once, none is left."""
    count = 1500
    done = tmp_path / "done"
    n1, n2 = _pair(tmp_path, pg_url, after="move", done_dir=str(done))
    try:
        expected = _burst(tmp_path, count)

        def n2_moving() -> bool:
            moved = set(delivered(done))
            ok = Counter(
                r["relpath"] for r in journal_rows(pg_url, "status='SUCCEEDED' AND node='n2'")
            )
            return sum(1 for name in moved if ok[name] == len(DESTS)) >= 20

        wait_until(n2_moving, 120)  # n2's after-actions are running
        n1.signal(signal.SIGSTOP)
        try:
            n2.kill()
            assert _no_source_removed_early(tmp_path, pg_url, expected) < count  # mid-burst
        finally:
            n1.signal(signal.SIGCONT)
        wait_until(lambda: _all_done(tmp_path, pg_url, count), 600)
        _delivered_exactly_once(tmp_path, pg_url, expected)
        assert delivered(done) == expected  # each source moved once, none lost
    finally:
        _stop(n1, n2)


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_a_node_stopped_past_its_lease_has_its_late_outcomes_refused(
    tmp_path: Path, pg_url: str
) -> None:
    """SIGSTOP a node mid-burst for longer than its lease: the other takes its work over and
    finishes; on SIGCONT the stopped node's late outcomes are refused, it starts no delivery
    and touches no source on their account, and every file is in each folder once."""
    count = 1000
    n1, n2 = _pair(tmp_path, pg_url)
    try:
        expected = _burst(tmp_path, count)
        wait_until(lambda: _nodes_of_rows(pg_url)["n2"] >= 20, 120)
        n2.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "n2" not in _live_nodes(pg_url), 60)  # past its lease
            _frozen_check(tmp_path, pg_url, expected, n1)
            wait_until(lambda: _all_done(tmp_path, pg_url, count), 600)
        finally:
            n2.signal(signal.SIGCONT)
        wait_until(lambda: "outcome(s) refused: node n2 no longer holds the rows" in n2.log(), 60)
        wait_until(lambda: "joining again" in n2.log(), 60)
        wait_until(lambda: "n2" in _live_nodes(pg_url), 60)
        n1.signal(signal.SIGSTOP)  # both quiet: what n2 did after waking is all on disk
        n2.signal(signal.SIGSTOP)
        try:
            _delivered_exactly_once(tmp_path, pg_url, expected)
        finally:
            n1.signal(signal.SIGCONT)
            n2.signal(signal.SIGCONT)
    finally:
        _stop(n1, n2)


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_two_nodes_pause_while_the_database_restarts_and_go_on(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    """Stop the database mid-burst for longer than a lease: both nodes pause (neither ends),
    then join again under new epochs once it is back, and finish the burst exactly once."""
    count = 1500
    n1, n2 = _pair(tmp_path, pg_url)
    try:
        expected = _burst(tmp_path, count)
        wait_until(lambda: _succeeded(pg_url) >= 100, 120)
        assert _frozen_check(tmp_path, pg_url, expected, n1, n2) < count  # mid-burst
        pg_cluster.stop()
        try:
            for n in (n1, n2):
                wait_until(lambda n=n: "cannot take writes" in n.log(), 120)
                wait_until(lambda n=n: "lease (2s) was not renewed in time" in n.log(), 120)
                assert n.proc is not None and n.proc.poll() is None, n.log()
        finally:
            pg_cluster.start()
        wait_until(lambda: _all_done(tmp_path, pg_url, count), 600)
        _frozen_check(tmp_path, pg_url, expected, n1, n2)
        _delivered_exactly_once(tmp_path, pg_url, expected)
        for n in (n1, n2):
            assert "takes writes again" in n.log()
            assert PASSWORD not in n.log()
    finally:
        _stop(n1, n2)


def _stop(*nodes: ServiceProcess) -> None:
    """Stop the nodes still running (woken first, in case a failed test left one stopped);
    each must exit cleanly. A killed node is only reaped."""
    codes = {}
    for n in nodes:
        assert n.proc is not None
        if n.proc.poll() is None:
            n.signal(signal.SIGCONT)
            codes[n.config.stem] = (n.stop(), n.log())
        else:
            n.stop()
    for name, (code, log) in codes.items():
        assert code == 0, f"{name}: {log}"


def _live_nodes(url: str) -> set[str]:
    import psycopg

    with psycopg.connect(url, password=PASSWORD) as conn:
        rows = conn.execute("SELECT name FROM nodes WHERE lease_until >= now()").fetchall()
    return {name for (name,) in rows}


def test_a_second_service_with_the_same_node_name_is_refused(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "inbox").mkdir()
    cfg1, _ = _configs(tmp_path, pg_url, str(tmp_path / "out"))
    n1 = ServiceProcess(cfg1).start()
    try:
        again = run_cli("-c", cfg1, timeout=60)
        assert again.returncode == 1, again.stderr
        assert "already running as node 'n1'" in again.stderr
        assert "Traceback" not in again.stderr
    finally:
        assert n1.stop() == 0, n1.log()


def test_a_starting_node_leaves_a_live_nodes_temporaries_alone(tmp_path: Path, pg_url: str) -> None:
    """A node's start-up sweep of temporary files in local destinations removes a crash's
    leftovers; while another node is live, a temporary name there may be its copy in
    progress, so it stays (the node that resumes a row removes that row's own)."""
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cfg1, cfg2 = _configs(tmp_path, pg_url, str(out))
    n1 = ServiceProcess(cfg1).start()
    with psycopg.connect(pg_url, password=PASSWORD) as db:
        [(token,)] = db.execute("SELECT token FROM journal_identity").fetchall()
    temp = out / f"{TMP_PREFIX}{token}-7-e1-a.txt"  # named as n1's copy of row 7 would be
    try:
        temp.write_bytes(b"half a copy")
        n2 = ServiceProcess(cfg2).start()  # "watching": its sweep is done
        try:
            assert temp.exists(), n2.log()
            assert "their temporary files in local destinations stay" in n2.log()
        finally:
            _stop(n2)
    finally:
        _stop(n1)
    # no live node but itself (a fresh log, so "watching" is this start's)
    alone = ServiceProcess(_node_config(tmp_path, pg_url, "n3", str(out))).start()
    try:
        assert not temp.exists(), alone.log()
    finally:
        _stop(alone)


def test_the_nodes_api_and_the_node_on_each_row(tmp_path: Path, pg_url: str) -> None:
    from .conftest import free_port

    (tmp_path / "inbox").mkdir()
    port, console_port = free_port(), free_port()
    cfg = _node_config(
        tmp_path,
        pg_url,
        "n1",
        str(tmp_path / "out"),
        port=port,
        monitor={"enabled": True, "port": console_port},
    )
    svc = ServiceProcess(cfg).start()
    try:
        old(tmp_path / "inbox" / "a.txt", b"a")
        wait_until(lambda: journal_rows(pg_url, "status='SUCCEEDED'"), 60)
        base = f"http://127.0.0.1:{port}"

        def listed() -> Any:
            with urllib.request.urlopen(f"{base}/api/v1/nodes", timeout=10) as resp:
                nodes = json.loads(resp.read())["nodes"]
            return nodes if nodes and nodes[0]["sources_listed"] == ["inbox"] else None

        [node] = wait_until(listed, 30)
        assert node["name"] == "n1" and node["alive"] is True and node["lease_s"] == 2.0
        assert 0 <= node["lease_age_s"] < 10 and node["in_flight"] == 0
        [row] = journal_rows(pg_url)
        with urllib.request.urlopen(f"{base}/api/v1/logs/{row['id']}", timeout=10) as resp:
            assert json.loads(resp.read())["node"] == "n1"
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as resp:
            metrics = resp.read().decode()
        assert 'filedispatch_node_lease_held{node="n1"} 1' in metrics
        assert re.search(r'filedispatch_info\{[^}]*node="n1"[^}]*\} 1', metrics), metrics
        (status,) = console(console_port, "fd-status")
        assert "nodes:" in status and "n1: alive" in status and "lists inbox" in status
    finally:
        assert svc.stop() == 0, svc.log()


def _inotify_watched(pid: int) -> set[int]:
    """The inodes the process ``pid`` has inotify watches on (from /proc: each inotify
    descriptor's fdinfo lists its watches as ``inotify wd:N ino:HEX ...``)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            if os.readlink(fd) != "anon_inode:inotify":
                continue
            info = Path(f"/proc/{pid}/fdinfo/{fd.name}").read_text()
        except OSError:  # closed meanwhile
            continue
        inodes |= {int(m, 16) for m in re.findall(r"^inotify wd:\S+ ino:([0-9a-f]+)", info, re.M)}
    return inodes


def test_a_shared_source_is_listed_by_polling_and_an_unshared_one_by_events(
    tmp_path: Path, pg_url: str
) -> None:
    """inotify sees only this host's writes, so a shared source is listed by polling: the
    service has no inotify watch on it, says it polls, and still finds a new file (no rescan
    is left to find it). Its unshared source beside it is watched through inotify."""
    from .conftest import free_port

    shared, local, out = tmp_path / "shared", tmp_path / "local", tmp_path / "out"
    for folder in (shared, local):
        folder.mkdir()
    port = free_port()
    source = {"settle": 0, "poll_interval": 0.2, "rescan": 0}  # no reconcile scans
    cfg = write_config(
        tmp_path / "n1.yml",
        {
            "database": database_config(pg_url),
            "node": "n1",
            "lease": "30s",
            "sources": [
                {"path": str(shared), "name": "shared", "shared": True, **source},
                {"path": str(local), "name": "local", **source},
            ],
            "rules": [{"extensions": ["txt"], "to": str(out)}],
            "api": {"enabled": True, "port": port},
            "monitor": {"enabled": False},
        },
    )
    svc = ServiceProcess(cfg).start()
    try:

        def sources() -> dict[str, Any] | None:
            url = f"http://127.0.0.1:{port}/api/v1/status"
            with urllib.request.urlopen(url, timeout=10) as resp:
                found = {s["name"]: s for s in json.loads(resp.read())["sources"]}
            ready = all(s["ready"] for s in found.values()) and found["shared"]["listing"]
            return found if ready else None

        status = wait_until(sources, 60)
        assert status["shared"]["polling"] is True
        assert status["local"]["polling"] is False
        assert svc.proc is not None
        watched = wait_until(lambda: _inotify_watched(svc.proc.pid) or None, 30)  # type: ignore[union-attr]
        assert os.stat(local).st_ino in watched
        assert os.stat(shared).st_ino not in watched  # no event from it can reach the service

        old(shared / "a.txt", b"written by another host")
        old(local / "b.txt", b"written here")
        wait_until(
            lambda: (
                delivered(out) == {"a.txt": b"written by another host", "b.txt": b"written here"}
            ),
            60,
        )
        assert os.stat(shared).st_ino not in _inotify_watched(svc.proc.pid)
    finally:
        assert svc.stop() == 0, svc.log()


def test_a_node_that_cannot_join_waits_for_the_journal_and_then_works(
    tmp_path: Path, pg_url: str
) -> None:
    """The journal can go away again between its opening and the node's join (here: the
    join's statement cannot get its lock, as during a failover or a long migration). The
    node waits and says so, and joins and delivers once it can; it does not exit."""
    import psycopg

    (tmp_path / "inbox").mkdir()
    cfg, _ = _configs(tmp_path, pg_url, str(tmp_path / "out"))
    first = ServiceProcess(cfg).start()  # makes the schema
    assert first.stop() == 0, first.log()
    cfg.with_suffix(".log").unlink()
    with psycopg.connect(pg_url, password=PASSWORD) as holder:
        holder.execute("LOCK TABLE nodes IN ACCESS EXCLUSIVE MODE")
        node = ServiceProcess(cfg).start(wait_ready=False)
        try:
            wait_until(lambda: "node n1 cannot join the journal: " in node.log(), 120)
            assert node.proc is not None and node.proc.poll() is None, node.log()
            holder.commit()  # the lock goes: the next try joins
            wait_until(lambda: "watching" in node.log(), 120)
            (tmp_path / "inbox" / "a.txt").write_bytes(b"after the wait")
            wait_until(lambda: (tmp_path / "out" / "a.txt").exists(), 60)
            assert (tmp_path / "out" / "a.txt").read_bytes() == b"after the wait"
            assert "waiting for it" in node.log() and "Traceback" not in node.log()
            assert PASSWORD not in node.log()
        finally:
            assert node.stop() == 0, node.log()


def test_two_names_whose_32_bit_hashes_collide_both_run(tmp_path: Path, pg_url: str) -> None:
    """A node's name lock once keyed on PostgreSQL's 32-bit ``hashtext``: these two names (a
    review found them by brute force) share that hash, and the second was refused as if it
    had the first's name."""
    import psycopg

    names = ("node-35394", "node-42840")
    with psycopg.connect(pg_url, password=PASSWORD) as conn:
        one, two = (conn.execute("SELECT hashtext(%s)", (n,)).fetchone() for n in names)
    assert one == two  # the premise: a 32-bit key cannot tell them apart
    (tmp_path / "inbox").mkdir()
    nodes = [
        ServiceProcess(_node_config(tmp_path, pg_url, name, str(tmp_path / "out")))
        for name in names
    ]
    try:
        for n in nodes:
            n.start()  # waits until it watches; fails if it exited
        assert _live_nodes(pg_url) == set(names)
    finally:
        _stop(*nodes)


def test_a_node_started_while_the_database_is_down_waits_for_it(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    """A host that boots before its database: the node says it waits, and starts working
    once the database is up (it once exited at once, taking its name's lock before the
    journal's wait). ``--once`` still fails at once, for cron to try again."""
    (tmp_path / "inbox").mkdir()
    cfg, _ = _configs(tmp_path, pg_url, str(tmp_path / "out"))
    first = ServiceProcess(cfg).start()  # makes the schema
    assert first.stop() == 0, first.log()
    cfg.with_suffix(".log").unlink()
    pg_cluster.stop()
    try:
        once = run_cli("-c", cfg, "--once", timeout=120)
        assert once.returncode == 1 and "cannot reach the journal database" in once.stderr
        node = ServiceProcess(cfg).start(wait_ready=False)
        wait_until(lambda: "to take its lock: " in node.log() and "waiting for it" in node.log())
        assert node.proc is not None and node.proc.poll() is None, node.log()
    finally:
        pg_cluster.start()
    try:
        wait_until(lambda: "watching" in node.log(), 120)
        (tmp_path / "inbox" / "a.txt").write_bytes(b"once the database is up")
        wait_until(lambda: (tmp_path / "out" / "a.txt").exists(), 60)
        assert PASSWORD not in node.log() and "Traceback" not in node.log()
    finally:
        assert node.stop() == 0, node.log()


def _drop_name_locks(url: str) -> int:
    """End the connections that hold advisory locks (a node's name lock), as a database
    restart or an operator's pg_terminate_backend would; how many."""
    import psycopg

    with psycopg.connect(url, password=PASSWORD, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM (SELECT DISTINCT pid FROM pg_locks "
            "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid()) AS holders"
        ).fetchall()
    return len(rows)


def test_a_name_lock_lost_with_its_connection_is_taken_again(tmp_path: Path, pg_url: str) -> None:
    """The database drops a node's name lock with its connection. The node takes it again at
    its next renewal, so a second service with that name is still refused; and if the second
    gets in first, one of the two stops (exit 1, saying why): never two nodes of one name."""
    (tmp_path / "inbox").mkdir()
    cfg, _ = _configs(tmp_path, pg_url, str(tmp_path / "out"))
    twin = ServiceProcess(cfg.with_name("twin.yml"))
    twin.config.write_text(cfg.read_text())
    n1 = ServiceProcess(cfg).start()
    try:
        assert _drop_name_locks(pg_url) == 1
        wait_until(lambda: "the journal's lock is held again" in n1.log(), 60)
        again = run_cli("-c", cfg, timeout=60)
        assert again.returncode == 1 and "already running as node 'n1'" in again.stderr
        # the race: the lock dropped, and another service of that name starting at once
        assert _drop_name_locks(pg_url) == 1
        twin.start(wait_ready=False)
        both = (n1, twin)
        wait_until(lambda: any(n.proc is not None and n.proc.poll() is not None for n in both))
        gone = next(n for n in both if n.proc is not None and n.proc.poll() is not None)
        kept = twin if gone is n1 else n1
        assert gone.proc is not None and gone.proc.wait() == 1, gone.log()
        assert "'n1'" in gone.log() and "Traceback" not in gone.log()
        (tmp_path / "inbox" / "a.txt").write_bytes(b"one node of that name works")
        wait_until(lambda: (tmp_path / "out" / "a.txt").exists(), 60)
        assert kept.proc is not None and kept.proc.poll() is None, kept.log()
    finally:
        _stop(*(n for n in (n1, twin) if n.proc is not None))


# ------------------------------------------------------------------ fencing (the x12 review)


class GatedReceiver(HttpReceiver):
    """Holds each upload to a path in ``paths`` until the test opens its gate: ``release(path,
    n)`` lets the path's n-th request go on. ``starts`` lists the held requests' paths."""

    def __init__(self, *paths: str) -> None:
        super().__init__()
        self.starts: list[str] = []
        self.opened: set[tuple[str, int]] = set()
        self.all_open = False
        for path in paths:
            self.behave[path] = self._held

    async def _held(self, request: Any, hit: int) -> None:
        self.starts.append(request.path)
        while not self.all_open and (request.path, hit) not in self.opened:
            await asyncio.sleep(0.02)  # polls the gate the test opens

    def release(self, path: str, n: int) -> None:
        self.opened.add((path, n))

    def close(self) -> None:
        self.all_open = True
        super().close()


def test_a_node_that_joined_again_refuses_the_late_outcome_of_its_lost_claim(
    tmp_path: Path, pg_url: str
) -> None:
    """One node (2 s lease, after: delete) uploads a.txt; the upload is held, the node frozen
    past its lease and woken: it joins again, its old row is requeued and it claims it anew, a
    second upload starts. The first upload then ends: its outcome carries the token of the
    claim it came from, so it is refused, and the source stays in place while the second
    upload runs; the second's outcome is taken and only then is the source deleted."""
    receiver = GatedReceiver("/up/a.txt")
    (tmp_path / "inbox").mkdir()
    to = {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}
    n1 = ServiceProcess(_node_config(tmp_path, pg_url, "n1", to, after="delete", workers=2))
    src = tmp_path / "inbox" / "a.txt"
    try:
        n1.start()
        old(src, b"payload")
        wait_until(lambda: len(receiver.starts) == 1, 60)  # the first upload is held
        [first] = journal_rows(pg_url)
        n1.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "n1" not in _live_nodes(pg_url), 60)  # past its lease
        finally:
            n1.signal(signal.SIGCONT)
        wait_until(lambda: len(receiver.starts) == 2, 60)  # claimed anew, a new upload
        receiver.release("/up/a.txt", 1)
        wait_until(lambda: "outcome(s) refused" in n1.log() or not src.exists(), 60)
        assert src.exists(), "deleted on a refused outcome while the live upload runs"
        assert journal_rows(pg_url, "status='SUCCEEDED'") == []
        receiver.release("/up/a.txt", 2)
        wait_until(lambda: not src.exists(), 60)
        [row] = journal_rows(pg_url)
        assert row["status"] == "SUCCEEDED" and row["epoch"] != first["epoch"]
        assert len(receiver.received) == 2  # the frozen upload, and the one that counts
    finally:
        _stop(n1)
        receiver.close()


def test_a_woken_node_starts_nothing_it_claimed_under_its_lost_lease(
    tmp_path: Path, pg_url: str
) -> None:
    """n1 (one worker) has claimed a.txt and b.txt: it uploads a.txt (held) while b.txt waits
    in its queue, and is frozen past its lease. n2 takes both over and copies b.txt. n1 is
    woken and joins again under a new epoch; when its worker is free it takes b.txt from its
    queue, and starts nothing: the claim was made under the lease it lost, whichever lease it
    holds now. b.txt is copied once (before the fix, a second time as b-1.txt)."""
    receiver = GatedReceiver("/up/a.txt")
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    rules = [
        {"glob": "a.txt", "to": {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}},
        {"glob": "b.txt", "to": str(out)},
    ]
    n1 = ServiceProcess(_node_config(tmp_path, pg_url, "n1", None, rules=rules, workers=1))
    n2 = ServiceProcess(_node_config(tmp_path, pg_url, "n2", None, rules=rules, workers=2))
    try:
        n1.start()
        old(tmp_path / "inbox" / "a.txt", b"A")
        old(tmp_path / "inbox" / "b.txt", b"B")

        def both_claimed_by_n1() -> bool:
            rows = journal_rows(pg_url)
            return len(rows) == 2 and all(
                (r["status"], r["node"]) == ("IN_PROGRESS", "n1") for r in rows
            )

        wait_until(lambda: both_claimed_by_n1() and len(receiver.starts) == 1, 60)
        n2.start()
        n1.signal(signal.SIGSTOP)
        try:  # n2 took both over: a.txt's upload held, b.txt copied
            wait_until(lambda: len(receiver.starts) == 2 and (out / "b.txt").exists(), 60)
        finally:
            n1.signal(signal.SIGCONT)
        wait_until(lambda: "joining again" in n1.log(), 60)
        receiver.release("/up/a.txt", 1)  # n1's worker is free: it takes b.txt's group
        wait_until(lambda: "left to the queue" in n1.log() or len(list(out.iterdir())) > 1, 60)
        assert sorted(p.name for p in out.iterdir()) == ["b.txt"]
        receiver.release("/up/a.txt", 2)
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 2, 60)
        assert "b.txt: claimed under a lease this node may have lost" in n1.log()
        assert delivered(out) == {"b.txt": b"B"}
    finally:
        _stop(*(n for n in (n1, n2) if n.proc is not None))
        receiver.close()


class CutAwareReceiver(GatedReceiver):
    """A GatedReceiver that also lists in ``cut`` the requests whose client went away before
    the whole body came (a complete upload is in ``received``, as before)."""

    def __init__(self, *paths: str) -> None:
        super().__init__(*paths)
        self.cut: list[str] = []

    async def _handle(self, request: Any) -> Any:
        try:
            return await super()._handle(request)
        except BaseException:  # the body ended short: the connection was lost or reset
            self.cut.append(request.path)
            raise


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_a_node_woken_past_its_lease_cuts_its_upload_short(tmp_path: Path, pg_url: str) -> None:
    """n1 uploads a 48 MiB file to a receiver that holds the request before reading its body,
    so n1 is mid-upload; n1 is frozen past its lease, and n2 takes the file over and uploads
    it whole. n1 is woken: when the receiver reads on, n1's next chunk meets the fence (the
    lease it claimed under ran out) and the upload stops short of its end, so the receiver
    gets n1's body cut, and the file whole only once.
    Before, n1's upload went on to its end: the file arrived whole twice (n1's outcome was
    refused by the journal, but the receiver had it)."""
    receiver = CutAwareReceiver("/up/big.bin")
    (tmp_path / "inbox").mkdir()
    to = {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}
    rules = [{"glob": "*.bin", "to": to}]
    n1 = ServiceProcess(_node_config(tmp_path, pg_url, "n1", None, rules=rules, workers=1))
    n2 = ServiceProcess(_node_config(tmp_path, pg_url, "n2", None, rules=rules, workers=1))
    data = os.urandom(48 << 20)
    try:
        n1.start()
        old(tmp_path / "inbox" / "big.bin", data)
        wait_until(lambda: receiver.starts == ["/up/big.bin"], 60)  # n1's upload is held
        n2.start()
        receiver.release("/up/big.bin", 2)  # the next upload (n2's) is read at once
        n1.signal(signal.SIGSTOP)
        try:  # past n1's lease, n2 takes the file over and uploads it whole
            wait_until(lambda: len(receiver.received) == 1, 120)
        finally:
            n1.signal(signal.SIGCONT)
        wait_until(lambda: "lease (2s) was not renewed in time" in n1.log(), 60)
        receiver.release("/up/big.bin", 1)  # the receiver reads on from n1's connection
        wait_until(lambda: len(receiver.received) + len(receiver.cut) == 2, 60)
        assert receiver.cut == ["/up/big.bin"], "n1's upload went on to its end"
        [whole] = receiver.received
        assert (whole.size, whole.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 1, 60)
        [row] = journal_rows(pg_url)
        assert (row["status"], row["node"]) == ("SUCCEEDED", "n2")
        assert "big.bin: " in n1.log() and "stopped: this node's lease" in n1.log()
        assert "raise `lease`" in n1.log()
    finally:
        _stop(*(n for n in (n1, n2) if n.proc is not None))
        receiver.close()


def _renewed(url: str, node: str) -> Any:
    with psycopg.connect(url, password=PASSWORD) as db:
        row = db.execute("SELECT renewed FROM nodes WHERE name=%s", (node,)).fetchone()
    return None if row is None else row[0]


def _epoch(url: str, node: str) -> int | None:
    with psycopg.connect(url, password=PASSWORD) as db:
        row = db.execute("SELECT epoch FROM nodes WHERE name=%s", (node,)).fetchone()
    return None if row is None else int(row[0])


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
def test_a_second_service_of_a_name_waits_out_the_lease_of_one_whose_lock_was_cut(
    tmp_path: Path, pg_url: str
) -> None:
    """n1 (lease 60 s) is mid-upload of a 48 MiB PUT, held by the receiver. The server session
    holding n1's name lock is ended (an idle timeout, a proxy, an operator), and a second
    service of the name starts: the lock is free, but n1 runs on, its lease live. The second
    service waits that lease out; n1 finds the lock taken at its next renewal and stops; the
    file arrives whole once.
    Before (r5 review): holding the lock counted as proof that n1 was gone, so the second
    service took n1's entry over at once and uploaded the file whole while n1, its lease
    still good on its own clock, finished its own upload: the file arrived whole twice."""
    receiver = CutAwareReceiver("/up/big.bin")
    (tmp_path / "inbox").mkdir()
    rules = [{"glob": "*.bin", "to": {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}}]
    n1_config = _node_config(tmp_path, pg_url, "n1", None, rules=rules, workers=1, lease="60s")
    twin_config = tmp_path / "n1-twin.yml"  # the same service, started a second time
    twin_config.write_text(n1_config.read_text())
    n1, twin = ServiceProcess(n1_config), ServiceProcess(twin_config)
    data = os.urandom(48 << 20)
    try:
        n1.start()
        old(tmp_path / "inbox" / "big.bin", data)
        wait_until(lambda: receiver.starts == ["/up/big.bin"], 60)  # n1 mid-upload, held
        receiver.release("/up/big.bin", 2)  # a second upload would be read at once
        first, epoch = _renewed(pg_url, "n1"), _epoch(pg_url, "n1")
        wait_until(lambda: _renewed(pg_url, "n1") != first, 60)  # right after a renewal
        with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as db:
            [(pid,)] = db.execute(
                "SELECT DISTINCT pid FROM pg_locks WHERE locktype='advisory'"
            ).fetchall()  # n1's name lock's session
            db.execute("SELECT pg_terminate_backend(%s)", (pid,))
        twin.start(wait_ready=False)  # it says "watching" once it has joined
        wait_until(lambda: "still live on the journal" in twin.log() or receiver.received, 120)
        assert not receiver.received, "the second service delivered beside n1"
        receiver.release("/up/big.bin", 1)  # n1's upload is read on
        wait_until(lambda: "node n1 stops" in n1.log(), 120)  # it found the lock taken
        assert n1.proc is not None and n1.proc.wait(120) == 1  # the name is not its own now
        wait_until(lambda: _epoch(pg_url, "n1") not in (None, epoch), 120)  # the twin joined
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 1, 120)
        [whole] = receiver.received
        assert (whole.size, whole.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    finally:
        _stop(*(n for n in (n1, twin) if n.proc is not None and n.proc.poll() is None))
        receiver.close()


@pytest.mark.timeout(SCENARIO_TIMEOUT_S)
@pytest.mark.parametrize("cut", [False, True], ids=["connected", "connections cut"])
def test_slow_local_copies_do_not_cost_the_node_its_lease(
    tmp_path: Path, pg_url: str, cut: bool
) -> None:
    """One node, a 6 s lease, eight 4 MiB files copied at once into a local folder held to
    2 MB/s (a slow disk or share): the copies fill the loop's default executor for about
    16 s, and the lease holds while the database answers; each file is copied once.
    Before (r5 review): the name lock's check ran in that executor, waited behind the
    copies, was taken for a silent connection after a third of the lease, and the lease was
    lost: every copy under way was stopped at its fence and begun again (a 150 s run
    delivered none of the eight).
    ``cut``: the journal is named by a host name (``localhost``) and every connection of the
    node is cut while the copies run, so the lease connection is made again behind them.
    Before, psycopg looked the name up in that same executor: the renewal waited behind the
    copies for longer than a lease, and the lease was lost."""
    out = tmp_path / "out"
    (tmp_path / "inbox").mkdir()
    url = pg_url.replace("127.0.0.1", "localhost") if cut else pg_url
    rules = [{"glob": "*.bin", "to": {"url": out.as_uri(), "bandwidth": "2MB/s"}}]
    n1 = ServiceProcess(_node_config(tmp_path, url, "n1", None, rules=rules, workers=8, lease="6s"))
    files = {f"f{i}.bin": os.urandom(4 << 20) for i in range(8)}
    try:
        n1.start()
        for name, data in files.items():
            old(tmp_path / "inbox" / name, data)
        if cut:
            copying = "status='IN_PROGRESS' AND node='n1'"
            try:
                wait_until(lambda: len(journal_rows(pg_url, copying)) == len(files), 120)
            except AssertionError:
                raise AssertionError(n1.log()[-3000:]) from None
            with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as db:
                db.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
        wait_until(
            lambda: (
                len(journal_rows(pg_url, "status='SUCCEEDED'")) == len(files)
                or "was not renewed in time" in n1.log()
            ),
            300,
        )
        assert "was not renewed in time" not in n1.log(), n1.log()[-3000:]
        assert {p.name: p.read_bytes() for p in out.iterdir()} == files
        assert "stopped: this node's lease" not in n1.log()
    finally:
        _stop(n1)


async def test_a_rejoin_waiting_out_another_lease_of_its_name_says_so_once(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A node holding its name's lock whose lease ran out finds a live lease of its name that
    is not its own (a twin whose lock's session was cut): it waits, and says so once, not at
    every renewal (v5 review: two warnings every third of a lease, the reason's text
    carrying the seconds left)."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    stop = asyncio.Event()
    async with (
        open_journal(target) as journal,
        open_journal(target) as twin,
        journal_lock_when_ready(target, "a", stop) as hold,
    ):
        membership = Membership(journal, "a", 3.0, [], hold, lambda why: None)
        await membership.join()

        async def dead() -> bool:
            return any(n.name == "a" and not n.alive for n in await twin.nodes())

        await until(dead, 30)  # its lease ran out unrenewed (a freeze)
        await twin.join("a", 60.0)  # and the twin joined under the name meanwhile
        renewals = 0
        renew = journal.renew

        async def counted() -> bool:
            nonlocal renewals
            renewals += 1
            return await renew()

        async def five() -> bool:
            return renewals >= 5

        journal.renew = counted  # type: ignore[method-assign]
        caplog.set_level(logging.WARNING, "filedispatch")
        running = asyncio.create_task(membership.run(stop))
        try:  # five renewals, a second apart: the twin's lease has 55 s left or more
            await until(five, 60)
        finally:
            stop.set()
            await running
    said = [r.getMessage() for r in caplog.records if r.name.startswith("filedispatch")]
    assert not membership.holds()
    assert len([m for m in said if "waiting for another lease" in m]) == 1, said
    assert len([m for m in said if "joining again" in m]) == 1, said


async def test_a_late_answer_to_a_renewal_the_database_took_in_time_keeps_the_epoch(
    pg_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The database renews the lease while it is still live, but the answer reaches the node
    only after its lease ran out on its own clock (a slow answer to the commit). Nobody can
    have found the epoch dead (see the next test), so the node takes the renewal up and goes
    on under the same epoch. Before (w5 review): it threw the epoch away and joined under a
    new one, so every row it was running was requeued at once, and a command still running
    here could run again on another node."""
    stop, answer = asyncio.Event(), asyncio.Event()
    lease_s = 9.0  # the database's lease outlives the node's own by the delay of the answer
    async with (
        open_journal(PostgresTarget(pg_url, PASSWORD_ENV)) as journal,
        await psycopg.AsyncConnection.connect(pg_url, password=PASSWORD, autocommit=True) as db,
    ):
        membership = Membership(journal, "a", lease_s)
        old_epoch = await membership.join()
        renew, calls = journal.renew, 0

        async def late() -> bool:
            nonlocal calls
            calls += 1
            renewed = await renew()
            if calls > 1:  # sent after the first renewal: it holds the lease longer
                await answer.wait()  # the answer is held back
            return renewed

        async def lapsed() -> bool:
            return not membership.holds(old_epoch)

        async def decided() -> bool:  # the late answer was taken one way or the other
            return membership.epoch != old_epoch or membership.holds(old_epoch)

        journal.renew = late  # type: ignore[method-assign]
        caplog.set_level(logging.INFO, "filedispatch")
        running = asyncio.create_task(membership.run(stop))
        try:
            await until(lapsed, 60)  # the lease ran out here, the renewal's answer pending
            cur = await db.execute(
                "SELECT lease_until > clock_timestamp() FROM nodes WHERE name='a' AND epoch=%s",
                (old_epoch,),
            )
            row = await cur.fetchone()
            assert row is not None and row[0], "precondition: the database still holds it"
            answer.set()
            journal.renew = renew  # type: ignore[method-assign]
            await until(decided, 60)
            assert membership.epoch == old_epoch, "joined again: its running work was requeued"
        finally:
            answer.set()
            stop.set()
            await running
    assert "took its renewal in time after all" in caplog.text


async def _held_renewal(
    journal: Any, db: psycopg.AsyncConnection[Any], locker: psycopg.AsyncConnection[Any]
) -> tuple[asyncio.Task[bool], float] | None:
    """A renewal of ``journal``'s lease that the database takes before the lease's end and
    whose transaction is then held (``locker`` locks the node's listing lease, which a renewal
    updates after its entry) until after that end: the task and the old end (the database's
    clock, seconds since 1970). The old end is set ``margin`` seconds ahead first; None if the
    machine was too slow for it (the renewal came too late)."""
    await locker.execute("SELECT 1 FROM listings WHERE epoch=%s FOR UPDATE", (journal.epoch,))
    cur = await db.execute(
        "UPDATE nodes SET lease_until=clock_timestamp() + interval '3 seconds' "
        "WHERE epoch=%s RETURNING EXTRACT(EPOCH FROM lease_until)::float8",
        (journal.epoch,),
    )
    [ends] = await cur.fetchone() or [0.0]
    renewal = asyncio.create_task(journal.renew())

    async def held_or_answered() -> bool:
        if renewal.done():
            return True
        cur = await db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type='Lock' "
            "AND query LIKE 'UPDATE listings%%'"
        )
        row = await cur.fetchone()
        return bool(row and row[0])

    await until(held_or_answered, 60)
    if renewal.done():  # too late: it found the lease run out and did not touch the listing
        assert not renewal.result()
        await locker.rollback()
        return None
    return renewal, float(ends)  # it renewed the entry, else it would not update the listing


async def _past(db: psycopg.AsyncConnection[Any], moment: float) -> bool:
    """Whether the database's clock is past ``moment`` (seconds since 1970)."""
    cur = await db.execute("SELECT EXTRACT(EPOCH FROM clock_timestamp())::float8")
    now = await cur.fetchone()
    return bool(now and now[0] > moment)


async def test_no_node_finds_an_epoch_dead_while_the_database_takes_its_renewal(
    pg_url: str,
) -> None:
    """Node A's renewal reaches the database before its lease ends, but its transaction is
    held until after that end. Meanwhile node B looks for dead epochs, in both the ways a node
    acts on one: it must neither requeue A's row in progress nor take A's open S3 upload for
    an orphan, for the renewal then commits and A goes on under that epoch (it would deliver
    beside the node that took its row, its upload aborted under it). Before (w5 review): the
    verdict read the node entries unlocked, from a snapshot without the renewal: A was dead."""
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with (
        open_journal(target) as b,
        await psycopg.AsyncConnection.connect(pg_url, password=PASSWORD, autocommit=True) as db,
        await psycopg.AsyncConnection.connect(pg_url, password=PASSWORD) as locker,
    ):
        await b.join("b", 60.0)
        for attempt in range(5):  # a new node each time the machine was too slow (rare)
            name = f"a{attempt}"
            upload = OpenUpload(None, "bucket", f"in/{name}.bin", "upload-1")
            async with open_journal(target) as a:
                await a.join(name, 60.0, frozenset({name}))  # a renewal may wait 20 s for a lock
                assert await a.take_listing(name)
                version = FileVersion(name, Path("/in"), "a.bin", 1, 1, ino=3, ctime_ns=1)
                await a.plan([_step(version)])
                [[row]] = await a.claim(10, time.time())
                await a.record_uploads([upload])
                held = await _held_renewal(a, db, locker)
                if held is None:
                    continue
                await until(lambda: _past(db, held[1] + 0.1), 60)  # noqa: B023
                orphans = await b.orphan_uploads()
                async with await psycopg.AsyncConnection.connect(
                    pg_url, password=PASSWORD
                ) as reaper:
                    await requeue_orphans(reaper)
                    await reaper.commit()
                await locker.rollback()
                renewed = await held[0]
                cur = await db.execute("SELECT status, epoch FROM dispatches WHERE id=%s", [row.id])
                state, epoch = await cur.fetchone(), a.epoch
                break
        else:
            pytest.fail("the renewal never reached the database in time")
    assert renewed, "precondition: the database took the renewal"
    assert upload not in orphans, "B took the upload of a live epoch for an orphan"
    assert state == ("IN_PROGRESS", epoch), "B requeued a live epoch's row"


def test_a_claim_whose_commit_answer_is_lost_is_delivered(tmp_path: Path, pg_url: str) -> None:
    """A node's journal connection is cut right after the COMMIT of a claim reached the server
    (the answer never comes back): the node still delivers every file, and no row is left
    IN_PROGRESS (before the fix the claim ran again, took nothing, and its 20 rows stayed
    IN_PROGRESS under the live node's epoch: nothing was delivered)."""
    proxy = CommitCutProxy(
        int(urllib.parse.urlsplit(pg_url).port or 0), b"SET status='IN_PROGRESS'"
    )
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    node = ServiceProcess(_node_config(tmp_path, proxy.url(pg_url), "n1", str(out)))
    try:
        node.start()
        proxy.armed = True
        expected = {f"f{i:02d}.txt": f"file {i}".encode() for i in range(20)}
        for name, data in expected.items():
            old(tmp_path / "inbox" / name, data)
        wait_until(lambda: proxy.cuts == 1, 60)
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 20, 120)
        assert delivered(out) == expected
        assert "unanswered" in node.log()
    finally:
        _stop(node)
        proxy.close()


def test_a_node_whose_name_lock_connection_goes_silent_takes_it_again(
    tmp_path: Path, pg_url: str
) -> None:
    """The connection holding n1's name lock goes silent (no reset: see SilentLockProxy)
    while the database stays reachable. Each renewal checks that lock first, in a thread, on
    a blocking connection: the check waited for ever, and with it every renewal, so the
    lease ran out for good and the node delivered nothing more (the z12 review). Now the
    check gives up after a third of the lease, shuts that connection down and takes the
    lock again on a new one, and the node delivers a file put in meanwhile."""
    proxy = SilentLockProxy(int(urllib.parse.urlsplit(pg_url).port or 0))
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    node = ServiceProcess(_node_config(tmp_path, proxy.url(pg_url), "n1", str(out)))
    try:
        node.start()
        old(tmp_path / "inbox" / "a.txt", b"before")
        wait_until(lambda: (out / "a.txt").exists(), 60)
        proxy.silenced = True
        wait_until(lambda: proxy.held >= 1, 60)  # a renewal's check of the lock is held
        try:
            wait_until(lambda: "held again" in node.log(), 120)
        except AssertionError:
            raise AssertionError(node.log()[-3000:]) from None
        old(tmp_path / "inbox" / "b.txt", b"after")
        wait_until(lambda: (out / "b.txt").exists(), 120)
        assert "lock did not answer in" in node.log()
        assert delivered(out) == {"a.txt": b"before", "b.txt": b"after"}
    finally:
        _stop(node)
        proxy.close()


def test_a_rejoin_whose_commit_answer_is_lost_does_not_stop_the_node(
    tmp_path: Path, pg_url: str
) -> None:
    """A node woken past its lease joins again, and the connection is cut right after that
    join's COMMIT reached the database: its next try finds its own new entry live. The entry
    bears the start stamp of that unanswered join, so it is known for its own: the node joins
    again over it and goes on (before, it took the entry for another node's, and stopped with
    exit 1). Holding the name's lock is no such proof: see
    test_a_second_service_of_a_name_waits_out_the_lease_of_one_whose_lock_was_cut."""
    proxy = CommitCutProxy(int(urllib.parse.urlsplit(pg_url).port or 0), b"INSERT INTO nodes")
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    node = ServiceProcess(_node_config(tmp_path, proxy.url(pg_url), "n1", str(out)))
    try:
        node.start()
        node.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: "n1" not in _live_nodes(pg_url), 60)  # past its lease
            proxy.armed = True
        finally:
            node.signal(signal.SIGCONT)
        wait_until(lambda: proxy.cuts == 1, 60)
        old(tmp_path / "inbox" / "a.txt", b"after the cut")
        proc = node.proc
        assert proc is not None
        wait_until(lambda: (out / "a.txt").exists() or proc.poll() is not None, 60)
        assert proc.poll() is None, node.log()
        assert (out / "a.txt").read_bytes() == b"after the cut"
        assert "node n1 stops" not in node.log()
    finally:
        _stop(node)
        proxy.close()
