"""Red team of issue 10's integrity fixes: a source moved by copying (to a folder on another
filesystem, or where a rename is refused) is never doubled and never appears half-written
under its final name. Real files, the real CLI, real mounts where the test may make them."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config
from filedispatch.journal import MIGRATIONS
from filedispatch.router import step_keys

from .conftest import (
    cli_env,
    delivered,
    journal_rows,
    mounted_tmpfs,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .test_integrity import _old_key


def config(root: Path, inbox: Path, to: Any, **source: Any) -> Path:
    inbox.mkdir(exist_ok=True)
    return write_config(
        root / "c.yml",
        {
            "database": str(root / "j.db"),
            "sources": [{"path": str(inbox), "settle": 0, "rescan": 0, **source}],
            "rules": [{"name": "all", "glob": "*", "to": to}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


@pytest.fixture
def immutable() -> Iterator[list[Path]]:
    """Files made immutable (``chattr +i``: no rename, no unlink, even for root); undone after."""
    made: list[Path] = []
    yield made
    for path in made:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def make_immutable(path: Path, made: list[Path]) -> None:
    if shutil.which("chattr") is None:
        pytest.skip("needs chattr")
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("this filesystem has no immutable flag")
    made.append(path)


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted for the test (needs the right to mount)."""
    folder = tmp_path / "tiny"
    folder.mkdir()
    with mounted_tmpfs(folder):
        yield folder


def test_a_source_that_cannot_be_removed_is_never_doubled_in_done_dir(
    tmp_path: Path, immutable: list[Path]
) -> None:
    """A rename the kernel refuses with EPERM (an immutable or append-only source) was taken
    for "another filesystem": the source was copied into done_dir, its removal then failed too,
    and each later scan copied it again (a.bin, a-1.bin, ...). A move that cannot remove its
    source must take its copy back: the source stays, done_dir has no copy of it."""
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", tmp_path / "done"
    src = old(inbox / "a.bin", b"payload")
    make_immutable(src, immutable)
    cfg = config(tmp_path, inbox, str(out), after="move", done_dir=str(done))
    for _ in range(3):  # each run settles the delivered file again
        result = run_cli("-c", cfg, "--once")
        # the file was delivered but could not be moved: said, and the run exits 1
        assert result.returncode == 1, result.stderr
        assert "a move failed: see the log): 1" in result.stdout, result.stdout
    assert delivered(out) == {"a.bin": b"payload"}
    assert src.read_bytes() == b"payload"
    assert delivered(done) == {}, "the source stayed, so done_dir must not hold a copy of it"
    assert "after-action" in result.stderr or "after-action" in result.stdout


def test_a_crash_after_the_copy_of_a_cross_filesystem_move_does_not_double_it(
    tmp_path: Path, other_fs: Path
) -> None:
    """A move to done_dir on another filesystem copies, renames the copy into place, then
    removes the source. A crash (kill -9, power) between the last two leaves the source in the
    inbox and its copy in done_dir: the next start settled it again and done_dir got a second
    copy (a-1.bin). The next start must see the copy is there and only remove the source.
    The state the crash leaves is made here exactly: the file delivered and recorded, the copy
    (same bytes, same mtime, as shutil.copy2 makes it) in done_dir, the source still there."""
    inbox, out, done = tmp_path / "inbox", tmp_path / "out", other_fs / "done"
    payload = os.urandom(200_000)
    src = old(inbox / "a.bin", payload)
    cfg = config(tmp_path, inbox, str(out))
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert journal_rows(tmp_path / "j.db")[0]["status"] == "SUCCEEDED"
    done.mkdir()
    shutil.copy2(src, done / "a.bin")  # the rename into place happened; the unlink not

    cfg = config(tmp_path, inbox, str(out), after="move", done_dir=str(done))
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(done) == {"a.bin": payload}
    assert not src.exists()
    assert delivered(out) == {"a.bin": payload}

    # a different file that only shares the name, size and mtime is not taken for the copy
    other = old(inbox / "b.bin", b"B" * 1000)
    assert run_cli("-c", config(tmp_path, inbox, str(out)), "--once").returncode == 0
    old(done / "b.bin", b"C" * 1000)
    os.utime(done / "b.bin", ns=(other.stat().st_atime_ns, other.stat().st_mtime_ns))
    cfg = config(tmp_path, inbox, str(out), after="move", done_dir=str(done))
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(done) == {
        "a.bin": payload,
        "b.bin": b"C" * 1000,
        "b-1.bin": b"B" * 1000,
    }
    assert not other.exists()


