"""``history stats`` and ``GET /api/v1/stats`` put a day in the same ISO 8601 week (one shared
rule, ``filedispatch.reporting``): real dispatches by the real service, then moved to dates
where Monday-based week numbers (SQLite's %W) and ISO weeks part."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import sqlite3
from pathlib import Path
from typing import Any

from .apiutil import get_json
from .conftest import free_port, journal_rows, run_cli, wait_until
from .ops import delivered, old_file, ops_config

TOKEN = "periods-t0ken-for-the-test"
#: file -> (noon UTC of that day, the ISO week it is in)
DAYS = {
    "sunday.txt": (dt.date(2026, 11, 29), "2026-W48"),
    "monday.txt": (dt.date(2026, 11, 30), "2026-W49"),  # SQLite's %W says 2026-W48
    "newyear.txt": (dt.date(2027, 1, 1), "2026-W53"),  # %W says 2027-W00
    "monday2.txt": (dt.date(2027, 1, 4), "2027-W01"),
}


def _noon(day: dt.date) -> float:
    return dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp()


def test_cli_and_api_agree_on_iso_weeks(tmp_path: Path, service_factory: Any) -> None:
    port = free_port()
    db, outbox = tmp_path / "journal.db", tmp_path / "outbox"
    cfg = ops_config(tmp_path, api={"port": port, "token": TOKEN})
    sizes = {}
    for i, name in enumerate(DAYS):
        sizes[name] = 1000 * (i + 1) + 500
        old_file(tmp_path / "inbox" / name, b"x" * sizes[name])
    once = run_cli("--once", "-c", cfg)
    assert once.returncode == 0, once.stderr
    assert set(delivered(outbox)) == set(DAYS)
    with sqlite3.connect(db) as con:  # the same dispatches, as if made on those days
        for name, (day, _) in DAYS.items():
            con.execute(
                "UPDATE dispatches SET created=?, started=?, finished=? WHERE relpath=?",
                (_noon(day), _noon(day), _noon(day), name),
            )
    expected = {week: 0 for _, week in DAYS.values()}
    for _, week in DAYS.values():
        expected[week] += 1

    as_json = run_cli("history", "stats", "--period", "week", "--json", "--db", db)
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert {r["period"]: r["succeeded"] for r in rows} == expected
    assert [r["period"] for r in rows] == sorted(expected)
    # --json keeps the exact byte count; the table is for people
    newyear = next(r for r in rows if r["period"] == "2026-W53")
    assert newyear["bytes"] == sizes["newyear.txt"] == 3500
    table = run_cli("history", "stats", "--period", "week", "--db", db)
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == ["period", "succeeded", "failed", "waiting", "sent"]
    assert [line.split()[0] for line in lines] == sorted(expected)
    assert any(line.split()[0] == "2026-W53" and line.endswith("3.4 KB") for line in lines)

    svc = service_factory(cfg).start()
    wait_until(lambda: len(journal_rows(db)) == len(DAYS))
    body = asyncio.run(
        get_json(f"http://127.0.0.1:{port}/api/v1/stats?period=week&created__gte=2026-01-01", TOKEN)
    )
    assert {b["label"]: b["count"] for b in body["results"]} == expected
    assert svc.stop() == 0
