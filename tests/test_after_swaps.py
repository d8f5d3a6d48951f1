"""Moves and removals of a delivered source (``done_dir``, ``failed_dir``, ``delete``) while
its writer, or anyone who may write the inbox, swaps or replaces it: a new version renamed
over the source as the move ends is never removed (``relocate.consume``), a file replaced
while its move waits is not moved, a mount made below a ``done_dir`` gets the file whole, a
move called off at the stop leaves the file in one place. First written as attacks by the
session-9 review (rev9); the first was a finding (the new version was deleted, never
delivered), the others held. Real files, real mounts and fanotify gates (root, else
skipped), the real CLI."""

from __future__ import annotations

import contextlib
import ctypes
import os
import select
import struct
import threading
import time
from pathlib import Path

import pytest

from .conftest import (
    ServiceProcess,
    delivered,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .test_called_off import _OpenGate


def _config(tmp_path: Path, sources: list[dict[str, object]], **top: object) -> Path:
    """Every source delivered to ``tmp_path/out`` (a subfolder per source: ``{source}``)."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    settings = {
        "database": str(tmp_path / "journal.db"),
        "sources": sources,
        "rules": [{"name": "all", "glob": "*", "to": [{"url": out.as_uri()}]}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
        **top,
    }
    return write_config(tmp_path / "config.yml", settings)


def _moving(inbox: Path, done: Path, recursive: bool = False) -> dict[str, object]:
    """A source ``inbox`` whose files are moved to ``done`` once delivered."""
    source: dict[str, object] = {"path": str(inbox), "name": "in", "settle": 0.05}
    return source | {"recursive": recursive, "after": "move", "done_dir": str(done)}


# -- finding: --once says all is well while a delivered file was not moved -----------------


def test_a_source_replaced_while_its_move_waits_in_the_lane_is_not_moved(
    tmp_path: Path,
) -> None:
    """``done`` is another filesystem whose opens wait at a gate: the first file's move sticks
    in its copy, and the second file, delivered meanwhile, waits behind it in the folder's
    lane. Its source is then replaced (another file renamed over its name: a second version).
    Once the gate opens, the version delivered is not moved (it is gone), the new one is not
    moved in its place under the first's delivery: it is delivered and moved on its own.
    Held: done/2.txt holds the second version's bytes, once; no hidden copy is left."""
    from .test_hung_mount import _hung_mount

    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    source = {"path": str(inbox), "name": "in", "settle": 0.05}
    source.update({"after": "move", "done_dir": str(done)})
    with _hung_mount(done) as gate:
        svc = ServiceProcess(_config(tmp_path, [source]))
        try:
            svc.start()
            old(inbox / "1.txt", b"one\n")
            assert gate.held.wait(60), svc.log()  # the first move's copy waits
            old(inbox / "2.txt", b"two, first\n")
            wait_until(lambda: (tmp_path / "out" / "2.txt").exists(), 60)
            old(inbox / "2.txt", b"two, second\n")  # renamed over it: another file
            gate.release()
            wait_until(lambda: not any(inbox.iterdir()), 90)
            placed = {p.name: p.read_bytes() for p in done.iterdir()}
            log = svc.log()
        finally:
            gate.release()
            svc.stop(60)
    assert placed == {"1.txt": b"one\n", "2.txt": b"two, second\n"}, log[-3000:]


def test_a_mount_made_below_a_done_dir_seen_to_rename_is_moved_into_whole(
    tmp_path: Path,
) -> None:
    """A rename into ``done`` was seen to work (``_inline``: for 60 s, moves there go
    inline); then another filesystem is mounted at done/s2. The next file's move (s2/2.txt)
    is tried inline, meets EXDEV, and goes to the lane, which copies it. Held: the file ends
    in done/s2 whole, once, and not in the inbox. (Not shown, since a mkdir or stat cannot
    be made to hang here: for that minute the event loop makes the folder and looks for a
    free name in the new mount.)"""
    from .test_hung_mount import _mounted

    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    svc = ServiceProcess(_config(tmp_path, [_moving(inbox, done, recursive=True)]))
    try:
        svc.start()
        old(inbox / "s1" / "1.txt", b"one\n")
        wait_until(lambda: (done / "s1" / "1.txt").exists(), 60)
        with _mounted(done / "s2"):
            old(inbox / "s2" / "2.txt", b"two\n")
            wait_until(lambda: not (inbox / "s2" / "2.txt").exists(), 60)
            moved = (done / "s2" / "2.txt").read_bytes()
            names = sorted(p.name for p in (done / "s2").iterdir())
            log = svc.log()
    finally:
        svc.stop(60)
    assert (moved, names) == (b"two\n", ["2.txt"]), log[-3000:]


def test_a_move_called_off_at_the_stop_mid_copy_leaves_the_file_in_one_place(
    tmp_path: Path,
) -> None:
    """The move's copy into ``done`` (another filesystem) waits at a gate when the service is
    stopped: the stop calls it off, waits for it CALL_OFF_PATIENCE_S, and ends the process
    with the thread still stuck. Held: the file is in the inbox and nowhere in ``done`` but
    for an empty hidden copy the stuck open had made; the next start moves it, the hidden
    copy goes, and ``done`` holds the file once."""
    from .test_hung_mount import _hung_mount

    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    source = {"path": str(inbox), "name": "in", "settle": 0.05}
    source.update({"after": "move", "done_dir": str(done)})
    cfg = _config(tmp_path, [source], shutdown_grace=0.5)
    with _hung_mount(done) as gate:
        svc = ServiceProcess(cfg)
        try:
            svc.start()
            old(inbox / "1.txt", b"one\n")
            assert gate.held.wait(60), svc.log()
            code = svc.stop(120)
        finally:
            gate.release()
            svc.stop(60)
        left = sorted(p.name for p in done.iterdir() if p.stat().st_size)
        assert (inbox / "1.txt").read_bytes() == b"one\n", svc.log()[-3000:]
        assert left == [], f"exit {code}; a copy with bytes left in done: {left}"
        again = ServiceProcess(cfg)
        try:
            again.start()
            wait_until(lambda: not (inbox / "1.txt").exists(), 60)
            placed = {p.name: p.read_bytes() for p in done.iterdir()}
        finally:
            again.stop(60)
    assert placed == {"1.txt": b"one\n"}, placed


# -- finding: a file renamed over the source as its move's copy is placed is deleted --------


class _ClosedWrites:
    """inotify on a folder: ``wait(prefix)`` returns once a file whose name starts with
    ``prefix`` has been closed after writing there."""

    def __init__(self, folder: Path) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_CLOEXEC | os.O_NONBLOCK)
        if self.fd < 0:
            pytest.skip(f"inotify_init1: {os.strerror(ctypes.get_errno())}")
        if self._libc.inotify_add_watch(self.fd, bytes(folder), 0x8) < 0:  # IN_CLOSE_WRITE
            os.close(self.fd)
            pytest.skip(f"inotify_add_watch: {os.strerror(ctypes.get_errno())}")

    def wait(self, prefix: str, until: threading.Event) -> bool:
        while not until.is_set():
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            buf = os.read(self.fd, 65536)
            at = 0
            while at < len(buf):
                _, _, _, size = struct.unpack_from("iIII", buf, at)
                name = buf[at + 16 : at + 16 + size].rstrip(b"\0").decode()
                at += 16 + size
                if name.startswith(prefix):
                    return True
        return False

    def close(self) -> None:
        os.close(self.fd)


