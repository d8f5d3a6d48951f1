"""A folder on a hung mount (NFS, SMB: its open, write or rename never returns): a
destination, a subfolder of one, a ``done_dir``, or a source whose files' open hangs.
Every call into such a folder runs in a daemon thread of its own: a stuck one holds neither
the process's exit nor the threads the rest of the service uses; a folder with a stuck call
(a copy, a resume's look, its start-up sweep) gets no new thread until that call ends (each
attempt there fails at once, transient), and only that folder and those below it wait; the
batch lane honours the step's ``timeout`` and the stop's grace like a worker's copy.

The hang is the kernel's own: fanotify permission events hold each open in the folder
(``test_called_off._OpenGate``, needs root, else skipped)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from .conftest import ServiceProcess, old, run_cli, wait_until
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


def _config(tmp_path: Path, sources: list[dict[str, object]], rules: object, **top: object) -> Path:
    """A service's config.yml in ``tmp_path``: its journal there, no API, no monitor."""
    cfg = tmp_path / "config.yml"
    settings = {"database": str(tmp_path / "journal.db"), "sources": sources, "rules": rules}
    settings.update({"api": {"enabled": False}, "monitor": {"enabled": False}, **top})
    cfg.write_text(yaml.safe_dump(settings), encoding="utf-8")
    return cfg


def _stops(svc: ServiceProcess, within: float) -> bool:
    """SIGTERM, and whether the process has ended within ``within`` seconds."""
    svc.signal(15)
    assert svc.proc is not None
    proc = svc.proc
    with contextlib.suppress(AssertionError):  # the mount hangs longer than this
        return bool(wait_until(lambda: proc.poll() is not None, within))
    return False


def _served_beside_a_hang(
    svc: ServiceProcess, gate: _OpenGate, put: Path, arrives: Path
) -> tuple[bool, bool, str]:
    """Start ``svc`` and, once an open waits at ``gate``, put a file at ``put``: whether it
    arrives at ``arrives``, whether a stop then ends the process, and the log."""
    delivered = exited = False
    with _closed(gate, svc):
        svc.start(wait_ready=False)
        assert gate.held.wait(60), svc.log()
        old(put, b"a file for a healthy folder\n")
        with contextlib.suppress(AssertionError):  # the hang lasts longer than this
            delivered = wait_until(lambda: arrives.exists(), 30)
        exited = _stops(svc, 60)
    return delivered, exited, svc.log()


def _hold_the_folder_itself(gate: _OpenGate, folder: Path) -> None:
    """Hold the opens of ``folder`` itself too (FAN_ONDIR: a listing's opendir), as a hung
    mount holds every call into it, not only the opens of its files."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [
        ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
    ]  # fmt: skip
    # FAN_MARK_ADD; FAN_OPEN_PERM | FAN_ONDIR | FAN_EVENT_ON_CHILD; AT_FDCWD
    if libc.fanotify_mark(gate.fd, 0x1, 0x10000 | 0x40000000 | 0x08000000, -100, bytes(folder)):
        pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")


def _tmpfs_folder(tmp_path: Path) -> Path:
    """A new folder on /dev/shm, another filesystem than ``tmp_path``'s (the caller removes
    it)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on a filesystem of its own")
    return Path(tempfile.mkdtemp(prefix="fd-done-", dir=shm))


def _done_dir_config(tmp_path: Path, done: Path, **top: object) -> Path:
    """Sources ``a`` (after: move to ``done``) and ``b`` (kept), both delivered to ``out``."""
    inbox_a, inbox_b, out = tmp_path / "a", tmp_path / "b", tmp_path / "out"
    for folder in (inbox_a, inbox_b, out):
        folder.mkdir()
    source_a = {"path": str(inbox_a), "name": "a", "settle": 0.05}
    source_a.update({"after": "move", "done_dir": str(done)})
    source_b = {"path": str(inbox_b), "name": "b", "settle": 0.05}
    rules = [{"name": "all", "glob": "*", "to": [{"url": out.as_uri()}]}]
    return _config(tmp_path, [source_a, source_b], rules, **top)


