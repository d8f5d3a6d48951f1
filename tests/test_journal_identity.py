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
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from filedispatch.journal import Journal, PlannedStep, PostgresTarget, open_journal
from filedispatch.models import FileVersion
from filedispatch.processors import StepContext

from .conftest import ServiceProcess, cli_env, journal_rows, old, run_cli, wait_until
from .servers import (
    FAST_RETRY,
    HttpReceiver,
    consumed_once,
    keep_idempotency_keys,
    old_file,
    remote_config,
)

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
    # a role that may read the control data opens it: the same journal, its place made full
    assert await _token(PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)) == token
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        [(place,)] = conn.execute("SELECT place FROM journal_identity").fetchall()
    assert place.endswith(f":{oid}") and not place.startswith("-:"), place
    assert await _token(plain) == token


# ------------------------------------------------------------------ a journal given back its past


def _checkpointed(db: Path) -> None:
    """Everything of the journal in its main file (a consistent copy can be taken of it)."""
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


def _two_files_around_a_restore(tmp_path: Path, restore: Any) -> tuple[list[int], set[str], Any]:
    """a.csv is delivered (row 1) to a receiver that drops a repeated ``Idempotency-Key``,
    the journal having been backed up before; then, with no service running, the journal
    is restored from that backup by ``restore(backup, db)``, and b.csv (other bytes) is
    delivered. Returns the journal's row ids, the SHA-256 of each file sent that the
    receiver did not store, and the keys it dropped."""
    receiver = HttpReceiver()
    try:
        dropped = keep_idempotency_keys(receiver, "/upload")
        ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
        ws["inbox"].mkdir(parents=True)
        cfg = remote_config(ws, {"url": f"{receiver.url}/upload"}, source={"after": "delete"})
        made = run_cli("-c", cfg, "--once", timeout=90)  # the journal made, no file yet
        assert made.returncode == 0, made.stderr
        _checkpointed(ws["db"])
        backup = tmp_path / "journal.db.bak"
        shutil.copyfile(ws["db"], backup)  # the nightly backup
        sent = []
        for name, data in (("a.csv", b"monday\n"), ("b.csv", b"tuesday, other\n")):
            consumed_once(cfg, ws["inbox"], name, data)
            sent.append(hashlib.sha256(data).hexdigest())
            if name == "a.csv":
                _checkpointed(ws["db"])
                for suffix in ("-wal", "-shm"):
                    Path(f"{ws['db']}{suffix}").unlink(missing_ok=True)
                restore(backup, ws["db"])
        ids = [r["id"] for r in journal_rows(ws["db"])]
        stored = {r.sha256 for r in receiver.received if r.path == "/upload"}
    finally:
        receiver.close()
    return ids, set(sent) - stored, dropped


def test_a_journal_restored_in_place_from_its_backup_never_names_two_files_alike(
    tmp_path: Path,
) -> None:
    """The journal is restored from its backup the ordinary way, ``cp journal.db.bak
    journal.db`` (which writes the existing file again: the same inode, birth time and
    machine), after a.csv was delivered as row 1. The restored journal keeps its token and
    gives row 1 again, to b.csv. Before, b.csv's ``Idempotency-Key`` was a.csv's
    (``<token>-1``): the receiver dropped it as a repeat, the row said SUCCEEDED and the
    source was deleted, a file lost. The name now carries when the row was planned too, so
    a row id given again names another delivery. (The same for ``sqlite3 .restore``, a
    snapshot rolled back, a PostgreSQL point-in-time restore.)"""

    def in_place(backup: Path, db: Path) -> None:
        ino = db.stat().st_ino
        shutil.copyfile(backup, db)
        assert db.stat().st_ino == ino  # the file itself, written again

    ids, lost, dropped = _two_files_around_a_restore(tmp_path, in_place)
    assert ids == [1], ids  # the id was given again: the name must differ all the same
    assert not lost, f"the receiver dropped b.csv as a repeat (keys {dropped}; ids {ids})"


def test_a_journal_restored_as_a_new_file_is_a_journal_of_its_own(tmp_path: Path) -> None:
    """The backup restored as a new file (the old one removed first, so even a reused inode
    number has another birth time): the journal takes a new token at its open and the
    receiver stores both files."""

    def as_new_file(backup: Path, db: Path) -> None:
        db.unlink()
        shutil.copyfile(backup, db)

    _ids, lost, dropped = _two_files_around_a_restore(tmp_path, as_new_file)
    assert not lost, f"the receiver dropped a file as a repeat (keys {dropped})"


