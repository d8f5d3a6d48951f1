"""A journal that fails under a running service: a real full disk (a small tmpfs), a read-only
remount, a corrupted file, the file removed or replaced. Nothing here mocks SQLite.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filedispatch.journal import Journal, JournalState, PlannedStep
from filedispatch.models import FileVersion

from .conftest import (
    ServiceProcess,
    arrived,
    delivered,
    free_port,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .ops import console


def _mount(folder: Path, size: str) -> bool:
    return (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
        ).returncode
        == 0
    )


@pytest.fixture
def journal_disk(tmp_path: Path) -> Iterator[Path]:
    """A small tmpfs for the journal alone, so that it can be filled and freed."""
    folder = tmp_path / "jdisk"
    folder.mkdir()
    if not _mount(folder, "2m"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(disk: Path) -> Path:
    """Take every free block of ``disk``; the file returned gives them back when removed."""
    blocker = disk / "blocker"
    fd = os.open(blocker, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError:
        pass
    finally:
        os.close(fd)
    return blocker


def remount(disk: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(disk)], check=True)


def get(url: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def service_config(root: Path, db: Path, port: int, **source: Any) -> Path:
    (root / "inbox").mkdir(exist_ok=True)
    return write_config(
        root / "config.yml",
        {
            "database": str(db),
            "sources": [
                {"path": str(root / "inbox"), "name": "inbox", "settle": 0, "rescan": 0, **source}
            ],
            "rules": [{"name": "all", "glob": "*", "to": str(root / "outbox")}],
            "api": {"port": port, "host": "127.0.0.1"},
            "monitor": {"enabled": False},
        },
    )


def held_for_a_while(url: str, retries: int = 2) -> dict[str, Any]:
    """The status once the journal has refused writes ``retries`` times after the first."""

    def check() -> dict[str, Any] | None:
        code, st = get(f"{url}/api/v1/status")
        return st if code == 200 and st["journal"]["retries"] >= retries else None

    found: dict[str, Any] = wait_until(check, 60, 0.2)
    return found


# ----------------------------------------------------------------------------- the writer


def _steps(tmp_path: Path, n: int, start: int = 0) -> list[PlannedStep]:
    return [
        PlannedStep(
            FileVersion("inbox", tmp_path, f"file-{i:05d}-{'x' * 200}.txt", i, i, i + 1, i, 1),
            "all",
            0,
            "k",
            "/out",
            "local",
        )
        for i in range(start, start + n)
    ]


async def test_a_write_the_full_disk_refuses_is_held_and_committed_once_space_is_freed(
    tmp_path: Path, journal_disk: Path
) -> None:
    async with Journal.open(journal_disk / "j.db") as journal:
        assert await journal.plan(_steps(tmp_path, 10)) == 10
        blocker = fill(journal_disk)
        states: list[JournalState] = []
        journal.on_health(lambda h: states.append(h.state))
        planned = asyncio.ensure_future(journal.plan(_steps(tmp_path, 300, 10)))
        await asyncio.wait_for(asyncio.shield(_until(lambda: not journal.writable.is_set())), 30)
        assert journal.health.state == JournalState.FAILING
        assert "full" in (journal.health.error or "")
        assert not planned.done(), "a refused write must wait, not fail"
        with pytest.raises(Exception, match="cannot be written now"):
            await journal.retry(1)  # an operator's request is answered at once
        blocker.unlink()
        assert await asyncio.wait_for(planned, 60) == 300
        assert journal.writable.is_set() and journal.health.state == JournalState.OK
        assert states[0] == JournalState.FAILING and states[-1] == JournalState.OK
    assert len(journal_rows(journal_disk / "j.db")) == 310


async def _until(predicate: Any) -> None:
    while not predicate():
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- a full disk


def test_a_full_journal_disk_pauses_intake_and_delivery_until_space_is_freed(
    tmp_path: Path, journal_disk: Path, service_factory: Any
) -> None:
    port = free_port()
    db = journal_disk / "j.db"
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    svc: ServiceProcess = service_factory(service_config(tmp_path, db, port, after="delete"))
    svc.start()
    url = f"http://127.0.0.1:{port}"
    old(inbox / "before.txt", b"before")
    wait_until(lambda: "before.txt" in delivered(outbox) and not (inbox / "before.txt").exists())
    assert get(f"{url}/health")[0] == 200

    blocker = fill(journal_disk)
    names = [f"during-{i:03d}.txt" for i in range(40)]
    for name in names:
        old(inbox / name, name.encode())
    status = held_for_a_while(url)
    assert status["paused"] is True and status["pause_reason"] == "journal"
    assert status["journal"]["state"] == "failing" and str(db) == status["journal"]["path"]
    code, health = get(f"{url}/health")
    assert code == 503 and health["status"] == "unavailable" and "full" in health["detail"]
    # nothing was delivered, and no source moved or deleted, while nothing could be recorded
    assert sorted(p.name for p in inbox.iterdir()) == names
    assert delivered(outbox) == {"before.txt": b"before"}
    old(inbox / "late.txt", b"late")  # arrives while the service waits

    blocker.unlink()
    everything = {"before.txt", "late.txt", *names}
    wait_until(lambda: set(delivered(outbox)) == everything, 60)
    wait_until(lambda: not list(inbox.iterdir()), 30)
    assert get(f"{url}/health")[0] == 200
    assert get(f"{url}/api/v1/status")[1]["paused"] is False
    rows = journal_rows(db)
    assert sorted(r["filename"] for r in rows) == sorted(everything)  # each once
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCEEDED", 1)}
    assert delivered(outbox) == {n: n.encode() for n in names} | {
        "before.txt": b"before",
        "late.txt": b"late",
    }
    assert svc.stop() == 0
    log = svc.log()
    assert log.count("is full: free space there") == 1, log
    assert "takes writes again" in log and "Traceback" not in log


def test_the_console_says_the_journal_is_failing(
    tmp_path: Path, journal_disk: Path, service_factory: Any
) -> None:
    port, console_port = free_port(), free_port()
    cfg = service_config(tmp_path, journal_disk / "j.db", port)
    data = cfg.read_text().replace(
        "monitor:\n  enabled: false", f"monitor:\n  port: {console_port}\n  console: false"
    )
    cfg.write_text(data)
    svc: ServiceProcess = service_factory(cfg).start()
    blocker = fill(journal_disk)
    for i in range(40):
        old(tmp_path / "inbox" / f"f{i}.txt")
    held_for_a_while(f"http://127.0.0.1:{port}", 1)
    (status,) = console(console_port, "fd-status")
    assert "PAUSED: journal failing" in status and "is full" in status, status
    blocker.unlink()
    wait_until(lambda: len(arrived(tmp_path / "outbox")) == 40, 60)
    (status,) = console(console_port, "fd-status")
    assert "running" in status and "PAUSED" not in status
    assert svc.stop() == 0


def test_a_start_on_a_full_journal_disk_waits_for_space(
    tmp_path: Path, journal_disk: Path, service_factory: Any
) -> None:
    """A clean stop removes the journal's -wal and -shm files: SQLite cannot open it again
    until there is room for them. The service waits, says why once, and starts by itself."""
    port = free_port()
    db = journal_disk / "j.db"
    cfg = service_config(tmp_path, db, port)
    old(tmp_path / "inbox" / "first.txt", b"1")
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert not Path(f"{db}-shm").exists()
    blocker = fill(journal_disk)
    old(tmp_path / "inbox" / "second.txt", b"2")
    svc: ServiceProcess = service_factory(cfg).start(wait_ready=False)
    wait_until(lambda: "waiting for it" in svc.log(), 30)
    assert svc.proc is not None and svc.proc.poll() is None, svc.log()
    blocker.unlink()
    wait_until(lambda: "watching" in svc.log(), 90)
    wait_until(lambda: "second.txt" in delivered(tmp_path / "outbox"), 30)
    assert get(f"http://127.0.0.1:{port}/health")[0] == 200
    assert svc.stop() == 0
    assert svc.log().count("waiting for it") == 1 and "Traceback" not in svc.log()


def test_a_stop_while_the_journal_is_full_is_prompt_and_clean(
    tmp_path: Path, journal_disk: Path, service_factory: Any
) -> None:
    port = free_port()
    db = journal_disk / "j.db"
    cfg = service_config(tmp_path, db, port, after="delete")
    svc: ServiceProcess = service_factory(cfg).start()
    fill(journal_disk)
    for i in range(40):
        old(tmp_path / "inbox" / f"f{i}.txt")
    held_for_a_while(f"http://127.0.0.1:{port}", 1)
    t0 = time.monotonic()
    assert svc.stop() == 0
    assert time.monotonic() - t0 < 20  # not the shutdown grace, not a retry of the disk
    assert len(list((tmp_path / "inbox").iterdir())) == 40  # every source still there
    assert not delivered(tmp_path / "outbox")
    assert "Traceback" not in svc.log()


# ----------------------------------------------------------------------------- a corrupted file


def _corrupt_pages(db: Path) -> None:
    with open(db, "r+b") as fh:  # the header stays: SQLite opens it, the pages are garbage
        fh.seek(4096 * 2)
        fh.write(os.urandom(4096 * 3))


def _garbage(db: Path) -> None:
    db.write_bytes(os.urandom(64 * 1024))


@pytest.mark.parametrize("damage", [_corrupt_pages, _garbage], ids=["pages", "garbage"])
def test_a_corrupted_journal_is_refused_at_start_with_what_to_do(
    tmp_path: Path, damage: Any
) -> None:
    db = tmp_path / "j.db"
    cfg = service_config(tmp_path, db, free_port())
    for i in range(300):
        old(tmp_path / "inbox" / f"file-{i:04d}-{'x' * 100}.txt")
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert len(journal_rows(db)) == 300 and os.path.getsize(db) > 4096 * 5
    damage(db)
    damaged = db.read_bytes()
    shutil.rmtree(tmp_path / "outbox")
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert str(db) in lines[0] and "corrupted" in lines[0] and ".recover" in lines[0]
    assert db.read_bytes() == damaged  # left as it was
    assert not (tmp_path / "outbox").exists()  # nothing was sent


# ----------------------------------------------------------------------------- removed, replaced


def _delete(db: Path) -> None:
    db.unlink()


def _replace(db: Path) -> None:
    copy = db.with_name("copy.db")
    shutil.copyfile(db, copy)
    os.replace(copy, db)


@pytest.mark.parametrize(
    ("change", "state"), [(_delete, "removed"), (_replace, "replaced")], ids=["deleted", "replaced"]
)
def test_a_journal_removed_or_replaced_while_running_stops_dispatching(
    tmp_path: Path, service_factory: Any, change: Any, state: str
) -> None:
    port = free_port()
    db = tmp_path / "j.db"
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    svc: ServiceProcess = service_factory(service_config(tmp_path, db, port, after="delete"))
    svc.start()
    url = f"http://127.0.0.1:{port}"
    old(inbox / "before.txt", b"before")
    wait_until(lambda: "before.txt" in delivered(outbox) and not (inbox / "before.txt").exists())

    change(db)
    wait_until(lambda: get(f"{url}/health")[0] == 503, 30)
    old(inbox / "after.txt", b"after")
    status = held_for_a_while(url, 1)  # the new file's row was offered and is held
    assert status["journal"]["state"] == state and status["pause_reason"] == "journal"
    assert (inbox / "after.txt").read_bytes() == b"after"  # its source untouched
    assert delivered(outbox) == {"before.txt": b"before"}  # and nothing sent
    assert f"the journal file {db} was {state}" in svc.log().replace(
        "removed or renamed", "removed"
    )
    assert svc.stop() == 0
    assert (inbox / "after.txt").exists() and "Traceback" not in svc.log()


def test_a_journal_moved_aside_and_back_resumes_where_it_stopped(
    tmp_path: Path, service_factory: Any
) -> None:
    port = free_port()
    db, aside = tmp_path / "j.db", tmp_path / "j.db.aside"
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    svc: ServiceProcess = service_factory(service_config(tmp_path, db, port, after="delete"))
    svc.start()
    url = f"http://127.0.0.1:{port}"
    os.rename(db, aside)
    wait_until(lambda: get(f"{url}/health")[0] == 503, 30)
    old(inbox / "waiting.txt", b"w")
    held_for_a_while(url, 1)
    assert (inbox / "waiting.txt").exists() and not delivered(outbox)
    os.rename(aside, db)  # the same file (device and inode) is back
    wait_until(lambda: delivered(outbox) == {"waiting.txt": b"w"}, 60)
    wait_until(lambda: not (inbox / "waiting.txt").exists(), 30)
    assert get(f"{url}/health")[0] == 200
    assert [(r["filename"], r["status"]) for r in journal_rows(db)] == [
        ("waiting.txt", "SUCCEEDED")
    ]
    assert svc.stop() == 0