@contextlib.contextmanager
def _moving_into_a_hung_done_dir(
    tmp_path: Path, **top: object
) -> Iterator[tuple[ServiceProcess, _OpenGate]]:
    """A started service of ``_done_dir_config`` whose ``done_dir`` (on /dev/shm: a move there
    is a copy) hangs: every open in it waits at the gate."""
    done = _tmpfs_folder(tmp_path)
    try:
        svc = ServiceProcess(_done_dir_config(tmp_path, done, **top))
        gate = _OpenGate(done)
        with _closed(gate, svc):
            svc.start()
            yield svc, gate
    finally:
        shutil.rmtree(done, ignore_errors=True)


@pytest.mark.parametrize("many", [False, True], ids=["one-stuck-control", "all-threads-stuck"])
def test_after_actions_stuck_in_a_hung_done_dir_do_not_stop_another_sources_deliveries(
    tmp_path: Path, many: bool
) -> None:
    """Source ``a`` moves its delivered files to a ``done_dir`` on another filesystem (tmpfs
    here: a move by copy) whose mount hangs; source ``b`` keeps its files. With more moves
    stuck than the loop's default executor has threads (min(32, cpus + 4)), b's new file is
    still delivered to its healthy folder; one stuck move is the control.

    Before (r8 review): each move by copy ran in ``asyncio.to_thread``; once the default
    executor's threads were all stuck, every ``to_thread`` of the service waited (b's scan
    and planning), and b's file was never delivered."""
    threads = min(32, (os.cpu_count() or 1) + 4)
    delivered = False
    with _moving_into_a_hung_done_dir(tmp_path) as (svc, gate):
        for i in range(threads + 2 if many else 1):
            old(tmp_path / "a" / f"{i}.txt", f"file {i}\n".encode())
        with contextlib.suppress(AssertionError):  # every thread held, or fewer
            wait_until(lambda: len(gate._pending) >= (threads if many else 1), 60)
        with gate._lock:
            stuck = len(gate._pending)
        old(tmp_path / "b" / "b.txt", b"b's own file\n")
        with contextlib.suppress(AssertionError):  # the mount hangs longer than this
            delivered = wait_until(lambda: (tmp_path / "out" / "b.txt").exists(), 60)
        log = svc.log()
    assert delivered, (
        f"b.txt was never delivered to its healthy folder while {stuck} moves were stuck in "
        f"the hung done_dir of source a. Log:\n{log[-2500:]}"
    )


def test_a_stop_beside_a_move_stuck_in_a_hung_done_dir_ends_the_process(tmp_path: Path) -> None:
    """A delivered file's move by copy into a hung ``done_dir`` is stuck, and the service is
    stopped (SIGTERM, ``shutdown_grace: 0.5``): the process exits while the mount still
    hangs; the file stays in its source folder, moved at a later start.

    Before (r8 review): the move ran in the loop's default executor, which ``asyncio.run``
    joins at the exit without bound, and the stop awaited every move."""
    with _moving_into_a_hung_done_dir(tmp_path, shutdown_grace=0.5) as (svc, gate):
        old(tmp_path / "a" / "1.txt", b"one\n")
        assert gate.held.wait(60), svc.log()
        exited = _stops(svc, 60)
        log = svc.log()
    assert exited, f"the stopped service never exited beside a stuck move. Log:\n{log[-2000:]}"
    assert (tmp_path / "a" / "1.txt").exists()