async def _next_name(journal: Journal, name: str) -> str:
    """The delivery name of a row planned now in ``journal`` for a new file ``name``."""
    version = FileVersion("in", Path("/in"), name, 1, 1, ino=1, ctime_ns=1)
    await journal.plan([PlannedStep(version, "r", 0, "k0", "/dest/0", "file")])
    return await _name(journal, name)


async def _name(journal: Journal, name: str) -> str:
    """The delivery name (``StepContext.delivery_id``) of the row of file ``name`` in
    ``journal``, as a worker names it."""
    [row] = [r for r in await journal.recent(10) if r.relpath == name]
    named_under, planned = journal.named(row.id, row.created)
    version = FileVersion("in", Path("/in"), name, 1, 1, ino=1, ctime_ns=1)
    return StepContext(
        row.id,
        version,
        version.path,
        "r",
        0,
        row.attempts + 1,
        Path("/"),
        journal=journal.token,
        planned=planned,
        named_under=named_under,
    ).delivery_id


def _base_backup(cluster: Any) -> Any:
    """A second running cluster made from ``cluster`` by ``pg_basebackup`` (how a standby, a
    staging copy or a disaster-recovery rehearsal server is made), on a port of its own;
    the caller closes it and removes its folder."""
    import itertools
    import pwd

    from . import pgcluster

    clone = pgcluster.Cluster.__new__(pgcluster.Cluster)
    clone.bin = cluster.bin
    clone.root = Path(tempfile.mkdtemp(prefix="fd-pg-clone-"))
    clone.data = clone.root / "data"
    clone.port = pgcluster._free_port()
    clone._names = itertools.count(1)
    pw = pwd.getpwnam("postgres")
    os.chown(clone.root, pw.pw_uid, pw.pw_gid)
    try:
        clone._as_postgres(
            str(cluster.bin / "pg_basebackup"),
            *("-h", str(cluster.root), "-p", str(cluster.port), "-U", pgcluster.USER),
            *("-D", str(clone.data), "-X", "stream", "--no-sync", "--checkpoint=fast"),
        )
        clone.start()
    except BaseException:
        shutil.rmtree(clone.root, ignore_errors=True)
        raise
    return clone


async def test_a_postgres_journal_cloned_by_a_base_backup_names_its_deliveries_apart(
    pg_cluster: Any, pg_url: str
) -> None:
    """A journal's cluster copied with ``pg_basebackup`` and started as a server of its own
    (a staging copy, a disaster-recovery rehearsal) has the same system identifier and
    database oid: it keeps the journal's token and goes on from the same last row id.
    Before, the next file of each was named ``<token>-<id>`` alike (an idempotent receiver
    they share dropped one as a repeat). Each row's name now carries when it was planned,
    so the two journals' next rows are named apart. A clone meant to run beside its original
    is given a token of its own as docs/cluster.md says (its place changed by hand), the
    row it holds from the original keeping its name."""
    import psycopg

    from . import pgcluster

    async with open_journal(PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)) as journal:
        first = await _next_name(journal, "first.csv")
        token = journal.token
    clone = _base_backup(pg_cluster)
    try:
        name = pg_url.rpartition("/")[2]
        there = PostgresTarget(clone.url(name), pgcluster.PASSWORD_ENV)
        async with open_journal(there) as journal:
            theirs = await _next_name(journal, "theirs.csv")
        with psycopg.connect(clone.url(name), password=pgcluster.PASSWORD) as conn:
            conn.execute("UPDATE journal_identity SET place = 'clone'")
        async with open_journal(there) as journal:
            assert journal.token != token
            assert await _name(journal, "first.csv") == first
    finally:
        clone.close()
        shutil.rmtree(clone.root, ignore_errors=True)  # what the stopping server still wrote
    async with open_journal(PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)) as journal:
        ours = await _next_name(journal, "ours.csv")
    assert ours.split("-")[:2] == theirs.split("-")[:2]  # the same token, the same id
    assert ours != theirs, f"two files of two journals were both named {ours}"


