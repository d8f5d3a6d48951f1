"""The inline lanes: a new file whose only step is a local folder is renamed into it as soon as
it is planned (same filesystem, source consumed), or copied in a batch with other small files,
with no claim and no worker. These tests check what a user sees of those paths: the bytes,
the source, the journal row, and what a crash leaves.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config
from filedispatch.dispatcher import Dispatcher
from filedispatch.journal import Journal, planned_steps
from filedispatch.models import FileVersion
from filedispatch.processors import Registry
from filedispatch.router import Router

from .conftest import (
    ServiceProcess,
    delivered,
    journal_rows,
    mounted_tmpfs,
    needs_fastpath,
    old,
    run_cli,
    wait_until,
    write_config,
)


def move_config(ws: dict[str, Path], **dest: Any) -> Path:
    return write_config(
        ws["root"] / "c.yml",
        {
            "database": str(ws["db"]),
            "sources": [
                {"path": str(ws["inbox"]), "settle": 0, "failed_dir": str(ws["root"] / "failed")}
            ],
            "rules": [
                {
                    "name": "all",
                    "glob": "*",
                    "to": {"url": str(ws["outbox"]), "mode": "move", **dest},
                }
            ],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def drop(ws: dict[str, Path], files: dict[str, bytes]) -> None:
    """Write ``files`` aside, then rename them all into the inbox at once (a burst)."""
    stage = ws["root"] / "stage"
    stage.mkdir(exist_ok=True)
    for name, data in files.items():
        (stage / name).write_bytes(data)
    for name in sorted(files):
        os.rename(stage / name, ws["inbox"] / name)


@pytest.mark.parametrize(
    "policy,expected_files,status,detail",
    [
        ("rename", {"a.txt": b"old", "a-1.txt": b"new"}, "SUCCEEDED", "moved"),
        ("overwrite", {"a.txt": b"new"}, "SUCCEEDED", "moved"),
        ("skip", {"a.txt": b"old"}, "SUCCEEDED", "skipped: the name is taken"),
        ("fail", {"a.txt": b"old"}, "FAILED", None),
    ],
)
def test_on_conflict_when_the_file_is_moved(
    workspace: dict[str, Path],
    policy: str,
    expected_files: dict[str, bytes],
    status: str,
    detail: str | None,
) -> None:
    ws = workspace
    old(ws["outbox"] / "a.txt", b"old")
    old(ws["inbox"] / "a.txt", b"new")
    cfg = move_config(ws, on_conflict=policy, retry={"attempts": 1})

    result = run_cli("-c", cfg, "--once")

    assert result.returncode == (1 if status == "FAILED" else 0), result.stderr
    assert delivered(ws["outbox"]) == expected_files
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["detail"], row["attempts"]) == (status, detail, 1)
    assert list(ws["inbox"].iterdir()) == []  # moved, consumed by skip, or moved to failed/
    if status == "FAILED":
        assert "already exists" in row["reason"]
        assert (ws["root"] / "failed" / "a.txt").read_bytes() == b"new"


def test_a_burst_into_a_running_service_is_moved_whole(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    cfg = move_config(ws, name="{ext}/{name}", fsync=False)
    files = {
        f"scan {i:04d}.{('pdf', 'tif', 'xml')[i % 3]}": f"{i}".encode() * (1 + i % 50)
        for i in range(3000)
    }
    expected = {f"{name.rsplit('.', 1)[1]}/{name}": data for name, data in files.items()}
    svc: ServiceProcess = service_factory(cfg).start()
    drop(ws, files)
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) == len(expected), 60)
    assert svc.stop() == 0

    assert delivered(ws["outbox"]) == expected
    assert list(ws["inbox"].iterdir()) == []
    rows = journal_rows(ws["db"])
    assert len(rows) == len(expected)
    assert {(r["status"], r["attempts"], r["detail"]) for r in rows} == {("SUCCEEDED", 1, "moved")}
    assert all(r["started"] is not None and r["finished"] >= r["started"] for r in rows)


def _interrupted(ws: dict[str, Path], cfg: Path, name: str) -> FileVersion:
    """The state a kill -9 leaves between committing a file's IN_PROGRESS row and recording
    its outcome: the row is IN_PROGRESS, nothing else is written."""
    config = load_config(cfg)
    source = config.sources[0]
    st = (ws["inbox"] / name).stat()
    version = FileVersion.from_stat(source.key, source.path, name, st)

    async def plan() -> None:
        async with Journal.open(ws["db"]) as journal:
            steps = planned_steps(version, Router(config).route(version))
            await journal.plan_started(steps, time.time())

    asyncio.run(plan())
    (row,) = journal_rows(ws["db"])
    assert row["status"] == "IN_PROGRESS"
    return version


def test_a_crash_after_the_rename_is_recorded_once_at_restart(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = move_config(ws)
    old(ws["inbox"] / "batch.edi", b"UNB+UNOA:1")
    _interrupted(ws, cfg, "batch.edi")
    ws["outbox"].mkdir()
    os.rename(ws["inbox"] / "batch.edi", ws["outbox"] / "batch.edi")  # the move that was done

    result = run_cli("-c", cfg, "--once")

    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"batch.edi": b"UNB+UNOA:1"}
    (row,) = journal_rows(ws["db"])
    assert row["status"] == "SUCCEEDED"
    assert row["detail"] == "found delivered by an earlier attempt"


def test_a_crash_before_the_rename_moves_the_file_at_restart(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = move_config(ws)
    old(ws["inbox"] / "batch.edi", b"UNB+UNOA:2")
    _interrupted(ws, cfg, "batch.edi")

    result = run_cli("-c", cfg, "--once")

    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"batch.edi": b"UNB+UNOA:2"}
    assert list(ws["inbox"].iterdir()) == []
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["attempts"]) == ("SUCCEEDED", 1)


@pytest.mark.slow
def test_kill_9_during_a_live_burst_then_restart(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    cfg = move_config(ws, fsync=False)
    expected = {f"f{i:05d}.dat": os.urandom(16 + i % 200) for i in range(8000)}
    svc: ServiceProcess = service_factory(cfg).start()
    drop(ws, expected)
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) >= 500, 60, 0.005)
    svc.kill()
    print("killed with", len(journal_rows(ws["db"], "status='SUCCEEDED'")), "rows SUCCEEDED")

    result = run_cli("-c", cfg, "--once", timeout=300)

    assert result.returncode == 0, result.stderr + result.stdout
    assert delivered(ws["outbox"]) == expected
    assert list(ws["inbox"].iterdir()) == []
    rows = journal_rows(ws["db"])
    assert sorted(r["filename"] for r in rows) == sorted(expected)
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    conn = sqlite3.connect(ws["db"])
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


@pytest.fixture
def mounted_subfolder(tmp_path: Path) -> Any:
    """A tmpfs mounted inside the destination: renames into it cross filesystems."""
    folder = tmp_path / "outbox" / "elsewhere"
    folder.mkdir(parents=True)
    with mounted_tmpfs(folder):
        yield folder


def test_a_move_across_a_mount_inside_the_destination_is_copied(
    workspace: dict[str, Path], mounted_subfolder: Path
) -> None:
    ws = workspace
    cfg = move_config(ws, name="elsewhere/{name}")
    old(ws["inbox"] / "photo.jpg", b"\xff\xd8\xff\xe0 jpeg")

    result = run_cli("-c", cfg, "--once")

    assert result.returncode == 0, result.stderr
    assert (mounted_subfolder / "photo.jpg").read_bytes() == b"\xff\xd8\xff\xe0 jpeg"
    assert list(ws["inbox"].iterdir()) == []
    (row,) = journal_rows(ws["db"])
    assert (row["status"], row["attempts"]) == ("SUCCEEDED", 1)
    assert row["detail"] != "moved"


@needs_fastpath
async def test_a_source_gone_or_changed_before_its_move_fails_alone(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    config = load_config(move_config(ws))
    source = config.sources[0]
    versions = {}
    for name in ("gone.txt", "changed.txt", "fine.txt"):
        st = old(ws["inbox"] / name, b"v1").stat()
        versions[name] = FileVersion.from_stat(source.key, source.path, name, st)
    (ws["inbox"] / "gone.txt").unlink()
    (ws["inbox"] / "changed.txt").write_bytes(b"version 2")

    async with Journal.open(ws["db"]) as journal:
        dispatcher = Dispatcher(config, journal, Registry(), workdir=ws["root"] / "work")
        await dispatcher.offer(source, list(versions.values()))
        await journal.write(lambda conn: None)  # every outcome queued so far is committed

    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert rows["fine.txt"]["status"] == "SUCCEEDED"
    assert rows["gone.txt"]["status"] == "FAILED"
    assert "vanished" in rows["gone.txt"]["reason"]
    assert rows["changed.txt"]["status"] == "FAILED"
    assert "changed after it was seen" in rows["changed.txt"]["reason"]
    assert delivered(ws["outbox"]) == {"fine.txt": b"v1"}
    assert (ws["inbox"] / "changed.txt").read_bytes() == b"version 2"  # its new version waits


@pytest.mark.parametrize("mode", ["move", "copy"])
def test_a_destination_folder_removed_while_running_is_made_again(
    workspace: dict[str, Path], service_factory: Any, mode: str
) -> None:
    ws = workspace
    cfg = move_config(ws, name="{ext}/{name}", mode=mode, retry={"attempts": 3, "delay": 0.2})
    svc: ServiceProcess = service_factory(cfg).start()
    old(ws["inbox"] / "a.txt", b"first")
    wait_until(lambda: (ws["outbox"] / "txt" / "a.txt").exists())
    shutil.rmtree(ws["outbox"] / "txt")
    old(ws["inbox"] / "b.txt", b"second")
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) == 2)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"txt/b.txt": b"second"}
    row = journal_rows(ws["db"], "filename='b.txt'")[0]
    assert row["attempts"] == 2  # the first attempt met the missing folder


async def test_a_pause_stops_a_burst_between_chunks(workspace: dict[str, Path]) -> None:
    ws = workspace
    config = load_config(move_config(ws))
    source = config.sources[0]
    versions = []
    for i in range(600):  # two chunks
        st = old(ws["inbox"] / f"f{i:03d}.txt", b"x").stat()
        versions.append(FileVersion(source.key, source.path, f"f{i:03d}.txt", 1, st.st_mtime_ns))

    async with Journal.open(ws["db"]) as journal:
        dispatcher = Dispatcher(config, journal, Registry(), workdir=ws["root"] / "work")
        # runs while the first chunk's rows are being committed, before anything is moved
        asyncio.get_running_loop().call_soon(dispatcher.pause)
        await dispatcher.offer(source, versions)
        await journal.write(lambda conn: None)

    rows = journal_rows(ws["db"])
    assert len(rows) == 600
    assert {r["status"] for r in rows} == {"PENDING"}  # given back for the workers
    assert len(list(ws["inbox"].iterdir())) == 600
    assert delivered(ws["outbox"]) == {}


# ---------------------------------------------------------------------- copies in batches


def test_a_burst_of_copies_arrives_whole_and_the_sources_stay(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """Small files are copied in batches, a large one by a worker: all arrive, all kept."""
    ws = workspace
    cfg = move_config(ws, mode="copy", fsync=True)
    expected = {f"lab {i:04d}.csv": os.urandom(1 + i * 7 % 9000) for i in range(1500)}
    expected["scan.tif"] = os.urandom(3 * 1024 * 1024)  # above the batch limit: for a worker
    svc: ServiceProcess = service_factory(cfg).start()
    drop(ws, expected)
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) == len(expected), 60)
    assert svc.stop() == 0

    assert delivered(ws["outbox"]) == expected
    assert delivered(ws["inbox"]) == expected  # mode: copy, after: keep
    assert not [p for p in ws["outbox"].iterdir() if p.name.startswith(".")]
    rows = journal_rows(ws["db"])
    assert len(rows) == len(expected)
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCEEDED", 1)}
    mtimes = {p.name: p.stat().st_mtime_ns for p in ws["inbox"].iterdir()}
    assert {p.name: p.stat().st_mtime_ns for p in ws["outbox"].iterdir()} == mtimes


@needs_fastpath
async def test_one_bad_file_in_a_copy_batch_fails_alone(workspace: dict[str, Path]) -> None:
    ws = workspace
    config = load_config(move_config(ws, mode="copy"))
    source = config.sources[0]
    versions = []
    for name in ("a.txt", "gone.txt", "changed.txt", "unreadable.txt", "z.txt"):
        old(ws["inbox"] / name, name.encode())
        if name == "unreadable.txt":  # before it is seen: a chmod makes a new version
            (ws["inbox"] / name).chmod(0)
        st = (ws["inbox"] / name).stat()
        versions.append(FileVersion.from_stat(source.key, source.path, name, st))
    (ws["inbox"] / "gone.txt").unlink()
    (ws["inbox"] / "changed.txt").write_bytes(b"changed since it was seen")
    can_read_anyway = os.access(ws["inbox"] / "unreadable.txt", os.R_OK)  # root

    async with Journal.open(ws["db"]) as journal:
        dispatcher = Dispatcher(config, journal, Registry(), workdir=ws["root"] / "work")
        await dispatcher.offer(source, versions)
        await journal.write(lambda conn: None)

    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert rows["a.txt"]["status"] == rows["z.txt"]["status"] == "SUCCEEDED"
    assert rows["gone.txt"]["status"] == "FAILED" and "vanished" in rows["gone.txt"]["reason"]
    assert rows["changed.txt"]["status"] == "FAILED"
    assert "changed after it was seen" in rows["changed.txt"]["reason"]
    expected = {"a.txt": b"a.txt", "z.txt": b"z.txt"}
    if can_read_anyway:
        expected["unreadable.txt"] = b"unreadable.txt"
    else:
        assert rows["unreadable.txt"]["status"] == "FAILED"
        assert "cannot read" in rows["unreadable.txt"]["reason"]
    assert delivered(ws["outbox"]) == expected
    assert len(list(ws["inbox"].iterdir())) == 4  # copies leave the sources; gone is gone


@needs_fastpath
async def test_files_of_a_running_copy_batch_count_as_in_flight(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch holds its files until the slowest is read. Here the batch's thread is held at
    the copier's seam (as a slow disk would hold it; a FIFO no longer can: sources are opened
    without blocking), so the count can be looked at while the batch runs."""
    ws = workspace
    config = load_config(move_config(ws, mode="copy"))
    source = config.sources[0]
    names = ("a.txt", "b.txt", "c.txt")
    versions = [
        FileVersion.from_stat(source.key, source.path, n, old(ws["inbox"] / n).stat())
        for n in names
    ]
    registry = Registry()
    copier = registry.get(config.rules[0].to[0])
    release = threading.Event()
    copy_batch = copier._copy_batch  # type: ignore[attr-defined]

    def held(ctxs: list[Any]) -> Any:  # in the batch's thread
        release.wait(60)
        return copy_batch(ctxs)

    monkeypatch.setattr(copier, "_copy_batch", held)

    async with Journal.open(ws["db"]) as journal:
        dispatcher = Dispatcher(config, journal, registry, workdir=ws["root"] / "work")
        offered = asyncio.create_task(dispatcher.offer(source, versions))
        await asyncio.to_thread(
            wait_until, lambda: dispatcher.running == 3 or offered.done(), 10, 0.01
        )
        assert dispatcher.running == 3
        release.set()
        await offered
        assert dispatcher.running == 0
        await journal.write(lambda conn: None)

    rows = {r["filename"]: r["status"] for r in journal_rows(ws["db"])}
    assert rows == dict.fromkeys(names, "SUCCEEDED")
    assert delivered(ws["outbox"]) == dict.fromkeys(names, b"x")


