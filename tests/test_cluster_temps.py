"""Temporary names of their own per claim: two nodes that hold one row in turn never share
the hidden name a delivery is written under.

End-to-end tests run two real services (the CLI as subprocesses) on one real PostgreSQL
journal, against real FTP and SFTP servers on loopback or a local folder; one node is frozen
with SIGSTOP past its lease while the other takes its row over. The unit tests check the
name itself and the resume clean-up. Nothing waits for a duration: each test waits for a
state, with a generous deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServiceProcess, journal_rows, old, wait_until
from .test_cluster import _node_config

MIB = 1 << 20


def _config(root: Path, url: str, node: str, to: Any) -> Path:
    return _node_config(root, url, node, to, rules=[{"glob": "*", "to": to}], workers=2)


def _stop(*nodes: ServiceProcess) -> None:
    for n in nodes:
        if n.proc is not None and n.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(n.proc.pid, signal.SIGCONT)  # a frozen node must hear the stop
            n.stop()


def _sizes(folder: Path) -> dict[str, int]:
    if not folder.exists():
        return {}
    sizes = {}
    for p in folder.iterdir():
        with contextlib.suppress(FileNotFoundError):
            if p.is_file():
                sizes[p.name] = p.stat().st_size
    return sizes


def _temporaries(folder: Path) -> dict[str, tuple[int, int]]:
    """(inode, size) of each temporary file in ``folder`` by name."""
    found = {}
    if folder.exists():
        for p in folder.iterdir():
            if p.name.startswith(".filedispatch-tmp-"):
                with contextlib.suppress(FileNotFoundError):
                    st = p.stat()
                    found[p.name] = (st.st_ino, st.st_size)
    return found


def _pair(root: Path, url: str, to: Any, to1: Any = None) -> tuple[ServiceProcess, ServiceProcess]:
    (root / "inbox").mkdir()
    return (
        ServiceProcess(_config(root, url, "n1", to1 or to)),
        ServiceProcess(_config(root, url, "n2", to)),
    )


def _sftp(tmp_path: Path, sftp_class: Any = None, **options: Any) -> tuple[Any, dict[str, Any]]:
    """An SFTP server on loopback rooted at tmp_path/root, and a destination to its /in/."""
    from .servers import SftpServer

    server = SftpServer(tmp_path / "root", tmp_path / "keys", sftp_class=sftp_class)
    to = {
        "url": server.url("/in/"),
        "key_file": str(server.key_file),
        "known_hosts": str(server.known_hosts),
        **options,
    }
    return server, to


def _frozen_at_rename(
    root: Path, out: Path, data: bytes, n1: ServiceProcess, n2: ServiceProcess, state: Any
) -> None:
    """n1 uploads big.bin; n2 starts; the server freezes n1 at its rename (and sets
    ``state["frozen"]``); n2 takes the row over and is left mid-way through its own upload."""
    n1.start()
    assert n1.proc is not None
    state["pid"] = n1.proc.pid
    old(root / "inbox" / "big.bin", data)
    wait_until(lambda: any(0 < s < len(data) for s in _sizes(out).values()), 60)
    n2.start()  # n1 holds the row (and the listing): n2 waits
    wait_until(lambda: state["frozen"], 60)  # n1 frozen at its rename, its upload whole
    # n2 takes the row over and uploads again: mid-way
    wait_until(lambda: any(MIB // 2 < s < len(data) // 2 for s in _sizes(out).values()), 60)


def _logs(*nodes: ServiceProcess) -> str:
    return "".join(f"\n--- {n.config.stem}:\n{n.log()[-2500:]}" for n in nodes)


@pytest.mark.parametrize("taker_killed", [False, True], ids=["seen", "kept"])
def test_a_frozen_nodes_late_ftp_rename_publishes_only_its_own_whole_copy(
    tmp_path: Path, pg_url: str, taker_killed: bool
) -> None:
    """n1 finishes its FTP upload, passes its fence and sends RNFR; the server freezes it
    there. Its lease runs out, n2 takes the row over, removes n1's temporary file and uploads
    again (1 MB/s). n1 wakes mid-way and sends RNTO. Each rename that gives the final name a
    file must carry the whole file (with a name shared by both claims it published n2's
    half-written upload). ``kept``: n2 is killed right after n1's RNTO; no partial file may
    stay under a final name."""
    from pyftpdlib.handlers import FTPHandler

    from .servers import FtpServer

    data = os.urandom(4 * MIB)
    state: dict[str, Any] = {"pid": None, "frozen": False}
    published: list[tuple[str, int]] = []
    lock = threading.Lock()

    def ftp_RNFR(handler: Any, path: str) -> None:
        with lock:
            if state["pid"] is not None and not state["frozen"]:
                state["frozen"] = True
                os.kill(state["pid"], signal.SIGSTOP)  # n1 waits for the 350: frozen
        FTPHandler.ftp_RNFR(handler, path)

    def ftp_RNTO(handler: Any, path: str) -> Any:
        src = handler._rnfr
        if src and os.path.exists(src):
            published.append((os.path.basename(path), os.path.getsize(src)))
        return FTPHandler.ftp_RNTO(handler, path)

    server = FtpServer(tmp_path / "root", overrides={"ftp_RNFR": ftp_RNFR, "ftp_RNTO": ftp_RNTO})
    out = tmp_path / "root" / "in"
    n1, n2 = _pair(tmp_path, pg_url, {"url": server.url("/in/"), "bandwidth": "1MB/s"})
    try:
        _frozen_at_rename(tmp_path, out, data, n1, n2, state)
        os.kill(state["pid"], signal.SIGCONT)  # n1 wakes and sends its RNTO
        if taker_killed:
            wait_until(lambda: published, 60)
            n2.signal(signal.SIGKILL)  # the node that took the row over crashes
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 1, 120)
        wait_until(lambda: not _temporaries(out), 60)
        partial = {n: s for n, s in _sizes(out).items() if s != len(data)}
        assert partial == {}, f"partial file(s) under a final name: {partial}" + _logs(n1, n2)
        assert [p for p in published if p[1] != len(data)] == [], (
            f"a rename gave a final name a partial file: {published}" + _logs(n1, n2)
        )
    finally:
        _stop(n1, n2)
        server.stop()


def test_a_late_sftp_rename_publishes_only_its_own_whole_copy(tmp_path: Path, pg_url: str) -> None:
    """The SFTP form: n1 passes its fence and sends its rename; the request is held by the
    server (as a lossy path would hold it) and n1 freezes meanwhile. n2 takes the row over and
    uploads again; the held rename is then carried out. Each rename into a final name must
    carry the whole file."""
    import asyncssh

    data = os.urandom(4 * MIB)
    state: dict[str, Any] = {"pid": None, "frozen": False, "go": False}
    published: list[tuple[str, int]] = []

    class LateRename(asyncssh.SFTPServer):  # type: ignore[misc]
        async def rename(self, oldpath: bytes, newpath: bytes) -> None:
            if state["pid"] is not None and not state["frozen"]:
                state["frozen"] = True
                os.kill(state["pid"], signal.SIGSTOP)
                while not state["go"]:
                    await asyncio.sleep(0.02)
            src = self.map_path(oldpath)
            if os.path.exists(src):
                published.append((os.path.basename(newpath.decode()), os.path.getsize(src)))
            super().rename(oldpath, newpath)

    server, to = _sftp(tmp_path, sftp_class=LateRename, bandwidth="1MB/s")
    out = tmp_path / "root" / "in"
    n1, n2 = _pair(tmp_path, pg_url, to)
    try:
        _frozen_at_rename(tmp_path, out, data, n1, n2, state)
        state["go"] = True  # the held rename arrives...
        wait_until(lambda: published, 60)
        os.kill(state["pid"], signal.SIGCONT)  # ...and n1 wakes
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 1, 120)
        wait_until(lambda: not _temporaries(out), 60)
        assert [p for p in published if p[1] != len(data)] == [], (
            f"a rename gave a final name a partial file: {published}" + _logs(n1, n2)
        )
        assert (out / "big.bin").read_bytes() == data
    finally:
        state["go"] = True
        _stop(n1, n2)
        server.close()


@pytest.mark.parametrize("kind", ["sftp", "local"])
def test_a_woken_nodes_clean_up_leaves_the_taker_s_upload_alone(
    tmp_path: Path, pg_url: str, kind: str
) -> None:
    """n1 uploads 8 MiB (1 MB/s) and is frozen mid-way; past its lease n2 takes the row over
    and uploads again. n1 is woken: it meets its fence (or, over SFTP, its step timeout, long
    passed) and cleans up. Its clean-up must remove its own temporary file only: n2's upload
    goes on and its first attempt succeeds."""
    out = tmp_path / "root" / "in"
    server: Any = None
    if kind == "sftp":
        server, to = _sftp(tmp_path, bandwidth="1MB/s")
        to1 = {**to, "timeout": 6}  # n1's step timeout passes while it is frozen
        frozen_at = MIB // 2
    else:
        to = to1 = {"url": out.as_uri(), "bandwidth": "1MB/s"}
        frozen_at = 6 * MIB  # late in its copy: the copying thread is not fenced per chunk
    n1, n2 = _pair(tmp_path, pg_url, to, to1)
    data = os.urandom(8 * MIB)
    try:
        n1.start()
        old(tmp_path / "inbox" / "big.bin", data)
        wait_until(lambda: any(s > frozen_at for _, s in _temporaries(out).values()), 60)
        assert n1.proc is not None
        os.kill(n1.proc.pid, signal.SIGSTOP)  # before n2 starts: n1 must not finish meanwhile
        mine = {(n, t[0]) for n, t in _temporaries(out).items()}  # (name, inode)
        try:
            n2.start()  # past n1's lease n2 takes the row over and uploads under a name of its own
            wait_until(
                lambda: any(
                    (n, t[0]) not in mine and t[1] > 3 * MIB for n, t in _temporaries(out).items()
                ),
                120,
            )
        finally:
            os.kill(n1.proc.pid, signal.SIGCONT)
        wait_until(lambda: len(journal_rows(pg_url, "status='SUCCEEDED'")) == 1, 120)
        assert (out / "big.bin").read_bytes() == data
        assert "attempt 1 failed" not in n2.log(), "n2's upload was removed" + _logs(n1, n2)
        wait_until(lambda: not _temporaries(out), 60)
    finally:
        _stop(n1, n2)
        if server is not None:
            server.close()


def test_a_claim_with_an_epoch_has_a_temporary_name_of_its_own() -> None:
    from filedispatch.naming import NAME_MAX
    from filedispatch.processors.common import temp_name

    j = "0a1b2c3d"  # the journal's token (Journal.token)
    assert temp_name(7, "a.txt", None, j) == f".filedispatch-tmp-{j}-7-a.txt"  # SQLite
    assert temp_name(7, "a.txt", 0, j) == f".filedispatch-tmp-{j}-7-a.txt"
    assert temp_name(7, "a.txt", 3, j) == f".filedispatch-tmp-{j}-7-e3-a.txt"
    assert temp_name(7, "a.txt", 3, j) != temp_name(7, "a.txt", 4, j)
    # another journal's row 7 (its ids start at 1 too), same file, same epoch
    assert temp_name(7, "a.txt", 3, j) != temp_name(7, "a.txt", 3, "ffee0011")
    assert temp_name(7, "a.txt") == ".filedispatch-tmp-7-a.txt"  # no journal: no token
    long = "€" * 84 + ".csv"  # 256 bytes: cut to leave room for the head
    tmp = temp_name(123456789, long, 2**62, j)
    assert len(tmp.encode()) <= NAME_MAX and tmp.endswith(".csv")
    assert tmp.startswith(f".filedispatch-tmp-{j}-123456789-e{2**62}-€")
    tmp.encode().decode("utf-8", "strict")


J = "0a1b2c3d"  #: this journal's token
OTHER = "ffee0011"  #: another journal's


def test_earlier_temps_are_the_rows_own_file_of_any_claim_of_this_journal() -> None:
    """Every temporary name of this journal's row 7, of any claim and any rendered name (a6
    review: a ``{now}`` template renders another name at each attempt, and the earlier copy
    was left), and nothing else: another journal's row 7 (j6: ids start at 1 in every
    journal; w5 review: it went, and a user's file with it), row 70, a temporary file named
    as before journals had tokens. Without a token only temp_name's names of the file."""
    from filedispatch.processors.common import earlier_temps, temp_name

    long = "€" * 84 + ".csv"  # shortened differently for each length of epoch
    ours = [
        f".filedispatch-tmp-{J}-7-a.txt",
        f".filedispatch-tmp-{J}-7-e1-a.txt",
        f".filedispatch-tmp-{J}-7-e12-a.txt",
        f".filedispatch-tmp-{J}-7-e12-a-2026-12-01T10.txt",  # an earlier {now} rendering
        f".filedispatch-tmp-{J}-7-b.txt",  # a name a reload changed since
    ]
    not_ours = [
        f".filedispatch-tmp-{OTHER}-7-a.txt",  # another journal's row 7, the same file
        f".filedispatch-tmp-{OTHER}-7-e1-a.txt",
        ".filedispatch-tmp-7-a.txt",  # no token: before the upgrade, or no journal
        ".filedispatch-tmp-7-e1-a.txt",
        f".filedispatch-tmp-{J}-70-e1-a.txt",  # row 70
        f".filedispatch-tmp-{J}-x-a.txt",
        f".filedispatch-tmp-{J}7-a.txt",
        "a.txt",
    ]
    assert earlier_temps(ours + not_ours, 7, "a.txt", J) == ours
    shortened = [temp_name(7, long, e, J) for e in (None, 3, 2**40)]
    others = [temp_name(8, long, 3, J), temp_name(7, long, 3, OTHER)]
    assert earlier_temps([*shortened, *others], 7, long, J) == shortened
    # without a journal (no token): exactly the names temp_name makes for the file
    plain = [".filedispatch-tmp-7-a.txt", ".filedispatch-tmp-7-e1-a.txt"]
    odd = [
        ".filedispatch-tmp-7-e05-a.txt",
        ".filedispatch-tmp-7-notes",
        ".filedispatch-tmp-7-b.txt",
    ]
    assert earlier_temps([*plain, *odd, *ours], 7, "a.txt") == plain


