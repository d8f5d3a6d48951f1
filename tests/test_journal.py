"""The journal on a real SQLite file: planning, claiming, outcomes, migrations."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from filedispatch.errors import JournalError
from filedispatch.journal import Journal, PlannedStep, StepResult
from filedispatch.models import FileVersion, Status


def step(v: FileVersion, n: int = 0, key: str = "k0", rule: str = "r") -> PlannedStep:
    return PlannedStep(v, rule, n, key, f"/dest/{n}", "file")


async def test_a_version_is_planned_once_per_step_and_a_new_version_again(tmp_path: Path) -> None:
    v1 = FileVersion("in", tmp_path, "a.txt", 10, 1)
    v2 = FileVersion("in", tmp_path, "a.txt", 11, 2)
    async with Journal.open(tmp_path / "j.db") as j:
        assert await j.plan([step(v1), step(v1, 1, "k1")]) == 2
        assert await j.plan([step(v1), step(v1, 1, "k1")]) == 0
        assert await j.plan([step(v2)]) == 1
        assert await j.counts() == {"PENDING": 3}


async def test_claim_groups_by_version_and_marks_in_progress(tmp_path: Path) -> None:
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    b = FileVersion("in", tmp_path, "b.txt", 1, 1)
    async with Journal.open(tmp_path / "j.db") as j:
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


async def test_retry_requeues_a_failed_step_and_the_rest_of_its_chain(tmp_path: Path) -> None:
    v = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with Journal.open(tmp_path / "j.db") as j:
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


async def test_unfinished_counts_pending_and_in_progress(tmp_path: Path) -> None:
    v = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with Journal.open(tmp_path / "j.db") as j:
        assert await j.unfinished() == 0
        await j.plan([step(v)])
        assert await j.unfinished() == 1
        (group,) = await j.claim(10, time.time())
        assert await j.unfinished() == 1  # IN_PROGRESS
        await j.finish([StepResult(group[0].id, Status.SUCCEEDED, 1)])
        assert await j.unfinished() == 0


@pytest.mark.parametrize("bulk", [True, False], ids=["json-batches", "executemany"])
async def test_rows_planned_in_progress_then_finished_in_one_write(
    tmp_path: Path, bulk: bool
) -> None:
    """Both ways the writer can send a batch: one JSON statement (SQLite 3.38 and later) and
    executemany (older SQLite); the rows must come out the same."""
    names = ["a.txt", "b.txt", "é ü.txt", "c.txt"]
    versions = [FileVersion("in", tmp_path, n, 5, i) for i, n in enumerate(names)]
    async with Journal.open(tmp_path / "j.db") as j:
        if bulk:
            assert j._bulk, "this SQLite has no ->>: the JSON path is not tested here"
        j._bulk = bulk
        await j.plan([step(versions[3])])  # known already: no new id for it
        now = time.time()
        ids = await j.plan_started([step(v) for v in versions] + [step(versions[0])], now)
        assert ids[3] is None and ids[4] is None  # planned before; a repeat in the batch
        assert all(isinstance(i, int) for i in ids[:3]) and len(set(ids[:3])) == 3
        rows = {d.relpath: d for d in [await j.get(i) for i in ids[:3]] if d is not None}
        assert {n: (d.status, d.started) for n, d in rows.items()} == {
            n: (Status.IN_PROGRESS, now) for n in names[:3]
        }
        await j.finish(
            [
                StepResult(ids[0], Status.SUCCEEDED, 1, location="/x/a.txt", started=now),
                StepResult(ids[1], Status.FAILED, 1, reason='no "room"\n', error_type="E"),
                StepResult(ids[2], Status.PENDING, 1, reason="busy", next_attempt=now + 9),
            ]
        )
        a, b, c = [await j.get(i) for i in ids[:3]]
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


async def test_an_outcome_with_undecodable_text_is_stored_without_failing_the_others(
    tmp_path: Path,
) -> None:
    a = FileVersion("in", tmp_path, "a.txt", 1, 1)
    b = FileVersion("in", tmp_path, "b.txt", 1, 1)
    async with Journal.open(tmp_path / "j.db") as j:
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
