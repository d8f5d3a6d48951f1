"""SFTP destinations against an asyncssh server with a generated host key and user key,
through the real CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

import asyncssh
import pytest

from .conftest import journal_rows, run_cli
from .servers import (
    FAST_RETRY,
    SftpServer,
    fails_at_once,
    files_under,
    old_file,
    remote_config,
    sha256_of,
    some_files,
)


def test_upload_with_a_key_into_nested_folders(
    workspace: dict[str, Path], sftp: SftpServer
) -> None:
    ws = workspace
    srcs = some_files(ws["inbox"], 3, 50_000)
    dest = {
        "url": sftp.url("/up/"),
        "key_file": str(sftp.key_file),
        "known_hosts": str(sftp.known_hosts),
        "name": "copies/{relpath}",
        "pool_size": 1,
    }
    result = run_cli(
        "-c", remote_config(ws, dest, source={"recursive": True}), "--once", timeout=60
    )
    assert result.returncode == 0, result.stderr
    expected = {f"up/copies/{p.relative_to(ws['inbox']).as_posix()}": sha256_of(p) for p in srcs}
    assert files_under(sftp.root) == expected  # nothing else: no temporary file is left
    rows = journal_rows(ws["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 4
    assert {r["location"] for r in rows} == {
        f"{sftp.url('/up/')}{name.removeprefix('up/')}" for name in expected
    }


def test_password_in_the_url_or_as_an_option(workspace: dict[str, Path], sftp: SftpServer) -> None:
    src = old_file(workspace["inbox"] / "a.txt", b"by password")
    known = str(sftp.known_hosts)
    cfg = remote_config(
        workspace,
        {"url": sftp.url("/p1/", password=sftp.password), "known_hosts": known},
        {"url": sftp.url("/p2/"), "password": sftp.password, "known_hosts": known},
    )
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert files_under(sftp.root) == {"p1/a.txt": sha256_of(src), "p2/a.txt": sha256_of(src)}
    rows = journal_rows(workspace["db"])
    assert {r["location"] for r in rows} == {
        f"sftp://bob:***@127.0.0.1:{sftp.port}/p1/a.txt",
        f"sftp://bob@127.0.0.1:{sftp.port}/p2/a.txt",
    }
    assert sftp.password not in result.stderr


def test_wrong_password_fails_at_once(workspace: dict[str, Path], sftp: SftpServer) -> None:
    old_file(workspace["inbox"] / "a.txt", b"x")
    dest = {"url": sftp.url("/", password="wrong-one"), "known_hosts": str(sftp.known_hosts)}
    row, stderr = fails_at_once(workspace, dest)
    assert "authentication refused" in row["reason"]
    assert "wrong-one" not in row["reason"] + stderr


def test_a_host_key_that_does_not_match_known_hosts_is_refused(
    workspace: dict[str, Path], sftp: SftpServer, tmp_path: Path
) -> None:
    other = tmp_path / "other_known_hosts"
    other.write_text(sftp.known_hosts_line(asyncssh.generate_private_key("ssh-ed25519")))
    old_file(workspace["inbox"] / "a.txt", b"x")
    dest = {"url": sftp.url("/"), "key_file": str(sftp.key_file), "known_hosts": str(other)}
    row, _ = fails_at_once(workspace, dest)
    assert "host key is not trusted" in row["reason"]
    assert files_under(sftp.root) == {}


def test_skipping_the_host_key_check_works_but_warns(
    workspace: dict[str, Path], sftp: SftpServer, tmp_path: Path
) -> None:
    src = old_file(workspace["inbox"] / "a.txt", b"x")
    dest = {
        "url": sftp.url("/"),
        "key_file": str(sftp.key_file),
        "known_hosts": str(tmp_path / "does-not-matter"),
        "insecure_skip_host_key_check": True,
    }
    result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert "WARNING" in result.stderr and "host key checking is OFF" in result.stderr
    assert files_under(sftp.root) == {"a.txt": sha256_of(src)}


# ------------------------------------------------------------ names, servers that do less, verify


def _dest(server: SftpServer, path: str = "/in/", **extra: Any) -> dict[str, Any]:
    return {
        "url": server.url(path),
        "key_file": str(server.key_file),
        "known_hosts": str(server.known_hosts),
        "retry": FAST_RETRY,
        **extra,
    }


def test_any_name_arrives_line_breaks_and_quotes_too(
    workspace: dict[str, Path], sftp: SftpServer
) -> None:
    names = ["two\nlines.txt", 'é "q";50%.txt', "tab\there.txt"]
    for name in names:
        old_file(workspace["inbox"] / name, os.fsencode(name))
    result = run_cli("-c", remote_config(workspace, _dest(sftp, verify="sha256")), "--once")
    assert result.returncode == 0, result.stderr
    arrived = {os.fsencode(p.name): p.read_bytes() for p in (sftp.root / "in").iterdir()}
    assert arrived == {os.fsencode(n): os.fsencode(n) for n in names}
    rows = journal_rows(workspace["db"])
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCEEDED", 1)}
    assert {r["sha256"] for r in rows} == {
        hashlib.sha256(os.fsencode(n)).hexdigest() for n in names
    }


class _MadeMeanwhile(asyncssh.SFTPServer):
    """Another connection makes each folder just before this one asks."""

    def mkdir(self, path: bytes, attrs: Any) -> None:
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.map_path(path))
        raise asyncssh.SFTPFailure("File exists")


def test_a_folder_another_connection_made_meanwhile_is_used(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = SftpServer(tmp_path / "root", tmp_path / "keys", sftp_class=_MadeMeanwhile)
    try:
        src = old_file(workspace["inbox"] / "v.mp4", 5000)
        cfg = remote_config(workspace, _dest(server, "/videos/in/"))
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"videos/in/v.mp4": sha256_of(src)}
        assert journal_rows(workspace["db"])[0]["attempts"] == 1
    finally:
        server.close()


class _NoRename(asyncssh.SFTPServer):
    def rename(self, oldpath: bytes, newpath: bytes) -> None:
        raise asyncssh.SFTPPermissionDenied("renaming is not allowed here")

    posix_rename = rename


def test_a_server_that_forbids_renames_fails_at_once_or_takes_the_final_name(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = SftpServer(tmp_path / "root", tmp_path / "keys", sftp_class=_NoRename)
    try:
        src = old_file(workspace["inbox"] / "a.txt", b"payload")
        row, _ = fails_at_once(workspace, _dest(server))
        assert "renaming is not allowed" in row["reason"] and "temp_name: false" in row["reason"]
        assert files_under(server.root) == {}
        workspace["db"].unlink()
        cfg = remote_config(workspace, _dest(server, temp_name=False, verify="sha256"))
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"in/a.txt": sha256_of(src)}
        assert journal_rows(workspace["db"])[0]["sha256"] == sha256_of(src)
    finally:
        server.close()


class _Shortens(asyncssh.SFTPServer):
    """Reports every file one byte short: what arrived is not what was sent."""

    def stat(self, path: bytes) -> Any:
        attrs = asyncssh.SFTPAttrs.from_local(super().stat(path))
        if attrs.size:
            attrs.size -= 1
        return attrs


def test_a_size_that_does_not_match_is_retried_and_leaves_nothing(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = SftpServer(tmp_path / "root", tmp_path / "keys", sftp_class=_Shortens)
    try:
        old_file(workspace["inbox"] / "a.bin", 1000)
        result = run_cli("-c", remote_config(workspace, _dest(server)), "--once", timeout=60)
        assert result.returncode == 1
        (row,) = journal_rows(workspace["db"])
        assert (row["status"], row["attempts"]) == ("FAILED", 3)
        assert "999 bytes arrived of 1000 sent" in row["reason"]
        assert files_under(server.root) == {}
    finally:
        server.close()


@pytest.mark.parametrize("temp_name", [True, False])
def test_an_upload_its_timeout_cuts_short_leaves_nothing_on_the_server(
    workspace: dict[str, Path], sftp: SftpServer, temp_name: bool
) -> None:
    """An upload longer than the step's ``timeout`` (8 MiB at 1 MB/s against 2 s) is
    cancelled mid-way: what it wrote (under its temporary name, or under the final name with
    ``temp_name: false``) is removed over a connection of its own before the row is FAILED.
    Before, the cancellation passed the clean-up by: the partial file stayed (the z12
    review), and with ``temp_name: false`` a later attempt took the name for taken."""
    old_file(workspace["inbox"] / "big.bin", 8 << 20)
    dest = _dest(sftp, temp_name=temp_name, bandwidth="1MB/s", timeout=2, retry={"attempts": 1})
    result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=120)
    assert result.returncode == 1, result.stderr
    [row] = journal_rows(workspace["db"])
    assert (row["status"], row["reason"]) == ("FAILED", "timed out after 2s"), row
    assert files_under(sftp.root) == {}


@pytest.mark.parametrize("scheme", ["ftp", "sftp"])
def test_temp_name_false_with_on_conflict_skip_is_refused(
    workspace: dict[str, Path], scheme: str
) -> None:
    """A partial file that an interrupted upload leaves under the final name would pass for
    the file with ``on_conflict: skip``, and the source would be consumed unsent."""
    url = f"{scheme}://user:pw@127.0.0.1:9/in/" if scheme == "ftp" else "sftp://u@127.0.0.1:9/in/"
    cfg = remote_config(workspace, {"url": url, "temp_name": False, "on_conflict": "skip"})
    result = run_cli("-c", cfg, "check", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rules[0].to[0]" in result.stderr and "on_conflict: skip" in result.stderr
    assert "Traceback" not in result.stderr and "pw@" not in result.stderr


def test_temp_name_false_with_a_postgresql_journal_is_refused(workspace: dict[str, Path]) -> None:
    """Two nodes may upload one file at once (one whose lease ran out, and the one that took
    its work over): written under the final name, their uploads could mix, or one's clean-up
    remove the other's delivered file (the z12 review, read from the code)."""
    dest = {"url": "sftp://u@127.0.0.1:9/in/", "temp_name": False}
    cfg = remote_config(workspace, dest, database="postgresql://fd@127.0.0.1:9/journal")
    result = run_cli("-c", cfg, "check", timeout=60)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rules[0].to[0].temp_name: false cannot be used with a PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr
