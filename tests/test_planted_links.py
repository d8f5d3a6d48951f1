"""A link planted at a temporary name is never written through (k7 review, findings 10, 11).

The next temporary name of a delivery can be known in advance (the journal's token shows in
every temporary name, row ids count up, the file's name is the inbox's), so anyone who may
write into a destination folder can put a symbolic or hard link there before the delivery
comes. A delivery creates its temporary file anew: a local copy with O_EXCL and O_NOFOLLOW
(another name when what is there is not a plain file of ours), an SFTP upload exclusively
(what is at our name is removed, which takes away a link and never what it points to).

Real files, a real asyncssh server on loopback, the real CLI or service as a subprocess.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from filedispatch.journal import open_journal

from .conftest import ServiceProcess, journal_rows, run_cli, wait_until
from .servers import SftpServer, deliver_once, old_file, remote_config


def _ws(root: Path) -> dict[str, Path]:
    return {"root": root, "inbox": root / "inbox", "db": root / "journal.db"}


def _token_of(db: Path) -> str:
    """The token of the SQLite journal at ``db``, made now if it is new (anyone who can list
    the destination reads it from a temporary name: ``.filedispatch-tmp-<token>-...``)."""

    async def read() -> str:
        async with open_journal(db) as journal:
            return journal.token

    return asyncio.run(read())


def _plant(tmp_path: Path, victim: Path, data: bytes) -> tuple[Path, Path, dict[str, Path]]:
    """A server's upload folder root/in, a symbolic link planted there at the next temporary
    name of row 1 (a.txt), to ``victim`` (made, with ``data``); (the folder, the link, the
    service's workspace, its inbox holding a.txt)."""
    out = tmp_path / "root" / "in"
    out.mkdir(parents=True)
    victim.write_bytes(data)
    ws = _ws(tmp_path / "svc")
    planted = out / f".filedispatch-tmp-{_token_of(ws['db'])}-1-a.txt"
    planted.symlink_to(victim)
    return out, planted, ws


def test_a_link_planted_at_the_next_temporary_name_over_sftp_is_never_written_through(
    tmp_path: Path,
) -> None:
    """A writer of the SFTP upload folder plants a symbolic link at the next temporary name,
    to a file the service's account may write (outside the upload area; on a real server,
    its ``~/.ssh/authorized_keys``). The upload used to open the name with ``wb``: it
    truncated that file and wrote the inbox file into it, and the rename gave the link the
    final name. Now the link is removed and the file uploaded: a.txt is a file, not a link."""
    server = SftpServer(tmp_path / "root", tmp_path / "keys")
    victim = tmp_path / "victim.txt"
    out, planted, ws = _plant(tmp_path, victim, b"the account's own file")
    old_file(ws["inbox"] / "a.txt", b"ssh-ed25519 AAAA... the inbox writer's key")
    step = {
        "url": server.url("/in/"),
        "key_file": str(server.key_file),
        "known_hosts": str(server.known_hosts),
    }
    try:
        result = run_cli("-c", remote_config(ws, step), "--once", timeout=90)
    finally:
        server.close()
    assert victim.read_bytes() == b"the account's own file", (
        f"the upload wrote through the planted link; a.txt is a link: "
        f"{(out / 'a.txt').is_symlink()}\n{result.stderr[-2000:]}"
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert not (out / "a.txt").is_symlink()
    assert (out / "a.txt").read_bytes() == b"ssh-ed25519 AAAA... the inbox writer's key"
    assert not os.path.lexists(planted)
    assert journal_rows(ws["db"], "status = 'SUCCEEDED'")


def test_a_link_planted_at_the_predictable_ftp_temporary_name_is_left_alone(
    tmp_path: Path,
) -> None:
    """FTP has no exclusive create: ``STOR`` writes whatever the server finds at the name,
    through a link if the server follows it (pyftpdlib does, inside the user's home). So an
    FTP temporary name has six random characters after the id: a link planted at what used
    to be the next temporary name (here to another file of the upload area) is never
    reached, and stays as it was."""
    from .servers import FtpServer

    server = FtpServer(tmp_path / "root")
    victim = tmp_path / "root" / "keep.txt"
    out, planted, ws = _plant(tmp_path, victim, b"another user's file")
    old_file(ws["inbox"] / "a.txt", b"the inbox file")
    try:
        result = run_cli("-c", remote_config(ws, {"url": server.url("/in/")}), "--once")
    finally:
        server.stop()
    assert victim.read_bytes() == b"another user's file", result.stderr[-2000:]
    assert result.returncode == 0, result.stderr[-2000:]
    assert (out / "a.txt").read_bytes() == b"the inbox file"
    assert planted.is_symlink() and os.readlink(planted) == str(victim)
    assert sorted(p.name for p in out.iterdir()) == sorted(["a.txt", planted.name])


@pytest.mark.parametrize("link", ["hard", "symbolic"])
def test_a_hard_link_planted_at_the_next_temporary_name_is_never_written_through(
    tmp_path: Path, link: str
) -> None:
    """The local form, while the service runs (the start-up sweep would remove a link planted
    before the start). A writer of the destination folder who may link to a file there (its
    owner, or one with write access to it, as for a group-writable ``file_mode``) plants a
    hard link to yesterday's delivery at the next temporary name: the copy used to open the
    name with O_TRUNC (no O_EXCL), so yesterday's file was overwritten by today's, then
    renamed to today's name. Or a symbolic link, to a file outside the destination. Now the
    copy takes another temporary name: the linked file is untouched, the link stays."""
    out = tmp_path / "out"
    out.mkdir()
    yesterday = (out if link == "hard" else tmp_path) / "report-1.csv"
    yesterday.write_bytes(b"yesterday's report")
    ws = _ws(tmp_path / "svc")
    ws["inbox"].mkdir(parents=True)
    token = _token_of(ws["db"])
    planted = out / f".filedispatch-tmp-{token}-1-report-2.csv"
    service = ServiceProcess(remote_config(ws, {"url": out.as_uri()}))
    try:
        service.start()
        if link == "hard":
            os.link(yesterday, planted)
        else:
            planted.symlink_to(yesterday)
        old_file(ws["inbox"] / "report-2.csv", b"today's report")
        wait_until(lambda: journal_rows(ws["db"], "status = 'SUCCEEDED'"), 60)
    finally:
        service.stop()
    assert yesterday.read_bytes() == b"yesterday's report", service.log()[-2000:]
    assert (out / "report-2.csv").read_bytes() == b"today's report"
    assert not (out / "report-2.csv").is_symlink()
    assert planted.is_symlink() == (link == "symbolic")
    assert os.path.samefile(planted, yesterday), "the planted link is left as it was"
    assert "is not a file of ours" in service.log()


def test_a_plain_file_of_ours_at_the_temporary_name_is_replaced_and_a_salted_name_is_ours(
    tmp_path: Path,
) -> None:
    """What is at the name and is a plain file of ours (a copy an attempt left) is removed and
    the name made again: no second temporary file stays. A salted name (taken beside a planted
    link) keeps the row's prefix: a resume (``earlier_temps``) and the start-up sweep remove it
    like any temporary name of the journal, and another journal's stays."""
    from filedispatch.config import load_config
    from filedispatch.models import FileVersion
    from filedispatch.processors import StepContext
    from filedispatch.processors.common import earlier_temps, fresh_salt, temp_name
    from filedispatch.processors.local import sweep_temporaries

    token, other = "0a1b2c3d", "9f8e7d6c"
    out = tmp_path / "out"
    out.mkdir()
    ws = _ws(tmp_path)
    config = load_config(remote_config(ws, {"url": out.as_uri()}))
    source = config.sources[0]
    src = old_file(ws["inbox"] / "a.txt", b"the file")
    (out / temp_name(7, "a.txt", None, token)).write_bytes(b"an earlier attempt's hal")
    version = FileVersion.from_stat(source.key, source.path, "a.txt", os.stat(src))
    ctx = StepContext(7, version, src, "remote", 0, 2, tmp_path / "work", journal=token)

    deliver_once(config.rules[0].to[0], ctx)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {"a.txt": b"the file"}

    salt = fresh_salt()
    assert len(salt) == 6 and salt != fresh_salt()
    salted = temp_name(7, "a.txt", 3, token, salt)
    assert salted == f".filedispatch-tmp-{token}-7-e3-{salt}-a.txt"
    assert len(temp_name(123456789, "€" * 200 + ".csv", 2**62, token, salt).encode()) <= 255
    assert earlier_temps([salted, temp_name(7, "a.txt", 3, other, salt)], 7, "a.txt", token) == [
        salted
    ]
    (out / salted).write_bytes(b"left by a crash")
    (out / temp_name(7, "a.txt", None, other, salt)).write_bytes(b"another journal's")
    assert sweep_temporaries([out], token) == 1
    assert not (out / salted).exists()
    assert (out / temp_name(7, "a.txt", None, other, salt)).exists()


def test_a_link_planted_at_a_moves_hidden_name_is_never_written_through(tmp_path: Path) -> None:
    """A move by copy (``done_dir``, ``failed_dir`` on another filesystem) writes its copy
    under ``.filedispatch-move-<tag>-NAME`` (the tag is a hash of the source's path, so
    anyone can work it out) beside the target. It used to open that name with ``wb``
    (following a link, truncating); now what is there is removed and the name made anew."""
    import hashlib

    from filedispatch.relocate import move_by_copy

    src = old_file(tmp_path / "inbox" / "a.txt", b"the inbox file")
    done = tmp_path / "done"
    done.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"the account's own file")
    tag = hashlib.sha256(os.fsencode(src)).hexdigest()[:12]
    (done / f".filedispatch-move-{tag}-a.txt").symlink_to(victim)
    placed = move_by_copy(src, done / "a.txt", lambda: True, any_free_name=True)
    assert victim.read_bytes() == b"the account's own file"
    assert placed == done / "a.txt" and not placed.is_symlink()
    assert placed.read_bytes() == b"the inbox file"
    assert sorted(p.name for p in done.iterdir()) == ["a.txt"] and not src.exists()


@pytest.mark.parametrize("kind", ["local", "sftp"])
def test_a_folder_planted_at_the_temporary_name_does_not_stop_the_delivery(
    tmp_path: Path, kind: str
) -> None:
    """Anyone who may write in the destination folder can know the next temporary name (the
    token is in every earlier one, row ids count up) and make a folder there. A local copy
    takes a salted name; an SFTP upload did not (r8 review): its exclusive create found the
    name taken, the removal of a folder failed, and every attempt failed "Is a directory"
    until the row FAILED. Now both take a salted name and deliver; the folder stays."""
    from .servers import resume
    from .test_cluster_temps import _sftp

    token = "0a1b2c3d"
    server: Any = None
    if kind == "sftp":
        server, to = _sftp(tmp_path)
        out = tmp_path / "root" / "in"
    else:
        out = tmp_path / "out"
        to = {"url": out.as_uri()}
    out.mkdir(parents=True)
    planted = out / f".filedispatch-tmp-{token}-7-a.txt"
    planted.mkdir()
    try:
        got = resume(tmp_path, to, b"the file's bytes\n", "a.txt", None, token)
    finally:
        if server is not None:
            server.close()
    assert not isinstance(got, BaseException), f"{type(got).__name__}: {got}"
    assert (out / "a.txt").read_bytes() == b"the file's bytes\n"
    assert planted.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [planted.name, "a.txt"]


def test_a_file_renamed_onto_our_temporary_while_we_write_is_never_published(
    tmp_path: Path,
) -> None:
    """While a paced copy (``bandwidth``) of a.bin is written under its temporary name, a
    writer of the destination folder renames a file of their own onto that name. The copy
    wrote on into its own, now nameless, file and the rename by name published theirs as
    a.bin, SUCCEEDED (r8 review). Now the name is checked to still be our file just before
    the rename: that attempt fails, the next delivers our bytes."""
    ws = _ws(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    cfg = remote_config(ws, {"url": out.as_uri(), "bandwidth": "1MB/s"})
    data = os.urandom(3 << 20)
    theirs = out / "theirs"
    theirs.write_bytes(b"not what was sent\n")

    def temporary() -> list[str]:
        return [n for n in os.listdir(out) if n.startswith(".filedispatch-tmp-")]

    svc = ServiceProcess(cfg)
    try:
        svc.start()
        old_file(ws["inbox"] / "a.bin", data)
        wait_until(lambda: bool(temporary()), 60)
        os.rename(theirs, out / temporary()[0])
        wait_until(lambda: [r["status"] for r in journal_rows(ws["db"])] == ["SUCCEEDED"], 90)
    finally:
        svc.stop(60)
    assert (out / "a.bin").read_bytes() == data
    assert [r["attempts"] for r in journal_rows(ws["db"])] == [2]


def test_a_file_renamed_onto_a_moves_hidden_name_is_never_placed_for_the_source(
    tmp_path: Path,
) -> None:
    """A move by copy (``done_dir`` on another filesystem) is renamed into place by name: a
    file renamed onto its hidden name after the copy was placed instead, and the source
    removed, so the source's bytes were nowhere (r8 review, same kind as the copy above).
    Now the move sees the hidden name no longer holds its copy and stops: the source stays,
    the other file is not placed."""
    from filedispatch.relocate import move_by_copy

    src = old_file(tmp_path / "inbox" / "a.txt", b"the inbox file")
    done = tmp_path / "done"
    done.mkdir()
    theirs = tmp_path / "theirs"
    theirs.write_bytes(b"someone else's")

    def swap_then_say_unchanged() -> bool:  # runs after the copy, before its rename
        (hidden,) = done.iterdir()
        os.rename(theirs, hidden)
        return True

    with pytest.raises(OSError, match="was replaced by another file"):
        move_by_copy(src, done / "a.txt", swap_then_say_unchanged, any_free_name=True)
    assert src.read_bytes() == b"the inbox file"
    assert not (done / "a.txt").exists()
