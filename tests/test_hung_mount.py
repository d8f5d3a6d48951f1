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

from .conftest import ServiceProcess, old, wait_until
from .servers import remote_config
from .test_called_off import _OpenGate


@contextlib.contextmanager
def _hung_mount(folder: Path) -> Iterator[_OpenGate]:
    """``folder``, a new tmpfs mount whose every open (of a file anywhere in it) waits at
    the gate it yields; on the way out the gate opens and the mount goes."""
    folder.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip(f"mount: {made.stderr.strip()}")
    try:
        gate = _OpenGate(folder)
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.fanotify_mark.argtypes = [
                ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
            ]  # fmt: skip
            # FAN_MARK_ADD | FAN_MARK_MOUNT; FAN_OPEN_PERM; AT_FDCWD
            if libc.fanotify_mark(gate.fd, 0x1 | 0x10, 0x10000, -100, bytes(folder)):
                pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")
            yield gate
        finally:
            gate.close()
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


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
