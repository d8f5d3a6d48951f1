"""A node's life cycle in the cluster: a dead node is forgotten once its lease ended long
enough ago and it holds no work, a renamed node's unshared work is handed over by the
operator (``filedispatch nodes hand-over``), and ``check --connect`` opens the journal as the
service would.

A real PostgreSQL (tests/pgcluster.py), the real CLI and services as subprocesses; every wait
is for a state, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from aiohttp import web

from filedispatch.errors import FencedError, NodeConflictError
from filedispatch.journal import PlannedStep, PostgresTarget, StepResult, open_journal
from filedispatch.models import FileVersion, Status

from .apiutil import database_config
from .conftest import (
    ServiceProcess,
    cli_env,
    free_port,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .conftest import (
    until as _until,
)
from .pgcluster import PASSWORD, PASSWORD_ENV
from .servers import HttpReceiver


def _config(
    root: Path, url: str, node: str, to: Any, name: str | None = None, **extra: Any
) -> Path:
    """A node whose inbox is its own (not shared): its rows are claimed by its name only."""
    return write_config(
        root / f"{name or node}.yml",
        {
            "database": database_config(url),
            "node": node,
            "lease": "1s",
            "workers": 2,
            "sources": [
                {"path": str(root / "inbox"), "name": "inbox", "settle": 0, "after": "keep"}
            ],
            "rules": [{"extensions": ["txt"], "to": to}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
            **extra,
        },
    )


def _nodes_table(url: str) -> dict[str, bool]:
    """Each node on record: whether its lease holds (on the database's clock)."""
    with psycopg.connect(url, password=PASSWORD) as conn:
        rows = conn.execute("SELECT name, lease_until >= now() FROM nodes").fetchall()
    return {str(name): bool(alive) for name, alive in rows}


def _local(root: Path, name: str, ino: int) -> PlannedStep:
    """A step of a file of the source ``local``, which no node shares: it is its node's."""
    version = FileVersion("local", root, name, 1, 1, ino=ino, ctime_ns=1)
    return PlannedStep(version, "r", 0, "k0", "/out", "local")


@contextlib.asynccontextmanager
async def _joined(url: str, root: Path, *nodes: tuple[str, float]) -> AsyncIterator[list[Any]]:
    """A journal joined as each of ``nodes`` (name, lease in seconds); the first has planned
    one row of its source ``local``."""
    target = PostgresTarget(url, PASSWORD_ENV)
    async with contextlib.AsyncExitStack() as stack:
        journals = [await stack.enter_async_context(open_journal(target)) for _ in nodes]
        for journal, (name, lease) in zip(journals, nodes, strict=True):
            await journal.join(name, lease)
        await journals[0].plan([_local(root, "a.txt", 7)])
        yield journals


def _dead_node(url: str, name: str, tmp_path: Path, waiting: int = 0) -> None:
    """Register node ``name`` with a one-second lease, planning ``waiting`` rows of its
    unshared source ``local``, and wait until its lease has run out: a node that died."""
    target = PostgresTarget(url, PASSWORD_ENV)

    async def run() -> None:
        async with open_journal(target) as journal:
            await journal.join(name, 1.0, frozenset())
            await journal.plan(_local(tmp_path, f"{name}{i}.txt", i + 1) for i in range(waiting))

    asyncio.run(run())
    wait_until(lambda: _nodes_table(url).get(name) is False, 60)


# ------------------------------------------------------------------ forgetting dead nodes


async def test_only_dead_nodes_that_hold_no_work_are_forgotten(tmp_path: Path, pg_url: str) -> None:
    """A node whose lease ended longer ago than the threshold is forgotten if it holds no
    work; one whose unshared source still has rows waiting stays, with that work counted."""
    nodes = ("busy", 0.5), ("idle", 0.5), ("live", 30.0)  # busy plans a row only it may run
    async with _joined(pg_url, tmp_path, *nodes) as (*_, live):

        async def both_dead() -> bool:
            return not any(n.alive for n in await live.nodes() if n.name != "live")

        await _until(both_dead)
        assert await live.forget_nodes(3600.0) == []  # dead, but not for an hour

        async def forgot() -> list[str]:
            return await live.forget_nodes(1.0)

        assert await _until(forgot) == ["idle"]
        found = {n.name: n for n in await live.nodes()}
        assert set(found) == {"busy", "live"}
        busy = found["busy"]
        assert (busy.alive, busy.waiting, busy.in_flight) == (False, 1, 0)
        assert await live.forget_nodes(0.0) == []  # whatever the threshold, while it holds work


def test_a_service_forgets_dead_nodes_after_forget_nodes_after(tmp_path: Path, pg_url: str) -> None:
    """A live node forgets, at its renewals, a node dead for longer than
    ``forget_nodes_after``; a dead node still holding work is listed (API: ``waiting``)."""
    _dead_node(pg_url, "busy", tmp_path, waiting=2)  # dead first: longer than "gone"
    _dead_node(pg_url, "gone", tmp_path)
    (tmp_path / "inbox").mkdir()
    port = free_port()
    cfg = _config(
        tmp_path,
        pg_url,
        "n1",
        str(tmp_path / "out"),
        forget_nodes_after="1s",
        api={"enabled": True, "port": port},
    )
    svc = ServiceProcess(cfg).start()
    try:
        wait_until(lambda: "gone" not in _nodes_table(pg_url), 60)
        assert _nodes_table(pg_url) == {"busy": False, "n1": True}
        wait_until(lambda: "forgot node(s) gone" in svc.log(), 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/nodes", timeout=10) as resp:
            nodes = {n["name"]: n for n in json.loads(resp.read())["nodes"]}
        assert (nodes["busy"]["alive"], nodes["busy"]["waiting"]) == (False, 2)
        listed = run_cli("-c", cfg, "nodes")
        assert listed.returncode == 0, listed.stderr
        assert "busy: lease ran out" in listed.stdout and "2 waiting" in listed.stdout
        assert "nodes hand-over busy" in listed.stdout
    finally:
        assert svc.stop() == 0, svc.log()


# ------------------------------------------------------------------ handing work over


async def test_a_hand_over_fences_the_late_outcome_of_a_frozen_node(
    tmp_path: Path, pg_url: str
) -> None:
    """Node ``old`` claimed a row of its unshared source and froze past its lease: after the
    hand-over the row is PENDING with no epoch, claimable by ``new`` only; ``old``'s late
    outcome is refused, ``new``'s is taken, and ``old`` is forgotten."""
    async with _joined(pg_url, tmp_path, ("old", 0.5), ("new", 30.0), ("other", 30.0)) as (
        frozen,
        new,
        other,
    ):
        [[row]] = await frozen.claim(10, time.time())
        with pytest.raises(NodeConflictError, match="node 'old' is alive"):
            await new.hand_over("old", "new")

        async def dead() -> bool:
            return not any(n.alive for n in await new.nodes() if n.name == "old")

        await _until(dead)
        assert await new.hand_over("old", "new") == 1
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["owner"], rec["epoch"]) == ("PENDING", "new", None)
        assert await other.claim(10, time.time()) == []  # unshared: new's only

        with pytest.raises(FencedError):
            await frozen.finish([StepResult(row.id, Status.SUCCEEDED, 1, location="/late")])
        [[again]] = await new.claim(10, time.time())
        await new.finish(
            [StepResult(again.id, Status.SUCCEEDED, 1, location="/out/a.txt", epoch=again.epoch)]
        )
        [rec] = journal_rows(pg_url)
        assert (rec["status"], rec["node"], rec["location"]) == ("SUCCEEDED", "new", "/out/a.txt")
        assert [n.name for n in await new.nodes()] == ["new", "other"]


class Refusing(HttpReceiver):
    """Answers 503 to every upload until ``accept`` is set."""

    def __init__(self) -> None:
        self.accept = False
        self.refused = 0
        super().__init__()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self.accept:
            self.refused += 1
            await request.read()
            return web.Response(status=503, text="not now")
        return await super()._handle(request)


def test_a_hand_over_is_refused_while_the_node_is_alive(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "inbox").mkdir()
    cfg = _config(tmp_path, pg_url, "old", str(tmp_path / "out"))
    svc = ServiceProcess(cfg).start()
    try:
        refused = run_cli("-c", cfg, "nodes", "hand-over", "old", "--to", "new")
        assert refused.returncode == 1, (refused.stdout, refused.stderr)
        assert "node 'old' is alive" in refused.stderr and "stop it first" in refused.stderr
        assert "Traceback" not in refused.stderr and PASSWORD not in refused.stderr
        assert _nodes_table(pg_url) == {"old": True}
        unknown = run_cli("-c", cfg, "nodes", "hand-over", "nobody", "--to", "old")
        assert unknown.returncode == 1 and "no node named 'nobody'" in unknown.stderr
        itself = run_cli("-c", cfg, "nodes", "hand-over", "old")  # --to: this config's node
        assert itself.returncode == 2 and "to itself" in itself.stderr
    finally:
        assert svc.stop() == 0, svc.log()


def test_a_renamed_nodes_backlog_is_handed_over_and_delivered_once(
    tmp_path: Path, pg_url: str
) -> None:
    """Node ``old`` plans its unshared inbox but cannot deliver (503), and dies. Renamed
    ``new`` (same host, same config otherwise) cannot run its rows; once handed over it
    delivers each file exactly once, and ``old`` is forgotten."""
    receiver = Refusing()
    try:
        (tmp_path / "inbox").mkdir()
        files = {f"f{i}.txt": f"file {i} ".encode() * 50 for i in range(6)}
        for name, data in files.items():
            old(tmp_path / "inbox" / name, data)
        to = {"url": f"{receiver.url}/up/{{name}}", "method": "PUT", "retry": {"delay": 600}}
        gone = ServiceProcess(_config(tmp_path, pg_url, "old", to)).start()
        # every file planned and tried once, none in flight: a backlog only "old" may run
        wait_until(
            lambda: len(journal_rows(pg_url, "status='PENDING' AND attempts >= 1")) == len(files),
            120,
        )
        gone.kill()
        wait_until(lambda: _nodes_table(pg_url).get("old") is False, 60)

        cfg = _config(tmp_path, pg_url, "new", to)
        new = ServiceProcess(cfg).start()
        try:
            listed = run_cli("-c", cfg, "nodes")
            assert "old: lease ran out" in listed.stdout and "6 waiting" in listed.stdout
            assert not journal_rows(pg_url, "owner='new' OR status='SUCCEEDED'")

            receiver.accept = True
            handed = run_cli("-c", cfg, "nodes", "hand-over", "old")
            assert handed.returncode == 0, (handed.stdout, handed.stderr)
            assert "6 row(s) handed over to node new" in handed.stdout
            assert PASSWORD not in handed.stdout + handed.stderr

            wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == len(files), 120)
            rows = journal_rows(pg_url)
            assert len(rows) == len(files)
            assert {(r["status"], r["node"], r["owner"]) for r in rows} == {
                ("SUCCEEDED", "new", "new")
            }
            got = {r.path: r.sha256 for r in receiver.received}
            assert len(receiver.received) == len(files)
            assert got == {f"/up/{n}": hashlib.sha256(d).hexdigest() for n, d in files.items()}
            assert "old" not in _nodes_table(pg_url)
        finally:
            assert new.stop() == 0, new.log()
    finally:
        receiver.close()


