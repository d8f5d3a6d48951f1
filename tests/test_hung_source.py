"""A source file whose open or read never returns (a hung network mount, an on-access
scanner holding it), delivered by an upload (HTTP, SFTP): the other source's files still go,
the step's ``timeout`` ends the attempt and says so in its row, its retries add no thread
stuck beside the first (the folder is refused while that call hangs), and a stop (SIGTERM)
ends the process while the source still hangs.

The hang is the kernel's own: fanotify permission events hold each open (or each read) of
the source folder's files (``test_called_off._OpenGate``; needs root, else skipped).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServiceProcess, cli_env, journal_rows, old, wait_until
from .servers import HttpReceiver, SftpServer
from .test_called_off import _OpenGate
from .test_hung_folder import _closed, _config, _stops

RETRY = {"attempts": 1000, "delay": 0.2, "backoff": 1}


def _hold_reads_instead(gate: _OpenGate, folder: Path) -> None:
    """Make ``gate`` hold each read of a file in ``folder`` (FAN_ACCESS_PERM) instead of each
    open: the file opens, and its first read waits, as on a mount that hangs mid-file."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fanotify_mark.argtypes = [
        ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
    ]  # fmt: skip
    # FAN_MARK_FLUSH: the opens' mark goes; then FAN_MARK_ADD FAN_ACCESS_PERM on the children
    if libc.fanotify_mark(gate.fd, 0x80, 0, -100, None) or libc.fanotify_mark(
        gate.fd, 0x1, 0x20000 | 0x08000000, -100, bytes(folder)
    ):
        pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")


@contextlib.contextmanager
def _http() -> Iterator[tuple[dict[str, Any], Callable[[str], bool]]]:
    receiver = HttpReceiver()
    try:
        step = {"url": receiver.url + "/up/{name}"}
        yield step, lambda name: any(r.path == f"/up/{name}" for r in receiver.received)
    finally:
        receiver.close()


@contextlib.contextmanager
def _sftp(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Callable[[str], bool]]]:
    server = SftpServer(tmp_path / "sftproot", tmp_path / "keys")
    try:
        step = {
            "url": server.url("/up/"),
            "key_file": str(server.key_file),
            "known_hosts": str(server.known_hosts),
        }
        up = server.root / "up"

        def arrived(name: str) -> bool:  # as it is, or after a name by content ("…-name")
            there = up.iterdir() if up.is_dir() else ()
            return any(p.name in (name, f"{p.name[:8]}-{name}") for p in there)

        yield step, arrived
    finally:
        server.close()


@contextlib.contextmanager
def _local(tmp_path: Path) -> Iterator[tuple[dict[str, Any], Callable[[str], bool]]]:
    """A local folder both sources copy into: a copy stuck opening its source must be
    blamed on the source, not on this folder, which the healthy source's files still reach."""
    out = tmp_path / "out"
    yield {"url": str(out)}, lambda name: (out / name).is_file()


def _served_beside_a_hung_source(
    tmp_path: Path, transport: str, size: int, reads: bool, name: str | None = None, **env: str
) -> tuple[bool, str, bool, int, str]:
    """Sources ``hung`` (a.bin, ``size`` bytes, its opens, or with ``reads`` its reads, held)
    and ``fine``, both uploaded by ``transport`` with ``timeout: 2``; once the upload of
    a.bin waits at the gate, b.txt is put in ``fine``. Whether b.txt arrived, a.bin's row's
    error once it has one, whether SIGTERM then ended the process, how many calls were
    held at the gate (each one a stuck thread) once a.bin had been tried again, and the log.
    ``name``: the step's name template; ``env``: for the service's environment."""
    hung, fine = tmp_path / "hung", tmp_path / "fine"
    for folder in (hung, fine):
        folder.mkdir()
    old(hung / "a.bin", os.urandom(size))
    with contextlib.ExitStack() as stack:
        makers = {"http": _http, "sftp": lambda: _sftp(tmp_path), "local": lambda: _local(tmp_path)}
        make = makers[transport]()
        step, arrived = stack.enter_context(make)
        if name is not None:
            step = {**step, "name": name}
        sources = [  # open_writers: ignore: the watcher opens nothing, the upload is the first
            {"path": str(hung), "name": "hung", "settle": 0.05, "open_writers": "ignore"},
            {"path": str(fine), "name": "fine", "settle": 0.05},
        ]
        rules = [{"name": "all", "glob": "*", "to": [{**step, "timeout": 2, "retry": RETRY}]}]
        cfg = _config(tmp_path, sources, rules, shutdown_grace=0.5)
        svc = ServiceProcess(cfg, env=cli_env(**env))
        gate = _OpenGate(hung)
        if reads:
            _hold_reads_instead(gate, hung)
        delivered = exited = False
        error = ""
        db = tmp_path / "journal.db"

        def a_row() -> dict[str, Any]:
            rows = journal_rows(db, "relpath = ?", ("a.bin",))
            return rows[0] if rows else {}

        def a_error() -> str:
            return str(a_row().get("reason") or "")

        with _closed(gate, svc):
            svc.start(wait_ready=False)
            assert gate.held.wait(60), svc.log()
            old(fine / "b.txt", b"a file of a healthy source\n")
            with contextlib.suppress(AssertionError):  # the hang lasts longer than this
                delivered = wait_until(lambda: arrived("b.txt"), 30)
            with contextlib.suppress(AssertionError):
                wait_until(a_error, 30)
            error = a_error()
            with contextlib.suppress(AssertionError):  # retried, each 0.2 s after the last
                wait_until(lambda: int(a_row().get("attempts", 0)) >= 4, 30)
            with gate._lock:
                stuck = len(gate._pending)
            exited = _stops(svc, 60)
        return delivered, error, exited, stuck, svc.log()