def test_a_new_version_renamed_over_the_source_as_its_move_by_copy_ends_is_not_deleted(
    tmp_path: Path,
) -> None:
    """A producer that replaces its files atomically (write ``.a.txt.tmp``, rename it over
    ``a.txt``: the careful writer's way, no attacker needed) does so just as the move of the
    version delivered into a ``done_dir`` on another filesystem has written its copy.
    ``move_by_copy`` looks at the source (``unchanged()``), places the copy, then removes the
    source by name: a rename over the name between the look and the removal makes it remove
    the new version, never delivered. The window is the rename of the copy into place,
    widened here as a full ``done_dir`` widens it (a-1.txt ... taken: ``free_name`` looks at
    each); the new version is renamed in as soon as the copy is closed (inotify).

    Found: the new version is gone: not delivered, not in ``done``, not in the inbox
    (relocate.py ``move_by_copy``: ``unchanged()`` then ``rename_free`` then
    ``os.unlink(src)`` by name, nothing tying the unlink to the file looked at)."""
    from .test_hung_mount import _mounted

    inbox, done, out = tmp_path / "in", tmp_path / "done", tmp_path / "out"
    inbox.mkdir()
    # settle: the new version is delivered 2 s after it appeared, the old one's move ends first
    source = {"path": str(inbox), "name": "in", "settle": 2.0}
    source.update({"after": "move", "done_dir": str(done)})
    with _mounted(done):
        for n in range(1, 10_000):  # a done_dir where many a.txt went before
            (done / f"a-{n}.txt").write_bytes(b"")
        (done / "a.txt").write_bytes(b"")
        closed = _ClosedWrites(done)
        stop = threading.Event()
        swapped: list[bool] = []
        staged = inbox / ".a.txt.tmp"

        def producer() -> None:
            if closed.wait(".filedispatch-move-", stop):
                os.rename(staged, inbox / "a.txt")
                swapped.append(True)

        staged.write_bytes(b"a, second\n")
        thread = threading.Thread(target=producer, daemon=True)
        svc = ServiceProcess(_config(tmp_path, [source]))
        try:
            svc.start()
            thread.start()
            old(inbox / "a.txt", b"a, first\n")
            wait_until(lambda: swapped, 60)

            def holds(folder: Path, data: bytes) -> bool:
                return any(p.is_file() and p.read_bytes() == data for p in folder.iterdir())

            # the first version's move has ended: its copy placed, or refused as changed
            wait_until(
                lambda: holds(done, b"a, first\n") or "changed while it was moved" in svc.log(),
                60,
            )
            with contextlib.suppress(AssertionError):  # the second is delivered 2 s later
                wait_until(lambda: holds(out, b"a, second\n"), 30)
            found = holds(out, b"a, second\n") or holds(inbox, b"a, second\n")
            log = svc.log()
        finally:
            stop.set()
            thread.join(10)
            closed.close()
            svc.stop(60)
    assert found, f"the second version, never delivered, was deleted:\n{log[-3000:]}"