#: what a folder holds before a resumed delivery of row 7: earlier claims' temporary files
#: (of epochs 1 and 2, one from before epochs, one under a name an earlier attempt rendered
#: otherwise: a ``{now}`` template), which go; and what stays: another row's temporary file,
#: other journals' (their tokens), a user's file named like one, and a user's file
EARLIER = [
    f".filedispatch-tmp-{J}-7-e1-a.txt",
    f".filedispatch-tmp-{J}-7-e2-a.txt",
    f".filedispatch-tmp-{J}-7-a.txt",
    f".filedispatch-tmp-{J}-7-e2-a-1200.txt",
]
STAYS = {
    f".filedispatch-tmp-{J}-70-e1-a.txt": b"row 70's",
    ".filedispatch-tmp-x-a.txt": b"a user's",
    "b.txt": b"b",
    # row 7 of ANOTHER journal (a second cluster; a single host on SQLite) uploading b.txt
    # into the same folder (w5 review: these went too)
    f".filedispatch-tmp-{OTHER}-7-e3-b.txt": b"another cluster's row 7, still uploading b.txt",
    f".filedispatch-tmp-{OTHER}-7-b.txt": b"a SQLite host's row 7, still uploading b.txt",
    # row 7 of another journal uploading the SAME a.txt into the same folder (j6)
    f".filedispatch-tmp-{OTHER}-7-e3-a.txt": b"another cluster's row 7, uploading a.txt",
    f".filedispatch-tmp-{OTHER}-7-a.txt": b"a SQLite host's row 7, uploading a.txt",
}