def test_a_resumes_look_into_a_hung_folder_takes_no_more_than_one_stuck_thread(
    tmp_path: Path,
) -> None:
    """A row's retries are resumes, and a resume first looks into the destination folder for
    an earlier delivery (``CopyThreads.call``: a listing, an lstat, an open). The folder's
    mount hangs (every open in it held, the folder's own too), the step has ``timeout: 2``
    and one worker: the first look sticks and marks the folder hung as a stuck copy does, so
    every later attempt is refused at once, without a thread: one stuck thread, not one per
    attempt.

    How the row comes to be retried: its first copy sticks and is called off (the folder is
    marked hung); the mount answers for a moment (the copy ends, the mark goes) and hangs
    again at once, before the retry. Before (r8 review): the look never marked the folder,
    and each attempt left one more thread stuck in it."""
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    ws["inbox"].mkdir()
    out = tmp_path / "out"
    out.mkdir()
    retry = {"attempts": 1000, "delay": 0.2, "backoff": 1}
    cfg = remote_config(ws, {"url": out.as_uri(), "timeout": 2, "retry": retry}, workers=1)
    svc = ServiceProcess(cfg)
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: svc.proc is None or svc.stop(60))
        svc.start()  # its start-up sweep lists the folder: the mount hangs from now on
        gate = _OpenGate(out)
        stack.enter_context(_closed(gate, svc))
        _hold_the_folder_itself(gate, out)
        old(ws["inbox"] / "a.bin", os.urandom(2 << 20))  # the workers' path
        wait_until(lambda: "has not ended" in svc.log(), 90)  # the copy stuck: folder hung
        with gate._lock:  # the mount answers for a moment, then hangs again
            for efd in gate._pending:
                gate._answer(efd)
            gate._pending.clear()
        wait_until(lambda: "copies into it start again" in svc.log(), 60)
        # time for several attempts: a 2 s timeout, then 0.2 s apart
        with contextlib.suppress(AssertionError):
            wait_until(lambda: len(gate._pending) >= 4, 40)
        with gate._lock:
            stuck = len(gate._pending)  # each open held at the gate is one stuck thread
        log = svc.log()
    assert stuck <= 1, (
        f"{stuck} threads stuck in the hung folder, one per attempt (1 worker). Log:\n"
        + log[-2500:]
    )


def test_a_hung_destination_at_start_up_neither_holds_the_other_destinations_nor_the_stop(
    tmp_path: Path,
) -> None:
    """The service starts while one of its two local destinations hangs (every open in it
    held, the folder's own listing too). The start-up sweep of that folder's temporary files
    sticks, beside the start: the source is watched, a file for the healthy destination is
    delivered, and a stop (SIGTERM) ends the process while the mount still hangs.

    Before (r8 review): the sweeps (``recovery.at_start``) ran in the loop's default
    executor and were awaited before any source was watched, and the stuck thread was joined
    at the exit."""
    inbox, hung, fine = tmp_path / "inbox", tmp_path / "hung", tmp_path / "fine"
    for folder in (inbox, hung, fine):
        folder.mkdir()
    rules = [
        {"name": "h", "glob": "*.hung", "to": [{"url": hung.as_uri()}]},
        {"name": "f", "glob": "*.fine", "to": [{"url": fine.as_uri()}]},
    ]
    source = {"path": str(inbox), "name": "inbox", "settle": 0.05}
    cfg = _config(tmp_path, [source], rules, shutdown_grace=0.5)
    gate = _OpenGate(hung)
    _hold_the_folder_itself(gate, hung)
    served = _served_beside_a_hang(ServiceProcess(cfg), gate, inbox / "a.fine", fine / "a.fine")
    delivered, exited, log = served
    assert (delivered, exited) == (True, True), (
        f"delivered to the healthy folder: {delivered}; exited at the stop: {exited}. "
        f"Log:\n{log[-2000:]}"
    )


