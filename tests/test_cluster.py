"""Several nodes on one PostgreSQL journal: leases, fencing, shared sources, the nodes API.

A real cluster (tests/pgcluster.py); the journal-level tests open the journal twice as two
nodes would; the end-to-end tests run two real services (the CLI as subprocesses) on one
database and one inbox, and kill one of them with SIGKILL. Nothing waits for a duration: each
test waits for a state, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filedispatch.errors import FencedError, NodeConflictError
from filedispatch.journal import PlannedStep, PostgresTarget, StepResult, open_journal
from filedispatch.models import FileVersion, Status

from .apiutil import database_config
from .conftest import (
    ServiceProcess,
    delivered,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .pgcluster import PASSWORD_ENV
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

        async def a_dead() -> bool:
            return any(n.name == "a" and not n.alive for n in await b.nodes())

        await _until(a_dead)
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
                }
            ],
            "rules": [{"extensions": ["txt"], "to": to}],
            "api": {"enabled": port is not None, "port": port or 0},
            "monitor": {"enabled": False},
            **extra,
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
    root: Path, url: str, receiver: SlowReceiver, count: int, **source: Any
) -> tuple[ServiceProcess, ServiceProcess]:
    """Two nodes on one shared inbox sending to ``receiver``, and ``count`` files in it."""
    (root / "inbox").mkdir()
    to = {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}
    cfg1, cfg2 = _configs(root, url, to, **source)
    nodes = ServiceProcess(cfg1).start(), ServiceProcess(cfg2).start()
    for i in range(count):
        old(root / "inbox" / f"f{i:04d}.txt", f"file {i}".encode())
    return nodes


def test_two_nodes_share_one_inbox_and_deliver_each_file_once(
    tmp_path: Path, pg_url: str, slow_receiver: SlowReceiver
) -> None:
    count = 400
    n1, n2 = _http_burst(tmp_path, pg_url, slow_receiver, count)
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


def test_the_other_node_finishes_after_the_lister_is_killed(tmp_path: Path, pg_url: str) -> None:
    """SIGKILL the node that lists the shared inbox mid-burst: within about one lease the other
    lists it, requeues the dead node's claimed work, and every file arrives exactly once (the
    dead node's interrupted copies are found delivered, not sent again)."""
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    cfg1, cfg2 = _configs(tmp_path, pg_url, str(out))
    n1 = ServiceProcess(cfg1).start()
    wait_until(lambda: "this node lists it now" in n1.log(), 30)
    n2 = ServiceProcess(cfg2).start()
    try:
        count = 1500
        expected = {f"f{i:04d}.txt": f"file {i}".encode() * 50 for i in range(count)}
        for name, data in expected.items():
            old(tmp_path / "inbox" / name, data)
        wait_until(lambda: _nodes_of_rows(pg_url)["n1"] >= 20, 60)
        n1.signal(signal.SIGKILL)
        n1.proc.wait(30)  # type: ignore[union-attr]
        wait_until(lambda: "this node lists it now" in n2.log(), 60)
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == count, 240)
        got = {k: v for k, v in delivered(out).items() if not Path(k).name.startswith(".")}
        assert got == expected  # nothing doubled under another name, nothing missing
        rows = journal_rows(pg_url)
        assert len(rows) == count and {r["status"] for r in rows} == {"SUCCEEDED"}
        assert _nodes_of_rows(pg_url)["n2"] > 0
    finally:
        n1._log.close()
        assert n2.stop() == 0, n2.log()


def test_a_node_stopped_past_its_lease_has_its_late_outcomes_refused(
    tmp_path: Path, pg_url: str, slow_receiver: SlowReceiver
) -> None:
    """SIGSTOP a node mid-burst for longer than its lease: the other takes its work over and
    finishes; on SIGCONT the stopped node's late outcomes are refused, it touches no source on
    their account, and the journal has one SUCCEEDED row per file."""
    count = 600
    n1, n2 = _http_burst(tmp_path, pg_url, slow_receiver, count, after="delete")
    try:
        wait_until(lambda: _nodes_of_rows(pg_url)["n1"] >= 10, 60)
        n1.signal(signal.SIGSTOP)
        try:
            wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == count, 240)
        finally:
            n1.signal(signal.SIGCONT)
        wait_until(lambda: "outcome(s) refused: node n1 no longer holds the rows" in n1.log(), 60)
        assert "the source is left in place" in n1.log()
        wait_until(lambda: "joining again" in n1.log(), 60)
        rows = journal_rows(pg_url)
        assert len(rows) == count and {r["status"] for r in rows} == {"SUCCEEDED"}
        assert len({r.path for r in slow_receiver.received}) == count
        wait_until(lambda: not any((tmp_path / "inbox").iterdir()), 60)  # n2 consumed them
    finally:
        assert n1.stop() == 0, n1.log()
        assert n2.stop() == 0, n2.log()


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


def test_the_nodes_api_and_the_node_on_each_row(tmp_path: Path, pg_url: str) -> None:
    from .conftest import free_port

    (tmp_path / "inbox").mkdir()
    port = free_port()
    cfg = _node_config(tmp_path, pg_url, "n1", str(tmp_path / "out"), port=port)
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
    finally:
        assert svc.stop() == 0, svc.log()
