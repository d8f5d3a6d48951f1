"""The change feed (filedispatch/watcher/changes.py): paced hot and idle, on real folders."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
from watchfiles import Change
from watchfiles._rust_notify import RustNotify

from filedispatch import fastpath
from filedispatch.watcher import changes
from filedispatch.watcher.changes import Changes, watch_changes

from .conftest import needs_fastpath


def _watch(root: Path, stop: asyncio.Event) -> AsyncGenerator[Changes, None]:
    return watch_changes(root, stop, recursive=True, force_polling=False, poll_delay_ms=300)


async def _next_with(feed: AsyncIterator[Changes], path: Path) -> None:
    """Batches from ``feed`` until one names ``path`` (a generous deadline, not a timing)."""
    async with asyncio.timeout(60):
        async for batch in feed:
            if (Change.added, str(path)) in batch:
                return


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(60):
        while not condition():
            await asyncio.sleep(0.01)


def _watch_threads(*folders: Path) -> list[threading.Thread]:
    """The watch threads of these folders' feeds (named ``watch <folder>_<n>``). Only theirs:
    a thread of an earlier test's feed may still be ending, and counting it said "the watch is
    in place" before this feed had made its watch (a file written then was never seen)."""
    names = tuple(f"watch {folder.name}_" for folder in folders)
    return [t for t in threading.enumerate() if t.name.startswith(names)]


@pytest.fixture(autouse=True)
def _another_feeds_thread(tmp_path: Path) -> Iterator[None]:
    """A watch thread of some other folder's feed, alive through each test, as an earlier
    test's can be while it ends on a busy machine: waits for "this feed's watch" must not
    take it for theirs."""
    done = threading.Event()
    other = threading.Thread(target=done.wait, name=f"watch not-{tmp_path.name}_0")
    other.start()
    yield
    done.set()
    other.join()


@pytest.mark.parametrize("doorbell", [True, False])
async def test_a_file_after_the_watch_went_idle_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, doorbell: bool
) -> None:
    """The watch steps down to warm and idle after quiet spells (longer steps); the first
    file after that is still seen, and so is the next one (hot again). So too without a
    doorbell to wait on (``changes.DOORBELLS`` taken by other sources)."""
    monkeypatch.setattr(changes, "PACE", ((2, 20), (5, 20), (50, 0)))
    bells = threading.BoundedSemaphore(1)
    if not doorbell:
        bells.acquire()
    monkeypatch.setattr(changes, "_DOORBELLS", bells)
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    async with contextlib.aclosing(feed):
        first = asyncio.ensure_future(_next_with(feed, tmp_path / "a.txt"))
        await _until(lambda: bool(_watch_threads(tmp_path)))  # the watch is in place
        (tmp_path / "a.txt").write_text("a")
        await first
        await asyncio.sleep(0.3)  # longer than both quiet spells: idle now
        (tmp_path / "b.txt").write_text("b")
        await _next_with(feed, tmp_path / "b.txt")
        (tmp_path / "c.txt").write_text("c")
        await _next_with(feed, tmp_path / "c.txt")


@needs_fastpath
async def test_the_first_file_after_a_quiet_spell_is_seen_within_the_idle_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch_steps: list[int]
) -> None:
    """An idle watch waits on its inotify descriptor between looks: a file landing in an idle
    folder is looked for at once, not at the end of the idle step (before: two idle steps, one
    to see it and one to see the change was over; with this 60 s idle step, two minutes).
    Each later file is seen as promptly: the watch goes idle again after each one."""
    monkeypatch.setattr(changes, "PACE", ((2, 20), (5, 20), (60_000, 0)))
    # its own place for a doorbell, whatever feeds of other tests are still ending
    monkeypatch.setattr(changes, "_DOORBELLS", threading.BoundedSemaphore(1))
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    async with contextlib.aclosing(feed):
        for name in ("a.txt", "b.txt", "c.txt"):
            seen = asyncio.ensure_future(_next_with(feed, tmp_path / name))
            await _until(lambda: bool(watch_steps) and watch_steps[-1] == 60_000)  # idle
            (tmp_path / name).write_text(name)
            async with asyncio.timeout(30):  # half the idle step: only the wait can see it
                await seen
        stop.set()