def _remote(kind: str, tmp_path: Path) -> tuple[dict[str, Any], Path, Any]:
    """A destination of ``kind`` (its config mapping), the local folder it writes into, and
    its server's stop."""
    out = tmp_path / "root" / "in"
    if kind == "local":
        return {"url": out.as_uri()}, out, lambda: None
    if kind == "ftp":
        from .servers import FtpServer

        ftp = FtpServer(tmp_path / "root")
        return {"url": ftp.url("/in/")}, out, ftp.stop
    server, to = _sftp(tmp_path)
    return to, out, server.close


@pytest.mark.parametrize("epoch", [5, None], ids=["postgresql", "sqlite"])
@pytest.mark.parametrize("kind", ["local", "ftp", "sftp"])
def test_a_resumed_delivery_removes_every_earlier_claims_temporary_and_nothing_else(
    tmp_path: Path, kind: str, epoch: int | None
) -> None:
    """Row 7 is resumed under epoch 5: the temporary files of its earlier claims go, whatever
    their epoch, and the file is delivered; nothing else in the folder is touched, another
    journal's row 7 delivering the same a.txt included (its token differs). With SQLite (no
    epoch) alike: the journal's token marks the row's names (before, only the one name the
    attempt renders went, and a ``{now}`` template's earlier name stayed: k7 review)."""
    from filedispatch.config import load_config
    from filedispatch.models import FileVersion
    from filedispatch.processors import StepContext

    from .servers import deliver_once, old_file, remote_config

    step, out, stop = _remote(kind, tmp_path)
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    config = load_config(remote_config(ws, step))
    source = config.sources[0]
    src = old_file(ws["inbox"] / "a.txt", b"the file")
    out.mkdir(parents=True)
    for name in EARLIER:
        (out / name).write_bytes(b"half")
    for name, data in STAYS.items():
        (out / name).write_bytes(data)
    version = FileVersion.from_stat(source.key, source.path, "a.txt", os.stat(src))
    ctx = StepContext(
        7, version, src, "remote", 0, 2, tmp_path / "work", resuming=True, epoch=epoch, journal=J
    )

    try:
        deliver_once(config.rules[0].to[0], ctx)
    finally:
        stop()
    held = {p.name: p.read_bytes() for p in out.iterdir()}
    assert held == {**STAYS, "a.txt": b"the file"}


def test_the_start_up_sweep_removes_this_journals_temporaries_and_leaves_anothers(
    tmp_path: Path,
) -> None:
    """At a start with no other node of its journal live, a service removes the temporary
    files a crash left in its local destinations: its own journal's and the old form's.
    Another journal's (another token) stay: that may be its copy in progress. Before (j6 left
    it): every name beginning ``.filedispatch-tmp-`` went."""
    from filedispatch.processors.local import sweep_temporaries

    folder = tmp_path / "out" / "sub"
    folder.mkdir(parents=True)
    gone = [f".filedispatch-tmp-{J}-7-e1-a.txt", f".filedispatch-tmp-{J}-8-b.txt"]
    gone += [".filedispatch-tmp-7-a.txt", ".filedispatch-tmp-123-e4-b.txt"]
    stay = [f".filedispatch-tmp-{OTHER}-7-a.txt", ".filedispatch-tmp-12345678-a.txt", "a.txt"]
    for name in gone + stay:
        (folder / name).write_bytes(b"x")
    assert sweep_temporaries([tmp_path / "out"], J) == len(gone)
    assert sorted(p.name for p in folder.iterdir()) == sorted(stay)
