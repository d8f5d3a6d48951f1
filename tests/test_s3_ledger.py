"""The ledger of open S3 multipart uploads in the journal (issue 12), against moto's S3 server
and a real PostgreSQL: whose uploads are orphans on each backend, a live node's never aborted,
a killed node's aborted by the node that is left, a frozen node's late upload never recorded
as done, and the ledger files of older versions moved into the journal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml

from filedispatch.config import load_config
from filedispatch.journal import Database, OpenUpload, PostgresTarget, open_journal
from filedispatch.models import FileVersion
from filedispatch.processors.s3 import sweep_orphans
from filedispatch.processors.s3uploads import UploadLedger

from .conftest import ServiceProcess, cli_env, journal_rows, until, wait_until
from .pgcluster import PASSWORD, PASSWORD_ENV
from .servers import S3Server, old_file, remote_config, sha256_of
from .test_cluster import _node_config, _step

MIB = 1024 * 1024


def _upload(s3: S3Server, key: str) -> OpenUpload:
    """A real multipart upload begun on the server, as the ledger writes it down."""
    upload_id = s3.client().create_multipart_upload(Bucket=s3.bucket, Key=key)["UploadId"]
    return OpenUpload(s3.endpoint, s3.bucket, key, upload_id)


# ------------------------------------------------------------------ the journal's ledger


async def test_the_uploads_of_a_run_that_is_gone_are_orphans_and_this_runs_are_not(
    database: Database,
) -> None:
    """Either backend: what a run that ended (or whose lease ended) began is an orphan to the
    next one; what the next run began itself is not, nor anything once ended."""
    first = OpenUpload(None, "b", "in/a.bin", "u1")
    async with open_journal(database) as before:
        await before.join("a", 1.0)
        await before.record_uploads([first])
        await before.leave()  # PostgreSQL: its lease ends now; SQLite: the run ends with it
    mine = OpenUpload("http://127.0.0.1:9", "b", "in/b.bin", "u2")
    async with open_journal(database) as journal:
        await journal.join("b", 30.0)
        await journal.record_uploads([mine])
        assert await journal.orphan_uploads() == [first]
        await journal.end_uploads([first])
        assert await journal.orphan_uploads() == []


async def test_a_ledger_that_cannot_be_written_costs_no_delivery(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal that takes no write (here: closed) neither raises into the upload nor makes it
    wait: the upload goes on, and the log says so once."""
    async with open_journal(tmp_path / "j.db") as journal:
        pass
    ledger = UploadLedger(journal)
    upload = OpenUpload(None, "b", "in/a.bin", "u1")
    for _ in range(2):
        await ledger.begun(upload)
        ledger.ended(upload)
    said = [r for r in caplog.records if "cannot write the S3 upload ledger" in r.message]
    assert len(said) == 1 and "closed" in said[0].getMessage()


async def test_a_live_nodes_upload_is_never_aborted_and_a_gone_ones_are(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """Three nodes on one journal: the sweep of B aborts the upload of C, whose lease ran out,
    and the one A began before it joined again (a run replaced); A's live upload stays open,
    and so does one under no configured destination (left in the ledger)."""
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "unused.db"}
    config = load_config(remote_config(ws, s3.dest("in/")))
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    async with open_journal(target) as a, open_journal(target) as b, open_journal(target) as c:
        await a.join("a", 60.0)
        await b.join("b", 60.0)
        await c.join("c", 1.0)
        replaced = _upload(s3, "in/replaced.bin")
        await a.record_uploads([replaced])
        await a.leave()  # its lease ended (lost, or given up)
        await a.join("a", 60.0)  # and it joined again: a new epoch
        live, dead, elsewhere = (
            _upload(s3, "in/live.bin"),
            _upload(s3, "in/dead.bin"),
            _upload(s3, "other/dead.bin"),
        )
        await a.record_uploads([live])
        await c.record_uploads([dead, elsewhere])
        await until(lambda: _gone(b, 3))  # C's lease ran out (nobody renews it)
        await sweep_orphans(b, config)
        assert sorted(s3.uploads()) == ["in/live.bin", "other/dead.bin"]
        assert await b.orphan_uploads() == [elsewhere]
        rows = journal_rows(pg_url, table="uploads")
        assert {r["key"]: r["node"] for r in rows} == {"in/live.bin": "a", "other/dead.bin": "c"}
        assert all(s3.secret_key not in json.dumps(r, default=str) for r in rows)