def test_once_exits_1_when_a_delivered_file_could_not_be_moved(tmp_path: Path) -> None:
    """``after: move`` of a recursive source: in/s1/a.txt goes to done/s1/a.txt, but a
    regular file stands at done/s1 (left by someone, or a file of that name moved there
    earlier by a non-recursive source sharing the done_dir). ``--once`` delivers the file,
    its move fails (the subfolder cannot be made), the file stays in the inbox: the run did
    not do what it was asked, and a cron job must be told (exit status 1, as for a done_dir
    that hangs). Before, the failure was only logged, the summary said nothing and the exit
    status was 0 (found by the session-9 review)."""
    inbox, done = tmp_path / "in", tmp_path / "done"
    inbox.mkdir()
    done.mkdir()
    (done / "s1").write_bytes(b"not a folder\n")
    source = {"path": str(inbox), "name": "in", "settle": 0.05, "recursive": True}
    source.update({"after": "move", "done_dir": str(done)})
    cfg = _config(tmp_path, [source])
    old(inbox / "s1" / "a.txt", b"a\n")
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert (tmp_path / "out" / "s1" / "a.txt").read_bytes() == b"a\n", result.stderr[-3000:]
    assert (inbox / "s1" / "a.txt").exists()  # not moved: its folder cannot be made
    assert result.returncode == 1, (
        f"--once exited {result.returncode} with a delivered file left unmoved:\n"
        f"{result.stdout}\n{result.stderr[-2000:]}"
    )
    assert "a move failed: see the log): 1" in result.stdout, result.stdout


