"""Crash safety: kill -9 in the middle of a large delivery, restart, and count."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServiceProcess, journal_rows, run_cli, wait_until, write_config

pytestmark = pytest.mark.slow

N = 2000


@pytest.mark.parametrize(
    ("after", "mode"), [("keep", "copy"), ("delete", "copy"), ("keep", "move")]
)
def test_kill_9_mid_delivery_then_restart_delivers_each_file_exactly_once(
    tmp_path: Path, service_factory: Any, after: str, mode: str
) -> None:
    inbox, outbox, db = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "j.db"
    inbox.mkdir()
    expected: dict[str, bytes] = {}
    past = time.time() - 60
    for i in range(N):
        data = os.urandom(64 + i % 4096)
        name = f"batch-{i:05d}.edi"
        (inbox / name).write_bytes(data)
        os.utime(inbox / name, (past, past))
        expected[name] = data
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(db),
            "workers": 8,
            "sources": [{"path": str(inbox), "settle": 0, "after": after}],
            "rules": [
                {
                    "name": "edi",
                    "glob": "*",
                    # fsync makes each delivery slow enough to be caught half-way
                    "to": {"url": str(outbox), "fsync": True, "mode": mode},
                }
            ],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    for threshold in (150, 700, 1300):  # three crashes at different points
        svc: ServiceProcess = service_factory(cfg).start(wait_ready=False)
        wait_until(
            lambda t=threshold: len(journal_rows(db, "status='SUCCEEDED'")) >= t, 120, interval=0.01
        )
        svc.kill()
        rows = journal_rows(db)
        print(
            "killed at",
            threshold,
            {
                s: sum(r["status"] == s for r in rows)
                for s in ("PENDING", "IN_PROGRESS", "SUCCEEDED")
            },
        )
        if len(rows) == N and all(r["status"] == "SUCCEEDED" for r in rows):
            break
    result = run_cli("-c", cfg, "--once", timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout

    got = {p.name: p.read_bytes() for p in outbox.iterdir()}
    assert got.keys() == expected.keys(), "files missing, doubled or renamed"
    assert all(got[k] == expected[k] for k in expected), "a delivered file has wrong bytes"
    assert not [p for p in outbox.iterdir() if p.name.startswith(".")], "temporary left behind"
    rows = journal_rows(db)
    assert len(rows) == N
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    assert sorted(r["filename"] for r in rows) == sorted(expected)
    if after == "delete" or mode == "move":  # no source left whose destination has it
        assert list(inbox.iterdir()) == []
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()
