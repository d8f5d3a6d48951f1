"""Each journal's identity token, and the temporary names it keeps apart.

Row ids start at 1 in every journal: two services with a journal each (two hosts on SQLite,
two services on one host, two PostgreSQL clusters) delivering a file of the same name into one
folder from rows of the same id wrote one temporary file, and a mixed file was published (its
size right, so ``verify: size`` passed). Each journal now has a token of its own in its
temporary names.

The end-to-end tests run two real services (the CLI as subprocesses, each with its own SQLite
journal) against one local folder or one real SFTP server on loopback; nothing waits for a
duration, each waits for a state.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from filedispatch.journal import PostgresTarget, open_journal

from .conftest import ServiceProcess, journal_rows, old, wait_until
from .servers import FAST_RETRY, remote_config

MIB = 1 << 20
TOKEN = re.compile(r"[0-9a-f]{8}")


# ------------------------------------------------------------------ the token in the journal


def _old_sqlite(path: Path) -> None:
    """A journal as the schema before the identity token made it, with a row in it."""
    from filedispatch.journal.sqlite_schema import MIGRATIONS

    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:13]:
        for sql in migration:
            conn.execute(sql)
    conn.execute("PRAGMA user_version = 13")
    conn.commit()
    conn.close()


def _old_postgres(url: str) -> None:
    import psycopg

    from filedispatch.journal.pgschema import MIGRATIONS

    from . import pgcluster

    with psycopg.connect(url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        conn.execute("CREATE TABLE filedispatch_schema (version INTEGER NOT NULL)")
        conn.execute("INSERT INTO filedispatch_schema VALUES (10)")
        for migration in MIGRATIONS[:10]:
            for sql in migration:
                conn.execute(sql.encode())


async def _token(where: Any) -> str:
    async with open_journal(where) as journal:
        return journal.token


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
async def test_a_journal_of_the_old_schema_gets_a_token_of_its_own_kept_across_reopens(
    tmp_path: Path, request: pytest.FixtureRequest, backend: str
) -> None:
    """The migration gives an existing journal a token (8 lowercase hex characters), the same
    at every open; another journal gets another."""
    if backend == "sqlite":
        first: Any = tmp_path / "j.db"
        _old_sqlite(first)
        second: Any = tmp_path / "other.db"
    else:
        from . import pgcluster

        cluster = request.getfixturevalue("pg_cluster")
        url = str(cluster.database())
        _old_postgres(url)
        first = PostgresTarget(url, pgcluster.PASSWORD_ENV)
        second = PostgresTarget(str(cluster.database()), pgcluster.PASSWORD_ENV)
    token = await _token(first)
    assert TOKEN.fullmatch(token), token
    assert await _token(first) == token  # read again, never made again
    other = await _token(second)  # a new journal: made by the same migration
    assert TOKEN.fullmatch(other) and other != token


# ------------------------------------------------------------------ two journals, one folder


def _service(root: Path, to: dict[str, Any]) -> tuple[ServiceProcess, dict[str, Path]]:
    """A service with a journal of its own watching root/inbox, sending each file to ``to``
    (``on_conflict: rename``, retried at once)."""
    ws = {"root": root, "inbox": root / "inbox", "db": root / "journal.db"}
    ws["inbox"].mkdir(parents=True)
    step = {"on_conflict": "rename", "retry": FAST_RETRY, **to}
    return ServiceProcess(remote_config(ws, step)), ws


def _temporaries(folder: Path) -> dict[str, int]:
    found = {}
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(".filedispatch-tmp-"):
                try:
                    found[p.name] = p.stat().st_size
                except FileNotFoundError:
                    pass
    return found


def _settled(db: Path) -> list[dict[str, Any]]:
    rows = journal_rows(db)
    return rows if rows and all(r["status"] in ("SUCCEEDED", "FAILED") for r in rows) else []


@pytest.mark.parametrize("kind", ["local", "sftp"])
def test_two_journals_delivering_one_name_into_one_folder_never_mix_their_bytes(
    tmp_path: Path, kind: str
) -> None:
    """Service A (its own SQLite journal) copies a.bin slowly (16 MiB at 1 MB/s) into the
    folder from its row 1; while A's temporary file is being written, service B (a journal of
    its own) delivers another a.bin of the same size from its row 1 into the same folder. Both
    arrive whole (B's first, A's under the name ``on_conflict: rename`` gives) and each row's
    location holds its own bytes. With one temporary name for both, B truncated A's temporary
    file, wrote its own bytes and published it, and A went on writing its bytes into the
    published file: a mixed a.bin whose size was right."""
    out = tmp_path / "root" / "in"
    server: Any = None
    if kind == "sftp":
        from .servers import SftpServer

        server = SftpServer(tmp_path / "root", tmp_path / "keys")
        to: dict[str, Any] = {
            "url": server.url("/in/"),
            "key_file": str(server.key_file),
            "known_hosts": str(server.known_hosts),
        }
    else:
        to = {"url": out.as_uri()}
    out.mkdir(parents=True)
    a, ws_a = _service(tmp_path / "a", {**to, "bandwidth": "1MB/s"})
    b, ws_b = _service(tmp_path / "b", to)
    size = 16 * MIB  # at 1 MB/s A's copy takes some 16 s: B's runs well within it
    data_a, data_b = os.urandom(size), os.urandom(size)
    try:
        a.start()
        b.start()
        old(ws_a["inbox"] / "a.bin", data_a)
        # A's copy is under way, far from its end (its chunks may come a MiB at a time)
        wait_until(lambda: any(0 < s < size // 4 for s in _temporaries(out).values()), 60)
        old(ws_b["inbox"] / "a.bin", data_b)
        (row_b,) = wait_until(lambda: _settled(ws_b["db"]), 60)
        # the two copies overlapped: A's is still being written (else this test proves nothing)
        assert journal_rows(ws_a["db"], "status = 'IN_PROGRESS'"), a.log()
        (row_a,) = wait_until(lambda: _settled(ws_a["db"]), 120)
        wait_until(lambda: not _temporaries(out), 60)
    finally:
        for service in (a, b):
            service.stop()
        if server is not None:
            server.close()
    logs = f"\n--- A:\n{a.log()[-3000:]}\n--- B:\n{b.log()[-3000:]}"
    assert (row_a["status"], row_b["status"]) == ("SUCCEEDED", "SUCCEEDED"), logs
    held = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(held.values()) == sorted([data_a, data_b]), (
        f"mixed or missing files: { {n: len(d) for n, d in held.items()} }" + logs
    )
    assert held["a.bin"] == data_b  # B finished first: the name was free
    for row, data in ((row_a, data_a), (row_b, data_b)):
        name = Path(row["location"]).name
        assert held[name] == data, (name, logs)
        if row["sha256"] is not None:  # what the journal says was sent is what arrived
            assert row["sha256"] == hashlib.sha256(held[name]).hexdigest()