def test_a_file_brought_back_from_failed_dir_never_appears_half_written(
    tmp_path: Path, tiny_fs: Path
) -> None:
    """Retrying a dispatch whose file is in a failed_dir on another filesystem moved it back
    with shutil.move: the bytes were written straight under the file's own name in the inbox,
    so the watcher could take a half file, and a copy that stopped (a full disk here; a crash
    the same) left that half file there for good. The copy must be whole before it has its
    name: a move that cannot finish leaves the inbox as it was and says why."""
    inbox, out, failed = tiny_fs, tmp_path / "out", tmp_path / "failed"
    payload = os.urandom(600 * 1024)
    old(inbox / "a.bin", payload)
    fail = {"command": "exit 4", "retry": {"attempts": 1}}
    cfg = config(tmp_path, inbox, [fail, str(out)], failed_dir=str(failed))
    assert run_cli("-c", cfg, "--once").returncode == 1
    assert delivered(failed) == {"a.bin": payload}
    (inbox / ".filler").write_bytes(b"\0" * (600 * 1024))  # ignored (hidden): the disk is full
    row = journal_rows(tmp_path / "j.db", "relpath='a.bin' AND step=0")[0]
    config(tmp_path, inbox, [str(out)], failed_dir=str(failed))

    answer = run_cli("history", "retry", str(row["id"]), "-c", cfg)
    assert answer.returncode == 1
    assert "cannot move" in answer.stderr
    assert sorted(p.name for p in inbox.iterdir()) == [".filler"], "no half file, no leftover"
    assert delivered(failed) == {"a.bin": payload}

    (inbox / ".filler").unlink()
    answer = run_cli("history", "retry", str(row["id"]), "-c", cfg)
    assert answer.returncode == 0, answer.stderr
    assert (inbox / "a.bin").read_bytes() == payload
    assert delivered(failed) == {}
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(out) == {"a.bin": payload}


def test_an_old_journal_larger_than_a_batch_is_rekeyed_whole_and_sends_nothing_again(
    tmp_path: Path,
) -> None:
    """The start-up re-key of a journal of the previous release read it in batches of 1000,
    each batch scanning the table from its start: 200,000 rows took 68 s before the service
    watched anything (7.6 s now: the vkey index is walked once, from the last key of each
    batch). Here: 3,000 rows (three batches), 40 of them for files still kept in the inbox;
    every row is checked, no kept file is sent again, and the others stay history."""
    inbox, out, db = tmp_path / "inbox", tmp_path / "out", tmp_path / "j.db"
    cfg = config(tmp_path, inbox, str(out))
    loaded = load_config(cfg)
    source = loaded.sources[0].key
    (step_key,) = step_keys(loaded.rules[0].to)
    conn = sqlite3.connect(db)
    for migration in MIGRATIONS[:3]:
        for sql in migration:
            conn.execute(sql)
    conn.execute("PRAGMA user_version = 3")
    rows = []
    for i in range(3000):
        name = f"f{i:04d}.txt"
        if i % 75 == 0:  # kept in the inbox since it was sent
            st = old(inbox / name, b"kept %d" % i).stat()
            size, mtime_ns = st.st_size, st.st_mtime_ns
        else:  # consumed long ago
            size, mtime_ns = 10, 1_000_000_000 * (i + 1)
        rows.append((
            _old_key(source, name, size, mtime_ns), source, str(inbox), name, name, "txt",
            size, mtime_ns, step_key, str(out), time.time(), time.time(),
        ))  # fmt: skip
    conn.executemany(
        "INSERT INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
        "mtime_ns, rule, step, step_key, destination, protocol, status, attempts, created, "
        "finished) VALUES (?,?,?,?,?,?,?,?,'all',0,?,?,'file','SUCCEEDED',1,?,?)",
        rows,
    )
    conn.commit()
    conn.close()

    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert "already done: 40" in result.stdout
    assert delivered(out) == {}
    assert journal_rows(db, "ino IS NULL") == []
    kept = journal_rows(db, "ino > 0")
    assert len(kept) == 40 and len(journal_rows(db)) == 3000
    for row in kept:
        assert row["ino"] == (inbox / row["relpath"]).stat().st_ino


