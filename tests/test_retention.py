"""History retention on both backends (``database``): pruning removes old delivered rows, never
a row still at work or awaiting a retry, keeps the compact key of a pruned version whose source
is still there (a restart does not send it again), and the stats rollup answers as the rows do.
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import pytest

from filedispatch.api.queries import rollup as api_stats
from filedispatch.config import HistoryConfig
from filedispatch.journal import (
    Condition,
    Database,
    Journal,
    PlannedStep,
    PostgresTarget,
    StatsGroup,
    StepResult,
    open_journal,
)
from filedispatch.journal.reads import rollup_sql, stats_sql
from filedispatch.models import FileVersion, Status
from filedispatch.retention import prune_once, sweep_kept

from .apiutil import database_config
from .conftest import delivered, journal_rows, old, run_cli, write_config

DAY = 86400.0
#: an old day (2001-09-09 01:46:40 UTC) and the time pruning runs at, long after it
LONG_AGO = 1_000_000_000.0


def step(v: FileVersion, n: int = 0, dest: str = "/dest/0") -> PlannedStep:
    return PlannedStep(v, "r", n, f"k{n}", dest, "file")


async def test_pruning_removes_old_delivered_rows_and_nothing_still_at_work(
    tmp_path: Path, database: Database
) -> None:
    src = tmp_path / "in"
    src.mkdir()
    (src / "kept.txt").write_bytes(b"still here")
    names = ["kept", "gone", "running", "waiting", "failed", "retrying", "recent"]
    v = {n: FileVersion("in", src, f"{n}.txt", 10, 1) for n in names}
    now = time.time()
    async with open_journal(database) as j:
        for n in names:
            created = now - 60 if n == "recent" else LONG_AGO
            await j.plan([step(v[n]), step(v[n], 1, "/dest/1")], now=created)
        await j.claim(100, LONG_AGO + 1)  # every row IN_PROGRESS
        results = []
        for n in names:
            for d in await rows_of(j, v[n]):
                if n in ("kept", "gone"):
                    results.append(StepResult(d.id, Status.SUCCEEDED, 1))
                elif n == "failed":
                    results.append(StepResult(d.id, Status.FAILED, 3, reason="refused"))
                elif n == "retrying":
                    results.append(StepResult(d.id, Status.PENDING, 1, next_attempt=now + 3600))
        await j.finish(results, now=LONG_AGO + 5)
        await j.finish(
            [StepResult(d.id, Status.SUCCEEDED, 1) for d in await rows_of(j, v["recent"])],
            now=now - 30,
        )
        await j.resume_interrupted()  # "running" and "waiting": PENDING again
        assert [d.relpath for g in await j.claim(1, now) for d in g] == ["running.txt"] * 2
        before = await j.counts()

        done = await prune_once(j, HistoryConfig(keep=90 * DAY), now=now)

        assert done.rows == 4 and done.kept == 1
        left = {d.relpath for d in await j.recent(100)}
        assert left == {f"{n}.txt" for n in names} - {"kept.txt", "gone.txt"}
        after = await j.counts()
        assert after["SUCCEEDED"] == before["SUCCEEDED"] - 4 == 2
        assert {k: after[k] for k in ("PENDING", "IN_PROGRESS", "FAILED")} == {
            k: before[k] for k in ("PENDING", "IN_PROGRESS", "FAILED")
        }
        # the source still there keeps its compact key: never planned again, seen as done
        assert [k.relpath for k in await j.kept_keys("", 10)] == ["kept.txt"]
        assert await j.plan([step(v["kept"]), step(v["kept"], 1, "/dest/1")]) == 0
        states = await j.version_states([v["kept"]])
        assert sorted(states[v["kept"].key]) == [("k0", "SUCCEEDED", 1), ("k1", "SUCCEEDED", 1)]
        # the one whose source is gone keeps nothing (a new file there is a new version anyway)
        assert await j.version_states([v["gone"]]) == {}
        # removing the kept source lets its key go too
        (src / "kept.txt").unlink()
        assert await sweep_kept(j) == 1
        assert await j.kept_keys("", 10) == []


async def rows_of(j: Journal, v: FileVersion) -> list[Any]:
    return [d for d in await j.recent(1000) if d.relpath == v.relpath]


async def test_a_row_cap_prunes_the_oldest_delivered_versions_first(
    tmp_path: Path, database: Database
) -> None:
    """The cap counts every row, those still waiting or at work too (which are never pruned):
    1,300 delivered, 300 PENDING and 200 IN_PROGRESS against a cap of 1,500."""
    versions = [FileVersion("in", tmp_path, f"f{i:04}.txt", 1, 1) for i in range(1300)]
    waiting = [FileVersion("in", tmp_path, f"w{i:04}.txt", 1, 1) for i in range(500)]
    async with open_journal(database) as j:
        await j.mark_done([step(v) for v in versions])
        await j.plan([step(v) for v in waiting])
        assert len([d for g in await j.claim(200, time.time()) for d in g]) == 200
        assert await j.row_count() == 1800
        done = await prune_once(j, HistoryConfig(max_rows=1500), now=time.time() + 60)
        assert done.rows == 300
        assert await j.row_count() == 1500 == sum((await j.counts()).values())
        assert await j.counts() == {"SUCCEEDED": 1000, "PENDING": 300, "IN_PROGRESS": 200}
        left = sorted(d.relpath for d in await j.recent(2000) if d.status == Status.SUCCEEDED)
        assert left == [v.relpath for v in versions[300:]]


async def both_stats(
    j: Journal, conditions: list[Condition], period: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """What GET /api/v1/stats answers from the journal's ``stats`` (the rollup where it can),
    and from the same groups counted from the rows."""
    rollup = await j.stats(conditions, period)
    sql = stats_sql(conditions, j.dialect)  # type: ignore[attr-defined]
    rows = [
        StatsGroup(int(d), s, dest, ext, int(n), int(b))
        for d, s, dest, ext, n, b in await j.read(*sql)  # type: ignore[attr-defined]
    ]
    return api_stats(rollup, period), api_stats(rows, period)  # type: ignore[arg-type]


async def test_stats_from_the_rollup_equal_stats_from_the_rows(
    tmp_path: Path, database: Database
) -> None:
    now = time.time()
    async with open_journal(database) as j:
        for i in range(120):
            v = FileVersion("in", tmp_path, f"f{i}.{('txt', 'csv', 'bin')[i % 3]}", i * 7, i)
            await j.plan(
                [step(v), step(v, 1, f"/dest/{i % 4}")], now=now - (i % 50) * DAY - i * 37.0
            )
        groups = await j.claim(200, now)
        results = []
        for n, group in enumerate(groups):
            status = (Status.SUCCEEDED, Status.FAILED, Status.PENDING)[n % 3]
            results += [StepResult(d.id, status, 1, next_attempt=now + 60) for d in group]
        await j.finish(results[: len(results) // 2], now=now)
        await j.resume_interrupted()  # the rest: back to PENDING
        await j.forget(source="in", relpath="f7.csv")
        await j.claim(15, now)  # some on their way: counted from the rows, not the rollup
        assert set(await j.counts()) >= set(Status)  # every status is among the rows
        midnight = (now // DAY - 20) * DAY
        first = dt.datetime.fromtimestamp(now - 35 * DAY, dt.UTC).date().replace(day=1)
        month_ago = dt.datetime(first.year, first.month, 1, tzinfo=dt.UTC).timestamp()
        queries: list[list[Condition]] = [
            [],
            [Condition("destination", "=", "/dest/1")],
            [Condition("status", "=", "SUCCEEDED"), Condition("created", ">=", midnight)],
            [Condition("extension", "contains", "t"), Condition("created", "<", midnight)],
            [Condition("created", ">=", month_ago)],  # months from the month rollup
            [Condition("created", ">=", midnight + 5)],  # not a day's start: read from the rows
        ]
        for conditions in queries:
            for period in ("day", "week", "month"):
                from_rollup = rollup_sql(conditions, period=period) is not None
                assert from_rollup == (conditions is not queries[-1])
                rollup, rows = await both_stats(j, conditions, period)
                assert rollup == rows, (conditions, period)
                assert rollup, (conditions, period)


def _service_config(root: Path, database: Database) -> Path:
    db: Any = (
        database_config(database.url) if isinstance(database, PostgresTarget) else str(database)
    )
    return write_config(
        root / "config.yml",
        {
            "database": db,
            "sources": [{"path": str(root / "inbox"), "settle": 0, "after": "keep"}],
            "rules": [{"extensions": ["txt"], "to": str(root / "out")}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
            "history": {"keep": "90d"},
        },
    )


def _rows(database: Database) -> list[dict[str, Any]]:
    return journal_rows(database.url if isinstance(database, PostgresTarget) else database)


@pytest.mark.slow
async def test_a_kept_source_is_not_sent_again_after_its_rows_are_pruned(
    tmp_path: Path, database: Database
) -> None:
    old(tmp_path / "inbox" / "a.txt", b"delivered once")
    old(tmp_path / "inbox" / "b.txt", b"also once")
    cfg = _service_config(tmp_path, database)
    first = run_cli("-c", cfg, "--once")
    assert first.returncode == 0, first.stderr
    assert delivered(tmp_path / "out") == {"a.txt": b"delivered once", "b.txt": b"also once"}
    assert len(_rows(database)) == 2

    async with open_journal(database) as j:  # 100 days on: every row is past ``keep``
        done = await prune_once(j, HistoryConfig(keep=90 * DAY), now=time.time() + 100 * DAY)
    assert done.rows == 2 and done.kept == 2
    assert _rows(database) == []

    for name in ("a.txt", "b.txt"):  # so a second delivery would show
        (tmp_path / "out" / name).unlink()
    again = run_cli("-c", cfg, "--once")
    assert again.returncode == 0, again.stderr
    assert delivered(tmp_path / "out") == {}
    assert _rows(database) == []
    assert (tmp_path / "inbox" / "a.txt").read_bytes() == b"delivered once"
    # a pruned row's id, the newest's too, is never given to another file (it names the
    # delivery outside the journal: an HTTP Idempotency-Key, an S3 object's filedispatch-id)
    old(tmp_path / "inbox" / "c.txt", b"new")
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert [r["id"] for r in _rows(database)] == [3]


def test_a_bad_history_setting_names_the_field(tmp_path: Path) -> None:
    (tmp_path / "inbox").mkdir()
    cfg = write_config(
        tmp_path / "config.yml",
        {
            "sources": [{"path": str(tmp_path / "inbox")}],
            "rules": [{"extensions": ["txt"], "to": str(tmp_path / "out")}],
            "history": {"keep": "soon"},
        },
    )
    checked = run_cli("check", "-c", cfg)
    assert checked.returncode == 2
    assert "history.keep" in checked.stderr and str(cfg) in checked.stderr
    assert "Traceback" not in checked.stderr


def _back_to_the_schema_before(database: Database) -> None:
    """The journal as the release before this one left it: no rollup, no kept keys (and no
    birth times, settled-only rollups, upload ledger, identity token, id mark nor earlier
    tokens, the migrations after this one)."""
    if isinstance(database, PostgresTarget):
        import psycopg

        from .pgcluster import PASSWORD

        with psycopg.connect(database.url, password=PASSWORD) as conn:
            for name in ("stats_insert", "stats_update", "stats_delete"):
                conn.execute(f"DROP TRIGGER {name} ON dispatches")
                conn.execute(f"DROP FUNCTION {name}()")
            conn.execute(
                "DROP TABLE stats_days, stats_months, kept, uploads, journal_identity, "
                "journal_tokens"
            )
            conn.execute("ALTER TABLE dispatches DROP COLUMN btime_ns")
            conn.execute("UPDATE filedispatch_schema SET version = 5")
        return
    import sqlite3

    conn = sqlite3.connect(database)
    with conn:
        for name in (
            "stats_insert",
            "stats_update",
            "stats_settle",
            "stats_delete",
            "kept_not_new",
            "id_mark_insert",
            "id_mark_delete",
        ):
            conn.execute(f"DROP TRIGGER {name}")
        tables = (
            *("stats_days", "stats_months", "kept", "uploads"),
            *("journal_identity", "id_mark", "journal_tokens"),
        )
        for table in tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("ALTER TABLE dispatches DROP COLUMN btime_ns")
        conn.execute("PRAGMA user_version = 8")
    conn.close()


async def test_an_older_journal_gets_its_rollup_from_the_rows_it_holds(
    tmp_path: Path, database: Database
) -> None:
    now = time.time()
    async with open_journal(database) as j:
        for i in range(30):
            v = FileVersion("in", tmp_path, f"f{i}.{('txt', 'pdf')[i % 2]}", i + 1, i)
            await j.plan([step(v, 0, f"/dest/{i % 3}")], now=now - i * DAY / 3)
        groups = await j.claim(20, now)
        await j.finish([StepResult(d.id, Status.SUCCEEDED, 1) for g in groups for d in g])
    _back_to_the_schema_before(database)
    async with open_journal(database) as j:  # migrated again: the rollup counts the old rows
        for period in ("day", "week", "month"):
            rollup, rows = await both_stats(j, [], period)
            assert rollup == rows, period
            assert rollup["totals"]["count"] == 30


async def test_forgetting_a_pruned_path_lets_it_be_sent_again(
    tmp_path: Path, database: Database
) -> None:
    (tmp_path / "a.txt").write_bytes(b"kept in the source")
    a = FileVersion("in", tmp_path, "a.txt", 18, 1)
    async with open_journal(database) as j:
        await j.mark_done([step(a)])
        done = await prune_once(j, HistoryConfig(keep=DAY), now=time.time() + 2 * DAY)
        assert (done.rows, done.kept) == (1, 1)
        assert await j.plan([step(a)]) == 0
        await j.forget(source="in", relpath="a.txt")  # history forget --path a.txt
        assert await j.kept_keys("", 10) == []
        assert await j.plan([step(a)]) == 1


async def test_on_a_shared_journal_every_pruned_version_keeps_its_key(
    tmp_path: Path, database: Database
) -> None:
    """Another host's source may sit at a path that is empty here: nothing is judged gone."""
    here = tmp_path / "inbox"
    here.mkdir()  # the same path as another host's source, without its file
    theirs = FileVersion("in", here, "a.txt", 1, 1)
    async with open_journal(database) as j:
        await j.mark_done([step(theirs)])
        later = time.time() + 2 * DAY
        done = await prune_once(j, HistoryConfig(keep=DAY), now=later, local=False)
        assert (done.rows, done.kept, done.forgotten) == (1, 1, 0)
        assert await j.plan([step(theirs)]) == 0
        done = await prune_once(j, HistoryConfig(keep=DAY), now=later, local=False)
        assert [k.relpath for k in await j.kept_keys("", 10)] == ["a.txt"]
