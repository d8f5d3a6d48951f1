"""Session-10 review (rev10) of the day's integrity fixes, as an inbox writer and an operator
would attack them: the start's end of interrupted removals (``recovery.finish_removals``,
hidden names ``.filedispatch-gone-<key>-<random>``), links resolved only outside the
sources (``config.real_outside``) and the walk by list (``sourcefile.entries_beneath``).
Each test says in its docstring whether it is a finding (it failed on main 3d28da7; fixed
since) or a control (the attack held). Two findings are not fixed yet and stay on the
``rev10`` branch: a hung share below a recursive source holds the event loop while the
watch is made (rev10-1), and a retry from a failed_dir on another filesystem cut short by a
kill is delivered twice by the next retry (rev10-5). Real files, real mounts and fanotify
gates (root, else skipped), the real CLI and service."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

import pytest

from .conftest import (
    ServiceProcess,
    arrived,
    delivered,
    journal_rows,
    old,
    run_cli,
    wait_until,
)
from .test_after_swaps import _config, _delivered_then_interrupted, _moving
from .test_called_off import _OpenGate
from .test_hung_mount import FAN_ONDIR, FAN_OPEN_PERM, _mark_mount, _mounted


class _SlowFolders(_OpenGate):
    """fanotify permission events on a whole mount: every open there (of a folder too) is
    let through ``delay`` seconds after it was asked for, one after the other, as on a slow
    network share (an NFS mount over a distant link)."""

    def __init__(self, mount: Path, delay: float) -> None:
        super().__init__(mount)
        self.delay = delay
        try:
            _mark_mount(self.fd, mount, FAN_OPEN_PERM | FAN_ONDIR)
        except BaseException:
            self.close()
            raise
        self.release()

    def _answer(self, efd: int) -> None:
        time.sleep(self.delay)
        super()._answer(efd)


@pytest.mark.parametrize("delay", [0.0, 0.1])
def test_an_interrupted_removal_in_a_slow_recursive_source_is_still_finished(
    tmp_path: Path, delay: float
) -> None:
    """FINDING (rev10-2), fixed: the look is waited for while it lists
    (``recovery.STALL_S``). A recursive source on a slow share (every opendir or open answered
    after 0.1 s) holding 40 folders: a walk of it takes about 4 s, longer than the 2 s the
    start gives its look for interrupted removals (``recovery.SWEEP_WAIT_S``). A kill -9 in
    ``consume`` left a new version (renamed over the source as it was taken) under the
    hidden name carrying the delivered version's key. The next start must put it back and
    deliver it. Before: the look is given up after 2 s, on this start and on every later
    one, so the new version stays hidden in the inbox, never delivered (any recursive
    source whose walk takes over 2 s: a large tree, a share on a slow link). ``delay`` 0:
    the control (no gate), which holds on main."""
    inbox = tmp_path / "in"
    with _mounted(inbox, "ramfs"):
        for n in range(40):
            (inbox / f"d{n:02}").mkdir()
        inbox2, hidden, settings, _key = _delivered_then_interrupted(
            tmp_path, "a.txt", b"first\n", recursive=True
        )
        assert inbox2 == inbox
        hidden.unlink()
        (inbox / "new").write_bytes(b"second, renamed over it\n")
        os.utime(inbox / "new", (1_000_000_000, 1_000_000_000))
        os.rename(inbox / "new", hidden)
        gate = _SlowFolders(inbox, delay) if delay else None
        try:
            result = run_cli("-c", _config(tmp_path, [settings]), "--once", timeout=300)
        finally:
            if gate is not None:
                gate.close()
        left = sorted(p.name for p in inbox.iterdir() if p.is_file())
    assert sorted(delivered(tmp_path / "out").values()) == [
        b"first\n",
        b"second, renamed over it\n",
    ], (left, result.stderr[-3000:])


def test_a_slow_but_healthy_source_is_not_reported_hung_at_the_start(tmp_path: Path) -> None:
    """FINDING (rev10-4, low), fixed: a slow look marks nothing hung. The slow share
    of the test above (40 folders, each open
    answered after 0.1 s), nothing left by a kill: a healthy source whose walk takes 4 s.
    The start must not log an ERROR that the source is stuck, nor refuse its files.
    Before: "a look for interrupted removals a file to send has not returned by the end of its
    attempt (stuck in a system call: a hung disk or mount...); no file of this folder is sent
    until it has" (the wording of a stuck read, given the look's name), then "the stuck open
    or read of a file to send has returned ...; copies into it start again", at every start
    of any recursive source whose walk takes over 2 s."""
    inbox = tmp_path / "in"
    with _mounted(inbox, "ramfs"):
        for n in range(40):
            (inbox / f"d{n:02}").mkdir()
        old(inbox / "a.txt", b"a\n")
        source = {"path": str(inbox), "name": "in", "settle": 0, "recursive": True}
        gate = _SlowFolders(inbox, 0.1)
        try:
            result = run_cli("-c", _config(tmp_path, [source]), "--once", timeout=300)
        finally:
            gate.close()
    assert delivered(tmp_path / "out") == {"a.txt": b"a\n"}, result.stderr[-3000:]
    assert " ERROR " not in result.stderr, result.stderr[-3000:]


# -- names an inbox writer gives that parse as a hidden removal ---------------------------


def test_a_hidden_removal_name_cannot_forge_lines_in_the_log(tmp_path: Path) -> None:
    """CONTROL. The inbox writer names a file ``.filedispatch-gone-<key>-x``
    followed by a newline and a made-up log line (the key unknown to the journal). The
    start's warning about it must not print the name raw: a forged line (or terminal
    escapes) would land in the operator's log, as the watcher's own lines avoid by escaping
    names (``textsafe.escape``). Held: the log filter (``logs.ScrubFilter``) escapes every
    message, this one included."""
    inbox = tmp_path / "in"
    forged = "FORGED filedispatch: all files delivered"
    name = f".filedispatch-gone-00112233445566778899aabb-x\n{forged}"
    old(inbox / name, b"g\n")
    old(inbox / "a.txt", b"a\n")
    source = {"path": str(inbox), "name": "in", "settle": 0}
    result = run_cli("-c", _config(tmp_path, [source]), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (inbox / name).read_bytes() == b"g\n"  # it stays, unknown
    assert delivered(tmp_path / "out") == {"a.txt": b"a\n"}
    lines = result.stderr.splitlines()
    assert not any(line.startswith(forged) for line in lines), result.stderr[-3000:]


def test_hidden_removal_names_that_are_not_files_are_only_put_back(tmp_path: Path) -> None:
    """CONTROL. Beside the delivered version left under its hidden name by an interrupted
    removal, the inbox writer leaves a FIFO and a folder (holding a file) under hidden
    removal names carrying that version's key. The start never opens the FIFO (no hang),
    removes the delivered version, and takes neither attack for it: each is put back under
    the version's name (numbered where taken); the version is not delivered twice; the
    start ends."""
    inbox, hidden, settings, key = _delivered_then_interrupted(
        tmp_path, "a.txt", b"delivered\n", recursive=True
    )
    fifo = inbox / f".filedispatch-gone-{key}-f1f0"
    os.mkfifo(fifo)
    folder = inbox / f".filedispatch-gone-{key}-d1d0"
    old(folder / "inside.txt", b"inside\n")
    result = run_cli("-c", _config(tmp_path, [settings]), "--once", timeout=120)
    assert result.returncode in (0, 1), result.stderr[-3000:]
    assert not hidden.exists() and not fifo.exists() and not folder.exists(), result.stderr
    names = sorted(p.name for p in inbox.iterdir())
    assert names == ["a-1.txt", "a.txt"], names
    # the folder's file may meet out/a.txt (a file) on its way: a conflict, not checked here
    out = delivered(tmp_path / "out")
    assert list(out.values()).count(b"delivered\n") == 1, out


def test_a_hard_link_of_an_undelivered_file_under_its_hidden_name_leaves_the_file(
    tmp_path: Path,
) -> None:
    """CONTROL. ``a.txt`` failed (kept in the source, its row FAILED: not delivered). The
    inbox writer hard-links it under the hidden removal name carrying its own version's key,
    as if a removal had been interrupted. The start removes only that extra name (the very
    file of the version): ``a.txt`` itself stays, and nothing of it is marked delivered."""
    inbox = tmp_path / "in"
    old(inbox / "a.txt", b"not delivered\n")
    source = {"path": str(inbox), "name": "in", "settle": 0}
    failing = [{"name": "all", "glob": "*", "to": [{"command": "exit 4"}]}]
    cfg = _config(tmp_path, [source], rules=failing)
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 1
    [row] = journal_rows(tmp_path / "journal.db")
    assert row["status"] == "FAILED"
    link = inbox / f".filedispatch-gone-{row['vkey']}-0123456789ab"
    os.link(inbox / "a.txt", link)
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert (inbox / "a.txt").read_bytes() == b"not delivered\n", result.stderr[-3000:]
    assert not link.exists(), result.stderr[-3000:]
    # the extra link moved a.txt's ctime: a new version, sent (and failed) on its own
    assert {r["status"] for r in journal_rows(tmp_path / "journal.db")} == {"FAILED"}


def test_a_hidden_name_with_extra_dashes_or_another_source_s_key_is_not_removed(
    tmp_path: Path,
) -> None:
    """CONTROL. Two sources; ``b/a.txt`` was delivered and is kept (after: keep). In source
    ``in`` the inbox writer leaves (1) a file of their own under the hidden name carrying
    the key of ``b``'s version, and (2) one whose name adds dashes after the key. Neither is
    the very file of a version: nothing is removed; (1) comes back under the version's
    name in ``in`` (a file of its own, delivered), (2) stays (its key is unknown), and
    ``b/a.txt`` is untouched."""
    inbox, other = tmp_path / "in", tmp_path / "b"
    inbox.mkdir()
    old(other / "a.txt", b"kept in b\n")
    sources = [
        {"path": str(inbox), "name": "in", "settle": 0},
        {"path": str(other), "name": "b", "settle": 0},
    ]
    cfg = _config(tmp_path, sources)
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 0
    [row] = journal_rows(tmp_path / "journal.db")
    key = row["vkey"]
    mine = old(inbox / f".filedispatch-gone-{key}-0123456789ab", b"attacker's\n")
    dashes = old(inbox / f".filedispatch-gone-{key}-extra-0123", b"dashes\n")
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (other / "a.txt").read_bytes() == b"kept in b\n"
    assert not mine.exists()
    assert (inbox / "a.txt").read_bytes() == b"attacker's\n", result.stderr[-3000:]
    assert dashes.read_bytes() == b"dashes\n"


# -- links: an operator's on purpose outside the inbox, an inbox writer's inside ----------


@pytest.mark.parametrize("via", ["source-given-through-a-link", "done-dir-in-another-source"])
def test_a_done_dir_reached_through_operator_links_still_refuses_a_swap_in_the_inbox(
    tmp_path: Path, via: str
) -> None:
    """CONTROL. The done_dir lies in a hostile inbox, but the config reaches it another way
    than the source's own path: (1) the source and its done_dir are given through an
    operator's link outside the inbox (``inlink`` -> ``in``); (2) the done_dir of source
    ``in`` lies inside another source ``b`` (also written by the attacker). While the
    service is stopped the attacker replaces that done_dir with a link to ``outside``. The
    start must not resolve it: nothing lands in ``outside``, the file stays, ``--once``
    exits 1."""
    inbox, other, outside = tmp_path / "in", tmp_path / "b", tmp_path / "outside"
    for folder in (inbox, other, outside):
        folder.mkdir()
    if via == "source-given-through-a-link":
        (tmp_path / "inlink").symlink_to(inbox, target_is_directory=True)
        done = inbox / "done"
        moving = _moving(tmp_path / "inlink", tmp_path / "inlink" / "done")
        sources = [moving]
    else:
        done = other / "done"
        sources = [_moving(inbox, done), {"path": str(other), "name": "b", "settle": 0}]
    done.symlink_to(outside, target_is_directory=True)  # the inbox writer's swap
    old(inbox / "evil.txt", b"* * * * * root id > /tmp/owned\n")
    result = run_cli("-c", _config(tmp_path, sources), "--once", timeout=120)
    assert (tmp_path / "out" / "evil.txt").exists(), result.stderr[-3000:]
    assert sorted(p.name for p in outside.iterdir()) == [], result.stderr[-3000:]
    assert (inbox / "evil.txt").exists(), result.stderr[-3000:]
    assert result.returncode == 1, result.stderr[-3000:]


def test_a_retry_brings_a_file_back_from_a_failed_dir_that_is_an_operator_s_link(
    tmp_path: Path,
) -> None:
    """CONTROL. ``failed_dir: failed``, a link the operator made on purpose outside the
    inbox (to ``store/failed``). The failed file is moved there through it, and ``history
    retry`` brings it back through it (a link outside the sources is followed), then it
    is delivered, once."""
    from .test_after_swaps import _failed_once

    store = tmp_path / "store" / "failed"
    store.mkdir(parents=True)
    (tmp_path / "failed").symlink_to(store, target_is_directory=True)
    _inbox, cfg, row_id = _failed_once(tmp_path, tmp_path / "failed", "s1/a.txt", b"back\n")
    assert delivered(store) == {"s1/a.txt": b"back\n"}
    answer = run_cli("history", "retry", str(row_id), "-c", cfg)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 0
    assert delivered(tmp_path / "out") == {"s1/a.txt": b"back\n"}
    assert delivered(store) == {}


def test_hidden_removal_names_in_a_source_that_follows_links(tmp_path: Path) -> None:
    """CONTROL. ``follow_symlinks: true``: ``l.txt`` is a link to ``data/t.txt`` in the
    source; both were delivered (after: keep). A kill -9 left the link under the hidden name
    of ``l.txt``'s version (as ``consume`` renames the link, not its target), and the inbox
    writer adds, under another hidden name with that key, a link to a secret outside the
    inbox. The start removes only the link of the version (``data/t.txt`` stays), puts the
    other back (a link leading outside: never followed, never delivered), nothing is sent
    twice, the secret is not sent."""
    inbox = tmp_path / "in"
    secret = old(tmp_path / "secret.txt", b"SECRET\n")
    old(inbox / "data" / "t.txt", b"target\n")
    (inbox / "l.txt").symlink_to("data/t.txt")
    source = {"path": str(inbox), "name": "in", "settle": 0, "recursive": True}
    source |= {"follow_symlinks": True}
    cfg = _config(tmp_path, [source])
    assert run_cli("-c", cfg, "--once", timeout=120).returncode == 0
    assert delivered(tmp_path / "out") == {"l.txt": b"target\n", "data/t.txt": b"target\n"}
    [key] = [r["vkey"] for r in journal_rows(tmp_path / "journal.db") if r["relpath"] == "l.txt"]
    hidden = inbox / f".filedispatch-gone-{key}-0123456789ab"
    os.rename(inbox / "l.txt", hidden)
    planted = inbox / f".filedispatch-gone-{key}-ba9876543210"
    planted.symlink_to(secret)
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert not hidden.exists() and not planted.exists(), result.stderr[-3000:]
    assert (inbox / "data" / "t.txt").read_bytes() == b"target\n"
    assert os.readlink(inbox / "l.txt") == str(secret), result.stderr[-3000:]  # put back
    out = delivered(tmp_path / "out")
    assert out == {"l.txt": b"target\n", "data/t.txt": b"target\n"}, result.stderr[-3000:]


# -- a cluster on PostgreSQL, with a shared source ------------------------------------------


def test_an_interrupted_removal_in_a_shared_source_is_finished_in_a_rolling_cluster(
    tmp_path: Path, pg_url: str
) -> None:
    """FINDING (rev10-3), fixed: ``recovery.removals_task``.
    Two nodes share the source ``inbox`` (PostgreSQL journal). A kill
    -9 of one in ``consume`` left a new version (renamed over ``a.txt`` as it was taken)
    under the hidden name carrying the delivered version's key. The cluster is restarted
    the way a cluster is: one node at a time, the other live. The new version must be put
    back and delivered. Before: a node finishes interrupted removals of a shared source
    only when it starts alone, and a live node never looks again, so in a cluster that is
    never wholly stopped the new version stays hidden for ever, never delivered."""
    from .test_cluster import _node_config

    inbox, out = tmp_path / "inbox", tmp_path / "out"
    inbox.mkdir()
    n1, n2 = (_node_config(tmp_path, pg_url, n, str(out)) for n in ("n1", "n2"))
    first = ServiceProcess(n1).start()
    second: ServiceProcess | None = None
    try:
        old(inbox / "a.txt", b"first\n")
        wait_until(lambda: journal_rows(pg_url, "status='SUCCEEDED'"), 60)
        [row] = journal_rows(pg_url)
        hidden = inbox / f".filedispatch-gone-{row['vkey']}-0123456789ab"
        os.rename(inbox / "a.txt", hidden)  # the kill's leftover: a new version there
        hidden.unlink()
        old(tmp_path / "new", b"second, renamed over it\n")
        os.rename(tmp_path / "new", hidden)
        second = ServiceProcess(n2).start()  # n1 live
        first.stop(60)
        first = ServiceProcess(n1).start()  # n2 live: a rolling restart
        want = [b"first\n", b"second, renamed over it\n"]
        with contextlib.suppress(AssertionError):  # arrived: a copy under way is not counted
            wait_until(lambda: sorted(arrived(out).values()) == want, 60)
        got = sorted(delivered(out).values())
        log = first.log()[-2000:] + second.log()[-2000:]
    finally:
        first.stop(60)
        if second is not None:
            second.stop(60)
    assert got == [b"first\n", b"second, renamed over it\n"], (sorted(os.listdir(inbox)), log)