def _survived(delivered: bool, error: str, exited: bool, stuck: int, log: str) -> None:
    """The healthy source's file went, the hung one's row says why, SIGTERM ended the
    service, and the hung file holds one stuck call, not one per attempt."""
    assert (delivered, exited) == (True, True), (
        f"b.txt delivered: {delivered}; exited at SIGTERM: {exited}. Log:\n{log[-2500:]}"
    )
    assert "timed out after 2s" in error or "stuck" in error, (error, log[-2500:])
    assert stuck == 1, f"{stuck} calls stuck on the hung source: one, not one per attempt"


@pytest.mark.parametrize("transport", ["http", "sftp"])
@pytest.mark.parametrize("size", [1000, 2 << 20], ids=["small", "large"])
def test_an_upload_whose_source_open_hangs_freezes_neither_the_service_nor_its_stop(
    tmp_path: Path, transport: str, size: int
) -> None:
    """The open of a.bin never returns. Before: the uploads opened their source on the event
    loop (``open_input``), so the loop itself hung in that open: the healthy source's file
    was never sent, the step's timeout never fired, and SIGTERM was never handled."""
    _survived(*_served_beside_a_hung_source(tmp_path, transport, size, False))


@pytest.mark.parametrize("transport", ["http", "sftp"])
def test_an_upload_whose_source_read_hangs_freezes_neither_the_service_nor_its_stop(
    tmp_path: Path, transport: str
) -> None:
    """a.bin (1000 bytes) opens, but its read never returns (a scanner's permission check
    that holds each read, as FAN_ACCESS_PERM does). Before: the first read was tried inline
    on the loop (``RWF_NOWAIT``, which a permission check holds all the same), so the loop
    hung in it: nothing else was sent, no timeout fired, SIGTERM was not handled."""
    _survived(*_served_beside_a_hung_source(tmp_path, transport, 1000, True))


@pytest.mark.parametrize("transport", ["http", "sftp"])
def test_a_large_upload_whose_source_read_hangs_ends_at_its_timeout(
    tmp_path: Path, transport: str
) -> None:
    """a.bin (2 MiB) opens, but its reads never return, each read in a thread
    (FILEDISPATCH_FASTPATH=0: no inline read; an inline ``RWF_NOWAIT`` read is held by a
    permission check such as this gate's, though not by a hung NFS or FUSE mount, which
    refuse RWF_NOWAIT). Before: the reads ran in the loop's default executor and a
    cancelled upload awaited its read to the end (its descriptor was to be closed next): the
    step's timeout never ended the attempt, and the stop waited for it."""
    _survived(
        *_served_beside_a_hung_source(tmp_path, transport, 2 << 20, True, FILEDISPATCH_FASTPATH="0")
    )


@pytest.mark.parametrize("transport", ["http", "sftp"])
def test_a_name_by_content_of_a_source_whose_open_hangs_freezes_nothing(
    tmp_path: Path, transport: str
) -> None:
    """The step names files by their bytes (``{sha256:8}``), and the open of a.bin never
    returns. Before: the name was rendered at the start of the upload, on the event loop,
    which opened and hashed the whole file there (``naming.content_sha256``): the loop hung
    in that open, as it did in the upload's own before uploads opened their source in a
    thread (a large file's hash held it for as long as the hash took, too)."""
    _survived(*_served_beside_a_hung_source(tmp_path, transport, 1000, False, "{sha256:8}-{name}"))


def test_a_copy_stuck_opening_its_source_leaves_its_destination_folder_open_to_others(
    tmp_path: Path,
) -> None:
    """A local copy whose source's open never returns: once its attempt has timed out and the
    call is known stuck, the folder marked hung must be the source's, not the destination's,
    which the healthy source's files still reach (``CopyThreads.entering``). Before: the copy
    entered its destination folder before opening the source, so the stuck open marked the
    destination hung, and c.txt from the healthy source, bound for it, was refused."""
    hung, fine, out = tmp_path / "hung", tmp_path / "fine", tmp_path / "out"
    for folder in (hung, fine):
        folder.mkdir()
    old(hung / "a.bin", os.urandom(1000))
    sources = [
        {"path": str(hung), "name": "hung", "settle": 0.05, "open_writers": "ignore"},
        {"path": str(fine), "name": "fine", "settle": 0.05},
    ]
    step = {"url": str(out), "timeout": 2, "retry": RETRY}
    rules = [{"name": "all", "glob": "*", "to": [step]}]
    svc = ServiceProcess(_config(tmp_path, sources, rules, shutdown_grace=0.5))
    gate = _OpenGate(hung)
    db = tmp_path / "journal.db"

    def a_reason() -> str:
        rows = journal_rows(db, "relpath = ?", ("a.bin",))
        return str(rows[0]["reason"] or "") if rows else ""

    with _closed(gate, svc):
        svc.start(wait_ready=False)
        assert gate.held.wait(60), svc.log()
        wait_until(lambda: "stuck" in a_reason(), 60)  # tried again: the call is known stuck
        old(fine / "c.txt", b"a file of a healthy source\n")
        with contextlib.suppress(AssertionError):
            wait_until(lambda: (out / "c.txt").is_file(), 30)
        log = svc.log()
        assert (out / "c.txt").is_file(), f"refused beside a stuck source open:\n{log[-3000:]}"
        assert _stops(svc, 60), log[-2500:]