def test_a_retry_whose_file_is_in_failed_dir_behind_a_new_file_says_so(tmp_path: Path) -> None:
    """A file moved to failed_dir, then a new file under the same name in the inbox: a retry
    said "changed since it failed; its new version is dispatched on its own", as if the failed
    bytes would go. They would not: they are in failed_dir and cannot come back over the new
    file. The answer must say where the failed file is and why it cannot come back."""
    inbox, out, failed = tmp_path / "inbox", tmp_path / "out", tmp_path / "failed"
    old(inbox / "a.txt", b"failed bytes")
    fail = {"command": "exit 4", "retry": {"attempts": 1}}
    cfg = config(tmp_path, inbox, [fail, str(out)], failed_dir=str(failed))
    assert run_cli("-c", cfg, "--once").returncode == 1
    assert delivered(failed) == {"a.txt": b"failed bytes"}
    (inbox / "a.txt").write_bytes(b"a new file")
    (row,) = journal_rows(tmp_path / "j.db", "relpath='a.txt' AND step=0")
    config(tmp_path, inbox, [str(out)], failed_dir=str(failed))

    answer = run_cli("history", "retry", str(row["id"]), "-c", cfg)
    assert answer.returncode == 1
    assert f"the file is in {failed / 'a.txt'}" in answer.stderr
    assert "another file now has its name" in answer.stderr
    assert (inbox / "a.txt").read_bytes() == b"a new file"
    assert delivered(failed) == {"a.txt": b"failed bytes"}

    (inbox / "a.txt").rename(tmp_path / "aside.txt")
    answer = run_cli("history", "retry", str(row["id"]), "-c", cfg)
    assert answer.returncode == 0, answer.stderr
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(out) == {"a.txt": b"failed bytes"}


@pytest.mark.slow
@pytest.mark.parametrize("fastpath", ["1", "0"])
def test_kill_9_in_a_chain_with_a_move_to_another_filesystem_delivers_each_file_once(
    tmp_path: Path, other_fs: Path, service_factory: Any, fastpath: str
) -> None:
    """Two folders and a command per file, then ``after: move`` to a done_dir on another
    filesystem (a copy then a removal), killed with SIGKILL at three points and restarted:
    each folder has each file once, whole; done_dir has each file once; the inbox is empty;
    the command ran at least once per file (at least once is what a command is promised)."""
    inbox, a, b, done = tmp_path / "inbox", tmp_path / "a", tmp_path / "b", other_fs / "done"
    db, ran = tmp_path / "j.db", tmp_path / "ran"
    inbox.mkdir()
    expected = {f"f-{i:04d}.bin": os.urandom(100 + i * 37 % 20_000) for i in range(400)}
    for name, data in expected.items():
        old(inbox / name, data)
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(db),
            "workers": 4,
            "sources": [{"path": str(inbox), "settle": 0, "after": "move", "done_dir": str(done)}],
            "rules": [
                {
                    "name": "chain",
                    "glob": "*",
                    "to": [
                        {"url": str(a), "fsync": True},
                        {"command": f'echo "$FILEDISPATCH_DISPATCH_ID" >> {ran}'},
                        {"url": str(b), "fsync": True},
                    ],
                }
            ],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    env = cli_env(FILEDISPATCH_FASTPATH=fastpath)
    for threshold in (100, 500, 900):  # rows SUCCEEDED (of 1,200) when the kill comes
        svc = service_factory(cfg, env=env).start(wait_ready=False)
        wait_until(lambda t=threshold: len(journal_rows(db, "status='SUCCEEDED'")) >= t, 120, 0.01)
        svc.kill()
    result = run_cli("-c", cfg, "--once", timeout=300, env=env)
    assert result.returncode == 0, result.stderr + result.stdout

    assert delivered(a) == expected
    assert delivered(b) == expected
    assert delivered(done) == expected, "missing, doubled or partial in done_dir"
    assert list(inbox.iterdir()) == []
    assert {r["status"] for r in journal_rows(db)} == {"SUCCEEDED"}
    step1 = {str(r["id"]) for r in journal_rows(db, "step=1")}
    assert set(ran.read_text().split()) == step1


def test_a_destination_added_in_front_of_another_does_not_send_kept_files_again(
    tmp_path: Path,
) -> None:
    """A rule sends to out2 and keeps its files (after: keep). The operator adds out1 in
    front: [out1, out2]. Every kept file is sent to out2 a second time (out2/a-1.txt), because
    out2's key in the new chain names out1 too, so its old SUCCEEDED row no longer counts.
    Only transforms (compress, a Python step returning a file) change what later steps get."""
    inbox, out1, out2 = tmp_path / "inbox", tmp_path / "out1", tmp_path / "out2"
    old(inbox / "a.txt", b"kept")
    assert run_cli("-c", config(tmp_path, inbox, [str(out2)]), "--once").returncode == 0
    cfg = config(tmp_path, inbox, [str(out1), str(out2)])
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(out1) == {"a.txt": b"kept"}
    assert delivered(out2) == {"a.txt": b"kept"}, "sent twice to out2"