def _let_pending(gate: _OpenGate) -> None:
    """Let the opens waiting at ``gate`` through, the gate staying closed to later ones."""
    with gate._lock:
        for efd in gate._pending:
            gate._answer(efd)
        gate._pending.clear()
        gate.held.clear()


def test_moves_slow_to_open_their_sources_do_not_mark_healthy_local_folders_hung(
    tmp_path: Path,
) -> None:
    """Two sources ``m/a`` and ``m/b`` on a filesystem of their own (a tmpfs here; an NFS
    share in life) whose opens are slow (an on-access virus scanner, a network share
    answering opens late: a fanotify gate here), each with ``after: move`` into a
    ``done_dir`` on the local disk (``da``, ``db``); a third source ``c`` on the local disk,
    delivered to ``out`` on the local disk. Once the two deliveries are in, the moves' opens
    of their sources wait at the gate. Nothing on the local disk hangs: ``c``'s file must be
    delivered.

    Before (found by the session-9 review): a move that makes no progress marks its
    ``done_dir`` hung whatever it waits for (here the source's open), and the second such
    move widened the mark to the folder both done_dirs are in, here ``tmp_path``: the local
    disk's healthy ``out`` was refused to every source for as long as the scanner was slow.
    A move's mark now stays on its own folder (``mark_stuck(..., alone=True)``)."""
    from .test_hung_mount import _mounted

    m, out = tmp_path / "m", tmp_path / "out"
    with _mounted(m):
        sources: list[dict[str, object]] = []
        for name in ("a", "b"):
            (m / name).mkdir()
            (m / name / f"{name}.txt").write_bytes(f"{name}\n".encode())
            sources.append(
                {"path": str(m / name), "name": name, "settle": 0.05, "after": "move"}
                | {"done_dir": str(tmp_path / f"d{name}")}
            )
        (tmp_path / "c").mkdir()
        sources.append({"path": str(tmp_path / "c"), "name": "c", "settle": 0.05})
        cfg = _config(tmp_path, sources)
        gates = [_OpenGate(m / "a"), _OpenGate(m / "b")]
        done = threading.Event()

        def deliveries_through() -> None:  # until each delivery is in, its opens go through
            while not done.is_set():
                for name, gate in zip(("a", "b"), gates, strict=True):
                    if not (out / f"{name}.txt").exists():
                        _let_pending(gate)
                time.sleep(0.01)

        releaser = threading.Thread(target=deliveries_through, daemon=True)
        releaser.start()
        svc = ServiceProcess(cfg)
        try:
            svc.start()
            wait_until(lambda: all((out / f"{n}.txt").exists() for n in ("a", "b")), 60)
            # the moves' opens wait at the gates: stuck moves, two done_dirs of one disk
            wait_until(lambda: svc.log().count("a move into it has made no progress") >= 2, 90)
            old(tmp_path / "c" / "c.txt", b"c\n")
            refused = "of its folders have been stuck"
            wait_until(lambda: (out / "c.txt").exists() or refused in svc.log(), 90)
            delivered = (out / "c.txt").exists()
            log = svc.log()
        finally:
            done.set()
            releaser.join(10)
            for gate in gates:
                gate.close()
            svc.stop(60)
    assert delivered, f"a healthy local folder refused as hung:\n{log[-4000:]}"


# -- a done_dir inside the hostile inbox, swapped for a link ----------------------

