"""End to end through the real CLI: real folders, a real journal, real subprocesses."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import (
    ROOT,
    ServiceProcess,
    cli_env,
    delivered,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)


def config(ws: dict[str, Path], rules: list[dict[str, Any]] | None = None, **source: Any) -> Path:
    src: dict[str, Any] = {"path": str(ws["inbox"]), "name": "inbox", "settle": 0.2, **source}
    data = {
        "database": str(ws["db"]),
        "sources": [src],
        "rules": rules or [{"name": "all", "glob": "*", "to": str(ws["outbox"])}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    return write_config(ws["root"] / "config.yml", data)


def test_seed_format_config_runs_once(workspace: dict[str, Path]) -> None:
    ws = workspace
    images, docs = ws["root"] / "images", ws["root"] / "documents"
    cfg = write_config(
        ws["root"] / "seed.yml",
        {
            "source": str(ws["inbox"]),
            "folders": [
                {"path": f"file://{docs}", "extensions": ["pdf", "txt"]},
                {"path": str(images), "extensions": ["png", "jpg"]},
            ],
        },
    )
    old(ws["inbox"] / "a.PDF", b"%PDF-1")
    old(ws["inbox"] / "b.png", b"png")
    old(ws["inbox"] / "c.zip", b"zip")
    result = run_cli("-c", cfg, "--once", "--db", ws["db"])
    assert result.returncode == 0, result.stderr
    assert delivered(docs) == {"a.PDF": b"%PDF-1"}
    assert delivered(images) == {"b.png": b"png"}
    assert "processed: 2" in result.stdout and "unmatched: 1" in result.stdout
    rows = journal_rows(ws["db"])
    assert {(r["filename"], r["status"], r["protocol"]) for r in rows} == {
        ("a.PDF", "SUCCEEDED", "file"),
        ("b.png", "SUCCEEDED", "file"),
    }
    assert (ws["inbox"] / "a.PDF").exists()  # after: keep is the default


def test_restart_sends_nothing_twice_and_a_modified_file_is_sent_again(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    cfg = config(
        ws,
        [{"name": "all", "glob": "*", "to": {"url": str(ws["outbox"]), "on_conflict": "rename"}}],
    )
    old(ws["inbox"] / "report.txt", b"v1")
    assert run_cli("-c", cfg, "--once").returncode == 0
    result = run_cli("-c", cfg, "--once")
    assert "already done: 1" in result.stdout
    assert delivered(ws["outbox"]) == {"report.txt": b"v1"}
    old(ws["inbox"] / "report.txt", b"version two")
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(ws["outbox"]) == {"report.txt": b"v1", "report-1.txt": b"version two"}
    assert len(journal_rows(ws["db"], "status='SUCCEEDED'")) == 2


def test_awkward_names(workspace: dict[str, Path]) -> None:
    ws = workspace
    names = [
        "with space.txt",
        "ünïcødé-日本.txt",
        "-leading-dash.txt",
        "new\nline.txt",
        "quote'and\"double.txt",
        "$(touch pwned).txt",
    ]
    for n in names:
        old(ws["inbox"] / n, n.encode())
    cfg = config(ws)
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {n: n.encode() for n in names}
    assert not (ws["root"] / "pwned").exists()
    assert len(journal_rows(ws["db"], "status='SUCCEEDED'")) == len(names)


def test_a_name_that_is_not_utf8_fails_alone(workspace: dict[str, Path]) -> None:
    ws = workspace
    raw = os.path.join(os.fsencode(ws["inbox"]), b"bad-\xff-name.txt")
    with open(raw, "wb") as fh:
        fh.write(b"x")
    os.utime(raw, (time.time() - 100, time.time() - 100))
    old(ws["inbox"] / "good.txt")
    result = run_cli("-c", config(ws), "--once")
    assert result.returncode == 1  # one file failed
    assert delivered(ws["outbox"]) == {"good.txt": b"x"}
    failed = journal_rows(ws["db"], "status='FAILED'")
    assert len(failed) == 1 and "not valid UTF-8" in failed[0]["reason"]
    assert "\\xff" in failed[0]["relpath"]


def test_dry_run_writes_nothing(workspace: dict[str, Path]) -> None:
    ws = workspace
    old(ws["inbox"] / "a.txt")
    result = run_cli("-c", config(ws), "--dry-run")
    assert result.returncode == 0
    assert f"inbox/a.txt -> [all] {ws['outbox'] / 'a.txt'}" in result.stdout
    assert not ws["outbox"].exists() and not ws["db"].exists()


def test_max_items_limits_one_run(workspace: dict[str, Path]) -> None:
    ws = workspace
    for i in range(5):
        old(ws["inbox"] / f"f{i}.txt")
    cfg = config(ws)
    result = run_cli("-c", cfg, "--once", "--max-items", "2")
    assert result.returncode == 0 and "processed: 2" in result.stdout
    assert len(delivered(ws["outbox"])) == 2
    run_cli("-c", cfg, "--once")
    assert len(delivered(ws["outbox"])) == 5


@pytest.mark.parametrize(
    "policy,expected_files,status",
    [
        ("rename", {"a.txt": b"old", "a-1.txt": b"new"}, "SUCCEEDED"),
        ("overwrite", {"a.txt": b"new"}, "SUCCEEDED"),
        ("skip", {"a.txt": b"old"}, "SUCCEEDED"),
        ("fail", {"a.txt": b"old"}, "FAILED"),
    ],
)
def test_on_conflict(
    workspace: dict[str, Path], policy: str, expected_files: dict[str, bytes], status: str
) -> None:
    ws = workspace
    old(ws["outbox"] / "a.txt", b"old")
    old(ws["inbox"] / "a.txt", b"new")
    cfg = config(
        ws,
        [
            {
                "name": "all",
                "glob": "*",
                "to": {"url": str(ws["outbox"]), "on_conflict": policy, "retry": {"attempts": 1}},
            }
        ],
    )
    run_cli("-c", cfg, "--once")
    assert delivered(ws["outbox"]) == expected_files
    (row,) = journal_rows(ws["db"])
    assert row["status"] == status
    if policy == "fail":
        assert "already exists" in row["reason"]
    if policy == "skip":
        assert "skipped" in row["detail"]


@pytest.fixture
def read_only_folder(tmp_path: Path) -> Any:
    """A folder nobody can write to: a read-only tmpfs as root, a chmod 555 folder otherwise."""
    folder = tmp_path / "readonly"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder, "Permission denied"
        folder.chmod(0o755)
        return
    if (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("cannot mount a read-only tmpfs here")
    try:
        yield folder, "Read-only file system"
    finally:
        subprocess.run(["umount", str(folder)], check=False)


def test_read_only_destination_fails_with_reason_and_keeps_source(
    workspace: dict[str, Path], read_only_folder: tuple[Path, str]
) -> None:
    ws = workspace
    folder, message = read_only_folder
    old(ws["inbox"] / "a.txt")
    cfg = config(ws, [{"name": "all", "glob": "*", "to": {"url": str(folder)}}], after="delete")
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    (row,) = journal_rows(ws["db"])
    assert row["status"] == "FAILED" and row["attempts"] == 1
    assert message in row["reason"]
    assert (ws["inbox"] / "a.txt").exists()
    assert os.listdir(folder) == []


def test_unwritable_destination_fails_and_source_stays(workspace: dict[str, Path]) -> None:
    """A destination below a read-only filesystem (/proc): FAILED at once, source kept."""
    ws = workspace
    old(ws["inbox"] / "a.txt")
    cfg = config(
        ws, [{"name": "all", "glob": "*", "to": {"url": "/proc/filedispatch-test"}}], after="delete"
    )
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    (row,) = journal_rows(ws["db"])
    assert row["status"] == "FAILED" and row["attempts"] == 1
    assert "cannot create /proc/filedispatch-test" in row["reason"]
    assert (ws["inbox"] / "a.txt").exists()


def test_after_delete_move_and_failed_dir(workspace: dict[str, Path]) -> None:
    ws = workspace
    done, failed = ws["root"] / "done", ws["root"] / "failed"
    old(ws["inbox"] / "ok.txt", b"ok")
    old(ws["inbox"] / "bad.bin", b"bad")
    cfg = config(
        ws,
        [
            {"name": "txt", "extensions": ["txt"], "to": str(ws["outbox"])},
            {
                "name": "bin",
                "extensions": ["bin"],
                "to": {"url": "/proc/nope", "retry": {"attempts": 1}},
            },
        ],
        after="move",
        done_dir=str(done),
        failed_dir=str(failed),
    )
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    assert delivered(ws["outbox"]) == {"ok.txt": b"ok"}
    assert delivered(done) == {"ok.txt": b"ok"}
    assert delivered(failed) == {"bad.bin": b"bad"}
    assert sorted(os.listdir(ws["inbox"])) == []


def test_move_flag_deletes_sources_after_delivery_to_every_destination(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    a, b = ws["root"] / "a", ws["root"] / "b"
    old(ws["inbox"] / "f.txt", b"data")
    cfg = config(ws, [{"name": "both", "glob": "*", "to": [str(a), str(b)]}])
    assert run_cli("-c", cfg, "--once", "--move").returncode == 0
    assert delivered(a) == delivered(b) == {"f.txt": b"data"}
    assert not (ws["inbox"] / "f.txt").exists()
    # two destinations: each got its own copy, not a shared inode
    assert (a / "f.txt").stat().st_ino != (b / "f.txt").stat().st_ino


def test_move_mode_same_filesystem_links_and_removes_source(workspace: dict[str, Path]) -> None:
    ws = workspace
    src = old(ws["inbox"] / "big.dat", b"z" * 1000)
    inode = src.stat().st_ino
    cfg = config(ws, [{"name": "m", "glob": "*", "to": {"url": str(ws["outbox"]), "mode": "move"}}])
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert (ws["outbox"] / "big.dat").stat().st_ino == inode  # no data was copied
    assert not src.exists()


def test_lock_and_done_modes(workspace: dict[str, Path], service_factory: Any) -> None:
    ws = workspace
    cfg = config(ws, ready="lock")
    svc: ServiceProcess = service_factory(cfg).start()
    lock = ws["inbox"] / "data.csv.lock"
    lock.write_text("")
    (ws["inbox"] / "data.csv").write_text("a,b\n")
    time.sleep(1.0)
    assert not (ws["outbox"] / "data.csv").exists()
    lock.unlink()
    wait_until(lambda: (ws["outbox"] / "data.csv").exists())
    assert svc.stop() == 0
    assert not (ws["outbox"] / "data.csv.lock").exists()

    cfg = config(ws, ready="done")
    svc = service_factory(cfg).start()
    (ws["inbox"] / "scan.pdf").write_text("pdf")
    time.sleep(1.0)
    assert not (ws["outbox"] / "scan.pdf").exists()
    (ws["inbox"] / "scan.pdf.done").write_text("")
    wait_until(lambda: (ws["outbox"] / "scan.pdf").exists())
    wait_until(lambda: not (ws["inbox"] / "scan.pdf.done").exists())
    assert svc.stop() == 0


def test_slowly_written_file_is_sent_once_and_complete(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    cfg = config(ws, settle=1.0)
    svc: ServiceProcess = service_factory(cfg).start()
    chunks = [os.urandom(4096) for _ in range(12)]
    target = ws["inbox"] / "slow.bin"
    with open(target, "wb") as fh:
        for chunk in chunks:  # 12 writes over ~3.3 s
            fh.write(chunk)
            fh.flush()
            time.sleep(0.3)
    wait_until(lambda: journal_rows(ws["db"], "status='SUCCEEDED'"), 15)
    time.sleep(1.5)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"slow.bin": b"".join(chunks)}
    assert len(journal_rows(ws["db"])) == 1


def test_thousand_files_dropped_at_once(workspace: dict[str, Path], service_factory: Any) -> None:
    ws = workspace
    cfg = config(ws, settle=0)
    svc: ServiceProcess = service_factory(cfg).start()
    expected = {}
    for i in range(1000):
        data = f"file {i}".encode()
        (ws["inbox"] / f"f{i:04d}.txt").write_bytes(data)
        expected[f"f{i:04d}.txt"] = data
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) >= 1000, 60)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == expected
    rows = journal_rows(ws["db"])
    assert len(rows) == 1000, [dict(r) for r in rows if r["status"] != "SUCCEEDED"]


def test_special_files_and_symlinks_are_not_taken(workspace: dict[str, Path]) -> None:
    ws = workspace
    outside = old(ws["root"] / "secret.txt", b"secret")
    os.mkfifo(ws["inbox"] / "pipe")
    (ws["inbox"] / "link.txt").symlink_to(outside)
    loop = ws["inbox"] / "sub"
    loop.mkdir()
    (loop / "again").symlink_to(ws["inbox"])
    old(ws["inbox"] / "sub" / "real.txt", b"real")
    cfg = config(ws, recursive=True, follow_symlinks=True)
    result = run_cli("-c", cfg, "--once", timeout=30)
    assert result.returncode == 0, result.stderr
    # the FIFO is skipped, the link pointing outside is refused, the loop does not hang
    assert delivered(ws["outbox"]) == {"sub/real.txt": b"real"}
    assert stat.S_ISFIFO(os.stat(ws["inbox"] / "pipe").st_mode)


def test_explain(workspace: dict[str, Path]) -> None:
    ws = workspace
    f = old(ws["inbox"] / "photo.JPG", b"jpg")
    cfg = config(
        ws,
        [
            {"name": "docs", "extensions": ["pdf"], "to": str(ws["outbox"] / "docs")},
            {
                "name": "images",
                "extensions": ["jpg"],
                "to": {"url": str(ws["outbox"] / "img"), "name": "{yyyy}/{name}"},
            },
        ],
    )
    result = run_cli("explain", "-c", cfg, f)
    assert result.returncode == 0, result.stderr
    assert "- docs: extension 'jpg' not in ['pdf']" in result.stdout
    assert "+ images: matched" in result.stdout
    year = time.strftime("%Y", time.localtime(f.stat().st_mtime))
    assert str(ws["outbox"] / "img" / year / "photo.JPG") in result.stdout


def test_journal_is_private(workspace: dict[str, Path]) -> None:
    ws = workspace
    old(ws["inbox"] / "a.txt")
    run_cli("-c", config(ws), "--once")
    assert stat.S_IMODE(ws["db"].stat().st_mode) == 0o600


def test_two_services_cannot_share_a_journal(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    cfg = config(ws)
    service_factory(cfg).start()
    result = run_cli("-c", cfg)
    assert result.returncode == 1
    assert "already running on the journal" in result.stderr


def test_a_file_deleted_while_settling_is_not_planned(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """It never became complete, so it leaves no row (the next test covers a planned one)."""
    ws = workspace
    cfg = config(ws, settle=0.5)
    svc: ServiceProcess = service_factory(cfg).start()
    gone = ws["inbox"] / "gone.txt"
    gone.write_text("x")
    gone.unlink()
    (ws["inbox"] / "stays.txt").write_text("y")
    wait_until(lambda: (ws["outbox"] / "stays.txt").exists())
    assert svc.stop() == 0
    assert [r["filename"] for r in journal_rows(ws["db"])] == ["stays.txt"]


def test_a_planned_file_that_vanishes_fails_once_with_the_reason(
    workspace: dict[str, Path],
) -> None:
    """A first step removes the source; the copy after it is FAILED as vanished, not retried."""
    ws = workspace
    old(ws["inbox"] / "doomed.txt", b"x")
    old(ws["inbox"] / "other.txt", b"y")
    cfg = config(
        ws,
        [
            {
                "name": "doomed",
                "glob": "doomed.txt",
                "to": [
                    {"python": "tests.helpers_programmable:remove"},
                    {"url": str(ws["outbox"]), "retry": {"attempts": 5, "delay": 0.05}},
                ],
            },
            {"name": "rest", "glob": "*", "to": str(ws["outbox"])},
        ],
    )
    env = cli_env(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = run_cli("-c", cfg, "--once", env=env)
    assert result.returncode == 1
    assert delivered(ws["outbox"]) == {"other.txt": b"y"}
    rows = {(r["filename"], r["step"]): r for r in journal_rows(ws["db"])}
    copy = rows[("doomed.txt", 1)]
    assert copy["status"] == "FAILED" and copy["attempts"] == 1
    assert "vanished" in copy["reason"]


def test_files_arriving_during_the_startup_scan_are_sent_once(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """The scan and the live watch feed the same path; the journal keeps each file once."""
    ws = workspace
    for i in range(500):
        old(ws["inbox"] / f"early-{i:03d}.txt", b"early")
    cfg = config(ws, settle=0)
    svc: ServiceProcess = service_factory(cfg).start(wait_ready=False)
    for i in range(300):  # while the service starts, scans and watches
        (ws["inbox"] / f"late-{i:03d}.txt").write_bytes(b"late")
    wait_until(lambda: len(journal_rows(ws["db"], "status='SUCCEEDED'")) >= 800, 60)
    time.sleep(0.5)
    assert svc.stop() == 0
    assert len(delivered(ws["outbox"])) == 800
    rows = journal_rows(ws["db"])
    assert len(rows) == 800 and {r["status"] for r in rows} == {"SUCCEEDED"}
