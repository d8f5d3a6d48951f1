"""The birth time (statx) on real files: what GNU stat(1) says for the same file, on the
filesystem of the tests and on a tmpfs; and a journal from before the column keeps working."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from filedispatch.birth import birth_time_ns, born
from filedispatch.journal import MIGRATIONS, PlannedStep, open_journal
from filedispatch.models import FileVersion

from .conftest import mounted_tmpfs
from .test_api import stat_birth_ns


def test_birth_time_is_what_stat_says(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_bytes(b"x")
    assert birth_time_ns(path) == stat_birth_ns(path)
    assert birth_time_ns(tmp_path / "gone.txt") is None


def test_birth_time_on_a_tmpfs(tmp_path: Path) -> None:
    (tmp_path / "mnt").mkdir()
    with mounted_tmpfs(tmp_path / "mnt") as mnt:
        path = mnt / "a.txt"
        path.write_bytes(b"x")
        assert birth_time_ns(path) == stat_birth_ns(path)


def test_a_journal_from_before_birth_times_gains_the_column(tmp_path: Path) -> None:
    db = tmp_path / "j.db"
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:8]:  # the schema before birth times were kept
        for sql in migration:
            conn.execute(sql)
    conn.execute("PRAGMA user_version = 8")
    conn.commit()
    conn.close()
    (tmp_path / "in").mkdir()
    path = tmp_path / "in" / "a.txt"
    path.write_bytes(b"x")
    st = path.stat()
    old = FileVersion.from_stat("in", tmp_path / "in", "a.txt", st)

    async def run() -> tuple[int | None, int | None]:
        async with open_journal(db) as j:
            await j.plan([PlannedStep(old, "r", 0, "k0", "/out", "file")], time.time())
            await j.plan([PlannedStep(born(old), "r", 0, "k1", "/out", "file")], time.time())
            rows = await j.recent(10, None)
            by_key = {r.id: r.btime_ns for r in rows}
            return by_key[min(by_key)], by_key[max(by_key)]

    before, now = asyncio.run(run())
    assert before is None
    assert now == stat_birth_ns(path)