# ------------------------------------------------------------------ check --connect


def _check_config(root: Path, database: Any) -> Path:
    (root / "inbox").mkdir(parents=True, exist_ok=True)
    return write_config(
        root / "check.yml",
        {
            "database": database,
            "node": "n1",
            "sources": [{"path": str(root / "inbox"), "name": "inbox"}],
            "rules": [{"to": str(root / "out")}],
        },
    )


def test_check_connect_reports_the_journal(tmp_path: Path, pg_url: str) -> None:
    cfg = _check_config(tmp_path, database_config(pg_url))
    fresh = run_cli("check", "-c", cfg, "--connect")
    assert fresh.returncode == 0, fresh.stderr
    assert f"journal: connected to {pg_url} (PostgreSQL " in fresh.stdout
    assert "schema: none yet" in fresh.stdout
    assert "lost commit answers: resolved" in fresh.stdout
    assert "node name 'n1': free" in fresh.stdout
    assert PASSWORD not in fresh.stdout + fresh.stderr

    svc = ServiceProcess(_config(tmp_path, pg_url, "n1", str(tmp_path / "out"))).start()
    try:
        found = run_cli("check", "-c", cfg, "--connect")
        assert found.returncode == 0, found.stderr
        assert "(current)" in found.stdout and "n1: alive" in found.stdout
        assert "node name 'n1': held by a live node" in found.stdout
    finally:
        assert svc.stop() == 0, svc.log()

    sqlite = _check_config(tmp_path / "lite", str(tmp_path / "lite" / "j.db"))
    local = run_cli("check", "-c", sqlite, "--connect")
    assert local.returncode == 0, local.stderr
    assert "(SQLite, writable)" in local.stdout and "schema: none yet" in local.stdout
    assert not (tmp_path / "lite" / "j.db").exists()  # looked at, not created


