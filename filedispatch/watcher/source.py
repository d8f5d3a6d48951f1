"""``SourceWatcher``: one source watched, its parts run together: the start-up scan (oldest
first), watchfiles events, periodic reconcile scans, and the timers of the readiness gates.
Events are only hints; the folder is the truth. It stats files in daemon threads, off the loop
(never the default executor: a hung source takes no thread of the others, and holds no exit).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import watchfiles

from ..asyncutil import in_daemon_thread
from ..config import SourceConfig
from ..models import FileVersion
from .batches import Batches, Emit, Reject
from .changes import SHORT_RUN_PACE, watch_changes
from .entries import Entries, Look, no_skips
from .gates import AgeDue, Gates, ident
from .listing import Listing
from .mounts import LOCAL_FS, is_network_fs, mount_fstype

log = logging.getLogger(__name__)

#: files a scan hands on first: a small batch, so the first file goes out soon after the
#: listing (its gates, routing and journal commit are those of a few files, not thousands)
FIRST_BATCH = 64
#: files a scan hands on together, at most; each batch doubles the last up to this. Larger
#: batches (4,096) did not make a 10,000-file --once measurably faster (its CPU is the
#: same), and would leave longer between a batch's open-writers check and its last move
BATCH = 500
#: what ``Entries.look`` says of a file (a folder, a name gone: not a file)
_FILES = ("file", "clear", "busy")


def _set_on_done(event: asyncio.Event, _: object) -> None:
    event.set()


def _end_if_removed(changes: set[tuple[watchfiles.Change, str]], root: Path) -> None:
    """Raise FileNotFoundError if ``changes`` hold the removal of ``root`` itself: the watch
    on a removed folder hears nothing of a folder made again at its path, so it must end and
    a new one begin (which fails, and is retried, while the folder is missing)."""
    if (watchfiles.Change.deleted, str(root)) in changes:
        raise FileNotFoundError(f"the folder {root} was removed")


#: per source key, the files ``process_existing: false`` left alone when it was first watched
Baselines = dict[str, set[tuple[str, int, int]]]


class SourceWatcher:
    """Feeds complete files of one source to ``emit``, in batches. Its parts: ``entries``
    (which entries are candidates), ``gates`` (complete or not, and when to look again),
    ``batches`` (handing on, one batch in flight)."""

    def __init__(
        self,
        config: SourceConfig,
        emit: Emit,
        reject: Reject,
        exclude: list[Path] | None = None,
        age_due: AgeDue | None = None,
        baselines: Baselines | None = None,
        short_run: bool = False,
    ) -> None:
        """``baselines``: per source key, the files ``process_existing: false`` left alone
        when the source was first watched, kept by whoever makes watchers again (a reload
        that restarts them, a shared source's listing lease regained): a new baseline then
        would also leave alone files seen since, still settling, and they were never sent.
        ``short_run``: the run ends once its backlog is done (``--once``): the watch never
        steps down to idle (``changes.SHORT_RUN_PACE``)."""
        self._pace = SHORT_RUN_PACE if short_run else None
        self.config = config
        self._baselines: Baselines = {} if baselines is None else baselines
        self.root = config.path
        self.entries = Entries(config, exclude)
        self.gates = Gates(config, age_due)
        self.batches = Batches(config, self.gates, emit, reject, self._hand_on_failed)
        self._rescan_now = asyncio.Event()
        self.ready = asyncio.Event()  #: set once the start-up scan has been handed on
        self.polling = False
        self.last_error: str | None = None
        self._watch_count: Callable[[], int | None] | None = None  #: see _check_watch
        self._feed_stop = asyncio.Event()  #: ends the current change feed (not the watcher)
        self._watched_before = False  #: a change feed was set up before (see _watching)
        self._watch_up = asyncio.Event()  #: the first watch is up, or failed, or never will be
        self.scans = 0
        #: entries the last full scan passed over, per reason (see SKIP_REASONS)
        self.skipped: dict[str, int] = no_skips()

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("source %s cannot be created: %s", self.root, exc.strerror or exc)
        self.entries.find_root()
        self.gates.local_fs = mount_fstype(self.root) in LOCAL_FS
        self.polling = self._decide_polling()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._settle_loop(stop), name=f"settle:{self.config.key}")
            tg.create_task(self._events(stop), name=f"watch:{self.config.key}")
            # the watch first, then the listing: a file that lands meanwhile is seen by one
            # or the other, never by neither
            await self._watch_up.wait()
            await self.scan(initial=True)
            self.ready.set()
            tg.create_task(self._rescan_loop(stop), name=f"rescan:{self.config.key}")
            await stop.wait()
            self.gates.wake()
            self._rescan_now.set()

    def _decide_polling(self) -> bool:
        if self.config.poll is not None:
            return self.config.poll
        fstype = mount_fstype(self.root)
        if is_network_fs(fstype):
            log.info(
                "source %s is on a network filesystem (%s): polling every %.1fs instead of "
                "inotify, which misses remote writes",
                self.root,
                fstype,
                self.config.poll_interval,
            )
            return True
        return False

    @property
    def unsettled(self) -> int:
        """Files seen but not yet complete (still being written, or within ``settle``)."""
        return self.gates.unsettled

    @property
    def ageing(self) -> int:
        """Files a rule waits for until they are old enough (``min_age``)."""
        return self.gates.ageing

    def request_rescan(self) -> None:
        self._rescan_now.set()

    def _hand_on_failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "handing on files from %s failed (%s); they are offered again at a rescan",
            self.root,
            self.last_error,
        )
        asyncio.get_running_loop().call_later(1.0, self._rescan_now.set)

    # ------------------------------------------------------------------ events

    def _watching(self, started: bool, count: Callable[[], int | None] | None) -> None:
        self._watch_count = count
        if started and self._watched_before:
            # a watch made again (after a failure, or polling now): what came in between,
            # seen by no watch, is found by a scan that starts only now that this one is up
            self._rescan_now.set()
        self._watched_before |= started
        self._watch_up.set()
        self._check_watch()

    def _check_watch(self) -> None:
        """Fall back to polling when the watch covers fewer folders than the last whole walk
        listed: the kernel refused some (``fs.inotify.max_user_watches`` reached), and
        watchfiles passes that over without a word, so their files would only be found at
        the rescans. Told once, as the source's error."""
        folders = self.entries.folders
        watched = self._watch_count() if self._watch_count is not None else None
        if self.polling or folders is None or watched is None or watched >= folders:
            return
        self.polling = True
        self.last_error = (
            f"inotify watches {watched} of its {folders} folders (the kernel refused the "
            "rest: fs.inotify.max_user_watches?); polling instead"
        )
        log.warning(
            "source %s: inotify watches only %d of its %d folders (the kernel refused the "
            "rest; raise fs.inotify.max_user_watches): polling every %.1fs instead",
            self.root,
            watched,
            folders,
            self.config.poll_interval,
        )
        self._feed_stop.set()  # the feed ends; the next one polls

    async def _events(self, stop: asyncio.Event) -> None:
        try:
            await self._watch(stop)
        finally:
            self._watch_up.set()

    async def _watch(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._feed_stop = feed_stop = asyncio.Event()
            relay = asyncio.create_task(stop.wait())
            relay.add_done_callback(functools.partial(_set_on_done, feed_stop))
            try:
                feed = watch_changes(
                    self.root,
                    feed_stop,
                    recursive=self.config.recursive,
                    force_polling=self.polling,
                    poll_delay_ms=int(self.config.poll_interval * 1000),
                    on_watch=self._watching,
                    pace=self._pace,
                )
                async with contextlib.aclosing(feed):
                    async for changes in feed:
                        await self._on_changes(changes)
                        _end_if_removed(changes, self.root)
                await self.batches.drain()
            except Exception as exc:  # the watch ended: say why, rescan, watch again
                self._watch_up.set()
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "watching %s failed (%s); rescanning and watching again",
                    self.root,
                    self.last_error,
                )
                self._rescan_now.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            finally:
                relay.cancel()

    async def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        mode = self.config.ready
        paths: set[str] = set()
        for change, raw in changes:
            rel = self.entries.relative(raw)
            if rel is None:
                continue
            if change == watchfiles.Change.deleted:
                if mode == "lock" and rel.endswith(".lock"):
                    paths.add(rel[:-5])
                self.gates.forget(rel)
                continue
            if mode == "done" and rel.endswith(".done"):
                paths.add(rel[:-5])
                continue
            paths.add(rel)
        ready, cleared = await self._observe(sorted(paths))
        await self.batches.emit(ready, wait=False, cleared=cleared)

    async def _settle_loop(self, stop: asyncio.Event) -> None:
        """Look again at unsettled files when their quiet period is over."""
        while (due := await self.gates.next_due(stop)) is not None:
            ready, cleared = await self._observe(due)
            await self.batches.emit(ready, cleared=cleared)

    def _look(self, rels: list[str]) -> tuple[list[Look], set[str]]:
        """``Entries.look`` with the open-writers gate in the same look where it can be, and
        the files a ``ready`` marker holds back (``Gates.held_by_marker``). Runs in a thread:
        a stat may block."""
        top, lease = self.gates.lease_here()
        try:
            looks = self.entries.look(rels, top, lease, self.gates.writers)
        finally:
            if lease is not None:
                os.close(top)
        files = (rel for rel, what, st in looks if st is not None and what in _FILES)
        return looks, self.gates.held_by_marker(files)

    async def _observe(self, rels: list[str]) -> tuple[list[FileVersion], set[str]]:
        """Look at files named by events (or due after settling), off the loop: the complete
        ones, and the relpaths of those the open-writers gate cleared in the same look."""
        if not rels:
            return [], set()
        looks, held = await in_daemon_thread(self._look, rels)
        now = time.time()
        ready: list[FileVersion] = []
        cleared: set[str] = set()
        busy: list[FileVersion] = []
        for rel, what, st in looks:
            if st is not None and what in _FILES:
                v = self.gates.consider(
                    rel, st.st_size, st.st_mtime_ns, now, ident(st), rel in held
                )
                if v is None:
                    continue
                if what == "busy":
                    busy.append(v)
                    continue
                if what == "clear":
                    cleared.add(rel)
                ready.append(v)
            elif what == "dir":  # a folder moved in whole sends one event
                await self._scan_tree(Path(self.entries.prefix + rel))
            elif what == "gone":
                self.gates.forget(rel)
        if busy:
            self.gates.still_written(busy, now)
        return ready, cleared

    # ------------------------------------------------------------------ scans

    async def _rescan_loop(self, stop: asyncio.Event) -> None:
        interval = self.config.rescan
        while not stop.is_set():
            timeout = interval if interval > 0 else None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._rescan_now.wait(), timeout)
            self._rescan_now.clear()
            if stop.is_set():
                return
            await self.scan(initial=False)

    async def scan(self, initial: bool) -> None:
        """Walk the source and offer every complete file (oldest first), a batch at a time.
        The whole listing is needed before the first file (the oldest may be listed last);
        it is held packed (see listing.py), and unpacked only a batch at a time."""
        skips: Counter[str] = Counter()
        if initial and not self.config.process_existing:
            kept = self._baselines.get(self.config.key)
            if kept is None:
                kept = await in_daemon_thread(
                    lambda: {
                        (rel, st.st_size, st.st_mtime_ns)
                        for rel, st in self.entries.walk(skips=skips)
                    }
                )
                self._baselines[self.config.key] = kept
                log.info(
                    "source %s: %d existing file(s) left alone (process_existing: false)",
                    self.root,
                    len(kept),
                )
                self.gates.baseline = kept
                self.scans += 1
                self.skipped = no_skips() | skips
                return
            self.gates.baseline = kept  # watched again: only the first start's files
            log.info(
                "source %s: %d file(s) there at the first start still left alone "
                "(process_existing: false)",
                self.root,
                len(kept),
            )
        listing, held = await in_daemon_thread(self._list, skips)
        self.scans += 1
        self._check_watch()
        now = time.time()
        consider = self.gates.consider
        ready: list[FileVersion] = []
        batch = FIRST_BATCH
        for mtime, rel, size, ino, ctime, dev in listing:
            v = consider(rel, size, mtime, now, (ino, ctime, dev), rel in held)
            if v is not None:
                ready.append(v)
                if len(ready) >= batch:
                    skips["unmatched"] += await self.batches.emit(ready)
                    ready = []
                    batch = min(batch * 2, BATCH)
        skips["unmatched"] += await self.batches.emit(ready)
        self.skipped = no_skips() | skips

    def _list(self, skips: Counter[str]) -> tuple[Listing, set[str]]:
        """The scan's walk, and the files a ``ready`` marker holds back. Runs in a thread."""
        listing = Listing(self.entries.walk(skips=skips))
        return listing, self.gates.held_by_marker(entry[1] for entry in listing)

    def _walk(self, folder: Path) -> tuple[list[tuple[str, os.stat_result]], set[str]]:
        """A folder moved in whole, walked, and the files a ``ready`` marker holds back. Runs
        in a thread."""
        found = list(self.entries.walk(folder))
        return found, self.gates.held_by_marker(rel for rel, _ in found)

    async def _scan_tree(self, folder: Path) -> None:
        found, held = await in_daemon_thread(self._walk, folder)
        now = time.time()
        consider = self.gates.consider
        await self.batches.emit(
            [
                v
                for rel, st in found
                if (v := consider(rel, st.st_size, st.st_mtime_ns, now, ident(st), rel in held))
            ]
        )
