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

import asyncio
import hashlib
import logging
import os
import re
import shutil
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


def _overlapping(
    a: ServiceProcess,
    ws_a: dict[str, Path],
    data_a: bytes,
    b: ServiceProcess,
    ws_b: dict[str, Path],
    data_b: bytes,
    out: Path,
) -> list[dict[str, Any]]:
    """Start A and B; A delivers a.bin (``data_a``, slowly) into ``out``, and while its
    temporary file is being written B delivers another a.bin (``data_b``); B's rows once
    settled."""
    size = len(data_a)  # at 1 MB/s A's copy of 16 MiB takes some 16 s: B's runs well within it
    a.start()
    b.start()
    old(ws_a["inbox"] / "a.bin", data_a)
    # A's copy is under way, far from its end (its chunks may come a MiB at a time)
    wait_until(lambda: any(0 < s < size // 4 for s in _temporaries(out).values()), 60)
    old(ws_b["inbox"] / "a.bin", data_b)
    rows: list[dict[str, Any]] = wait_until(lambda: _settled(ws_b["db"]), 60)
    return rows


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
    data_a, data_b = os.urandom(16 * MIB), os.urandom(16 * MIB)
    try:
        (row_b,) = _overlapping(a, ws_a, data_a, b, ws_b, data_b, out)
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


# ------------------------------------------------------------------ a journal copied


def _cloned(database: Any, tmp_path: Path) -> Any:
    """A second journal made from the first as people make one: the SQLite file copied (a VM
    or container image with a journal in its state folder, a host set up from another's
    backup), a PostgreSQL database made from it as a template (``createdb -T``)."""
    if isinstance(database, Path):
        copy = tmp_path / "copy.db"
        shutil.copyfile(database, copy)
        return copy
    import psycopg

    from . import pgcluster

    base, _, name = database.url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", password=pgcluster.PASSWORD, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}_copy" TEMPLATE "{name}"')
    return PostgresTarget(f"{base}/{name}_copy", pgcluster.PASSWORD_ENV)


async def test_a_copied_journal_is_a_journal_of_its_own(
    database: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A journal copied (``_cloned``) gets a token of its own at its first open, says so once
    at WARNING, and keeps that token afterwards; the first journal keeps its own. Before,
    the copy kept the first's token: with the same last row id, the two journals' temporary
    names coincided again (a mixed file), and each one's resume or start-up sweep removed
    the other's temporary files."""
    token = await _token(database)
    copy = _cloned(database, tmp_path)
    with caplog.at_level(logging.WARNING, logger="filedispatch"):
        other = await _token(copy)
    assert TOKEN.fullmatch(other) and other != token, "the copy kept the first's token"
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(said) == 1 and "copied or moved" in said[0] and token in said[0], said
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="filedispatch"):
        assert await _token(copy) == other  # made once, kept
        assert await _token(database) == token  # the first journal is untouched
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


async def test_a_journal_moved_within_its_filesystem_keeps_its_token(tmp_path: Path) -> None:
    """``mv`` within one filesystem keeps the file's inode: the same journal, the same token,
    and nothing said."""
    first = tmp_path / "j.db"
    token = await _token(first)
    moved = tmp_path / "elsewhere" / "j.db"
    moved.parent.mkdir()
    for suffix in ("", "-wal", "-shm"):
        if Path(f"{first}{suffix}").exists():
            os.rename(f"{first}{suffix}", f"{moved}{suffix}")
    assert await _token(moved) == token


async def test_an_upgraded_journal_keeps_its_token(tmp_path: Path) -> None:
    """A journal that has a token but no place stored yet (the schema before the place was
    kept) is bound to where it is now without a new token: its temporary files stay its own."""
    from filedispatch.journal.sqlite_schema import MIGRATIONS

    path = tmp_path / "j.db"
    conn = sqlite3.connect(path)
    for migration in MIGRATIONS[:14]:
        for sql in migration:
            conn.execute(sql)
    conn.execute("PRAGMA user_version = 14")
    [(token,)] = conn.execute("SELECT token FROM journal_identity").fetchall()
    conn.commit()
    conn.close()
    assert await _token(path) == token
    copy = tmp_path / "copy.db"
    shutil.copyfile(path, copy)  # bound now: a copy is told apart
    assert await _token(copy) != token


def test_two_services_on_a_copied_sqlite_journal_never_mix_their_bytes(tmp_path: Path) -> None:
    """The mix above, with B's journal a copy of A's made before either ran (an image of a
    freshly set-up host): both deliver a.bin from their row 1 into one folder while A's slow
    copy is under way. Both arrive whole. Before, both wrote one temporary name
    (``.filedispatch-tmp-<token>-1-a.bin``): B truncated A's copy and published it, and A
    wrote on into the published file."""
    out = tmp_path / "out"
    out.mkdir()
    a, ws_a = _service(tmp_path / "a", {"url": out.as_uri(), "bandwidth": "1MB/s"})
    b, ws_b = _service(tmp_path / "b", {"url": out.as_uri()})
    asyncio.run(_token(ws_a["db"]))
    shutil.copyfile(ws_a["db"], ws_b["db"])
    data_a, data_b = os.urandom(16 * MIB), os.urandom(16 * MIB)
    try:
        _overlapping(a, ws_a, data_a, b, ws_b, data_b, out)
        wait_until(lambda: _settled(ws_a["db"]), 120)
    finally:
        for service in (a, b):
            service.stop()
    held = {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith(".")}
    logs = f"\n--- A:\n{a.log()[-2000:]}\n--- B:\n{b.log()[-2000:]}"
    assert sorted(held.values()) == sorted([data_a, data_b]), (
        f"mixed or missing files: { {n: len(d) for n, d in held.items()} }" + logs
    )
    assert "copied or moved" in b.log() and "copied or moved" not in a.log()


async def test_a_postgres_role_that_may_not_read_the_control_data_binds_to_the_database(
    pg_url: str, tmp_path: Path
) -> None:
    """Where ``pg_control_system()`` is revoked from the journal's role, the token is bound to
    the database's oid alone: the journal opens, keeps its token across opens, and a copy
    made from it as a template (another oid) still gets a token of its own."""
    import psycopg

    from . import pgcluster

    base, _, name = pg_url.rpartition("/")
    role = f"plain_{name}"
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{pgcluster.PASSWORD}'")
        conn.execute(f'ALTER DATABASE "{name}" OWNER TO {role}')
        conn.execute(f"ALTER SCHEMA public OWNER TO {role}")
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    host = base.rpartition("@")[2]
    plain = PostgresTarget(f"postgresql://{role}@{host}/{name}", pgcluster.PASSWORD_ENV)
    token = await _token(plain)
    assert await _token(plain) == token
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        [(place,)] = conn.execute("SELECT place FROM journal_identity").fetchall()
        [(oid,)] = conn.execute(
            "SELECT oid FROM pg_database WHERE datname = current_database()"
        ).fetchall()
    assert place == f"-:{oid}"
    _cloned(PostgresTarget(pg_url, pgcluster.PASSWORD_ENV), tmp_path)
    copy = PostgresTarget(f"postgresql://{role}@{host}/{name}_copy", pgcluster.PASSWORD_ENV)
    assert await _token(copy) != token
