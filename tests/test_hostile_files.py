"""Hostile entries in a source, tried on a real running service: links swapped in for a planned
file (or for one of its folders) during a retry wait, FIFOs swapped in, linked folders in a
recursive source, a writer that pauses, links followed with ``after: delete`` / ``mode: move``.

Nothing outside a source may ever be read, no entry may freeze the service, no half-written
file may be delivered, and the journal must say what happened.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from filedispatch import sourcefile
from filedispatch.config import load_config
from filedispatch.dispatcher import Dispatcher
from filedispatch.journal import Journal
from filedispatch.models import FileVersion
from filedispatch.processors import Registry

from .conftest import (
    ServiceProcess,
    delivered,
    free_port,
    journal_rows,
    old,
    wait_until,
    write_config,
)
from .servers import HttpReceiver

SECRET = b"outside secret: never to be read by filedispatch!!\n"


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    rx = HttpReceiver()
    yield rx
    rx.close()


@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways of opening beneath a root: openat2, and the walk kept for older kernels (in
    this process; the service subprocesses use what the kernel has)."""
    if request.param == "walk":
        monkeypatch.setattr(sourcefile, "openat2", None)
    elif sourcefile.openat2 is None:
        pytest.skip("this kernel has no openat2")
    return str(request.param)


def config(ws: dict[str, Path], to: Any, port: int | None = None, **source: Any) -> Path:
    data: dict[str, Any] = {
        "database": str(ws["db"]),
        "sources": [{"path": str(ws["inbox"]), "settle": 0, **source}],
        "rules": [{"name": "all", "glob": "*", "to": to}],
        "api": {"enabled": port is not None, "port": port or 3001},
        "monitor": {"enabled": False},
    }
    return write_config(ws["root"] / "c.yml", data)


def http_to(rx: HttpReceiver) -> dict[str, Any]:
    return {"url": f"{rx.url}/up", "retry": {"attempts": 5, "delay": 0.2, "jitter": False}}


def first_fails_after(rx: HttpReceiver, swap: Callable[[], None]) -> None:
    """The first upload is answered 503, once ``swap`` has run: the file is swapped while the
    service waits to retry. Later uploads are accepted."""

    async def behave(request: web.Request, hit: int) -> web.StreamResponse | None:
        if hit == 1:
            await request.read()
            swap()
            return web.Response(status=503, text="try later")
        return None

    rx.behave["/up"] = behave


def outside_twin(ws: dict[str, Path], like: Path) -> Path:
    """A file outside the source with the size and mtime of ``like``."""
    outside = ws["root"] / "outside"
    outside.mkdir(exist_ok=True)
    secret = outside / like.name
    secret.write_bytes(SECRET[: like.stat().st_size].ljust(like.stat().st_size, b"!"))
    st = like.stat()
    os.utime(secret, ns=(st.st_atime_ns, st.st_mtime_ns))
    return secret


def final_row(db: Path) -> dict[str, Any]:
    return wait_until(
        lambda: next((r for r in journal_rows(db) if r["status"] in ("SUCCEEDED", "FAILED")), None),
        60,
    )


def received_hashes(rx: HttpReceiver) -> set[str]:
    return {r.sha256 for r in rx.received}


# ---------------------------------------------------------------- 11.1 links swapped in


