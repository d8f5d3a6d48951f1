"""Red team of issue 10's integrity fixes: a source moved by copying (to a folder on another
filesystem, or where a rename is refused) is never doubled and never appears half-written
under its final name. Real files, the real CLI, real mounts where the test may make them."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import delivered, journal_rows, mounted_tmpfs, old, run_cli, write_config


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
        assert result.returncode == 0, result.stderr
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
