"""The watcher in a running service: readiness, reconcile scans, odd names, mounts."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config
from filedispatch.errors import JournalError
from filedispatch.models import FileVersion
from filedispatch.watcher import SourceWatcher, is_network_fs, mount_fstype

from .conftest import ServiceProcess, inotify_limited, journal_rows, old, wait_until, write_config


def cfg(ws: dict[str, Path], **source: Any) -> Path:
    return write_config(
        ws["root"] / "c.yml",
        {
            "database": str(ws["db"]),
            "sources": [{"path": str(ws["inbox"]), "settle": 0.1, **source}],
            "rules": [{"name": "all", "glob": "*", "to": str(ws["outbox"])}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def test_reconcile_scan_finds_what_events_missed(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """With events effectively off (polling once an hour), only the rescan can find a file."""
    ws = workspace
    svc: ServiceProcess = service_factory(cfg(ws, poll=True, poll_interval=3600, rescan=0.5))
    svc.start()
    (ws["inbox"] / "late.txt").write_text("found by the reconcile scan")
    wait_until(lambda: (ws["outbox"] / "late.txt").exists(), 15)
    assert svc.stop() == 0


def test_a_source_folder_removed_and_made_again_is_watched_again(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """The watch of a removed folder hears nothing of a new folder at its path: the removal
    ends it and a new one begins once the folder is back. Rescans are off, so only the watch
    can find the file dropped into the new folder."""
    ws = workspace
    svc: ServiceProcess = service_factory(cfg(ws, rescan=0))
    svc.start()
    (ws["inbox"] / "a.txt").write_text("before")
    wait_until(lambda: (ws["outbox"] / "a.txt").exists(), 30)
    shutil.rmtree(ws["inbox"])
    wait_until(lambda: f"the folder {ws['inbox']} was removed" in svc.log(), 30)
    ws["inbox"].mkdir()
    (ws["inbox"] / "b.txt").write_text("after")
    wait_until(lambda: (ws["outbox"] / "b.txt").exists(), 30)
    assert (ws["outbox"] / "b.txt").read_text() == "after"
    assert svc.stop() == 0


def test_default_filter_of_watchfiles_does_not_hide_files(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """watchfiles' DefaultFilter would drop node_modules/ and .git paths; our rules decide."""
    ws = workspace
    svc: ServiceProcess = service_factory(cfg(ws, recursive=True)).start()
    (ws["inbox"] / "node_modules").mkdir()
    (ws["inbox"] / "node_modules" / "pkg.js").write_text("js")
    (ws["inbox"] / "build.pyc").write_text("pyc")
    (ws["inbox"] / ".hidden").write_text("ignored by our default ignore")
    (ws["inbox"] / "x.part").write_text("partial download, ignored")
    wait_until(
        lambda: (
            (ws["outbox"] / "node_modules" / "pkg.js").exists()
            and (ws["outbox"] / "build.pyc").exists()
        )
    )
    time.sleep(0.5)
    assert svc.stop() == 0
    assert not (ws["outbox"] / ".hidden").exists() and not (ws["outbox"] / "x.part").exists()


def test_a_folder_moved_in_whole_is_scanned(
    workspace: dict[str, Path], tmp_path: Path, service_factory: Any
) -> None:
    ws = workspace
    svc: ServiceProcess = service_factory(cfg(ws, recursive=True)).start()
    staged = tmp_path / "staged"
    (staged / "deep").mkdir(parents=True)
    (staged / "deep" / "a.txt").write_text("a")
    (staged / "b.txt").write_text("b")
    os.rename(staged, ws["inbox"] / "batch")
    wait_until(
        lambda: (
            (ws["outbox"] / "batch" / "deep" / "a.txt").exists()
            and (ws["outbox"] / "batch" / "b.txt").exists()
        )
    )
    assert svc.stop() == 0