def test_a_new_version_the_rename_took_goes_back_under_a_free_name_if_its_own_is_taken(
    tmp_path: Path,
) -> None:
    """``mode: move`` renames the source into the destination after a look; a writer may
    rename a new version over the source in between, and the rename takes that one. The look
    after the rename (``processors.local._check_moved``) puts it back; if yet another file has
    taken the source's name meanwhile, it goes back under the next free name, never left in
    the destination, delivered by nobody's account. The state of that instant is made here
    with real renames. Before: the put-back failed quietly and the new version stayed in
    the destination."""
    from filedispatch.errors import SourceVanishedError
    from filedispatch.processors.local import _check_moved

    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    (inbox / "a.txt").write_bytes(b"the version planned\n")
    st = os.lstat(inbox / "a.txt")
    version = FileVersion(
        "in", inbox, "a.txt", st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev
    )
    (inbox / ".a.txt.part").write_bytes(b"a new version\n")
    os.rename(inbox / ".a.txt.part", inbox / "a.txt")  # the writer's swap
    os.rename(inbox / "a.txt", out / "a.txt")  # the service's rename took the new version
    (inbox / "a.txt").write_bytes(b"a third file\n")  # and the name is taken again
    folder = os.open(inbox, os.O_PATH | os.O_DIRECTORY)
    try:
        with pytest.raises(SourceVanishedError, match=r"put back as a-1\.txt"):
            _check_moved(version, folder, "a.txt", st, str(out / "a.txt"))
    finally:
        os.close(folder)
    assert list(out.iterdir()) == []
    assert (inbox / "a-1.txt").read_bytes() == b"a new version\n"
    assert (inbox / "a.txt").read_bytes() == b"a third file\n"