#: what the log says of a move refused for a link in its folder's path
_REFUSED = "nothing is moved through it"


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-fs", "other-fs"])
def test_a_done_dir_in_the_inbox_swapped_for_a_link_moves_nothing_out_through_it(
    tmp_path: Path, elsewhere: bool
) -> None:
    """``after: move`` with ``done_dir: in/done``, inside the source (allowed: the watcher
    keeps it out). The inbox is hostile: whoever may write there replaces the folder ``done``
    with a symbolic link to a folder of their choosing (``outside``; on a host, say
    /etc/cron.d or a home's .ssh, written with the service's rights), then drops a file of
    theirs. The file is delivered; its move must not follow the link: it stays in the inbox
    and the log says why. ``outside`` on the inbox's filesystem (a rename through the link)
    or on another (a tmpfs: a move by copy through it).

    Found by the session-9 review: the file was renamed or copied into ``outside`` (after.py
    ``_place``: ``mkdir(parents=True, exist_ok=True)`` took the link for the folder, and
    ``rename_free`` / ``move_by_copy`` used a path resolved through it)."""
    from .test_hung_mount import _mounted

    inbox, outside = tmp_path / "in", tmp_path / "outside"
    done = inbox / "done"
    inbox.mkdir()
    done.mkdir()
    with _mounted(outside) if elsewhere else contextlib.nullcontext(outside.mkdir()):
        svc = ServiceProcess(_config(tmp_path, [_moving(inbox, done)]))
        try:
            svc.start()
            done.rmdir()
            done.symlink_to(outside, target_is_directory=True)  # the inbox writer's swap
            old(inbox / "evil.txt", b"* * * * * root id > /tmp/owned\n")
            wait_until(lambda: (tmp_path / "out" / "evil.txt").exists(), 60)
            wait_until(lambda: not (inbox / "evil.txt").exists() or _REFUSED in svc.log(), 60)
            log = svc.log()
        finally:
            svc.stop(60)
        assert not (outside / "evil.txt").exists(), f"moved out through the link:\n{log[-3000:]}"
        assert sorted(p.name for p in outside.iterdir()) == [], log[-3000:]
    assert (inbox / "evil.txt").exists(), log[-3000:]
    assert _REFUSED in log, log[-3000:]


def test_a_done_dir_in_the_inbox_swapped_for_a_link_while_the_service_is_stopped_is_refused(
    tmp_path: Path,
) -> None:
    """The same swap made while no service runs (before a restart, a reboot, a cron run of
    ``--once``): the start must not resolve the link and take its target for the done_dir.
    The file is delivered and stays in the inbox, ``--once`` exits 1, ``outside`` gets
    nothing. Before: the start resolved ``in/done`` through the link (``config.real``) and
    the file was moved into ``outside``."""
    inbox, outside = tmp_path / "in", tmp_path / "outside"
    done = inbox / "done"
    for folder in (inbox, outside):
        folder.mkdir()
    done.symlink_to(outside, target_is_directory=True)  # the inbox writer's swap
    old(inbox / "evil.txt", b"* * * * * root id > /tmp/owned\n")
    result = run_cli("-c", _config(tmp_path, [_moving(inbox, done)]), "--once", timeout=120)
    assert (tmp_path / "out" / "evil.txt").exists(), result.stderr[-3000:]
    assert sorted(p.name for p in outside.iterdir()) == [], result.stderr[-3000:]
    assert (inbox / "evil.txt").exists()
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert _REFUSED in result.stderr, result.stderr[-3000:]


def test_a_subfolder_of_a_done_dir_swapped_for_a_link_while_moves_go_inline_is_refused(
    tmp_path: Path,
) -> None:
    """The same attack on a subfolder (a recursive source: in/s1/a.txt goes to
    in/done/s1/a.txt) while renames into ``done`` go inline on the loop (one was seen to
    work: ``_inline``): done/s1, made by the first move, is replaced by a link to
    ``outside``. The next file of s1 is delivered and stays in the inbox; ``outside`` gets
    nothing; a file of another subfolder is still moved."""
    inbox, outside = tmp_path / "in", tmp_path / "outside"
    done = inbox / "done"
    for folder in (inbox, outside):
        folder.mkdir()
    cfg = _config(tmp_path, [_moving(inbox, done, recursive=True)])
    svc = ServiceProcess(cfg)
    try:
        svc.start()
        old(inbox / "s1" / "ok.txt", b"ok\n")
        wait_until(lambda: (done / "s1" / "ok.txt").exists(), 60)
        (done / "s1" / "ok.txt").rename(outside / "was-ok.txt")
        (done / "s1").rmdir()
        (done / "s1").symlink_to(outside, target_is_directory=True)
        old(inbox / "s1" / "evil.txt", b"evil\n")
        wait_until(lambda: not (inbox / "s1" / "evil.txt").exists() or _REFUSED in svc.log(), 60)
        old(inbox / "s2" / "fine.txt", b"fine\n")
        wait_until(lambda: (done / "s2" / "fine.txt").exists(), 60)
        log = svc.log()
    finally:
        svc.stop(60)
    assert sorted(p.name for p in outside.iterdir()) == ["was-ok.txt"], log[-3000:]
    assert (inbox / "s1" / "evil.txt").read_bytes() == b"evil\n", log[-3000:]
    assert _REFUSED in log, log[-3000:]


