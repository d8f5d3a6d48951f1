"""The change feed (filedispatch/watcher/changes.py): paced hot and idle, on real folders."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from pathlib import Path

import pytest
from watchfiles import Change

from filedispatch.watcher import changes
from filedispatch.watcher.changes import Changes, watch_changes


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


def _watch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("watch ")]


async def test_a_file_after_the_watch_went_idle_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watch steps down to warm and idle after quiet spells (longer steps); the first
    file after that is still seen, and so is the next one (hot again)."""
    monkeypatch.setattr(changes, "PACE", ((2, 20), (5, 20), (50, 0)))
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    async with contextlib.aclosing(feed):
        first = asyncio.ensure_future(_next_with(feed, tmp_path / "a.txt"))
        await _until(lambda: bool(_watch_threads()))  # the watch is in place
        (tmp_path / "a.txt").write_text("a")
        await first
        await asyncio.sleep(0.3)  # longer than both quiet spells: idle now
        (tmp_path / "b.txt").write_text("b")
        await _next_with(feed, tmp_path / "b.txt")
        (tmp_path / "c.txt").write_text("c")
        await _next_with(feed, tmp_path / "c.txt")


async def test_stop_ends_an_idle_feed_and_its_thread(tmp_path: Path) -> None:
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    ended = asyncio.ensure_future(anext(feed, None))
    await _until(lambda: bool(_watch_threads()))  # the watch is running in its thread
    stop.set()
    async with asyncio.timeout(30):
        assert await ended is None  # the feed ended, nothing yielded
    await _until(lambda: not _watch_threads())


async def test_closing_a_feed_early_ends_its_thread(tmp_path: Path) -> None:
    """A consumer that leaves (an exception in its loop, a cancelled task) closes the feed:
    the watch in flight returns within a step and its thread and notify watcher go."""
    stop = asyncio.Event()
    feed = _watch(tmp_path, stop)
    waiting = asyncio.ensure_future(anext(feed))
    await _until(lambda: bool(_watch_threads()))
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    await feed.aclose()
    await _until(lambda: not _watch_threads())
    assert not stop.is_set()


async def test_idle_watches_leave_the_shared_executor_free(tmp_path: Path) -> None:
    """Each idle watch holds a thread of its own, not one of the default executor's few
    (min(32, CPUs + 4)): with more sources than that, stat and hash work still runs."""
    stop = asyncio.Event()
    feeds = []
    for i in range(12):
        folder = tmp_path / f"s{i}"
        folder.mkdir()
        feed = _watch(folder, stop)
        feeds.append((feed, asyncio.ensure_future(anext(feed, None))))
    await _until(lambda: len(_watch_threads()) == 12)  # every watch in flight, idle
    async with asyncio.timeout(30):
        assert await asyncio.to_thread(lambda: 42) == 42
    stop.set()
    for feed, pending in feeds:
        async with asyncio.timeout(30):
            assert await pending is None
        await feed.aclose()
