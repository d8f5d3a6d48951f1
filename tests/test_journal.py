"""The journal on both backends (a real SQLite file, a real PostgreSQL database, through the one
``database`` fixture): planning, claiming, outcomes, migrations."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from filedispatch.errors import JournalError, JournalUnavailableError
from filedispatch.journal import (
    Condition,
    Database,
    Journal,
    JournalState,
    PageQuery,
    PlannedStep,
    PostgresTarget,
    SortKey,
    SqliteJournal,
    StepResult,
    open_journal,
    pgschema,
)
from filedispatch.models import FileVersion, Status

from . import pgcluster


def step(v: FileVersion, n: int = 0, key: str = "k0", rule: str = "r") -> PlannedStep:
    return PlannedStep(v, rule, n, key, f"/dest/{n}", "file")


async def test_a_version_is_planned_once_per_step_and_a_new_version_again(
    tmp_path: Path, database: Database
) -> None:
    v1 = FileVersion("in", tmp_path, "a.txt", 10, 1)
    v2 = FileVersion("in", tmp_path, "a.txt", 11, 2)
    async with open_journal(database) as j:
        assert await j.plan([step(v1), step(v1, 1, "k1")]) == 2
        assert await j.plan([step(v1), step(v1, 1, "k1")]) == 0
        assert await j.plan([step(v2)]) == 1
        assert await j.counts() == {"PENDING": 3}


async def test_claim_groups_by_version_and_marks_in_progress(
    tmp_path: Path, database: Database
) -> None:
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    b = FileVersion("in", tmp_path, "b.txt", 1, 1)
    async with open_journal(database) as j:
        await j.plan([step(a), step(a, 1, "k1"), step(b)])
        groups = await j.claim(10, time.time())
        assert [[d.relpath for d in g] for g in groups] == [["a.txt", "a.txt"], ["b.txt"]]
        assert all(d.status == Status.IN_PROGRESS and d.started is None for g in groups for d in g)
        assert await j.claim(10, time.time()) == []
        first = groups[0][0]
        await j.finish(
            [
                StepResult(
                    first.id, Status.PENDING, 1, reason="busy", next_attempt=time.time() + 3600
                )
            ]
        )
        assert await j.claim(10, time.time()) == []  # not due yet
        assert await j.next_due() is not None
        regained = await j.claim(10, time.time() + 7200)
        assert regained[0][0].started is not None  # it was claimed before: resuming
        assert await j.resume_interrupted() == 3  # every claimed row was left IN_PROGRESS


async def test_retry_requeues_a_failed_step_and_the_rest_of_its_chain(
    tmp_path: Path, database: Database
) -> None:
    v = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with open_journal(database) as j:
        await j.plan([step(v), step(v, 1, "k1")])
        (group,) = await j.claim(10, time.time())
        await j.finish(
            [
                StepResult(group[0].id, Status.FAILED, 1, reason="boom"),
                StepResult(group[1].id, Status.FAILED, 0, reason="not run"),
            ]
        )
        assert await j.retry(group[1].id + 100) is False
        assert await j.retry(group[0].id) is True
        assert await j.counts() == {"PENDING": 2}
        assert await j.retry(group[0].id) is False  # no longer FAILED
        assert await j.forget(group[0].id) == 1
        assert await j.forget(source="in", relpath="a.txt") == 1


async def test_the_file_is_private_and_a_newer_schema_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "j.db"
    async with Journal.open(path) as j:
        assert await j.integrity_check() == "ok"
    assert path.stat().st_mode & 0o777 == 0o600
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(JournalError, match="newer than this filedispatch"):
        async with Journal.open(path):
            pass


async def test_an_unwritable_location_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(JournalError, match="cannot create the journal"):
        async with Journal.open(blocker / "j.db"):
            pass


async def test_unfinished_counts_pending_and_in_progress(
    tmp_path: Path, database: Database
) -> None:
    v = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with open_journal(database) as j:
        assert await j.unfinished() == 0
        await j.plan([step(v)])
        assert await j.unfinished() == 1
        (group,) = await j.claim(10, time.time())
        assert await j.unfinished() == 1  # IN_PROGRESS
        await j.finish([StepResult(group[0].id, Status.SUCCEEDED, 1)])
        assert await j.unfinished() == 0


async def _plan_started_then_finished(j: Journal, tmp_path: Path) -> None:
    names = ["a.txt", "b.txt", "é ü.txt", "c.txt"]
    versions = [FileVersion("in", tmp_path, n, 5, i) for i, n in enumerate(names)]
    await j.plan([step(versions[3])])  # known already: no new id for it
    now = time.time()
    ids = await j.plan_started([step(v) for v in versions] + [step(versions[0])], now)
    assert ids[3] is None and ids[4] is None  # planned before; a repeat in the batch
    assert all(isinstance(i, int) for i in ids[:3]) and len(set(ids[:3])) == 3
    rows = {d.relpath: d for d in [await j.get(i) for i in ids[:3] if i] if d is not None}
    assert {n: (d.status, d.started) for n, d in rows.items()} == {
        n: (Status.IN_PROGRESS, now) for n in names[:3]
    }
    first, second, third = (i for i in ids[:3] if i is not None)
    await j.finish(
        [
            StepResult(first, Status.SUCCEEDED, 1, location="/x/a.txt", started=now),
            StepResult(second, Status.FAILED, 1, reason='no "room"\n', error_type="E"),
            StepResult(third, Status.PENDING, 1, reason="busy", next_attempt=now + 9),
        ]
    )
    a, b, c = [await j.get(i) for i in (first, second, third)]
    assert a is not None and b is not None and c is not None
    assert (a.status, a.location, a.attempts, a.reason) == (
        Status.SUCCEEDED,
        "/x/a.txt",
        1,
        None,
    )
    assert a.finished is not None and a.duration_ms is not None
    assert (b.status, b.reason, b.error_type) == (Status.FAILED, 'no "room"\n', "E")
    assert (c.status, c.finished, c.next_attempt) == (Status.PENDING, None, now + 9)
    assert await j.counts() == {"SUCCEEDED": 1, "FAILED": 1, "PENDING": 2}


async def test_rows_planned_in_progress_then_finished_in_one_write(
    tmp_path: Path, database: Database
) -> None:
    async with open_journal(database) as j:
        await _plan_started_then_finished(j, tmp_path)


async def test_sqlite_without_json_batches_writes_the_same_rows(tmp_path: Path) -> None:
    """The other way the SQLite writer sends a batch: executemany (SQLite before 3.38)."""
    async with SqliteJournal.open(tmp_path / "j.db") as j:
        assert j.writer.bulk, "this SQLite has no ->>: the JSON path is not tested by the others"
        j.writer.bulk = False
        await _plan_started_then_finished(j, tmp_path)


async def test_an_outcome_with_undecodable_text_is_stored_without_failing_the_others(
    tmp_path: Path, database: Database
) -> None:
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    b = FileVersion("in", tmp_path, "b.txt", 1, 1)
    async with open_journal(database) as j:
        ids = await j.plan_started([step(a), step(b)], time.time())
        assert ids[0] is not None and ids[1] is not None
        odd = b"/out/caf\xe9.txt".decode("utf-8", "surrogateescape")  # a Latin-1 name
        await j.finish(
            [
                StepResult(ids[0], Status.SUCCEEDED, 1, location=odd, detail=odd),
                StepResult(ids[1], Status.SUCCEEDED, 1, location="/out/b.txt"),
            ]
        )
        first, second = await j.get(ids[0]), await j.get(ids[1])
    assert first is not None and second is not None
    assert first.status == second.status == Status.SUCCEEDED
    assert first.location == "/out/caf\\xe9.txt"


async def test_stat_numbers_past_2_63_come_back_exactly(tmp_path: Path, database: Database) -> None:
    """mtime_ns after 2262, and inode and device numbers, are unsigned 64-bit."""
    huge = 2**64 - 5
    v = FileVersion("in", tmp_path, "far.txt", 3, huge, dev=huge - 1, ino=huge - 2, ctime_ns=huge)
    async with open_journal(database) as j:
        assert await j.plan([step(v)]) == 1
        (group,) = await j.claim(10, time.time())
        row = group[0]
        assert (row.mtime_ns, row.dev, row.ino, row.ctime_ns) == (huge, huge - 1, huge - 2, huge)
        assert row.version.key == v.key


async def test_a_version_is_read_back_by_its_key(tmp_path: Path, database: Database) -> None:
    """``versions``: what a key stands for (the start-up's end of an interrupted removal reads
    the name and identity of the file a hidden name's key is of); unknown keys left out."""
    huge = 2**64 - 5
    a = FileVersion("in", tmp_path, "sub/a.txt", 3, huge, dev=7, ino=huge - 2, ctime_ns=9)
    b = FileVersion("in", tmp_path, "b.txt", 4, 5, dev=7, ino=8, ctime_ns=9)
    async with open_journal(database) as j:
        assert await j.plan([step(a), step(a, 1, "k1"), step(b)]) == 3
        got = await j.versions([a.key, "0" * 24, b.key, a.key])
        assert got == {a.key: a, b.key: b}
        assert got[a.key].key == a.key and got[a.key].path == tmp_path / "sub/a.txt"


async def test_history_reads_answer_in_typed_rows(tmp_path: Path, database: Database) -> None:
    """The reads the API, the command line and the console use, on both backends."""
    a = FileVersion("in", tmp_path, "a_1%.txt", 10, 1)
    b = FileVersion("in", tmp_path, "B.PDF", 20, 2)
    async with open_journal(database) as j:
        await j.plan([step(a), step(b), step(b, 1, "k1")])
        groups = await j.claim(10, time.time())
        ids = {d.relpath: d.id for g in groups for d in g if d.step == 0}
        await j.finish(
            [
                StepResult(ids["a_1%.txt"], Status.SUCCEEDED, 1, started=time.time() - 0.2),
                StepResult(ids["B.PDF"], Status.FAILED, 1, reason="boom"),
            ]
        )
        async with j.reader() as r:
            assert await r.counts() == {"SUCCEEDED": 1, "FAILED": 1, "IN_PROGRESS": 1}
            assert await r.count_entries([Condition("filename", "contains", "1%")]) == 1
            assert await r.count_entries([Condition("filename", "contains", "b.pd")]) == 2
            keys = [SortKey("finished", True), SortKey("id", True)]
            page = await r.page(PageQuery([], keys, 2))
            assert [e.filename for e in page] == ["B.PDF", "a_1%.txt"]
            nxt = await r.page(PageQuery([], keys, 2, after=page[-1].sort_values(keys)))
            assert [(e.filename, e.finished) for e in nxt] == [("B.PDF", None)]
            detail = await r.detail(ids["B.PDF"])
            assert detail is not None and (detail.status, detail.reason) == ("FAILED", "boom")
            assert await r.detail(10**9) is None
            groups_ = await r.stats([])
            assert sum(g.count for g in groups_) == 3 and sum(g.bytes for g in groups_) == 50
            outcomes = await r.outcomes(0, time.time() + 1, (100, 60_000))
            ok = next(o for o in outcomes if o.status == "SUCCEEDED")
            assert (ok.count, ok.bytes, ok.timed, ok.within[1]) == (1, 10, 1, 1)
            waiting = await r.retry_waiting()
            assert (waiting.count, waiting.first) == (0, None)
            per_dest = {(d.destination, d.status): d.count for d in await r.by_destination()}
            assert per_dest[("/dest/0", "SUCCEEDED")] == 1
            assert [d.relpath for d in await r.recent(5, Status.FAILED)] == ["B.PDF"]
            days = await r.day_tallies()
            assert sum(d.succeeded for d in days) == 1 and sum(d.waiting for d in days) == 1
            assert [p.relpath for p in await r.recorded_paths("B.PDF", "/nowhere")] == ["B.PDF"]
            assert await r.first_failures() == [ids["B.PDF"]]
            assert await r.first_failures("a_1%.txt", None) == []
            await r.ping()


async def test_postgres_claims_skip_rows_another_transaction_holds(
    tmp_path: Path, pg_url: str
) -> None:
    """FOR UPDATE SKIP LOCKED: a row another claim holds is passed over, not waited for."""
    import psycopg

    target = PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    b = FileVersion("in", tmp_path, "b.txt", 1, 1)
    async with open_journal(target) as j:
        await j.plan([step(a), step(b)])
        other = await psycopg.AsyncConnection.connect(pg_url, password=pgcluster.PASSWORD)
        try:
            await other.execute(
                "SELECT id FROM dispatches WHERE relpath='a.txt' FOR UPDATE"
            )  # holds a.txt's row until it ends
            groups = await j.claim(10, time.time())
            assert [[d.relpath for d in g] for g in groups] == [["b.txt"]]
        finally:
            await other.rollback()
            await other.close()
        assert [[d.relpath for d in g] for g in await j.claim(10, time.time())] == [["a.txt"]]


async def test_postgres_newer_schema_is_refused_and_the_password_is_never_shown(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import psycopg

    target = PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)
    async with open_journal(target):
        pass
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        assert conn.execute("SELECT version FROM filedispatch_schema").fetchone() == (
            len(pgschema.MIGRATIONS),
        )
        conn.execute("UPDATE filedispatch_schema SET version = 99")
    with pytest.raises(JournalError, match="newer than this filedispatch"):
        async with open_journal(target):
            pass
    monkeypatch.setenv(pgcluster.PASSWORD_ENV, "wrong-password-5d1")
    with pytest.raises(JournalUnavailableError) as caught:
        async with open_journal(target):
            pass
    assert "password authentication failed" in str(caught.value)
    assert "wrong-password-5d1" not in str(caught.value)
    assert pg_url in str(caught.value)


async def test_postgres_going_away_holds_writes_until_it_is_back(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    """The server stops: writes are held (health failing, writable cleared), not lost or
    raised; once it is back they are committed and the health is ok again."""
    target = PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with open_journal(target) as j:
        await j.plan([step(a)])
        pg_cluster.stop()
        try:
            pending = asyncio.ensure_future(j.plan([step(a, 1, "k1")]))
            deadline = time.monotonic() + 60
            while j.health.ok and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert j.health.state == JournalState.FAILING and not j.writable.is_set()
            assert "cannot take writes" in (j.health.error or "")
            assert not pending.done()
        finally:
            pg_cluster.start()
        assert await asyncio.wait_for(pending, 120) == 1
        assert j.health.ok and j.writable.is_set()
        assert await j.counts() == {"PENDING": 2}


async def test_a_label_that_is_not_utf8_is_kept_escaped_on_both_backends(
    tmp_path: Path, database: Database
) -> None:
    """A label is an examples sub-folder's name: one that is not UTF-8 is kept as names are
    (its odd bytes escaped) instead of failing the commit of every file planned with it."""
    v = FileVersion("in", tmp_path, "scan.pdf", 10, 1)
    odd = PlannedStep(v, "learned", 0, "k0", "/dest/0", "file", os.fsdecode(b"factures-\xe9"))
    async with open_journal(database) as j:
        assert await j.plan([odd, step(FileVersion("in", tmp_path, "b.txt", 5, 1))]) == 2
        groups = await j.claim(10, time.time())
        got = {d.relpath: d.label for g in groups for d in g}
        assert got == {"scan.pdf": "factures-\\xe9", "b.txt": None}


async def test_a_learned_label_is_kept_with_its_rows_on_both_backends(
    tmp_path: Path, database: Database
) -> None:
    """plan() records a learned rule's label in the same write; a row planned before keeps
    the label it was given then (its delivery may have used it)."""
    v = FileVersion("in", tmp_path, "scan.pdf", 10, 1)
    plain = FileVersion("in", tmp_path, "notes.txt", 5, 1)

    def labelled(label: str) -> PlannedStep:
        return PlannedStep(v, "learned", 0, "k0", "/dest/0", "file", label)

    async with open_journal(database) as j:
        assert await j.plan([labelled("invoices"), step(plain)]) == 2
        assert await j.plan([labelled("contracts")]) == 0
        groups = await j.claim(10, time.time())
        got = {d.relpath: d.label for g in groups for d in g}
        assert got == {"scan.pdf": "invoices", "notes.txt": None}
        async with j.reader() as r:
            page = await r.page(PageQuery([], [SortKey("id", False)], 10))
            assert [(e.filename, e.label) for e in page] == [
                ("scan.pdf", "invoices"),
                ("notes.txt", None),
            ]
            detail = await r.detail(page[0].id)
            assert detail is not None and detail.label == "invoices"


async def test_outcomes_queued_together_are_one_write_and_keep_their_order(
    tmp_path: Path,
) -> None:
    """SQLite: outcomes queued in one turn of the loop reach the writer thread as one item (one
    wake-up of it, not one per file); a write queued after them, even in the same turn, still
    sees them committed, and closing the journal commits outcomes not yet handed over."""
    files = [FileVersion("in", tmp_path, f"f{i}.txt", 1, 1) for i in range(20)]
    async with SqliteJournal.open(tmp_path / "j.db") as j:
        await j.plan([step(v) for v in files])
        rows = [d for g in await j.claim(100, time.time()) for d in g]
        futures = [j.finish_soon([StepResult(d.id, Status.SUCCEEDED, 1)]) for d in rows[:10]]

        def seen(conn: sqlite3.Connection) -> int:
            sql = "SELECT count(*) FROM dispatches WHERE status='SUCCEEDED'"
            return int(conn.execute(sql).fetchone()[0])

        gathered = j.writer._inbox.gathered
        assert gathered is not None and len(gathered[2]) == 10  # ten callers, not queued yet
        # queued in the same turn, after them (awaiting a coroutine does not end the turn):
        # the gathered outcomes are handed over first, as one item
        assert await j.write(seen) == 10
        await asyncio.gather(*futures)
        last = j.finish_soon([StepResult(d.id, Status.FAILED, 1, reason="x") for d in rows[10:]])
    # closed before the turn ended: the outcomes were handed over and committed by the close
    assert last.done() and last.exception() is None
    async with SqliteJournal.open(tmp_path / "j.db") as j:
        assert await j.counts() == {"SUCCEEDED": 10, "FAILED": 10}