async def test_a_row_planned_before_its_journal_was_copied_keeps_its_name_in_the_copy(
    database: Any, tmp_path: Path
) -> None:
    """A row planned in a journal that is then copied (``_cloned``) keeps, in the copy, the
    name it was planned under (the first journal's token), though the copy took a token of
    its own at its open; a row planned in the copy afterwards is named with the new token.
    So a row in flight at the copy (a volume moved to another host) is sent again under its
    old key, which an idempotent receiver drops, while new rows of the two journals stay
    apart. The earlier token is kept in the journal: a later open still knows it."""
    async with open_journal(database) as journal:
        first = await _next_name(journal, "before.csv")
        token = journal.token
    copy = _cloned(database, tmp_path)
    for _ in range(2):  # the rebind's open, then a later one
        async with open_journal(copy) as journal:
            assert journal.token != token and await _name(journal, "before.csv") == first
    async with open_journal(copy) as journal:
        after = await _next_name(journal, "after.csv")
        assert after.startswith(f"{journal.token}-"), after


async def test_a_row_planned_before_the_upgrade_keeps_its_name(tmp_path: Path) -> None:
    """A row planned by the version before delivery names carried the planned time, resumed
    after the upgrade, keeps the name it was sent under (``<token>-<row id>``), so a receiver
    that has it recognises the repeat; a row planned after the upgrade carries the time."""
    path = tmp_path / "j.db"
    async with open_journal(path) as journal:
        await _next_name(journal, "before.csv")
    conn = sqlite3.connect(path)  # the journal as schema 15 left it, with that row
    conn.execute("DROP TABLE journal_tokens")
    conn.execute("ALTER TABLE journal_identity DROP COLUMN plain_upto")
    conn.execute("PRAGMA user_version = 15")
    conn.commit()
    conn.close()
    async with open_journal(path) as journal:
        token = journal.token
        assert await _name(journal, "before.csv") == f"{token}-1"
        assert re.fullmatch(rf"{token}-2-\d+", await _next_name(journal, "after.csv"))


async def test_a_postgres_journal_opened_by_a_role_with_other_rights_keeps_its_token(
    pg_url: str,
) -> None:
    """One PostgreSQL journal opened first by a role that may call ``pg_control_system()``
    (its place: ``<system id>:<oid>``), then by one that may not (``-:<oid>``), then by the
    first again: two nodes whose roles differ, or a DBA revoking the right between two
    starts. Before, each open took the database for a copy and made a new token (three
    tokens), orphaning temporary files and giving rows in flight new names. The oid is
    compared where either side lacks the system identifier."""
    import psycopg

    from . import pgcluster

    base, _, name = pg_url.rpartition("/")
    full = PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)
    first = await _token(full)
    role = f"plain_{name}"
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{pgcluster.PASSWORD}'")
        conn.execute(f'ALTER DATABASE "{name}" OWNER TO {role}')
        conn.execute(f"ALTER SCHEMA public OWNER TO {role}")
        for (table,) in conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall():
            conn.execute(f'ALTER TABLE "{table}" OWNER TO {role}')
        for (seq,) in conn.execute(
            "SELECT sequencename FROM pg_sequences WHERE schemaname = 'public'"
        ).fetchall():
            conn.execute(f'ALTER SEQUENCE "{seq}" OWNER TO {role}')
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_control_system() FROM PUBLIC")
    host = base.rpartition("@")[2]
    plain = PostgresTarget(f"postgresql://{role}@{host}/{name}", pgcluster.PASSWORD_ENV)
    seen = [first, await _token(plain), await _token(full)]
    assert seen == [first] * 3, f"the one database's token changed at each open: {seen}"
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        [(place,)] = conn.execute("SELECT place FROM journal_identity").fetchall()
    assert not place.startswith("-:"), place  # the fuller place is the one kept


# ------------------------------------------------------------------ a journal moved mid-delivery


def _lost_answer_receiver(receiver: HttpReceiver, path: str) -> tuple[list[str], Any]:
    """Make ``receiver`` store a body once per ``Idempotency-Key`` (a repeat is answered
    201 and dropped) and hold its answer to the first request until the returned function
    is called (the answer is lost: the sender cannot know it arrived). Returns the SHA-256
    of each body stored, and that function."""
    seen: set[str] = set()
    stored: list[str] = []
    lost = asyncio.Event()

    async def behave(request: web.Request, hits: int) -> web.StreamResponse | None:
        key = request.headers.get("Idempotency-Key", "")
        body = await request.read()
        if key in seen:
            return web.Response(status=201, text="already received")
        seen.add(key)
        stored.append(hashlib.sha256(body).hexdigest())
        if hits == 1:
            await lost.wait()  # no answer while the test runs
        return web.Response(status=201, text="created")

    receiver.behave[path] = behave
    return stored, lambda: receiver.lt.loop.call_soon_threadsafe(lost.set)