# -- a removal a stop interrupted (relocate.consume, recovery.finish_removals) ---------------
# A source being removed is renamed to ``.filedispatch-gone-<version key>-<random>`` in its
# own folder, looked at, then unlinked. A kill -9 between the rename and the unlink leaves it
# there (seen in a loaded CI run of test_redteam_integrity's kill -9 chain test). The state a
# kill leaves is made here by that very rename, after a run that delivered the file.


def _delivered_then_interrupted(
    tmp_path: Path, rel: str, data: bytes, **source: object
) -> tuple[Path, Path, dict[str, object], str]:
    """``rel`` delivered by ``--once`` (after: keep), then left as a stop between consume's
    rename and its unlink leaves it; returns the inbox, the hidden file, the source's
    settings and the version key."""
    inbox = tmp_path / "in"
    settings: dict[str, object] = {"path": str(inbox), "name": "in", "settle": 0} | source
    old(inbox / rel, data)
    result = run_cli("-c", _config(tmp_path, [settings]), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    [row] = journal_rows(tmp_path / "journal.db")
    assert row["status"] == "SUCCEEDED"
    hidden = (inbox / rel).with_name(f".filedispatch-gone-{row['vkey']}-0123456789ab")
    os.rename(inbox / rel, hidden)
    return inbox, hidden, settings, row["vkey"]


@pytest.mark.parametrize("rel", ["a.txt", "sub/a.txt"])
@pytest.mark.parametrize("after", ["delete", "move"])
def test_a_delivered_source_left_by_a_kill_mid_removal_is_removed_at_the_next_start(
    tmp_path: Path, rel: str, after: str
) -> None:
    """The delivered version under its hidden name: the next start removes it (the move's
    copy was placed before the rename: it stays, once), sends nothing again, and the inbox is
    empty. Before: the file stayed in the inbox for ever (a recursive source, a subfolder)."""
    done = tmp_path / "done"
    inbox, hidden, settings, _key = _delivered_then_interrupted(
        tmp_path, rel, b"delivered\n", recursive=True
    )
    if after == "move":  # consume runs once the move's copy is in place
        (done / rel).parent.mkdir(parents=True)
        (done / rel).write_bytes(b"delivered\n")
        settings |= {"after": "move", "done_dir": str(done)}
    else:
        settings |= {"after": "delete"}
    result = run_cli("-c", _config(tmp_path, [settings]), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not hidden.exists(), result.stderr[-3000:]
    assert [p for p in inbox.rglob("*") if p.is_file()] == []
    assert delivered(tmp_path / "out") == {rel: b"delivered\n"}
    assert delivered(done) == ({rel: b"delivered\n"} if after == "move" else {})
    assert [r["status"] for r in journal_rows(tmp_path / "journal.db")] == ["SUCCEEDED"]
    assert "whose removal a stop interrupted" in result.stderr


def test_a_new_version_left_by_a_kill_mid_removal_is_put_back_and_delivered(
    tmp_path: Path,
) -> None:
    """What the hidden name holds is not the version delivered (a new version a writer
    renamed over the source just as it was taken): the next start puts it back under its
    name, and it is delivered as a new version. Before: it stayed hidden, never delivered."""
    inbox, hidden, settings, _key = _delivered_then_interrupted(tmp_path, "a.txt", b"first\n")
    hidden.unlink()
    (tmp_path / "new").write_bytes(b"second, renamed over it\n")
    os.rename(tmp_path / "new", hidden)
    settings |= {"after": "delete"}
    result = run_cli("-c", _config(tmp_path, [settings]), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert not hidden.exists()
    assert list(inbox.iterdir()) == []  # put back, delivered, then removed
    assert sorted(delivered(tmp_path / "out").values()) == [
        b"first\n",
        b"second, renamed over it\n",
    ]
    assert [r["status"] for r in journal_rows(tmp_path / "journal.db")] == ["SUCCEEDED"] * 2


def test_names_of_filedispatch_s_own_work_are_never_taken_even_without_the_default_ignores(
    tmp_path: Path,
) -> None:
    """``ignore_defaults: false`` (hidden names are wanted): a hidden removal the journal does
    not know (another journal's, or made by hand) and a copy in progress of ours are not
    files to send. The unknown one stays, with a warning. Before: both were delivered, the
    leftover a second time under another name."""
    inbox = tmp_path / "in"
    gone = old(inbox / ".filedispatch-gone-00112233445566778899aabb-0123456789ab", b"g\n")
    old(inbox / ".filedispatch-tmp-abcd1234-7-a.txt", b"half\n")
    old(inbox / ".wanted", b"a hidden file, wanted\n")
    source = {"path": str(inbox), "name": "in", "settle": 0, "ignore_defaults": False}
    result = run_cli("-c", _config(tmp_path, [source]), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert delivered(tmp_path / "out") == {".wanted": b"a hidden file, wanted\n"}
    assert gone.read_bytes() == b"g\n"
    assert "no dispatch of this journal has its version" in result.stderr


# -- a retry's return from failed_dir, with links swapped in ---------------------------------


def _failed_once(tmp_path: Path, failed: Path, rel: str, data: bytes) -> tuple[Path, Path, int]:
    """``rel`` sent to a command that fails, so moved to ``failed``; then the config says a
    folder instead (the retry will succeed). Returns the inbox, the config and the row id."""
    inbox = tmp_path / "in"
    source = {"path": str(inbox), "name": "in", "settle": 0, "recursive": True}
    source |= {"failed_dir": str(failed)}
    settings = {
        "database": str(tmp_path / "journal.db"),
        "sources": [source],
        "rules": [{"name": "all", "glob": "*", "to": [{"command": "exit 4"}]}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    cfg = write_config(tmp_path / "config.yml", settings)
    old(inbox / rel, data)
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 1
    assert delivered(failed) == {rel: data}
    [row] = journal_rows(tmp_path / "journal.db")
    settings["rules"] = [{"name": "all", "glob": "*", "to": [str(tmp_path / "out")]}]
    write_config(cfg, settings)
    return inbox, cfg, row["id"]


def test_a_retry_never_brings_a_file_back_through_a_failed_dir_swapped_for_a_link(
    tmp_path: Path, other_fs: Path
) -> None:
    """``failed_dir: in/failed`` inside the hostile inbox. A file of the inbox writer's fails
    and is moved there; they then replace ``in/failed`` with a link to another filesystem
    where a file of the same name, size and mtime waits (on a host: any file the service may
    read, its size and mtime being readable by anyone). ``history retry`` must not take that
    file for the failed one: it would be moved into the inbox (removed from its place) and
    delivered. Before: the retry said it was moved back, and its bytes were sent."""
    failed = tmp_path / "in" / "failed"
    _inbox, cfg, row_id = _failed_once(tmp_path, failed, "x.txt", b"12345678\n")
    st = (failed / "x.txt").stat()
    secret = other_fs / "elsewhere"
    secret.mkdir()
    (secret / "x.txt").write_bytes(b"SECRET!!\n")  # the same size
    os.utime(secret / "x.txt", ns=(st.st_atime_ns, st.st_mtime_ns))
    (failed / "x.txt").unlink()
    failed.rmdir()
    failed.symlink_to(secret, target_is_directory=True)  # the inbox writer's swap
    answer = run_cli("history", "retry", str(row_id), "-c", cfg)
    run_cli("-c", cfg, "--once", timeout=120)
    assert (secret / "x.txt").read_bytes() == b"SECRET!!\n", answer.stdout + answer.stderr
    assert delivered(tmp_path / "out") == {}, answer.stdout + answer.stderr
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "cannot look in failed_dir" in answer.stderr, answer.stderr


def test_a_retry_never_puts_a_file_back_through_a_source_folder_swapped_for_a_link(
    tmp_path: Path,
) -> None:
    """A recursive source: in/s1/a.txt failed and was moved to failed/s1/a.txt (outside the
    inbox). The inbox writer replaces in/s1 with a link to ``outside`` (on a host,
    /etc/cron.d). ``history retry`` must not move the failed file (their bytes) into
    ``outside``. Before: it was moved there (``mkdir(parents=True)`` and the rename went
    through the link)."""
    failed, outside = tmp_path / "failed", tmp_path / "outside"
    inbox, cfg, row_id = _failed_once(tmp_path, failed, "s1/a.txt", b"* * * * * root id\n")
    outside.mkdir()
    (inbox / "s1").rmdir()
    (inbox / "s1").symlink_to(outside, target_is_directory=True)
    answer = run_cli("history", "retry", str(row_id), "-c", cfg)
    assert sorted(outside.iterdir()) == [], answer.stdout + answer.stderr
    assert delivered(failed) == {"s1/a.txt": b"* * * * * root id\n"}
    assert answer.returncode == 1, answer.stdout + answer.stderr
    assert "nothing is moved through it" in answer.stderr, answer.stderr


def test_a_retry_still_brings_a_file_back_from_a_failed_dir_on_another_filesystem(
    tmp_path: Path, other_fs: Path
) -> None:
    """The control: nothing swapped, ``failed_dir`` on another filesystem (a copy back), a
    subfolder: the retry brings the file back and it is delivered."""
    failed = other_fs / "failed"
    _inbox, cfg, row_id = _failed_once(tmp_path, failed, "s1/a.txt", b"back\n")
    answer = run_cli("history", "retry", str(row_id), "-c", cfg)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 0
    assert delivered(tmp_path / "out") == {"s1/a.txt": b"back\n"}
    assert delivered(failed) == {}


def _chain(top: Path, depth: int) -> list[int]:
    """``depth`` folders ``d`` one in the other under ``top``, made by descriptors
    (``os.makedirs`` and ``shutil.rmtree`` recurse); the descriptors, top first, for
    ``_unchain``."""
    fds = [os.open(top, os.O_RDONLY | os.O_DIRECTORY)]
    for _ in range(depth):
        os.mkdir("d", dir_fd=fds[-1])
        fds.append(os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=fds[-1]))
    return fds


def _unchain(fds: list[int]) -> None:
    """Remove what ``_chain`` made, and the files left in it, deepest first."""
    while fds:
        fd = fds.pop()
        for name in os.listdir(fd):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)
        os.close(fd)
        if fds:
            with contextlib.suppress(OSError):
                os.rmdir("d", dir_fd=fds[-1])


def test_a_tree_deeper_than_python_recursion_does_not_stop_the_start(tmp_path: Path) -> None:
    """The start walks a recursive source (interrupted removals) and each local destination
    (temporary files a crash left): a chain of 1,500 folders, deeper than Python's recursion
    limit (a hostile inbox may hold one, and a destination inside it), must neither end the
    start nor hide what lies at its bottom. Before: ``os.walk`` recursed (Python 3.11): the
    start failed on the source, and the sweep of the destination stopped a thousand deep."""
    inbox, out = tmp_path / "in", tmp_path / "out"
    old(inbox / "a.txt", b"a\n")
    out.mkdir()
    chains = [_chain(inbox, 1500), _chain(out, 1500)]
    try:
        stale = Path(f"/proc/self/fd/{chains[1][-1]}/.filedispatch-tmp-5-a.txt")
        stale.write_bytes(b"half a copy")  # the old form of a temporary name: stale
        source = {"path": str(inbox), "name": "in", "settle": 0, "recursive": True}
        result = run_cli("-c", _config(tmp_path, [source]), "--once", timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert (out / "a.txt").read_bytes() == b"a\n"
        assert not stale.exists(), result.stderr[-3000:]
    finally:
        for fds in chains:
            _unchain(fds)
