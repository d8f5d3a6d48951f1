"""FTP destinations against pyftpdlib (a server written independently of aioftp), with a real
user and folder, through the real CLI."""

from __future__ import annotations

import contextlib
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServiceProcess, journal_rows, run_cli, wait_until
from .servers import (
    FAST_RETRY,
    FtpServer,
    fails_at_once,
    files_under,
    old_file,
    remote_config,
    resume,
    self_signed,
    sha256_of,
    some_files,
)


@pytest.fixture
def ftps(tmp_path: Path) -> Iterator[FtpServer]:
    """FTPS with a self-signed certificate (``ftps.tls[0]``, its own CA): pyftpdlib refuses
    USER before AUTH TLS, and EPSV/PASV before PBSZ 0 + PROT P (a protected data channel)."""
    server = FtpServer(tmp_path / "ftpsroot", tls=self_signed(tmp_path / "tls"))
    yield server
    server.stop()


def test_upload_into_nested_folders_with_one_login(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    ws = workspace
    srcs = some_files(ws["inbox"], 5, 10_000)
    dest = {"url": ftp.url("/drop/"), "name": "{yyyy}/{relpath}", "pool_size": 1}
    cfg = remote_config(ws, dest, source={"recursive": True})
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    year = time.strftime("%Y", time.localtime(srcs[0].stat().st_mtime))
    expected = {f"drop/{year}/{p.relative_to(ws['inbox']).as_posix()}": sha256_of(p) for p in srcs}
    assert files_under(ftp.root) == expected  # no temporary file left behind
    rows = journal_rows(ws["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 6
    assert all(r["location"].startswith("ftp://alice:***@127.0.0.1") for r in rows)
    assert ftp.password not in result.stderr
    assert ftp.logins == 1  # six files, one pooled connection


def test_on_conflict_rename_and_skip(workspace: dict[str, Path], ftp: FtpServer) -> None:
    (ftp.root / "in").mkdir()
    (ftp.root / "in" / "a.txt").write_bytes(b"already there")
    old_file(workspace["inbox"] / "a.txt", b"new")
    cfg = remote_config(
        workspace,
        {"url": ftp.url("/in/"), "on_conflict": "rename"},
        {"url": ftp.url("/in/"), "name": "skip-{name}", "on_conflict": "skip"},
    )
    (ftp.root / "in" / "skip-a.txt").write_bytes(b"keep me")
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert (ftp.root / "in" / "a.txt").read_bytes() == b"already there"
    assert (ftp.root / "in" / "a-1.txt").read_bytes() == b"new"
    assert (ftp.root / "in" / "skip-a.txt").read_bytes() == b"keep me"
    assert sorted(p.name for p in (ftp.root / "in").iterdir()) == [
        "a-1.txt",
        "a.txt",
        "skip-a.txt",
    ]


def test_wrong_password_fails_at_once_with_a_clear_reason(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    old_file(workspace["inbox"] / "a.txt", b"x")
    row, stderr = fails_at_once(workspace, {"url": ftp.url("/", password="nope")})
    assert "login refused" in row["reason"] and "530" in row["reason"]
    assert "nope" not in row["reason"] + stderr


def test_server_down_then_back_is_delivered_after_retries(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    # States, not durations: the server comes back only once the journal shows a retry
    src = old_file(workspace["inbox"] / "a.bin", 100_000)
    ftp.stop()
    retry = {"attempts": 1000, "delay": 0.05, "backoff": 1, "jitter": False}
    cfg = remote_config(workspace, {"url": ftp.url("/x/"), "retry": retry, "connect_timeout": 1})
    svc = ServiceProcess(cfg, "--once").start(wait_ready=False)
    try:
        wait_until(lambda: [r for r in journal_rows(workspace["db"]) if r["attempts"] >= 2], 60)
        ftp.start()
        assert svc.proc is not None
        assert svc.proc.wait(60) == 0, svc.log()
    finally:
        svc.kill()
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "SUCCEEDED" and row["attempts"] > 1
    assert files_under(ftp.root) == {"x/a.bin": sha256_of(src)}


def test_kill_mid_upload_leaves_no_partial_file_and_resumes(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    root = tmp_path / "slowroot"
    slow = FtpServer(root, read_limit=2 * 1024 * 1024)  # 2 MiB/s: the upload takes seconds
    try:
        src = old_file(workspace["inbox"] / "big.bin", 12 * 1024 * 1024)
        cfg = remote_config(workspace, {"url": slow.url("/in/"), "retry": FAST_RETRY})
        svc = ServiceProcess(cfg).start()
        try:
            partial = wait_until(
                lambda: [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 0]
            )
        finally:
            svc.kill()
        assert not (root / "in" / "big.bin").exists()
        assert all(p.name.startswith(".filedispatch-tmp-") for p in partial)
        assert journal_rows(workspace["db"])[0]["status"] == "IN_PROGRESS"
    finally:
        slow.stop()
    fast = FtpServer(root, port=slow.port)
    try:
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(root) == {"in/big.bin": sha256_of(src)}  # the temp file is gone
        (row,) = journal_rows(workspace["db"])
        assert row["status"] == "SUCCEEDED"
    finally:
        fast.stop()


def test_a_pooled_connection_the_server_dropped_is_replaced(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    cfg = remote_config(workspace, {"url": ftp.url("/x/"), "retry": FAST_RETRY, "pool_size": 1})
    svc = ServiceProcess(cfg).start()
    try:
        first = old_file(workspace["inbox"] / "first.dat", 1000)
        wait_until(lambda: (ftp.root / "x" / "first.dat").exists())
        ftp.stop()  # the idle pooled connection dies with the server
        ftp.start()
        second = old_file(workspace["inbox"] / "second.dat", 2000)
        wait_until(lambda: len(journal_rows(workspace["db"], "status='SUCCEEDED'")) == 2)
    finally:
        svc.stop()
    assert files_under(ftp.root) == {
        "x/first.dat": sha256_of(first),
        "x/second.dat": sha256_of(second),
    }
    assert ftp.logins == 2  # one login before the restart, one after
    (row,) = journal_rows(workspace["db"], "filename='second.dat'")
    assert row["attempts"] == 2  # the first try met the dead connection, and dropped it


def test_ftps_upload_trusting_the_ca_file(workspace: dict[str, Path], ftps: FtpServer) -> None:
    assert ftps.tls is not None
    srcs = [old_file(workspace["inbox"] / f"f{i}.dat", 5_000 + i) for i in range(3)]
    dest = {"url": ftps.url("/secure/"), "ca_file": str(ftps.tls[0]), "pool_size": 1}
    result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    # the server refuses a login and a data connection without TLS: these went encrypted
    assert files_under(ftps.root) == {f"secure/{p.name}": sha256_of(p) for p in srcs}
    rows = journal_rows(workspace["db"])
    assert {r["status"] for r in rows} == {"SUCCEEDED"} and len(rows) == 3
    assert all(r["location"].startswith("ftps://alice:***@127.0.0.1") for r in rows)
    assert ftps.logins == 1
    assert "WARNING" not in result.stderr and ftps.password not in result.stderr


def test_ftps_untrusted_certificate_fails_at_once(
    workspace: dict[str, Path], ftps: FtpServer
) -> None:
    old_file(workspace["inbox"] / "a.txt", b"secret data")
    row, stderr = fails_at_once(workspace, {"url": ftps.url("/secure/")})  # verify is on
    assert "certificate is not trusted" in row["reason"], row["reason"]
    assert "ca_file, or tls_verify: false" in row["reason"]
    assert ftps.logins == 0 and files_under(ftps.root) == {}
    assert ftps.password not in row["reason"] + stderr


def test_ftps_verify_false_delivers_and_warns(workspace: dict[str, Path], ftps: FtpServer) -> None:
    src = old_file(workspace["inbox"] / "a.bin", 20_000)
    dest = {"url": ftps.url("/secure/"), "verify": False}
    result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert files_under(ftps.root) == {"secure/a.bin": sha256_of(src)}
    assert "WARNING" in result.stderr and "TLS certificate checking is OFF" in result.stderr
    assert ftps.password not in result.stderr


# ------------------------------------------------------------ names, servers that do less


def test_a_name_ftp_cannot_carry_fails_at_once_and_others_arrive(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    odd = old_file(workspace["inbox"] / 'é "q";50%.txt', b"odd but fine")
    old_file(workspace["inbox"] / "two\nlines.txt", b"cannot travel")
    cfg = remote_config(workspace, {"url": ftp.url("/in/"), "retry": FAST_RETRY})
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 1, result.stderr
    rows = {r["relpath"]: r for r in journal_rows(workspace["db"])}
    bad = rows["two\nlines.txt"]
    assert (bad["status"], bad["attempts"]) == ("FAILED", 1)
    assert "line break" in bad["reason"]
    assert rows[odd.name]["status"] == "SUCCEEDED"
    assert files_under(ftp.root) == {f"in/{odd.name}": sha256_of(odd)}


def _mkd_made_meanwhile(self: Any, path: str) -> None:
    """Another connection makes the folder just before this one asks: MKD answers 550."""
    with contextlib.suppress(FileExistsError):
        os.mkdir(path)
    self.respond("550 File exists.")


def _mkd_parent_vanishes() -> Any:
    """The first MKD of ``.../in`` finds its parent removed by someone meanwhile."""
    from pyftpdlib.handlers import FTPHandler

    vanished: list[str] = []

    def mkd(self: Any, path: str) -> None:
        if path.endswith("/in") and not vanished:
            vanished.append(path)
            os.rmdir(os.path.dirname(path))
            self.respond("550 No such file or directory.")
            return
        FTPHandler.ftp_MKD(self, path)

    return mkd


@pytest.mark.parametrize(
    "mkd",
    [_mkd_made_meanwhile, _mkd_parent_vanishes()],
    ids=["made-meanwhile", "parent-removed-meanwhile"],
)
def test_folders_are_made_safely_against_other_connections(
    workspace: dict[str, Path], tmp_path: Path, mkd: Any
) -> None:
    server = FtpServer(tmp_path / "root", overrides={"ftp_MKD": mkd})
    try:
        src = old_file(workspace["inbox"] / "v.mp4", 5000)
        cfg = remote_config(workspace, {"url": server.url("/videos/in/"), "retry": FAST_RETRY})
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"videos/in/v.mp4": sha256_of(src)}
        (row,) = journal_rows(workspace["db"])
        assert row["attempts"] == 1
    finally:
        server.stop()


def test_a_hundred_files_into_a_new_folder_over_the_default_pool(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    srcs = [old_file(workspace["inbox"] / f"c{i:03d}.mp4", 200 + i) for i in range(100)]
    cfg = remote_config(workspace, {"url": ftp.url("/videos/in/"), "retry": {"attempts": 1}})
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    assert files_under(ftp.root) == {f"videos/in/{p.name}": sha256_of(p) for p in srcs}


def _refuse(reply: str) -> Any:
    def handler(self: Any, arg: str) -> None:
        self.respond(reply)

    return handler


def test_a_server_that_forbids_renames_fails_at_once_or_takes_the_final_name(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = FtpServer(
        tmp_path / "root", overrides={"ftp_RNFR": _refuse("502 Command not implemented.")}
    )
    try:
        src = old_file(workspace["inbox"] / "a.txt", b"payload")
        row, _ = fails_at_once(workspace, {"url": server.url("/in/")})
        assert "502" in row["reason"] and "temp_name: false" in row["reason"]
        assert files_under(server.root) == {}  # the temporary file was removed
        workspace["db"].unlink()
        cfg = remote_config(workspace, {"url": server.url("/in/"), "temp_name": False})
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"in/a.txt": sha256_of(src)}
        (row,) = journal_rows(workspace["db"])
        assert (row["status"], row["sha256"]) == ("SUCCEEDED", sha256_of(src))
    finally:
        server.stop()


def test_a_server_that_will_not_rename_over_a_file_gets_it_deleted_first(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    from pyftpdlib.handlers import FTPHandler

    def rnto(self: Any, path: str) -> None:
        if os.path.exists(path):
            self.respond("550 File exists.")
            return
        FTPHandler.ftp_RNTO(self, path)

    server = FtpServer(tmp_path / "root", overrides={"ftp_RNTO": rnto})
    try:
        (server.root / "in").mkdir()
        (server.root / "in" / "a.txt").write_bytes(b"old")
        src = old_file(workspace["inbox"] / "a.txt", b"new content")
        dest = {"url": server.url("/in/"), "on_conflict": "overwrite", "retry": FAST_RETRY}
        result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"in/a.txt": sha256_of(src)}
        assert journal_rows(workspace["db"])[0]["attempts"] == 1
    finally:
        server.stop()


@pytest.mark.parametrize("missing", ["MLST", "SIZE", "EPSV"])
def test_a_server_without_a_command_is_served_by_the_fallback(
    workspace: dict[str, Path], tmp_path: Path, missing: str
) -> None:
    server = FtpServer(tmp_path / "root", without=(missing,))
    try:
        (server.root / "in").mkdir()
        (server.root / "in" / "a.txt").write_bytes(b"already there")
        src = old_file(workspace["inbox"] / "a.txt", b"second a")
        dest = {"url": server.url("/in/"), "retry": {"attempts": 1}, "verify": "size"}
        result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root)["in/a-1.txt"] == sha256_of(src)
        assert (server.root / "in" / "a.txt").read_bytes() == b"already there"
    finally:
        server.stop()


# ------------------------------------------------------------ verify


def _xsha256(lie: bool = False) -> Any:
    def handler(self: Any, arg: str) -> None:
        with open(arg, "rb") as f:  # pyftpdlib gives the real path
            digest = hashlib.sha256(f.read()).hexdigest()
        self.respond(f"213 {'0' * 64 if lie else digest}")

    return handler


def test_verify_sha256_asks_a_server_that_can_hash(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    server = FtpServer(tmp_path / "root", overrides={"ftp_XSHA256": _xsha256()})
    try:
        src = old_file(workspace["inbox"] / "a.bin", 300_000)
        dest = {"url": server.url("/in/"), "verify": "sha256", "retry": {"attempts": 1}}
        cfg = remote_config(workspace, dest)
        assert run_cli("check", "-c", cfg).returncode == 0
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        assert files_under(server.root) == {"in/a.bin": sha256_of(src)}
        (row,) = journal_rows(workspace["db"])
        assert row["sha256"] == sha256_of(src)
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("verify", "overrides", "reason"),
    [
        ("sha256", {"ftp_XSHA256": _xsha256(lie=True)}, "is not the one sent"),
        ("size", {"ftp_SIZE": _refuse("213 7")}, "7 bytes arrived of 1000 sent"),
    ],
)
def test_what_arrived_not_matching_is_retried_and_leaves_nothing(
    workspace: dict[str, Path], tmp_path: Path, verify: str, overrides: Any, reason: str
) -> None:
    server = FtpServer(tmp_path / "root", overrides=overrides)
    try:
        old_file(workspace["inbox"] / "a.bin", 1000)
        dest = {"url": server.url("/in/"), "verify": verify, "retry": FAST_RETRY}
        result = run_cli("-c", remote_config(workspace, dest), "--once", timeout=60)
        assert result.returncode == 1
        (row,) = journal_rows(workspace["db"])
        assert (row["status"], row["attempts"]) == ("FAILED", 3)
        assert "verify" in row["reason"] and reason in row["reason"]
        assert files_under(server.root) == {}
    finally:
        server.stop()


def test_verify_sha256_on_a_server_that_cannot_hash_is_refused_by_check_and_at_once(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    old_file(workspace["inbox"] / "a.bin", 1000)
    dest = {"url": ftp.url("/in/"), "verify": "sha256"}
    checked = run_cli("check", "-c", remote_config(workspace, {**dest, "retry": FAST_RETRY}))
    assert checked.returncode == 2
    assert "verify: sha256 needs the server's HASH" in checked.stderr
    assert ftp.password not in checked.stdout + checked.stderr
    row, _ = fails_at_once(workspace, dest)
    assert "HASH" in row["reason"] and "XSHA256" in row["reason"]
    assert files_under(ftp.root) == {}


def test_a_transfer_the_server_breaks_off_is_classified_by_its_reply(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    from pyftpdlib.handlers import DTPHandler

    class Quota(DTPHandler):  # type: ignore[misc]
        """Takes 256 KiB, then closes the data connection and replies 552."""

        def handle_read(self) -> None:
            super().handle_read()
            if self.tot_bytes_received > 256 * 1024 and not self._closed:
                self._resp = ("552 Exceeded storage allocation (quota).", lambda *a: None)
                self.close()

        handle_read_event = handle_read  # pyftpdlib calls this alias

    server = FtpServer(tmp_path / "root", overrides={"dtp_handler": Quota})
    try:
        old_file(workspace["inbox"] / "big.bin", 8 * 1024 * 1024)
        row, _ = fails_at_once(workspace, {"url": server.url("/in/")})
        assert "552 Exceeded storage allocation" in row["reason"]
        assert files_under(server.root) == {}
    finally:
        server.stop()


# ------------------------------------------------------------------ a folder anyone writes in


def _resume_into(tmp_path: Path, server: FtpServer) -> Any:
    """Resume row 7 under claim 5 (a node of several took it over), delivering inbox/a.txt to
    ``server``'s /in/: the outcome, or the exception the delivery raised. A resume lists the
    folder to remove what earlier claims of the row left."""
    return resume(tmp_path, {"url": server.url("/in/")})


@pytest.mark.parametrize(
    ("name", "without"),
    [
        (os.fsdecode(b"caf\xe9.txt"), ()),  # Latin-1 from an old client, over MLSD
        (os.fsdecode(b"caf\xe9.txt"), ("MLSD",)),  # the same over LIST (vsftpd has no MLSD)
        ("two\nlines.txt", ("MLSD",)),  # a line break: a LIST line no parser reads
    ],
    ids=["latin-1-mlsd", "latin-1-list", "line-break-list"],
)
def test_a_name_aioftp_cannot_read_does_not_stop_a_resumed_delivery(
    tmp_path: Path, name: str, without: tuple[str, ...]
) -> None:
    """Someone else's file in the destination folder has a name aioftp cannot read from the
    listing (the server sends it as the bytes it is, as vsftpd and ProFTPD do). A resumed
    delivery lists the folder to remove an earlier claim's temporary file: the file is still
    delivered, and the earlier claim's copy removed. Before (a6 review): aioftp's
    UnicodeDecodeError or ValueError ended the delivery, and every retry alike (each a resume
    that lists again), until the row was FAILED."""
    from filedispatch.processors.common import temp_name

    out = tmp_path / "root" / "in"
    out.mkdir(parents=True)
    (out / name).write_bytes(b"someone else's")
    earlier = temp_name(7, "a.txt", 2)
    (out / earlier).write_bytes(b"half")
    server = FtpServer(
        tmp_path / "root", overrides={"unicode_errors": "surrogateescape"}, without=without
    )
    try:
        outcome = _resume_into(tmp_path, server)
    finally:
        server.stop()
    assert not isinstance(outcome, BaseException), f"the resumed delivery failed: {outcome!r}"
    assert (out / "a.txt").read_bytes() == b"the file"
    assert not (out / earlier).exists()
    assert (out / name).read_bytes() == b"someone else's"


# ------------------------------------------------------------------ what a resume takes for its own

#: the journal token of the resumed row in the tests below
_TOKEN = "0a1b2c3d"


def _server(kind: str, tmp_path: Path) -> tuple[Any, dict[str, Any]]:
    """A server of ``kind`` rooted at tmp_path/root, and a destination to its /in/."""
    if kind == "sftp":
        from .test_cluster_temps import _sftp

        return _sftp(tmp_path)
    overrides = {"ftp_XSHA256": _xsha256()} if kind == "ftp-hash" else None
    server = FtpServer(tmp_path / "root", overrides=overrides)
    return server, {"url": server.url("/in/")}


@pytest.mark.parametrize("kind", ["ftp", "ftp-hash", "sftp"])
def test_a_resume_takes_only_a_file_with_its_own_bytes_for_an_earlier_delivery(
    tmp_path: Path, kind: str
) -> None:
    """A file of our name and size is at the destination (another journal's delivery into the
    same folder, a user's). Our row's first attempt failed, so its retry is a resume, which
    used to take any file of our size for our earlier delivery: ours was never sent, the row
    SUCCEEDED and the source was consumed (k7 review). Now the candidate is read back (or
    hashed by the server, ftp-hash) and compared: theirs stays, ours lands beside it
    (``on_conflict: rename``); a file with our very bytes is still found delivered."""
    out = tmp_path / "root" / "in"
    out.mkdir(parents=True)
    (out / "a.bin").write_bytes(b"T" * 4096)  # someone else's, of our size
    server, to = _server(kind, tmp_path)
    try:
        outcome = resume(tmp_path, to, b"O" * 4096, "a.bin", None, _TOKEN)
        assert not isinstance(outcome, BaseException), outcome
        held = {p.name: p.read_bytes()[:1] for p in out.iterdir() if p.is_file()}
        assert held == {"a.bin": b"T", "a-1.bin": b"O"}, (outcome.detail, outcome.location)
        (tmp_path / "again").mkdir()
        again = resume(tmp_path / "again", to, b"O" * 4096, "a.bin", None, _TOKEN)
    finally:
        server.close() if kind == "sftp" else server.stop()
    assert not isinstance(again, BaseException), again
    assert again.detail == "found delivered by an earlier attempt"


def _like_vsftpd(root: Path) -> FtpServer:
    """An FTP server that lists as vsftpd does by default (``force_dot_files=NO``; pure-ftpd
    without ``-D`` is alike): no MLSD, and LIST leaves out names that begin with a dot unless
    the client asks ``LIST -a``."""
    from pyftpdlib.filesystems import AbstractedFS
    from pyftpdlib.handlers import FTPHandler

    class HidingFS(AbstractedFS):  # type: ignore[misc]
        def listdir(self, path: str) -> list[str]:
            names: list[str] = super().listdir(path)
            if getattr(self.cmd_channel, "dot_files", False):
                return names
            return [n for n in names if not n.startswith(".")]

    def pre_process_command(handler: Any, line: str, cmd: str, arg: str) -> Any:
        handler.dot_files = False
        if cmd == "LIST" and arg.startswith("-"):
            options, _, arg = arg.partition(" ")
            handler.dot_files = "a" in options
        return FTPHandler.pre_process_command(handler, line, cmd, arg)

    overrides = {"abstracted_fs": HidingFS, "pre_process_command": pre_process_command}
    return FtpServer(root, overrides=overrides, without=("MLSD",))


@pytest.mark.parametrize(
    ("case", "earlier", "name", "epoch"),
    [
        # an SQLite row (no epoch) whose earlier attempt rendered another name ({now})
        ("sqlite-now", f".filedispatch-tmp-{_TOKEN}-7-20250101000000-a.txt", "{now}", None),
        # a file whose name ends in a blank: aioftp strips blanks from the listing's lines
        ("trailing-blank", f".filedispatch-tmp-{_TOKEN}-7-e2-a.txt ", "a.txt ", 5),
        # the same in a name holding " -> ", which only a LIST line of a link has a meaning
        # for (r8 review: MLSD's lines were read as a link's, and kept the blank off)
        ("arrow-and-blank", f".filedispatch-tmp-{_TOKEN}-7-e2-x -> y.txt ", "x -> y.txt ", 5),
        # a server that lists dot files only when asked LIST -a (vsftpd, pure-ftpd)
        ("hides-dot-files", f".filedispatch-tmp-{_TOKEN}-7-e2-a.txt", "a.txt", 5),
    ],
)
def test_a_resume_removes_what_earlier_attempts_of_its_row_left(
    tmp_path: Path, case: str, earlier: str, name: str, epoch: int | None
) -> None:
    """An earlier attempt of row 7 left a half-upload under a temporary name; the resume
    removes it (no start-up sweep reaches an FTP server: it would stay for good) and delivers.
    Each case failed before (k7 review; r8 for the arrow): the SQLite resume removed only the
    name it renders now; aioftp's listing cut the trailing blank, so the removal missed; a
    plain LIST on vsftpd does not show the dot file. A file that is not ours is left alone."""
    out = tmp_path / "root" / "in"
    out.mkdir(parents=True)
    (out / earlier).write_bytes(b"half an upl")
    (out / ".filedispatch-tmp-9f8e7d6c-7-e2-a.txt").write_bytes(b"another journal's")
    root = tmp_path / "root"
    server = _like_vsftpd(root) if case == "hides-dot-files" else FtpServer(root)
    step = {"url": server.url("/in/")}
    if name == "{now}":
        step["name"], name = "{now:%Y%m%d%H%M%S}-{name}", "a.txt"
    try:
        outcome = resume(tmp_path, step, b"the file", name, epoch, _TOKEN)
    finally:
        server.stop()
    assert not isinstance(outcome, BaseException), outcome
    left = sorted(p.name for p in out.iterdir() if p.name.startswith(".filedispatch-tmp-"))
    assert left == [".filedispatch-tmp-9f8e7d6c-7-e2-a.txt"], f"{case}: {left}"
    delivered = [p for p in out.iterdir() if not p.name.startswith(".")]
    assert [p.read_bytes() for p in delivered] == [b"the file"]