async def _gone(journal: Any, count: int) -> bool:
    return len(await journal.orphan_uploads()) == count


def test_an_older_versions_ledger_file_is_moved_into_the_journal_and_swept(
    workspace: dict[str, Path], s3: S3Server, service_factory: Any
) -> None:
    """An upgrade loses nothing: the upload a crashed run of an older version wrote down in its
    ledger file beside the journal is aborted at the start, and the file removed."""
    ws = workspace
    left = _upload(s3, "in/old.bin")
    ended = _upload(s3, "in/done.bin")
    folder = ws["root"] / "s3-uploads"
    folder.mkdir()
    lines = [
        {"begun": {"endpoint": s3.endpoint, "bucket": s3.bucket, "key": u.key, "upload_id": i}}
        for u, i in ((left, left.upload_id), (ended, ended.upload_id))
    ]
    (folder / "123-456.jsonl").write_text(
        "".join(json.dumps(e) + "\n" for e in [*lines, {"ended": ended.upload_id}])
    )
    svc = service_factory(remote_config(ws, s3.dest("in/"))).start()
    wait_until(lambda: s3.uploads() == ["in/done.bin"], 60)  # an ended one is not touched
    wait_until(lambda: not journal_rows(ws["db"], table="uploads"), 60)
    assert not list(folder.glob("*.jsonl"))
    assert svc.stop() == 0


# ------------------------------------------------------------------ nodes on one journal


@contextlib.contextmanager
def _two_nodes(root: Path, url: str, s3: S3Server) -> Iterator[tuple[ServiceProcess, ...]]:
    """Nodes a and b of a shared inbox sending to S3 in 5 MiB parts, slowly (a 12 MiB file
    takes a few seconds), each with a state folder of its own: as on two hosts. Killed at the
    end if still running."""
    (root / "inbox").mkdir()
    dest = s3.dest(part_size=5 * MIB, part_concurrency=1, bandwidth="3MB/s")
    nodes = tuple(
        ServiceProcess(
            _node_config(root, url, name, [dest], rules=[{"glob": "*", "to": [dest]}]),
            env=cli_env(XDG_STATE_HOME=str(root / f"state-{name}")),
        )
        for name in ("a", "b")
    )
    try:
        yield nodes
    finally:
        for svc in nodes:
            if svc.proc is not None and svc.proc.poll() is None:
                svc.kill()


def _begun_by(url: str, node: str) -> str:
    rows = journal_rows(url, "node=?", (node,), table="uploads")
    return str(rows[0]["upload_id"]) if rows else ""


def _delivered_by(url: str, node: str) -> bool:
    rows = journal_rows(url)
    return len(rows) == 1 and rows[0]["status"] == "SUCCEEDED" and rows[0]["node"] == node


def _open_ids(s3: S3Server) -> set[str]:
    found = s3.client().list_multipart_uploads(Bucket=s3.bucket)
    return {u["UploadId"] for u in found.get("Uploads", [])}


