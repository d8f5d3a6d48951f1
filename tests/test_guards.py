"""Two guards that nothing else would catch being removed: the source is touched only once
the journal has committed the outcome (``Outcomes.when_durable``), and a group commit's
bulk update never applies two outcomes of one row in an unknown order (``_distinct_ids``)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

from filedispatch.config import Config
from filedispatch.dispatcher import Dispatcher
from filedispatch.errors import FencedError
from filedispatch.journal import Journal, PlannedStep, StepResult
from filedispatch.journal.identity import Named
from filedispatch.models import Dispatch, FileVersion, Status
from filedispatch.processors import Registry
from filedispatch.router import Router


class RecordingJournal(Named):
    """The journal's write interface, recording each write; a test decides when (and whether)
    each write becomes durable. Its names (``Journal.named``) are a journal's that never took
    a new token."""

    token = "0a1b2c3d"  #: the journal's identity (``Journal.token``): in temporary names

    def __init__(self) -> None:
        self.writes: list[tuple[list[StepResult], asyncio.Future[None]]] = []

    def finish_soon(self, results: Sequence[StepResult], now: float | None = None) -> Any:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.writes.append((list(results), fut))
        return fut

    async def finish(self, results: Sequence[StepResult], now: float | None = None) -> None:
        await self.finish_soon(results, now)


def _claimed(config: Config, version: FileVersion) -> list[Dispatch]:
    """The rows a claim would hand a worker for ``version`` under ``config``'s one rule."""
    chain = Router(config).by_name["all"].chain
    return [
        Dispatch(
            i + 1,
            version.source,
            str(version.root),
            version.relpath,
            version.size,
            version.mtime_ns,
            "all",
            i,
            step.display,
            step.kind,
            Status.IN_PROGRESS,
            0,
            None,
            None,
            time.time(),
            None,
            None,
            None,
            0.0,
            dev=version.dev,
            ino=version.ino,
            ctime_ns=version.ctime_ns,
            step_key=chain.keys[i],
        )
        for i, step in enumerate(chain.steps)
    ]


def _setup(tmp_path: Path) -> tuple[Dispatcher, RecordingJournal, list[Dispatch], Path]:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    src = inbox / "a.txt"
    src.write_bytes(b"payload")
    config = Config.model_validate(
        {
            "sources": [{"path": str(inbox), "after": "delete"}],
            "rules": [
                {"name": "all", "glob": "*", "to": [str(tmp_path / "o1"), str(tmp_path / "o2")]}
            ],
        }
    )
    version = FileVersion.from_stat(config.sources[0].key, inbox, "a.txt", os.stat(src))
    journal = RecordingJournal()
    dispatcher = Dispatcher(config, cast(Journal, journal), Registry(), workdir=tmp_path / "work")
    return dispatcher, journal, _claimed(config, version), src


async def test_the_source_is_removed_only_once_the_outcome_is_durable(tmp_path: Path) -> None:
    dispatcher, journal, rows, src = _setup(tmp_path)
    await dispatcher.workers.run_version(rows)
    assert (tmp_path / "o1" / "a.txt").read_bytes() == b"payload"
    assert (tmp_path / "o2" / "a.txt").read_bytes() == b"payload"
    assert [r.status for results, _ in journal.writes for r in results] == [Status.SUCCEEDED] * 2
    await asyncio.sleep(0)  # callbacks that were scheduled get their turn
    assert src.exists(), "the source was removed before the journal committed the outcome"
    for _, fut in journal.writes:
        fut.set_result(None)
    await asyncio.sleep(0)
    assert not src.exists()


async def test_the_source_stays_when_the_journal_cannot_commit(tmp_path: Path) -> None:
    dispatcher, journal, rows, src = _setup(tmp_path)
    await dispatcher.workers.run_version(rows)
    for _, fut in journal.writes:
        fut.set_exception(RuntimeError("disk I/O error"))
    await asyncio.sleep(0)
    assert src.exists()


async def test_the_source_stays_when_the_journal_refuses_a_late_outcome(tmp_path: Path) -> None:
    """A node whose lease ran out delivered anyway (it was frozen mid-delivery): the journal
    refuses its outcomes (FencedError, another node owns the rows now), and its after-action
    must not run on their account."""
    dispatcher, journal, rows, src = _setup(tmp_path)
    await dispatcher.workers.run_version(rows)
    for _, fut in journal.writes:
        fut.set_exception(FencedError("2 outcome(s) refused: node n1 no longer holds the rows"))
    await asyncio.sleep(0)
    assert src.exists()


async def test_two_outcomes_of_one_row_in_one_group_commit_apply_in_order(
    tmp_path: Path,
) -> None:
    version = FileVersion("in", tmp_path, "a.txt", 1, 1)
    async with Journal.open(tmp_path / "j.db") as j:
        await j.plan([PlannedStep(version, "r", 0, "k0", "/dest", "file")])
        (group,) = await j.claim(10, time.time())
        row = group[0]
        # hold the writer inside a commit, so both outcomes below are queued behind it and
        # committed together in the next batch
        started, release = threading.Event(), threading.Event()

        def hold(conn: object) -> None:
            started.set()
            release.wait(30)

        statements: list[str] = []

        def trace(conn: sqlite3.Connection) -> None:
            conn.set_trace_callback(statements.append)

        await j.write(trace)
        held = asyncio.ensure_future(j.write(hold))
        await asyncio.get_running_loop().run_in_executor(None, started.wait, 30)
        first = j.finish_soon([StepResult(row.id, Status.PENDING, 1, reason="busy")])
        second = j.finish_soon([StepResult(row.id, Status.SUCCEEDED, 2, location="/dest/a")])
        release.set()
        await asyncio.gather(held, first, second)
        final = await j.get(row.id)
        assert final is not None
        assert (final.status, final.attempts) == (Status.SUCCEEDED, 2)
        # SQLite applies one arbitrary row of an UPDATE ... FROM per target row: with an id
        # twice, the rows must go one by one, in order
        bulk = [s for s in statements if s.startswith("UPDATE") and "json_each" in s]
        assert bulk == [], "two outcomes of one row went through the unordered bulk update"
        # the trace reports a statement again for each statement of the triggers it fires
        # (the stats rollup's): count each run of repeats once
        runs = [s for i, s in enumerate(statements) if i == 0 or statements[i - 1] != s]
        single = [s for s in runs if s.startswith("UPDATE dispatches SET status=")]
        assert len(single) == 2