@needs_fastpath
async def test_a_stop_ends_an_idle_watch_without_waiting_out_its_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch_steps: list[int]
) -> None:
    """A stop knocks an idle watch awake (``Doorbell.knock``): the feed ends at once, not at
    the end of the wait on the doorbell (before: the step, here a minute; and a quiet
    folder's wait is now QUIET_LOOK_MS)."""
    monkeypatch.setattr(changes, "PACE", ((2, 20), (5, 20), (60_000, 0)))
    monkeypatch.setattr(changes, "_DOORBELLS", threading.BoundedSemaphore(1))
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    async with contextlib.aclosing(feed):
        ended = asyncio.ensure_future(anext(feed, None))
        await _until(lambda: bool(watch_steps) and watch_steps[-1] == 60_000)  # waiting
        stop.set()
        async with asyncio.timeout(30):  # half the step: only the knock can end it
            assert await ended is None


@needs_fastpath
async def test_a_first_change_in_a_subfolder_is_still_seen_within_the_idle_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, watch_steps: list[int]
) -> None:
    """The doorbell watches the folder, not its subfolders: where the watch covers a
    subfolder (a recursive source that has one), the idle wait keeps looking once per idle
    step, also after its first look, rather than every QUIET_LOOK_MS (here ten minutes)."""
    monkeypatch.setattr(changes, "PACE", ((2, 20), (5, 20), (50, 0)))
    monkeypatch.setattr(changes, "QUIET_LOOK_MS", 600_000)
    monkeypatch.setattr(changes, "_DOORBELLS", threading.BoundedSemaphore(1))
    (tmp_path / "sub").mkdir()
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    async with contextlib.aclosing(feed):
        seen = asyncio.ensure_future(_next_with(feed, tmp_path / "sub" / "a.txt"))
        # idle, and past the wait's first look (a look at the hot step after the idle one)
        await _until(lambda: watch_steps[-2:] == [50, changes.PACE[0][0]])
        (tmp_path / "sub" / "a.txt").write_text("a")
        async with asyncio.timeout(60):
            await seen
        stop.set()


@needs_fastpath
@pytest.mark.parametrize(
    ("recursive", "subfolder", "covers"),
    [(False, True, True), (True, False, True), (True, True, False)],
)
def test_a_doorbell_covers_a_watch_only_where_it_watches_each_of_its_folders(
    tmp_path: Path, recursive: bool, subfolder: bool, covers: bool
) -> None:
    """``Doorbell.covers``, which lets the idle wait look only every QUIET_LOOK_MS: true for
    a folder watched alone (not recursive, or without subfolders), false where watchfiles
    also watches a subfolder, and false while the doorbell is not armed."""
    if subfolder:
        (tmp_path / "sub").mkdir()
    before = fastpath.inotify_fds()
    notify = RustNotify([str(tmp_path)], False, False, 300, recursive, True)
    try:
        (fd,) = fastpath.inotify_fds() - before
        assert len(fastpath.inotify_watched(fd)) == (2 if recursive and subfolder else 1)
        bell = fastpath.Doorbell(tmp_path)
        try:
            assert not bell.covers(fd)
            assert bell.arm()
            assert bell.covers(fd) is covers
            bell.disarm()
            assert not bell.covers(fd)
        finally:
            bell.close()
    finally:
        notify.close()


async def test_a_file_written_slowly_does_not_keep_the_watch_hot(
    tmp_path: Path, watch_steps: list[int]
) -> None:
    """A file that grows a little at a time makes a batch per write; a batch that only
    modifies what the batch before it named moves the watch to the warm step (before: hot,
    2 ms, for as long as the file grew: about 250 batches a second for one slow writer). A
    new file makes it hot again."""
    hot, warm = changes.PACE[0][0], changes.PACE[1][0]
    steps = watch_steps
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    grows = tmp_path / "grows.log"
    async with contextlib.aclosing(feed):
        first = asyncio.ensure_future(_next_with(feed, grows))
        await _until(lambda: bool(_watch_threads(tmp_path)))
        grows.write_bytes(b"0")
        await first
        for i in range(1, 6):  # one write at a time, each seen before the next
            with grows.open("ab") as f:
                f.write(b"%d" % i)
            async with asyncio.timeout(60):
                while True:
                    batch = await anext(feed)
                    if (Change.modified, str(grows)) in batch and grows.stat().st_size == i + 1:
                        break
        after_growth = steps[-1]
        (tmp_path / "new.txt").write_text("new")
        await _next_with(feed, tmp_path / "new.txt")
        following = asyncio.ensure_future(anext(feed))  # the watch after the new file's batch
        await _until(lambda: steps[-1] == hot)
        following.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await following
    assert after_growth == warm, steps


async def test_stop_ends_an_idle_feed_and_its_thread(tmp_path: Path) -> None:
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    ended = asyncio.ensure_future(anext(feed, None))
    await _until(lambda: bool(_watch_threads(tmp_path)))  # the watch is running in its thread
    stop.set()
    async with asyncio.timeout(30):
        assert await ended is None  # the feed ended, nothing yielded
    await _until(lambda: not _watch_threads(tmp_path))


