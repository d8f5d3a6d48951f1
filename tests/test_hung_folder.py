"""A destination folder on a hung mount (NFS, SMB: its open, write or rename never returns).
Its copies run in daemon threads of their own: a stuck one holds neither the process's exit
nor the threads the rest of the service uses; a folder with a stuck copy gets no new thread
until that copy ends (each attempt there fails at once, transient); the batch lane honours
the step's ``timeout`` and the stop's grace like a worker's copy.

The hang is the kernel's own: fanotify permission events hold each open in the folder
(``test_called_off._OpenGate``, needs root, else skipped)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import ServiceProcess, old, wait_until
from .servers import remote_config
from .test_called_off import _OpenGate


@contextlib.contextmanager
def _closed(gate: _OpenGate, svc: ServiceProcess) -> Iterator[None]:
    """On the way out, whatever happened: the mount answers again, the service is stopped."""
    try:
        yield
    finally:
        gate.close()
        with contextlib.suppress(Exception):
            svc.stop(60)


@contextlib.contextmanager
def _copying_into_a_hung_folder(
    tmp_path: Path, data: bytes, step: dict[str, object], **top: object
) -> Iterator[tuple[Path, _OpenGate, ServiceProcess]]:
    """A service copying a new file ``a.bin`` (``data``) into the folder ``out`` (options
    ``step``), whose opens are held at the gate: entered once the copy waits there."""
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    out = tmp_path / "out"
    out.mkdir()
    ws["inbox"].mkdir()
    svc = ServiceProcess(remote_config(ws, {"url": out.as_uri(), **step}, **top))
    gate = _OpenGate(out)
    with _closed(gate, svc):
        svc.start()
        old(ws["inbox"] / "a.bin", data)
        assert gate.held.wait(60), svc.log()
        yield out, gate, svc


@pytest.mark.parametrize("size", [100_000, 2 << 20], ids=["batch-lane", "worker"])
def test_a_stop_beside_a_copy_stuck_in_a_hung_folder_ends_the_process(
    tmp_path: Path, size: int
) -> None:
    """A copy into a folder whose filesystem hangs, and the service is stopped (SIGTERM,
    ``shutdown_grace: 0.5``): the process exits while the mount still hangs (after the grace
    and CALL_OFF_PATIENCE_S), and the next start, the mount answering again, delivers the
    file once, with no temporary file left.

    Before: the batch lane (a small new file of an unshared source, copied inside the
    watcher's ``offer``) was never cancelled, so the stop waited as long as the mount hung;
    a worker's copy (a file above COPY_MAX_SIZE) ran in the loop's default executor, whose
    threads ``asyncio.run`` and the interpreter join without bound."""
    data = os.urandom(size)
    exited = False
    with _copying_into_a_hung_folder(tmp_path, data, {}, shutdown_grace=0.5) as (out, _, svc):
        svc.signal(15)
        assert svc.proc is not None
        proc = svc.proc
        with contextlib.suppress(AssertionError):  # the mount hangs longer than this
            exited = wait_until(lambda: proc.poll() is not None, 90)
    cfg = svc.config
    assert exited, (
        "the stopped service never exited while a called-off copy was stuck in a hung "
        "folder. Log:\n" + svc.log()[-2000:]
    )
    again = ServiceProcess(cfg)
    try:
        again.start()
        wait_until(lambda: (out / "a.bin").exists(), 60)
    finally:
        again.stop(60)
    assert (out / "a.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"], again.log()[-2000:]


@pytest.mark.parametrize("size", [1000, 2 << 20], ids=["batch-lane", "worker-control"])
def test_a_copy_into_a_hung_folder_times_out(tmp_path: Path, size: int) -> None:
    """A step with ``timeout: 2`` and a new file copied into a folder whose filesystem
    hangs: past its timeout the attempt is called off and the file tried again later. Before,
    a small new file of an unshared source took the batch lane, which no step timeout
    covered: its row stayed IN_PROGRESS, and the source's watcher, which awaits the batch,
    planned nothing more while the mount hung. A file above COPY_MAX_SIZE (the workers'
    path) is the control. Once the mount answers, a retry delivers the file once and no
    temporary file is left."""
    data = os.urandom(size)
    retry = {"attempts": 1000, "delay": 0.2, "backoff": 1}
    timed_out = False
    step = {"timeout": 2, "retry": retry}
    with _copying_into_a_hung_folder(tmp_path, data, step) as (out, gate, svc):
        with contextlib.suppress(AssertionError):  # the mount hangs longer than this
            timed_out = wait_until(lambda: "timed out after 2s" in svc.log(), 60)
        assert timed_out, (
            "a copy into a hung folder never timed out (timeout: 2). Log:\n" + svc.log()[-2000:]
        )
        gate.release()  # the mount answers again
        wait_until(lambda: (out / "a.bin").exists(), 60)
    assert (out / "a.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["a.bin"], svc.log()[-2000:]


def test_copies_stuck_in_one_hung_folder_do_not_stop_the_other_destinations(
    tmp_path: Path,
) -> None:
    """One destination folder hangs; its step has ``timeout: 2``, and more files go to it
    than the loop's default executor has threads (min(32, cpus + 4)). The copies that stick
    (one per worker at most) are called off; every later attempt into that folder fails at
    once, naming it, without a thread, and a file for a healthy folder is delivered.

    Before: each timed-out file's copy took another thread of the default executor and
    stuck too; once all of them were stuck, every ``to_thread`` of the service waited (a
    copy to a healthy folder, the planning of new files), and nothing more was delivered."""
    inbox, hung, fine = tmp_path / "inbox", tmp_path / "hung", tmp_path / "fine"
    for folder in (inbox, hung, fine):
        folder.mkdir()
    workers = 4
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": str(tmp_path / "journal.db"),
                "workers": workers,
                "sources": [{"path": str(inbox), "name": "inbox", "settle": 0.05}],
                "rules": [
                    {"name": "h", "glob": "*.hung", "to": [{"url": hung.as_uri(), "timeout": 2}]},
                    {"name": "f", "glob": "*.fine", "to": [{"url": fine.as_uri(), "timeout": 2}]},
                ],
                "api": {"enabled": False},
                "monitor": {"enabled": False},
            }
        ),
        encoding="utf-8",
    )
    threads = min(32, (os.cpu_count() or 1) + 4)
    files = threads + 2
    gate = _OpenGate(hung)
    svc = ServiceProcess(cfg)
    delivered = False
    refused = "nothing new is started there"
    with _closed(gate, svc):
        svc.start()
        for i in range(files):  # above COPY_MAX_SIZE: the workers' path
            old(inbox / f"{i}.hung", b"h" * (2 << 20))
        # every hung file tried once: stuck, or refused since a copy there is stuck (before
        # this was built, stuck each, until the default executor was full)
        wait_until(
            lambda: svc.log().count("has not ended") >= threads or svc.log().count(refused) > 0,
            300,
        )
        old(inbox / "a.fine", b"f" * (2 << 20))
        with contextlib.suppress(AssertionError):  # the mount hangs longer than this
            delivered = wait_until(lambda: (fine / "a.fine").exists(), 60)
        with gate._lock:
            stuck = len(gate._pending)  # each open held at the gate is one stuck thread
    assert delivered, (
        "a file for a healthy folder was not delivered while copies were stuck in another, "
        "hung folder. Log:\n" + svc.log()[-3000:]
    )
    assert stuck <= workers, f"{stuck} copies stuck in the hung folder: one per attempt"
    assert str(hung) in svc.log()
