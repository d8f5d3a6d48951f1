"""A whole mount that hangs (an NFS or SMB mount that stopped answering), below which the
service writes into many folders: per-file subfolders of a destination (``name:
{relpath}``) or of a ``done_dir``. The mount is a tmpfs of its own, mounted for the test,
and every open in it is held at a fanotify gate (``test_called_off._OpenGate``; needs root
to mount and to hold opens, else skipped). What is measured: how many threads stick in it
(each open held at the gate is one), whether the event loop ever works in it, and whether
``--once`` ends."""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import ServiceProcess, old, run_cli, wait_until
from .servers import remote_config
from .test_called_off import _OpenGate


@contextlib.contextmanager
def _mounted(folder: Path, fstype: str = "tmpfs") -> Iterator[None]:
    """``folder``, made, a new ``fstype`` mount (tmpfs; ramfs: one the watcher does not take
    for a local disk) while inside (skipped where none can be made)."""
    folder.mkdir()
    size = ["-o", "size=64m"] if fstype == "tmpfs" else []
    made = subprocess.run(
        ["mount", "-t", fstype, *size, fstype, str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"mount: {made.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


#: fanotify masks: FAN_OPEN_PERM (an open of a file), FAN_ONDIR (of a folder too)
FAN_OPEN_PERM, FAN_ONDIR = 0x10000, 0x40000000


def _mark_mount(fd: int, folder: Path, mask: int = FAN_OPEN_PERM) -> None:
    """Mark the whole mount of ``folder`` for the fanotify group ``fd`` (skipped where the
    kernel refuses)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [
        ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
    ]  # fmt: skip
    # FAN_MARK_ADD | FAN_MARK_MOUNT; AT_FDCWD
    if libc.fanotify_mark(fd, 0x1 | 0x10, mask, -100, bytes(folder)):
        pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def _hung_mount(
    folder: Path, fstype: str = "tmpfs", mask: int = FAN_OPEN_PERM
) -> Iterator[_OpenGate]:
    """``folder``, a new ``fstype`` mount whose every open (of a file anywhere in it; of a
    folder too with ``FAN_ONDIR`` in ``mask``) waits at the gate it yields; on the way out
    the gate opens and the mount goes."""
    with _mounted(folder, fstype):
        gate = _OpenGate(folder)
        try:
            _mark_mount(gate.fd, folder, mask)
            yield gate
        finally:
            gate.close()


def _stuck(gate: _OpenGate) -> int:
    """How many opens wait at ``gate``: one stuck thread each."""
    with gate._lock:
        return len(gate._pending)


def test_copies_into_many_subfolders_of_one_hung_mount_take_two_threads_at_most(
    tmp_path: Path,
) -> None:
    """A destination ``out`` is a mount that hangs, and each file goes to a subfolder of
    its own there (``{relpath}``: out/s1/x.bin, out/s2/x.bin...); the step has ``timeout:
    2`` and one worker. The first copy sticks and marks out/s1 hung; the second sticks in
    out/s2, and the two stuck folders of one mount mark the mount: every later file is
    refused at once, without a thread. Two threads stuck, not one per subfolder.

    Before (hung9, review finding B): the mark was kept per folder, so each new subfolder
    took one more thread, stuck for as long as the mount hung."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    files = 5
    for i in range(files):
        (inbox / f"s{i}").mkdir(parents=True)
    ws = {"root": tmp_path, "inbox": inbox, "db": tmp_path / "journal.db"}
    retry = {"attempts": 1000, "delay": 0.2, "backoff": 1}
    step = {"url": out.as_uri(), "timeout": 2, "retry": retry}
    cfg = remote_config(ws, step, source={"recursive": True}, workers=1, shutdown_grace=0.5)
    with _hung_mount(out) as gate:
        svc = ServiceProcess(cfg)
        try:
            svc.start()
            for i in range(files):
                old(inbox / f"s{i}" / "x.bin", os.urandom(2 << 20))  # the workers' path
            refused = "of its folders have been stuck"
            with contextlib.suppress(AssertionError):  # three stuck: no need to wait more
                wait_until(lambda: refused in svc.log() or _stuck(gate) > 2, 180)
            stuck = _stuck(gate)
            log = svc.log()
        finally:
            gate.release()
            svc.stop(60)
    assert stuck <= 2, f"{stuck} threads stuck in one hung mount, one per subfolder:\n{log[-3000:]}"
    assert refused in log, log[-3000:]


def _moving_config(tmp_path: Path, done: Path, **top: object) -> Path:
    """Source ``a`` (recursive) delivered to ``out``, then moved to ``done``: a file's own
    subfolder there (a/s1/1.txt -> done/s1/1.txt)."""
    inbox, out = tmp_path / "a", tmp_path / "out"
    for folder in (inbox, out):
        folder.mkdir()
    source = {"path": str(inbox), "name": "a", "settle": 0.05, "recursive": True}
    source.update({"after": "move", "done_dir": str(done)})
    cfg = tmp_path / "config.yml"
    settings = {
        "database": str(tmp_path / "journal.db"),
        "sources": [source],
        "rules": [{"name": "all", "glob": "*", "to": [{"url": out.as_uri()}]}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
        **top,
    }
    cfg.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return cfg


def test_a_move_stuck_in_a_hung_done_dir_marks_it_and_the_loop_never_works_there(
    tmp_path: Path,
) -> None:
    """``done_dir`` is a mount that hangs (another filesystem: a move there is a copy). The
    first delivered file's move sticks in its copy; having made no progress for
    CALL_OFF_PATIENCE_S, it marks the folder hung (saying so). A second file, delivered
    meanwhile, stays in its source folder, refused at once: nothing, not even the mkdir of
    its subfolder done/s2, is asked of the hung mount, and never by the event loop.

    Before (hung9, review finding A): a move was never marked stuck, so the second file's
    after-action made done/s2 and looked for a free name there on the event loop (on a real
    hung mount, a mkdir or lstat that never returns: the whole service frozen), then queued
    behind the stuck move until the stop."""
    done, inbox = tmp_path / "done", tmp_path / "a"
    with _hung_mount(done) as gate:
        svc = ServiceProcess(_moving_config(tmp_path, done))
        try:
            svc.start()
            old(inbox / "s1" / "1.txt", b"one\n")
            assert gate.held.wait(60), svc.log()  # the move's copy is stuck
            with contextlib.suppress(AssertionError):
                wait_until(lambda: "a move into it has made no progress" in svc.log(), 60)
            old(inbox / "s2" / "2.txt", b"two\n")
            wait_until(lambda: any((tmp_path / "out").rglob("2.txt")), 60)
            stays = "2.txt stays where it is"
            with contextlib.suppress(AssertionError):  # either is the answer
                wait_until(lambda: stays in svc.log() or (done / "s2").exists(), 60)
            made = (done / "s2").exists()
            log = svc.log()
        finally:
            gate.release()
            svc.stop(60)
    assert not made, f"done/s2 was made in the hung mount, on the event loop:\n{log[-3000:]}"
    assert stays in log, log[-3000:]
    assert (inbox / "s2" / "2.txt").exists()


def test_once_ends_beside_a_move_stuck_in_a_hung_done_dir(tmp_path: Path) -> None:
    """``--once`` whose one file's move into a hung ``done_dir`` sticks: once the move is
    known stuck (CALL_OFF_PATIENCE_S without progress) and ``shutdown_grace`` more has
    passed, the run stops, calls the move off, says the file was not moved and exits with
    status 1; the file was delivered and is still in its source folder (a later run moves
    it).

    Before (hung9, review finding MEDIUM): ``--once`` waited for every move without a
    limit, so a cron run never ended while the mount hung."""
    done, inbox = tmp_path / "done", tmp_path / "a"
    with _hung_mount(done):
        cfg = _moving_config(tmp_path, done, shutdown_grace=0.5)
        old(inbox / "s1" / "1.txt", b"one\n")
        try:
            result = run_cli("-c", cfg, "--once", timeout=120)
        except subprocess.TimeoutExpired:
            pytest.fail("--once never ended beside a move stuck in a hung done_dir")
    assert result.returncode == 1, result.stderr[-3000:]
    assert (
        "not moved (a done_dir or failed_dir hangs, or a move failed: see the log): 1"
        in result.stdout
    ), result.stdout
    assert (inbox / "s1" / "1.txt").read_bytes() == b"one\n"
    assert (tmp_path / "out" / "s1" / "1.txt").read_bytes() == b"one\n"


async def test_a_widened_mark_spares_the_mounts_below_it(tmp_path: Path) -> None:
    """Calls stuck in two folders of one mount (``m/a``, ``m/b``) mark the mount ``m`` hung,
    but not ``m/inner``, another filesystem mounted below it; the mark goes once both calls
    have ended. Real mounts, read from /proc/self/mountinfo."""
    import asyncio

    from filedispatch.errors import NetworkError
    from filedispatch.processors import threads

    m = tmp_path / "m"
    with contextlib.ExitStack() as stack:
        for folder in (m, m / "inner"):
            stack.enter_context(_mounted(folder))
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        threads.mark_stuck(str(m / "a"), first, "stuck (test)")
        assert threads.hung_above(str(m / "c")) is None  # one folder: only itself
        threads.mark_stuck(str(m / "b"), second, "stuck (test)")
        with pytest.raises(NetworkError, match="of its folders have been stuck"):
            threads.refuse_if_hung(str(m / "c" / "d"))
        assert threads.hung_above(str(m / "inner" / "x")) is None
        first.set_result(None)
        second.set_result(None)
        await asyncio.sleep(0)  # the futures' callbacks run
        assert threads.hung_above(str(m / "c")) is None