@pytest.mark.slow
def test_a_killed_nodes_open_upload_is_aborted_by_the_node_left(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """Node A begins a multipart upload and is killed (-9), never to come back; node B, started
    on another state folder (another host) while A's lease still runs, aborts A's upload once
    that lease ran out, and delivers the file once. (A is killed before B starts: a start
    slowed by a loaded machine must not give A the time to finish its upload.)"""
    with _two_nodes(tmp_path, pg_url, s3) as (a, b):
        a.start()
        src = old_file(tmp_path / "inbox" / "big.bin", 12 * MIB)
        theirs = wait_until(lambda: _begun_by(pg_url, "a"), 60, 0.01)
        a.kill()
        assert theirs in _open_ids(s3)
        b.start()
        wait_until(lambda: _delivered_by(pg_url, "b"), 120)
        wait_until(lambda: not _open_ids(s3), 60)  # A's upload aborted, B's completed
        wait_until(lambda: not journal_rows(pg_url, table="uploads"), 60)
        assert "aborted 1 unfinished multipart upload" in b.log()
        assert s3.objects() == {"big.bin": sha256_of(src)}
        assert b.stop() == 0


@pytest.mark.slow
def test_a_frozen_nodes_aborted_upload_is_never_recorded_as_done(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """Node A is frozen (SIGSTOP) mid-upload past its lease: B aborts A's upload, takes the
    file back from the queue and delivers it. A, woken, is stopped by its fence or finds its
    upload gone (NoSuchUpload): its attempt is never recorded as done, nothing is sent twice."""
    with _two_nodes(tmp_path, pg_url, s3) as (a, b):
        a.start()
        src = old_file(tmp_path / "inbox" / "big.bin", 12 * MIB)
        theirs = wait_until(lambda: _begun_by(pg_url, "a"), 60, 0.01)
        a.signal(signal.SIGSTOP)  # before B starts, however long its start takes
        try:
            assert theirs in _open_ids(s3)
            b.start()
            wait_until(lambda: theirs not in _open_ids(s3), 120)  # aborted by B
            wait_until(lambda: _delivered_by(pg_url, "b"), 120)
        finally:
            a.signal(signal.SIGCONT)
        wait_until(lambda: "joining again" in a.log(), 60)
        assert a.stop() == 0  # A's late attempt ends with it
        assert _delivered_by(pg_url, "b")  # one row, B's: A's outcome was refused
        assert s3.objects() == {"big.bin": sha256_of(src)}
        wait_until(lambda: not _open_ids(s3), 60)
        assert b.stop() == 0
        assert not journal_rows(pg_url, table="uploads")


def _left(pg_url: str, node: str) -> float:
    """Seconds the lease of ``node`` has left on the database's clock (negative: ran out)."""
    with psycopg.connect(pg_url, password=PASSWORD, autocommit=True) as conn:
        row = conn.execute(
            "SELECT EXTRACT(EPOCH FROM lease_until - now())::float8 FROM nodes WHERE name=%s",
            (node,),
        ).fetchone()
    assert row is not None
    return float(row[0])


async def _below(pg_url: str, node: str, seconds: float) -> bool:
    return await asyncio.to_thread(_left, pg_url, node) < seconds


async def test_an_epoch_found_dead_stays_dead_when_its_renewal_comes_late(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """Node A's renewal is held up (here a lock on its node row; a slow server does the same)
    from before its lease ends to after. While the entry is held, node B leaves it for a later
    look (a renewal may be about to commit); once it is free, the late renewal must find the
    lease run out, and B then aborts A's upload and requeues A's row, which it claims.
    Before (v5 review): the renewal's condition was read on now(), the time its transaction
    began, so it renewed the lease all the same: A live again beside B on the same row, its
    upload gone."""
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "unused.db"}
    config = load_config(remote_config(ws, s3.dest("in/")))
    target = PostgresTarget(pg_url, PASSWORD_ENV)
    version = FileVersion("in", tmp_path, "a.bin", 1, 1, ino=3, ctime_ns=1)
    async with open_journal(target) as a, open_journal(target) as b:
        await a.join("a", 30.0, frozenset({"in"}))
        await b.join("b", 300.0, frozenset({"in"}))
        await a.plan([_step(version)])
        [[mine]] = await a.claim(10, time.time())  # A delivers a.bin, under its epoch
        live = _upload(s3, "in/live.bin")
        await a.record_uploads([live])
        with psycopg.connect(pg_url, password=PASSWORD) as locker:
            locker.execute("SELECT 1 FROM nodes WHERE name='a' FOR UPDATE")
            await until(lambda: _below(pg_url, "a", 5), 60)
            renewal = asyncio.create_task(a.renew())  # sent with about 5 s of lease left
            await until(lambda: _below(pg_url, "a", -0.5), 60)
            assert live not in await b.orphan_uploads()  # held: judged later
            locker.rollback()
        renewed = await renewal
        assert live in await b.orphan_uploads()  # A's epoch is dead on the database
        await sweep_orphans(b, config)  # so B aborts A's upload
        assert "in/live.bin" not in s3.uploads()
        assert await b.renew()  # and requeues A's work in progress, which B claims
        [[theirs]] = await until(lambda: b.claim(10, time.time()), 30)
        assert theirs.id == mine.id
        claimed = {n.name: n.in_flight for n in await b.nodes() if n.alive}
    assert not renewed, f"A's dead epoch was renewed; in flight per live node: {claimed}"
    assert claimed == {"b": 1}


async def _left_by_a_gone_node(pg_url: str, upload: OpenUpload) -> None:
    """``upload`` written down by node "gone", whose 1 s lease then runs out (never renewed)."""
    async with open_journal(PostgresTarget(pg_url, PASSWORD_ENV)) as journal:
        await journal.join("gone", 1.0)
        await journal.record_uploads([upload])

        async def orphaned() -> bool:
            return upload in await journal.orphan_uploads()

        await until(orphaned)


def test_abort_stale_uploads_turned_on_by_a_reload_aborts_orphans(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """A node starts with ``abort_stale_uploads: false`` on its S3 destination; a gone node's
    upload is open under its prefix; the config is changed to ``true`` and reloaded (SIGHUP):
    the orphan is aborted within a few leases, without a restart.
    Before (v5 review): the sweep knew only the config of the start, and with no destination
    that could abort then, no sweep ran at all: the upload stayed open, billed."""
    (tmp_path / "inbox").mkdir()
    dest = s3.dest("in/", abort_stale_uploads=False)
    config = _node_config(tmp_path, pg_url, "a", [dest], rules=[{"glob": "*", "to": [dest]}])
    svc = ServiceProcess(config, env=cli_env(XDG_STATE_HOME=str(tmp_path / "state"))).start()
    try:
        left = _upload(s3, "in/left.bin")
        asyncio.run(_left_by_a_gone_node(pg_url, left))
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        data["rules"][0]["to"][0]["abort_stale_uploads"] = True
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        svc.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in svc.log(), 60)
        wait_until(lambda: "in/left.bin" not in s3.uploads(), 60)  # the lease is 2 s
        # by this node, which logs it once the server has answered (the line may trail)
        wait_until(lambda: "aborted 1 unfinished multipart upload" in svc.log(), 60)
    finally:
        assert svc.stop() == 0, svc.log()


def test_an_s3_destination_added_by_a_reload_sweeps_orphans(
    tmp_path: Path, pg_url: str, s3: S3Server
) -> None:
    """A node starts with a local folder as its only destination (and no orphan on record);
    a reload (SIGHUP) gives it an S3 destination with ``abort_stale_uploads: true``; then a
    node dies with an upload open under that prefix: the orphan is aborted within a few
    leases, without a restart. Before (w5 review): a node without an S3 destination at its
    start had no sweep at all, and nothing started one at a reload."""
    (tmp_path / "inbox").mkdir()
    config = _node_config(tmp_path, pg_url, "a", str(tmp_path / "out"))
    svc = ServiceProcess(config, env=cli_env(XDG_STATE_HOME=str(tmp_path / "state"))).start()
    try:
        data = yaml.safe_load(config.read_text(encoding="utf-8"))
        data["rules"] = [{"glob": "*", "to": [s3.dest("in/", abort_stale_uploads=True)]}]
        config.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
        svc.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded" in svc.log(), 60)
        left = _upload(s3, "in/left.bin")
        asyncio.run(_left_by_a_gone_node(pg_url, left))
        wait_until(lambda: "in/left.bin" not in s3.uploads(), 60)  # the lease is 2 s
        wait_until(lambda: "aborted 1 unfinished multipart upload" in svc.log(), 60)
    finally:
        assert svc.stop() == 0, svc.log()


async def test_an_orphan_is_aborted_by_the_destination_that_can_when_another_covering_it_cannot(
    tmp_path: Path,
) -> None:
    """Two S3 destinations with the same endpoint, bucket and prefix cover a gone run's upload,
    the first with credentials that no longer work (rotated away: 403), the second with good
    ones: the sweep aborts the upload through the one that can. Before (a6 review): it tried
    only the first covering destination, and the upload stayed open, billed."""
    s3 = S3Server(tmp_path / "s3", auth=True)
    try:
        left = _upload(s3, "in/left.bin")
        db = tmp_path / "journal.db"
        async with open_journal(db) as before:  # a run that began it and is gone
            await before.join("a", 1.0)
            await before.record_uploads([left])
            await before.leave()
        ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": db}
        stale = s3.dest("in/", secret_access_key="a-key-rotated-away")
        config = load_config(remote_config(ws, stale, s3.dest("in/")))
        async with open_journal(db) as journal:
            await journal.join("b", 30.0)
            assert await journal.orphan_uploads() == [left]
            await sweep_orphans(journal, config)
            assert s3.uploads() == [], "the orphan is still open on the server"
            assert await journal.orphan_uploads() == []
    finally:
        s3.stop()