def test_a_non_utf8_name_arriving_live_does_not_stop_the_watch(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    svc: ServiceProcess = service_factory(cfg(ws)).start()
    with open(os.path.join(os.fsencode(ws["inbox"]), b"caf\xe9.txt"), "wb") as fh:
        fh.write(b"latin-1 name")
    wait_until(lambda: journal_rows(ws["db"], "status='FAILED'"), 20)
    (ws["inbox"] / "after.txt").write_text("still watching")
    wait_until(lambda: (ws["outbox"] / "after.txt").exists(), 20)
    assert svc.proc is not None and svc.proc.poll() is None
    assert svc.stop() == 0
    (row,) = journal_rows(ws["db"], "status='FAILED'")
    assert "not valid UTF-8" in row["reason"]


def test_mount_table_detection(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(
        "/dev/vda / ext4 rw 0 0\n"
        "server:/export /mnt/nfs nfs4 rw 0 0\n"
        "sshfs#me@host: /mnt/ssh\\040dir fuse.sshfs rw 0 0\n"
    )
    assert mount_fstype(Path("/mnt/nfs/inbox"), str(mounts)) == "nfs4"
    assert mount_fstype(Path("/mnt/ssh dir/x"), str(mounts)) == "fuse.sshfs"
    assert mount_fstype(Path("/home/user"), str(mounts)) == "ext4"
    assert is_network_fs("nfs4") and is_network_fs("fuse.sshfs") and not is_network_fs("ext4")


async def test_a_batch_that_cannot_be_handed_on_is_offered_again(
    workspace: dict[str, Path],
) -> None:
    """The journal refusing a batch (here: the hand-on callback raising, as a full disk makes
    the journal raise) costs a log line and a rescan, not the watch."""
    ws = workspace
    source = load_config(cfg(ws, rescan=0)).sources[0]
    offered: list[list[str]] = []

    async def emit(_: Any, versions: list[FileVersion]) -> None:
        offered.append([v.relpath for v in versions])
        if len(offered) == 1:
            raise JournalError("database or disk is full")

    async def reject(*_: Any) -> None:
        raise AssertionError("nothing here is rejected")

    watcher = SourceWatcher(source, emit, reject)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.wait_for(watcher.ready.wait(), 10)
    old(ws["inbox"] / "edi-1.x12", b"ISA*00")
    for _ in range(300):  # the live batch fails; the rescan one second later offers it again
        if len(offered) >= 2:
            break
        await asyncio.sleep(0.02)
    stop.set()
    await asyncio.wait_for(task, 10)
    assert offered[:2] == [["edi-1.x12"], ["edi-1.x12"]]
    assert watcher.last_error == "JournalError: database or disk is full"


async def test_a_watcher_made_again_leaves_alone_only_the_first_starts_files(
    workspace: dict[str, Path],
) -> None:
    """``process_existing: false``: the files there at the first start are left alone, and
    only those. A watcher made again for the same source (a reload that restarts the
    watchers, a shared source's listing lease lost and regained) takes the first baseline
    from the store it is given; a baseline of its own would also leave alone what arrived
    while no watcher ran, never sent."""
    ws = workspace
    source = load_config(cfg(ws, process_existing=False, rescan=0)).sources[0]
    old(ws["inbox"] / "before.txt", b"there at the first start")
    offered: list[str] = []

    async def emit(_: Any, versions: list[FileVersion]) -> None:
        offered.extend(v.relpath for v in versions)

    async def never(*_: Any) -> None:
        raise AssertionError("nothing here is rejected")

    baselines: dict[str, set[tuple[str, int, int]]] = {}
    for round_ in range(2):
        watcher = SourceWatcher(source, emit, never, baselines=baselines)
        stop = asyncio.Event()
        task = asyncio.create_task(watcher.run(stop))
        await asyncio.wait_for(watcher.ready.wait(), 10)
        deadline = time.monotonic() + 20
        while round_ == 1 and not offered and time.monotonic() < deadline:
            await asyncio.sleep(0.02)  # until the second watcher offers what it found
        stop.set()
        await asyncio.wait_for(task, 10)
        if round_ == 0:
            assert offered == []
            old(ws["inbox"] / "between.txt", b"arrived while no watcher ran")
    assert offered == ["between.txt"]
    assert [p for p, _, _ in baselines[source.key]] == ["before.txt"]


@pytest.mark.parametrize("short_run", [False, True])
async def test_a_short_runs_watch_never_steps_down_to_idle(
    workspace: dict[str, Path], watch_steps: list[int], short_run: bool
) -> None:
    """``--once`` (``short_run``): the watch's longest step is the warm one, so the stop
    waits at most that long for the watch thread; a long run's idle watch takes the idle
    step (before: ``--once`` too, and each run's stop waited up to 200 ms for it)."""
    from filedispatch.watcher import changes

    steps = watch_steps
    source = load_config(cfg(workspace, rescan=0)).sources[0]

    async def never(*_: Any) -> None:
        return None

    watcher = SourceWatcher(source, never, never, short_run=short_run)
    stop = asyncio.Event()
    task = asyncio.create_task(watcher.run(stop))
    await asyncio.wait_for(watcher.ready.wait(), 30)
    async with asyncio.timeout(30):
        while not steps:  # the watch's first look is under way
            await asyncio.sleep(0.01)
    stop.set()
    await asyncio.wait_for(task, 30)
    warm, idle = changes.PACE[1][0], changes.PACE[-1][0]
    assert steps[0] == (warm if short_run else idle), steps


def test_a_file_swapped_in_during_its_quiet_period_starts_it_again(
    workspace: dict[str, Path],
) -> None:
    """Settling compares the inode and ctime too: another file put at the name with the same
    size and mtime (here an mtime ahead of the clock, as a skewed NFS server gives, so only
    the quiet period decides) is watched for a whole period of its own."""
    ws = workspace
    source = load_config(cfg(ws, settle=5)).sources[0]

    async def never(*_: object) -> None:
        return None

    watcher = SourceWatcher(source, never, never)
    now = time.time()
    ahead = int((now + 60) * 1e9)
    path = ws["inbox"] / "a.txt"
    path.write_bytes(b"first")
    os.utime(path, ns=(ahead, ahead))
    st = path.stat()
    ident = (st.st_ino, st.st_ctime_ns, st.st_dev)
    assert watcher.gates.consider("a.txt", st.st_size, st.st_mtime_ns, now, ident) is None
    (ws["root"] / "swap").write_bytes(b"other")
    os.utime(ws["root"] / "swap", ns=(ahead, ahead))
    os.rename(ws["root"] / "swap", path)
    st2 = path.stat()
    assert (st2.st_size, st2.st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    ident2 = (st2.st_ino, st2.st_ctime_ns, st2.st_dev)
    assert ident2 != ident
    assert watcher.gates.consider("a.txt", st2.st_size, st2.st_mtime_ns, now + 5, ident2) is None
    v = watcher.gates.consider("a.txt", st2.st_size, st2.st_mtime_ns, now + 10, ident2)
    assert v is not None and v.ino == st2.st_ino


def test_folders_the_kernel_will_not_watch_make_the_source_poll(workspace: dict[str, Path]) -> None:
    """A host at ``fs.inotify.max_user_watches``: the kernel refuses the watches of most of
    the source's 31 folders, and watchfiles passes that over without a word, so files in
    those folders would wait for a rescan (off here). The service runs in a user namespace of
    its own whose limit is 5, so the refusal is real and touches nothing outside. It must see
    the shortfall, say so, and poll: every file in every folder is delivered."""
    ws = workspace
    for i in range(30):
        (ws["inbox"] / f"d{i:02d}").mkdir(parents=True)
    config = cfg(ws, recursive=True, rescan=0, poll_interval=0.2)
    svc = ServiceProcess(config, wrap=inotify_limited("max_inotify_watches", 5))
    svc.start(wait_ready=False)
    try:
        wait_until(lambda: "watching 1 source(s)" in svc.log(), 60)  # scanned
        wait_until(lambda: "polling every 0.2s instead" in svc.log(), 60)
        assert "inotify watches only 5 of its 31 folders" in svc.log()
        for i in range(30):
            old(ws["inbox"] / f"d{i:02d}" / "a.txt", f"file {i}".encode())
        wait_until(lambda: len(list(ws["outbox"].glob("d*/a.txt"))) == 30, 60)
        assert (ws["outbox"] / "d07" / "a.txt").read_bytes() == b"file 7"
    finally:
        assert svc.stop() == 0, svc.log()
    assert "Traceback" not in svc.log()


def test_a_folder_the_service_cannot_read_is_not_a_refused_watch(tmp_path: Path) -> None:
    """The service as an unprivileged user, with a subfolder it may not read (another
    user's, mode 0700): neither the scan nor inotify can look into it. That is not the
    kernel refusing watches, and the source must not fall back to polling for it."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the service as another user")
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="fd-nobody-"))
    try:
        base.chmod(0o777)
        ws = {"root": base, "inbox": base / "inbox", "outbox": base / "outbox", "db": base / "j.db"}
        for name in ("inbox", "outbox"):
            ws[name].mkdir()
            ws[name].chmod(0o777)
        (ws["inbox"] / "open").mkdir(mode=0o777)
        (ws["inbox"] / "open").chmod(0o777)
        (ws["inbox"] / "private").mkdir(mode=0o700)  # root's
        config = cfg(ws, recursive=True, rescan=0)
        nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        svc = ServiceProcess(config, wrap=nobody)
        svc.start(wait_ready=False)
        try:
            wait_until(lambda: "watching 1 source(s)" in svc.log(), 60)  # watched, then listed
            (ws["inbox"] / "open" / "a.txt").write_bytes(b"seen by its event")
            (ws["inbox"] / "open" / "a.txt").chmod(0o644)
            wait_until(lambda: (ws["outbox"] / "open" / "a.txt").exists(), 60)
            assert "polling" not in svc.log(), svc.log()
        finally:
            assert svc.stop() == 0, svc.log()
    finally:
        shutil.rmtree(base, ignore_errors=True)