def test_check_connect_says_in_one_line_why_it_cannot_connect(tmp_path: Path, pg_url: str) -> None:
    """A wrong password, a database that does not exist, a port that is not PostgreSQL: exit
    1, one line, no traceback, no password. Without --connect, check stays offline."""
    wrong = "not-the-pw-41d2"
    cases = [
        (pg_url, cli_env(**{PASSWORD_ENV: wrong}), "password authentication failed"),
        (pg_url.rsplit("/", 1)[0] + "/no_such_db", cli_env(), 'database "no_such_db" does not'),
    ]
    http = HttpReceiver()
    try:
        cases.append((f"postgresql://fd@127.0.0.1:{http.port}/fd", cli_env(), ""))
        for i, (url, env, why) in enumerate(cases):
            cfg = _check_config(tmp_path / str(i), database_config(url))
            offline = run_cli("check", "-c", cfg, env=env)
            assert offline.returncode == 0, offline.stderr
            failed = run_cli("check", "-c", cfg, "--connect", env=env)
            assert failed.returncode == 1, (url, failed.stdout, failed.stderr)
            [line] = failed.stderr.splitlines()
            assert line.startswith(f"filedispatch: cannot connect to the journal {url}: ")
            assert why in line
            assert "Traceback" not in failed.stderr
            for secret in (wrong, PASSWORD):
                assert secret not in failed.stdout + failed.stderr
    finally:
        http.close()