def test_a_hung_subfolder_of_a_destination_does_not_stop_its_healthy_subfolders(
    tmp_path: Path,
) -> None:
    """One local destination ``out`` whose subfolders are mounts of their own (``name:
    {relpath}``: out/site-a and out/site-b, one per site). site-a hangs: a copy into it
    sticks and is called off, and only the files for site-a wait; b.bin reaches the healthy
    out/site-b.

    Before (r8 review): the hung mark was keyed by the destination's root folder, so every
    file for out/site-b was refused too for as long as site-a hung."""
    inbox, out = tmp_path / "inbox", tmp_path / "out"
    for folder in (inbox / "site-a", inbox / "site-b", out / "site-a", out / "site-b"):
        folder.mkdir(parents=True)
    ws = {"root": tmp_path, "inbox": inbox, "db": tmp_path / "journal.db"}
    retry = {"attempts": 1000, "delay": 0.2, "backoff": 1}
    step = {"url": out.as_uri(), "timeout": 2, "retry": retry}
    svc = ServiceProcess(remote_config(ws, step, source={"recursive": True}))
    gate = _OpenGate(out / "site-a")
    delivered = False
    with _closed(gate, svc):
        svc.start()
        old(inbox / "site-a" / "a.bin", os.urandom(2 << 20))  # the workers' path
        wait_until(lambda: "has not ended" in svc.log(), 90)  # stuck, called off: marked
        old(inbox / "site-b" / "b.bin", os.urandom(2 << 20))
        with contextlib.suppress(AssertionError):  # site-a hangs longer than this
            delivered = wait_until(lambda: (out / "site-b" / "b.bin").exists(), 30)
        log = svc.log()
    assert delivered, f"b.bin never reached the healthy out/site-b. Log:\n{log[-2500:]}"


def test_a_source_file_whose_open_hangs_does_not_freeze_the_service(tmp_path: Path) -> None:
    """Two sources on a local filesystem deliver to one healthy folder; opening a file of
    the first hangs (a network block device that stopped answering, or an on-access virus
    scanner holding the open, as the gate here). The second source's file is delivered, and
    a stop (SIGTERM) ends the process while the open still hangs.

    Before (r8 review): the scan's open-writers lease (``watcher/gates.py`` -> sourcefile
    ``lease`` -> ``os.open``) ran on the event loop itself for a local filesystem, so the
    loop blocked in that open: nothing was delivered anywhere and SIGTERM was not handled."""
    hung, fine, out = tmp_path / "hung", tmp_path / "fine", tmp_path / "out"
    for folder in (hung, fine, out):
        folder.mkdir()
    old(hung / "a.bin", b"a file whose open hangs\n")
    sources = [
        {"path": str(hung), "name": "hung", "settle": 0.05},
        {"path": str(fine), "name": "fine", "settle": 0.05},
    ]
    rules = [{"name": "all", "glob": "*", "to": [{"url": out.as_uri()}]}]
    cfg = _config(tmp_path, sources, rules, shutdown_grace=0.5)
    served = _served_beside_a_hang(
        ServiceProcess(cfg), _OpenGate(hung), fine / "b.txt", out / "b.txt"
    )
    delivered, exited, log = served
    assert (delivered, exited) == (True, True), (
        f"b.txt delivered: {delivered}; exited at SIGTERM: {exited}. Log:\n{log[-2000:]}"
    )


def test_once_moves_every_file_to_a_done_dir_on_another_filesystem(tmp_path: Path) -> None:
    """The healthy case of the moves above: ``--once`` with 40 files whose ``done_dir`` is on
    another filesystem (moved by copy, one at a time per folder) ends once every file is
    delivered and moved, none left in the source folder and no hidden copy in ``done_dir``."""
    done = _tmpfs_folder(tmp_path)
    try:
        cfg = _done_dir_config(tmp_path, done)
        names = [f"{i}.txt" for i in range(40)]
        for name in names:
            old(tmp_path / "a" / name, name.encode())
        result = run_cli("-c", cfg, "--once", timeout=120)
        assert result.returncode == 0, result.stderr
        assert sorted(os.listdir(done)) == sorted(names)
        assert all((done / n).read_bytes() == n.encode() for n in names)
    finally:
        shutil.rmtree(done, ignore_errors=True)
    assert os.listdir(tmp_path / "a") == []
    assert sorted(os.listdir(tmp_path / "out")) == sorted(names)