async def test_closing_a_feed_early_ends_its_thread(tmp_path: Path) -> None:
    """A consumer that leaves (an exception in its loop, a cancelled task) closes the feed:
    the watch in flight returns within a step and its thread and notify watcher go."""
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    waiting = asyncio.ensure_future(anext(feed))
    await _until(lambda: bool(_watch_threads(tmp_path)))
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await feed.aclose()
    await _until(lambda: not _watch_threads(tmp_path))
    assert not stop.is_set()


async def test_idle_watches_leave_the_shared_executor_free(tmp_path: Path) -> None:
    """Each idle watch holds a thread of its own, not one of the default executor's few
    (min(32, CPUs + 4)): with more sources than that, stat and hash work still runs."""
    stop = asyncio.Event()
    feeds = []
    folders = [tmp_path / f"s{i}" for i in range(12)]
    for folder in folders:
        folder.mkdir()
        feed = _watch(folder, stop)
        feeds.append((feed, asyncio.ensure_future(anext(feed, None))))
    await _until(lambda: len(_watch_threads(*folders)) == 12)  # every watch in flight, idle
    async with asyncio.timeout(30):
        assert await asyncio.to_thread(lambda: 42) == 42
    stop.set()
    for feed, pending in feeds:
        async with asyncio.timeout(30):
            assert await pending is None
        await feed.aclose()


#: inotify event bits (linux/inotify.h)
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE, IN_OPEN = 0x2, 0x4, 0x8, 0x20
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200


def _watch_masks(folder: Path) -> dict[int, int]:
    """inotify descriptor -> event mask of this process's watches on ``folder``, as the kernel
    shows them in /proc/self/fdinfo (its inode, and its device as the kernel writes it); not
    the idle feed's doorbell (``fastpath.Doorbell``, a watch of its own that only wakes it)."""
    st = os.stat(folder)
    want = (f"ino:{st.st_ino:x}", f"sdev:{os.major(st.st_dev) << 20 | os.minor(st.st_dev):x}")
    masks = {}
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                continue
            with open(f"/proc/self/fdinfo/{fd}") as info:
                for line in info:
                    fields = line.split()
                    if line.startswith("inotify ") and all(w in fields for w in want):
                        masks |= {int(fd): int(f[5:], 16) for f in fields if f[:5] == "mask:"}
    return {fd: mask for fd, mask in masks.items() if mask != fastpath._IN_CHANGES}


async def _masks_of_a_watch(folder: Path) -> tuple[int, int, bool]:
    """With a watch of our own on ``folder`` (IN_OPEN and IN_CREATE, made first): its mask and
    the feed's watch's mask once that is in place, and whether a file written there afterwards
    is still seen."""
    libc = ctypes.CDLL(None, use_errno=True)
    own = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert own >= 0 and libc.inotify_add_watch(own, bytes(folder), IN_OPEN | IN_CREATE) >= 0
    stop = asyncio.Event()
    feed = _watch(folder, stop)
    try:
        async with contextlib.aclosing(feed):
            seen = asyncio.ensure_future(_next_with(feed, folder / "a.txt"))
            await _until(lambda: bool(_watch_threads(folder)))
            masks = _watch_masks(folder)
            (folder / "a.txt").write_text("a")
            await seen
            stop.set()
    finally:
        os.close(own)
    assert len(masks) == 2, masks
    theirs = next(mask for fd, mask in masks.items() if fd != own)
    return masks[own], theirs, seen.done()


@needs_fastpath
async def test_the_services_own_opens_wake_no_watch(tmp_path: Path) -> None:
    """watchfiles asks the kernel for IN_OPEN and drops those events; each file the service
    opened in the folder (a lease, a copy) woke its thread for nothing, half of what the
    open-writers gate cost. The watch keeps every other event, and files are still seen;
    another watch on the same folder (not the feed's) is left as it was."""
    own, theirs, seen = await _masks_of_a_watch(tmp_path)
    assert not theirs & IN_OPEN
    wanted = IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE
    assert theirs & (wanted | IN_DELETE) == wanted | IN_DELETE
    assert own == IN_OPEN | IN_CREATE
    assert seen


async def test_without_the_fast_paths_the_watch_is_watchfiles_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FILEDISPATCH_FASTPATH=0: the watch is left as watchfiles made it (IN_OPEN too)."""
    monkeypatch.setattr(fastpath, "ENABLED", False)
    own, theirs, seen = await _masks_of_a_watch(tmp_path)
    assert theirs & IN_OPEN and own == IN_OPEN | IN_CREATE
    assert seen
