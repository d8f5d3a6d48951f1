"""The service with its journal in PostgreSQL, end to end: the real CLI as a subprocess, a real
cluster (tests/pgcluster.py), real files. What a user checks: the bytes that arrived, the rows
``history`` shows, what ``check`` prints, and that a database going away pauses the work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

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
from .pgcluster import PASSWORD, PASSWORD_ENV


def _config(root: Path, url: str, **source: Any) -> Path:
    return write_config(
        root / "config.yml",
        {
            "database": database_config(url),
            "sources": [{"path": str(root / "inbox"), "settle": 0, "rescan": 1, **source}],
            "rules": [{"extensions": ["txt"], "to": str(root / "out")}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def test_a_service_on_postgresql_delivers_and_history_shows_it(tmp_path: Path, pg_url: str) -> None:
    for i in range(5):
        old(tmp_path / "inbox" / f"f{i}.txt", f"file {i}".encode())
    cfg = _config(tmp_path, pg_url)
    done = run_cli("-c", cfg, "--once")
    assert done.returncode == 0, done.stderr
    assert delivered(tmp_path / "out") == {f"f{i}.txt": f"file {i}".encode() for i in range(5)}
    rows = journal_rows(pg_url)
    assert sorted(r["relpath"] for r in rows) == [f"f{i}.txt" for i in range(5)]
    assert {r["status"] for r in rows} == {"SUCCEEDED"}

    listing = run_cli("-c", cfg, "history", "list", "--json")
    assert listing.returncode == 0, listing.stderr
    shown = json.loads(listing.stdout)
    assert sorted(r["relpath"] for r in shown) == [f"f{i}.txt" for i in range(5)]
    assert {r["status"] for r in shown} == {"SUCCEEDED"}
    stats = run_cli("-c", cfg, "history", "stats", "--json")
    assert stats.returncode == 0, stats.stderr
    assert sum(p["succeeded"] for p in json.loads(stats.stdout)) == 5

    again = run_cli("-c", cfg, "--once")  # nothing doubled: every version is recorded
    assert again.returncode == 0, again.stderr
    assert len(journal_rows(pg_url)) == 5


def test_check_names_the_database_and_never_its_password(tmp_path: Path, pg_url: str) -> None:
    (tmp_path / "inbox").mkdir()
    cfg = _config(tmp_path, pg_url)
    checked = run_cli("check", "-c", cfg)
    assert checked.returncode == 0, checked.stderr
    assert f"journal: {pg_url}" in checked.stdout
    assert PASSWORD not in checked.stdout + checked.stderr

    plain = cfg.read_text()
    # in the user part, or as libpq's query parameters (which libpq would use, and which
    # would otherwise be shown with the URL in the log, the status and check)
    for secret in (
        plain.replace("fdtest@", f"fdtest:{PASSWORD}@"),
        plain.replace(pg_url, f"{pg_url}?password={PASSWORD}"),
        plain.replace(pg_url, f"{pg_url}?sslmode=disable&PassWord={PASSWORD}"),
        plain.replace(pg_url, f"{pg_url}?sslpassword={PASSWORD}"),
    ):
        cfg.write_text(secret)
        refused = run_cli("check", "-c", cfg)
        assert refused.returncode == 2, secret
        assert "database" in refused.stderr and "must not hold a password" in refused.stderr
        assert PASSWORD not in refused.stdout + refused.stderr
        assert "Traceback" not in refused.stderr


def test_a_wrong_password_is_refused_without_showing_it(tmp_path: Path, pg_url: str) -> None:
    old(tmp_path / "inbox" / "a.txt")
    cfg = _config(tmp_path, pg_url)
    env_password = "not-the-password-81c"
    done = run_cli("-c", cfg, "--once", env={**_env(), PASSWORD_ENV: env_password}, timeout=120)
    assert done.returncode != 0
    assert "password authentication failed" in done.stderr
    assert env_password not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


def _env() -> dict[str, str]:
    from .conftest import cli_env

    return cli_env()


def test_the_database_going_away_pauses_the_service_and_it_goes_on(
    tmp_path: Path, pg_cluster: Any, pg_url: str
) -> None:
    """Stop the server mid-run: intake and delivery pause (the service does not end), then
    everything is delivered once, with one SUCCEEDED row per file, once the server is back."""
    cfg = _config(tmp_path, pg_url)
    (tmp_path / "inbox").mkdir()
    svc = ServiceProcess(cfg).start()
    try:
        old(tmp_path / "inbox" / "before.txt", b"before")
        wait_until(lambda: "before.txt" in delivered(tmp_path / "out"), 60)
        pg_cluster.stop()
        try:
            for i in range(3):
                old(tmp_path / "inbox" / f"during{i}.txt", f"during {i}".encode())
            wait_until(lambda: "cannot take writes" in svc.log(), 90)
            assert svc.proc is not None and svc.proc.poll() is None, svc.log()
        finally:
            pg_cluster.start()
        expected = {"before.txt": b"before"} | {
            f"during{i}.txt": f"during {i}".encode() for i in range(3)
        }
        wait_until(lambda: delivered(tmp_path / "out") == expected, 120)
        wait_until(
            lambda: (
                sorted(r["relpath"] for r in journal_rows(pg_url, "status='SUCCEEDED'"))
                == sorted(expected)
            ),
            60,
        )
        assert "takes writes again" in svc.log()
        assert PASSWORD not in svc.log()
    finally:
        assert svc.stop() == 0, svc.log()
    assert len(journal_rows(pg_url)) == 4


def test_explain_finds_a_duplicate_in_postgresql(tmp_path: Path, pg_url: str) -> None:
    """``dedupe: content`` in the simulation reads the PostgreSQL journal as the service does."""
    cfg = write_config(
        tmp_path / "config.yml",
        {
            "database": database_config(pg_url),
            "sources": [{"path": str(tmp_path / "inbox"), "settle": 0}],
            "rules": [{"extensions": ["txt"], "dedupe": "content", "to": str(tmp_path / "out")}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    old(tmp_path / "inbox" / "a.txt", b"same bytes")
    assert run_cli("-c", cfg, "--once").returncode == 0
    twin = old(tmp_path / "inbox" / "b.txt", b"same bytes")
    explain = run_cli("explain", "-c", cfg, twin)
    assert explain.returncode == 0, explain.stderr
    assert "=> recorded, not sent: duplicate of dispatch #1: the same bytes" in explain.stdout
    dry = run_cli("-c", cfg, "--dry-run")
    assert "b.txt (duplicate of dispatch #1:" in dry.stdout, dry.stdout