def _elsewhere(tmp_path: Path, *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``filedispatch ARGS`` run where /etc/machine-id names another machine (a mount
    namespace of its own, as a container or another host sees the same journal file)."""
    other = tmp_path / "other-machine-id"
    other.write_text("0123456789abcdef0123456789abcdef\n", encoding="ascii")
    bind = 'mount --bind "$0" /etc/machine-id && exec "$@"'
    wrap = ["unshare", "-m", "sh", "-c", bind, str(other)]
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a mount namespace of its own (unshare -m, root)")
    return subprocess.run(
        [*wrap, sys.executable, "-m", "filedispatch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=90,
        env=cli_env(),
    )


@pytest.mark.parametrize("resumed_on", ["this-machine", "another-machine"])
def test_a_row_in_flight_when_its_journal_moves_to_another_machine_keeps_its_name(
    tmp_path: Path, resumed_on: str
) -> None:
    """a.csv is posted to a receiver that keeps one body per ``Idempotency-Key``: it stores
    the body, its answer is lost, and the service is stopped (the row resumes at the next
    start). The journal's volume then moves to another machine (a pod rescheduled with its
    volume, a failover host mounting the disk: the same file, another /etc/machine-id) and
    the service starts there. The journal takes a new token at that open; before, the row
    in flight posted again under a key of the new token and the receiver stored a.csv
    twice. A row planned before the rebind keeps the name it was planned under."""
    receiver = HttpReceiver()
    try:
        stored, answer = _lost_answer_receiver(receiver, "/upload")
        ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
        data = b"the readings, once\n"
        step = {"url": f"{receiver.url}/upload", "timeout": 60}
        cfg = remote_config(ws, step, source={"after": "delete"}, shutdown_grace=0.5)
        old_file(ws["inbox"] / "a.csv", data)
        svc = ServiceProcess(cfg).start()
        try:
            wait_until(lambda: len(stored) == 1, 60)
        finally:
            svc.stop(60)
        once = ("-c", cfg, "--once")
        if resumed_on == "another-machine":
            result = _elsewhere(tmp_path, *once)
            assert "copied or moved" in result.stderr, result.stderr  # a new token
        else:
            result = run_cli(*once, timeout=90)
        assert result.returncode == 0, result.stderr
        rows = journal_rows(ws["db"])
    finally:
        answer()
        receiver.close()
    assert [r["status"] for r in rows] == ["SUCCEEDED"], rows
    assert stored == [hashlib.sha256(data).hexdigest()], (
        f"a.csv stored {len(stored)} times: the resumed row's key was new:\n{result.stderr}"
    )


async def test_a_postgres_row_reads_back_the_microsecond_its_name_carries(pg_url: str) -> None:
    """A row's delivery name carries its planned time in whole microseconds: the inline lane
    names its first attempt from the time it planned with, every later attempt (a resume, or
    another node) from ``created`` read back. A server that gives floats as text with 15
    significant digits (PostgreSQL 11 by default; any version where a role or database sets
    ``extra_float_digits = 0``) read 1796212235.9022577 back as 1796212235.90226: the resumed
    row was named with another microsecond, a second delivery to a receiver that drops
    repeats. Read back through the writer's connection (a claim) and the pool's (a read)."""
    import psycopg

    from . import pgcluster

    name = pg_url.rpartition("/")[2]
    with psycopg.connect(pg_url, password=pgcluster.PASSWORD, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET extra_float_digits = 0')
    planned = 1796212235.9022577  # 15 significant digits lose its last microseconds
    version = FileVersion("in", Path("/in"), "a.csv", 1, 1, ino=1, ctime_ns=1)
    async with open_journal(PostgresTarget(pg_url, pgcluster.PASSWORD_ENV)) as journal:
        await journal.plan([PlannedStep(version, "r", 0, "k0", "/dest/0", "file")], planned)
        [[claimed]] = await journal.claim(10, planned + 1)
        [read] = await journal.recent(10)
    wanted = round(planned * 1_000_000)
    assert round(claimed.created * 1_000_000) == wanted, claimed.created
    assert round(read.created * 1_000_000) == wanted, read.created