def test_a_link_swapped_in_during_a_retry_wait_is_not_followed(
    workspace: dict[str, Path],
    receiver: HttpReceiver,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    ws = workspace
    planned = old(ws["inbox"] / "r.txt", b"the planned bytes, inside the source\n"[: len(SECRET)])
    secret = outside_twin(ws, planned)

    def swap() -> None:  # ln -s /outside/r.txt .l && mv -T .l r.txt
        os.symlink(secret, ws["inbox"] / ".l")
        os.rename(ws["inbox"] / ".l", ws["inbox"] / "r.txt")

    first_fails_after(receiver, swap)
    svc = service_factory(config(ws, http_to(receiver))).start()
    row = final_row(ws["db"])
    assert svc.stop() == 0
    assert hashlib.sha256(SECRET).hexdigest() not in received_hashes(receiver)
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in received_hashes(receiver)
    assert row["status"] == "FAILED", row
    assert "outside the source" in row["reason"] and "not followed" in row["reason"]
    assert row["attempts"] == 2


def test_a_folder_swapped_for_a_link_during_a_retry_wait_is_not_followed(
    workspace: dict[str, Path],
    receiver: HttpReceiver,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    ws = workspace
    planned = old(ws["inbox"] / "sub" / "r.txt", b"the planned bytes, in a folder\n")
    secret = outside_twin(ws, planned)

    def swap() -> None:  # the folder, not the file, becomes a link to the outside
        os.rename(ws["inbox"] / "sub", ws["root"] / "moved-away")
        os.symlink(secret.parent, ws["inbox"] / "sub")

    first_fails_after(receiver, swap)
    svc = service_factory(config(ws, http_to(receiver), recursive=True)).start()
    row = final_row(ws["db"])
    assert svc.stop() == 0
    assert hashlib.sha256(secret.read_bytes()).hexdigest() not in received_hashes(receiver)
    assert row["status"] == "FAILED" and "outside the source" in row["reason"], row


async def test_opening_a_swapped_link_is_refused_by_both_resolvers(
    workspace: dict[str, Path], resolver: str
) -> None:
    """The component-wise walk (kernels before 5.6) refuses what openat2 refuses."""
    ws = workspace
    planned = old(ws["inbox"] / "sub" / "r.txt", b"planned")
    version = FileVersion.from_stat("in", ws["inbox"], "sub/r.txt", planned.stat())
    secret = outside_twin(ws, planned)
    fd, _ = sourcefile.open_version(version)  # the planned file opens
    os.close(fd)
    os.rename(ws["inbox"] / "sub", ws["root"] / "moved-away")
    os.symlink(secret.parent, ws["inbox"] / "sub")
    with pytest.raises(sourcefile.SourceVanishedError, match="outside the source"):
        sourcefile.open_version(version)
    os.unlink(ws["inbox"] / "sub")
    (ws["inbox"] / "sub").mkdir()
    os.symlink(secret, ws["inbox"] / "sub" / "r.txt")
    with pytest.raises(sourcefile.SourceVanishedError, match="outside the source"):
        sourcefile.open_version(version)
    assert sourcefile.read_head(version, 100) is None


# ---------------------------------------------------------------- 11.3 FIFOs


def test_a_fifo_swapped_in_neither_freezes_the_service_nor_stops_sigterm(
    workspace: dict[str, Path],
    receiver: HttpReceiver,
    service_factory: Callable[..., ServiceProcess],
) -> None:
    ws = workspace
    old(ws["inbox"] / "r.txt", b"a planned file")

    def swap() -> None:
        os.mkfifo(ws["inbox"] / ".f")
        os.rename(ws["inbox"] / ".f", ws["inbox"] / "r.txt")

    first_fails_after(receiver, swap)
    port = free_port()
    svc = service_factory(config(ws, http_to(receiver), port=port)).start()
    row = final_row(ws["db"])
    assert row["status"] == "FAILED" and "FIFO" in row["reason"], row
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=10) as resp:
        assert resp.status == 200
    old(ws["inbox"] / "after.txt", b"still working")
    wait_until(lambda: len(receiver.received) == 1, 30)
    svc.signal(signal.SIGTERM)
    assert svc.proc is not None and svc.proc.wait(30) == 0


async def test_fifos_swapped_in_do_not_hold_the_copy_threads(workspace: dict[str, Path]) -> None:
    """Six FIFOs swapped in for planned files (more than the default executor's threads on
    a small machine): each fails at once as not a regular file, the others are copied."""
    ws = workspace
    cfg = load_config(config(ws, {"url": str(ws["outbox"]), "mode": "copy"}))
    source = cfg.sources[0]
    names = [f"p{i}.bin" for i in range(6)]
    versions = []
    for name in [*names, "z.txt"]:
        st = old(ws["inbox"] / name, name.encode()).stat()
        versions.append(FileVersion.from_stat(source.key, source.path, name, st))
    for name in names:
        os.mkfifo(ws["root"] / name)
        os.rename(ws["root"] / name, ws["inbox"] / name)
    try:
        async with Journal.open(ws["db"]) as journal:
            dispatcher = Dispatcher(cfg, journal, Registry(), workdir=ws["root"] / "work")
            stop = asyncio.Event()  # the workers too: with the fast paths off they copy
            runner = asyncio.create_task(dispatcher.run(stop))
            await asyncio.wait_for(dispatcher.offer(source, versions), 30)
            await asyncio.wait_for(dispatcher.wait_idle(), 30)
            stop.set()
            await runner
            await journal.write(lambda conn: None)
    finally:
        for _ in range(20):  # copy threads blocked in open() one FIFO after another (the bug)
            for name in names:
                try:
                    os.close(os.open(ws["inbox"] / name, os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
            await asyncio.sleep(0.05)
    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert {n: rows[n]["status"] for n in names} == dict.fromkeys(names, "FAILED")
    assert all("FIFO" in rows[n]["reason"] for n in names)
    assert rows["z.txt"]["status"] == "SUCCEEDED"
    assert delivered(ws["outbox"]) == {"z.txt": b"z.txt"}


async def test_mime_sniffing_never_reads_a_fifo_or_a_link_swapped_in(
    workspace: dict[str, Path],
) -> None:
    """Routing by content reads the file's head: through sourcefile, so a FIFO swapped in
    cannot hold the planning thread, and a link out is not read (its type is not known)."""
    ws = workspace
    path = write_config(
        ws["root"] / "c.yml",
        {
            "database": str(ws["db"]),
            "sources": [{"path": str(ws["inbox"]), "settle": 0}],
            "rules": [
                {"name": "text", "mime": "text/*", "to": str(ws["outbox"] / "text")},
                {"name": "rest", "glob": "*", "to": str(ws["outbox"] / "rest")},
            ],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    cfg = load_config(path)
    source = cfg.sources[0]
    secret = old(ws["root"] / "outside" / "secret.txt", b"plain text outside")
    versions = []
    for name in ("fifo.txt", "link.txt"):
        st = old(ws["inbox"] / name, b"\x00\x01binary").stat()
        versions.append(FileVersion.from_stat(source.key, source.path, name, st))
    os.mkfifo(ws["root"] / "f")
    os.rename(ws["root"] / "f", ws["inbox"] / "fifo.txt")
    os.symlink(secret, ws["root"] / "l")
    os.rename(ws["root"] / "l", ws["inbox"] / "link.txt")
    async with Journal.open(ws["db"]) as journal:
        dispatcher = Dispatcher(cfg, journal, Registry(), workdir=ws["root"] / "work")
        try:
            routes = await asyncio.wait_for(
                asyncio.to_thread(lambda: [dispatcher.route(v) for v in versions]), 30
            )
        finally:
            for _ in range(5):  # a planning thread blocked in open() (the bug) is let go
                try:
                    os.close(os.open(ws["inbox"] / "fifo.txt", os.O_WRONLY | os.O_NONBLOCK))
                except OSError:
                    pass
                await asyncio.sleep(0.05)
    assert [[c.rule for c in chains] for chains in routes] == [["rest"], ["rest"]]


# ---------------------------------------------------------------- 11.2 linked folders


@pytest.mark.parametrize("follow", [False, True])
def test_a_linked_folder_out_of_a_recursive_source_is_never_shipped(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
    follow: bool,
) -> None:
    ws = workspace
    outside = ws["root"] / "outside"
    old(outside / "before.txt", b"there at the start")
    os.symlink(outside, ws["inbox"] / "extdir")
    svc = service_factory(
        config(ws, str(ws["outbox"]), recursive=True, follow_symlinks=follow)
    ).start()
    (outside / "later.txt").write_bytes(b"written under the link target later")
    (outside / "deep").mkdir()
    (outside / "deep" / "x.txt").write_bytes(b"deeper")
    old(ws["inbox"] / "inside.txt", b"inside")  # written after: once it is there, so are they
    wait_until(lambda: (ws["outbox"] / "inside.txt").exists(), 30)
    rows = journal_rows(ws["db"])
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"inside.txt": b"inside"}
    assert [r["relpath"] for r in rows] == ["inside.txt"]


def test_a_linked_folder_inside_the_source_is_followed_when_asked(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    ws = workspace
    old(ws["inbox"] / ".store" / "a.txt", b"through the alias")  # hidden: ignored itself
    os.symlink(".store", ws["inbox"] / "alias")
    cfg = config(ws, str(ws["outbox"]), recursive=True, follow_symlinks=True)
    svc = service_factory(cfg).start()
    wait_until(lambda: (ws["outbox"] / "alias" / "a.txt").exists(), 30)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"alias/a.txt": b"through the alias"}


# ---------------------------------------------------------------- 10.2 a writer that pauses


@pytest.mark.parametrize("other_fs", [False, True])
def test_a_writer_that_pauses_is_not_done(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
    other_fs: bool,
) -> None:
    ws = workspace
    outbox = ws["outbox"]
    if other_fs:
        shm = Path("/dev/shm")
        if not shm.is_dir() or os.stat(shm).st_dev == os.stat(ws["root"]).st_dev:
            pytest.skip("no second filesystem here")
        outbox = shm / f"fd-test-{os.getpid()}-{ws['root'].name}"
    cfg = config(ws, str(outbox), settle=1, after="delete")
    svc = service_factory(cfg, "--log-level", "DEBUG").start()
    first, second = os.urandom(110_000), os.urandom(110_000)
    try:
        with open(ws["inbox"] / "slow.bin", "wb") as fh:
            fh.write(first)
            fh.flush()
            # the writer pauses well past settle: wait until the service has looked at the
            # file and seen it still open (or, without the gate, until it took it)
            wait_until(
                lambda: "slow.bin is still open for writing" in svc.log() or journal_rows(ws["db"]),
                60,
            )
            assert not (outbox / "slow.bin").exists(), "a final-named file before the writer closed"
            fh.write(second)
        rows = wait_until(
            lambda: [r for r in journal_rows(ws["db"]) if r["status"] == "SUCCEEDED"], 60
        )
        wait_until(lambda: not (ws["inbox"] / "slow.bin").exists(), 30)
        assert svc.stop() == 0
        assert delivered(outbox) == {"slow.bin": first + second}
        assert [r["size"] for r in journal_rows(ws["db"])] == [220_000]
        assert rows[0]["sha256"] in (None, hashlib.sha256(first + second).hexdigest())
    finally:
        if other_fs:
            import shutil

            shutil.rmtree(outbox, ignore_errors=True)


def _writer_holding(path: Path, first: bytes) -> subprocess.Popen[bytes]:
    """Another process that wrote ``first`` to ``path``, flushed, and holds it open; it
    writes what its stdin gives next, then closes."""
    script = (
        "import sys\n"
        "fh = open(sys.argv[1], 'ab')\n"
        f"fh.write(sys.stdin.buffer.read({len(first)})); fh.flush()\n"
        "print(1, flush=True)\n"
        "fh.write(sys.stdin.buffer.read()); fh.close()\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(first)
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == b"1"
    return proc


def test_a_file_held_open_for_writing_is_never_moved_with_settle_0(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    """``settle: 0`` and ``mode: move`` (the inline move lane): the only thing between a file
    and its consumption is the open-writers gate, taken in the very look that finds the file
    (an event) or by the start-up scan. A writer in another process holds one file of each
    kind open; neither moves until it closes, and then each arrives whole."""
    ws = workspace
    first, second = os.urandom(50_000), os.urandom(50_000)
    ws["outbox"].mkdir()
    writer = _writer_holding(ws["inbox"] / "early.bin", first)
    cfg = config(ws, {"url": str(ws["outbox"]), "mode": "move"})
    svc = service_factory(cfg, "--log-level", "DEBUG").start()
    late_writer = _writer_holding(ws["inbox"] / "late.bin", first)
    try:
        for name in ("early.bin", "late.bin"):
            wait_until(lambda n=name: f"{n} is still open for writing" in svc.log(), 60)
        assert not os.listdir(ws["outbox"]), "a file still open for writing was delivered"
        assert sorted(os.listdir(ws["inbox"])) == ["early.bin", "late.bin"]
    finally:
        for w in (writer, late_writer):
            assert w.stdin is not None
            w.stdin.write(second)
            w.stdin.close()
            w.wait(10)
    wait_until(lambda: len(os.listdir(ws["outbox"])) == 2 and not os.listdir(ws["inbox"]), 60)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"early.bin": first + second, "late.bin": first + second}
    assert sorted((r["relpath"], r["size"], r["status"]) for r in journal_rows(ws["db"])) == [
        ("early.bin", 100_000, "SUCCEEDED"),
        ("late.bin", 100_000, "SUCCEEDED"),
    ]


def test_check_says_how_open_writers_are_told(workspace: dict[str, Path]) -> None:
    from .conftest import run_cli

    result = run_cli("check", "-c", config(workspace, str(workspace["outbox"])))
    assert result.returncode == 0, result.stderr
    assert "open writers: leases" in result.stdout or "open writers: /proc" in result.stdout


# ---------------------------------------------------------------- 10.5 links followed


@pytest.mark.parametrize(
    "dest,source",
    [
        ({"mode": "copy"}, {"after": "delete"}),
        ({"mode": "move"}, {}),
    ],
)
def test_a_followed_link_delivers_its_target_and_only_the_link_is_consumed(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
    dest: dict[str, Any],
    source: dict[str, Any],
) -> None:
    ws = workspace
    target = old(ws["inbox"] / "store" / "t.bin", b"the target's bytes")
    os.symlink("store/t.bin", ws["inbox"] / "l.bin")  # relative: dangling once moved away
    cfg = config(ws, {"url": str(ws["outbox"]), **dest}, follow_symlinks=True, **source)
    svc = service_factory(cfg).start()
    wait_until(lambda: not os.path.lexists(ws["inbox"] / "l.bin"), 30)
    rows = journal_rows(ws["db"])
    assert svc.stop() == 0
    got = ws["outbox"] / "l.bin"
    assert not got.is_symlink(), "a link was moved into the destination"
    assert got.read_bytes() == b"the target's bytes"
    assert target.read_bytes() == b"the target's bytes"  # the target stays
    assert [(r["relpath"], r["status"]) for r in rows] == [("l.bin", "SUCCEEDED")]


def test_a_link_pointing_outside_is_never_taken_even_when_following(
    workspace: dict[str, Path],
    service_factory: Callable[..., ServiceProcess],
) -> None:
    ws = workspace
    secret = old(ws["root"] / "outside" / "secret.key", SECRET)
    os.symlink(secret, ws["inbox"] / "s.key")
    old(ws["inbox"] / "fine.txt", b"fine")
    cfg = config(ws, str(ws["outbox"]), follow_symlinks=True, after="delete")
    svc = service_factory(cfg).start()
    wait_until(lambda: (ws["outbox"] / "fine.txt").exists(), 30)
    assert svc.stop() == 0
    assert delivered(ws["outbox"]) == {"fine.txt": b"fine"}
    assert secret.read_bytes() == SECRET and os.path.islink(ws["inbox"] / "s.key")


def test_a_writer_in_another_process_is_found_by_lease_and_by_proc(tmp_path: Path) -> None:
    """Both ways of telling a file is still being written see a real writer process: the
    lease (refused) and the /proc scan used where no lease can be had."""
    import subprocess
    import sys

    path = tmp_path / "w.bin"
    path.write_bytes(b"begun")
    writer = subprocess.Popen(
        [sys.executable, "-c", "import sys; f = open(sys.argv[1], 'ab'); print(1, flush=True); "
         "sys.stdin.read()", str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )  # fmt: skip
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == b"1"
        st = path.stat()
        version = FileVersion.from_stat("s", tmp_path, "w.bin", st)
        assert sourcefile.WriterCheck().busy(tmp_path, [version]) == {"w.bin"}
        found, _ = sourcefile.proc_writers()
        assert (st.st_dev, st.st_ino) in found
    finally:
        assert writer.stdin is not None
        writer.stdin.close()
        writer.wait(10)
    assert sourcefile.WriterCheck().busy(tmp_path, [version]) == set()
    path.write_bytes(b"changed since it was seen, by a writer now gone")
    assert sourcefile.WriterCheck().busy(tmp_path, [version]) == {"w.bin"}
    found, _ = sourcefile.proc_writers()
    assert (st.st_dev, st.st_ino) not in found


def test_a_command_reads_the_checked_file_and_a_swap_during_its_run_fails_the_row(
    workspace: dict[str, Path],
) -> None:
    """A command gets FILEDISPATCH_FD, open on the checked file; a file replaced while the
    command ran (here by the command itself, as another writer would) fails its row."""
    from .conftest import run_cli

    ws = workspace
    out = ws["root"] / "copies"
    out.mkdir()
    old(ws["inbox"] / "keep.txt", b"planned bytes")
    old(ws["inbox"] / "swap.txt", b"planned bytes")
    command = (
        f'cat /dev/fd/"$FILEDISPATCH_FD" > {out}/"$FILEDISPATCH_NAME"; '
        f'if [ "$FILEDISPATCH_NAME" = swap.txt ]; then '
        f"ln -s {ws['root']}/c.yml {ws['inbox']}/.l && "
        f'mv -T {ws["inbox"]}/.l "$FILEDISPATCH_PATH"; fi'
    )
    cfg = config(ws, {"command": command, "retry": {"attempts": 1}})
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 1, result.stderr  # --once: a file failed
    rows = {r["relpath"]: r for r in journal_rows(ws["db"])}
    assert rows["keep.txt"]["status"] == "SUCCEEDED"
    assert rows["swap.txt"]["status"] == "FAILED"
    assert "while the command ran" in rows["swap.txt"]["reason"]
    assert (out / "keep.txt").read_bytes() == b"planned bytes"
    assert (out / "swap.txt").read_bytes() == b"planned bytes"


def test_running_out_of_descriptors_is_worth_a_retry_not_a_failure(tmp_path: Path) -> None:
    """EMFILE says nothing about the file: the open is refused as transient (retried), while
    a real refusal such as a folder in the way stays permanent."""
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_bytes(b"data")
    script = f"""
import os, resource, sys
from pathlib import Path
from filedispatch.errors import TransientDeliveryError
from filedispatch.models import FileVersion
from filedispatch.sourcefile import open_version
root = Path({str(tmp_path / "in")!r})
v = FileVersion.from_stat("in", root, "a.txt", os.stat(root / "a.txt"))
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
held = []
try:
    while True:
        held.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
try:
    open_version(v)
except TransientDeliveryError as exc:
    print("transient", exc)
except Exception as exc:
    print("other", type(exc).__name__, exc)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("transient"), result.stdout
    assert "Too many open files" in result.stdout
