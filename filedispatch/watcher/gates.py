"""The readiness gates of one source: when a file seen is complete (``ready: settle`` quiet
period with the same inode and ctime, ``lock`` marker gone, ``done`` marker there), whether
someone still holds it open for writing, and when a file a rule waits for (``min_age``) is
old enough; the timers to look again at the files not complete yet. It never hands a file
on itself, and never opens one on the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import os
import time
from collections.abc import Callable, Iterable

from .. import sourcefile
from ..asyncutil import in_daemon_thread
from ..config import SourceConfig
from ..models import FileVersion
from ..sourcefile import WriterCheck

log = logging.getLogger(__name__)

#: files waiting to be old enough for a rule (``min_age``) that are remembered for a timely
#: look; beyond this many, the later ones are found by the periodic rescan instead
MAX_AGE_WAITS = 100_000
#: seconds between looks at a file someone still holds open for writing (at least; ``settle``
#: is used when longer, up to 2 s)
WRITER_RECHECK = 0.25

#: a file's (inode, ctime_ns, device), kept with its size and mtime
Ident = tuple[int, int, int]
#: when a file handed on will be old enough for the rule that waits for it (seconds since 1970)
AgeDue = Callable[[FileVersion], float | None]


def ident(st: os.stat_result) -> Ident:
    return st.st_ino, st.st_ctime_ns, st.st_dev


class Gates:
    """Tells complete files from those still being written, and times the next looks."""

    def __init__(self, config: SourceConfig, age_due: AgeDue | None = None) -> None:
        self.config = config
        self.root = config.path
        self._prefix = str(config.path).rstrip(os.sep) + os.sep
        self.age_due = age_due
        #: files a rule waits for (``min_age``): relpath -> when to look again
        self._ageing: dict[str, float] = {}
        self._told_ageing = False
        #: files seen but not complete yet: (size, mtime_ns, inode, ctime_ns) and when first seen
        self._pending: dict[str, tuple[tuple[int, int, int, int], float]] = {}
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        #: (relpath, size, mtime_ns) of the files left alone at start (``process_existing``)
        self.baseline: set[tuple[str, int, int]] = set()
        self.writers = WriterCheck()  #: the open-writers gate (``open_writers: check``)
        self.local_fs = False  #: decided at start: see mounts.LOCAL_FS
        self._told_unknown = False

    @property
    def unsettled(self) -> int:
        """Files seen but not yet complete (still being written, or within ``settle``)."""
        return len(self._pending)

    @property
    def ageing(self) -> int:
        """Files a rule waits for until they are old enough (``min_age``)."""
        return len(self._ageing)

    def forget(self, rel: str) -> None:
        """The file at ``rel`` is gone: stop waiting for it to settle."""
        self._pending.pop(rel, None)

    # ------------------------------------------------------------------ complete or not

    def held_by_marker(self, rels: Iterable[str]) -> set[str]:
        """The files among ``rels`` a ``ready`` marker holds back: NAME.lock there, or
        NAME.done not there yet; none for ``ready: settle``. Stats: not for the event loop
        (a hung mount would hold it)."""
        mode = self.config.ready
        if mode == "settle":
            return set()
        lock = mode == "lock"
        return {rel for rel in rels if os.path.lexists(f"{self._prefix}{rel}.{mode}") == lock}

    def consider(
        self, rel: str, size: int, mtime_ns: int, now: float, ident: Ident, held: bool = False
    ) -> FileVersion | None:
        """The version if the file is complete now; otherwise remember to look again.
        ``held``: its ``ready`` marker holds it back (``held_by_marker``, looked at off the
        loop)."""
        if self.baseline and (rel, size, mtime_ns) in self.baseline:
            return None
        if self.config.ready != "settle":
            return None if held else self.version(rel, size, mtime_ns, ident)
        settle = self.config.settle
        age = now - mtime_ns / 1e9
        if settle <= 0 or (age >= 0 and age >= settle):
            if self._pending:
                self._pending.pop(rel, None)
            return self.version(rel, size, mtime_ns, ident)
        # mtime is recent (or from a skewed clock): wait until the file stays put, the same
        # inode and ctime too (a file swapped in during the quiet period starts it again)
        shape = (size, mtime_ns, ident[0], ident[1])
        seen = self._pending.get(rel)
        if seen is not None and seen[0] == shape:
            if now - seen[1] >= settle:
                del self._pending[rel]
                return self.version(rel, size, mtime_ns, ident)
            due = seen[1] + settle
        else:
            self._pending[rel] = (shape, now)
            due = now + settle
        self._look_again(rel, due)
        return None

    def version(self, rel: str, size: int, mtime_ns: int, ident: Ident) -> FileVersion:
        ino, ctime_ns, dev = ident
        return FileVersion(self.config.key, self.root, rel, size, mtime_ns, ino, ctime_ns, dev)

    def not_ready(self, version: FileVersion, now: float) -> str | None:
        """Why the file is not complete now, by the source's ``ready`` and ``open_writers``
        (None: it would be handed on). Stats and may open the file: not for the event loop."""
        mode = self.config.ready
        if mode == "settle":
            age = now - version.mtime_ns / 1e9
            if self.config.settle > 0 and age < self.config.settle:
                return (
                    f"not complete yet: modified {max(age, 0):.1f}s ago, settle is "
                    f"{self.config.settle:g}s"
                )
        elif os.path.lexists(f"{self._prefix}{version.relpath}.{mode}") == (mode == "lock"):
            if mode == "lock":
                return f"not complete yet: {version.name}.lock exists (taken once it is gone)"
            return f"not complete yet: waits for {version.name}.done"
        if self.config.open_writers == "check" and version.relpath in self.writers.busy(
            self.root, [version]
        ):
            return "not complete yet: a process holds it open for writing"
        return None

    # ------------------------------------------------------------------ open writers

    def lease_here(self) -> tuple[int, sourcefile.Lease | None]:
        """A descriptor of the source folder and the lease check, when the open-writers gate
        runs within the look (``open_writers: check`` on a local disk: the handle that gives
        the file's lstat is the one the lease is taken through, so the gate costs no look of
        its own); (-1, None) otherwise. The caller closes the descriptor of a lease."""
        if self.config.open_writers != "check" or not self.local_fs:
            return -1, None
        try:
            top = sourcefile.open_root(self.root)
        except OSError:
            return -1, None
        return top, self.writers.leaser(top)

    async def no_writers(self, versions: list[FileVersion], cleared: set[str]) -> list[FileVersion]:
        """The versions nobody holds open for writing any more, and still as seen (those in
        ``cleared`` were looked at so in the same look). The others are still being written
        (a writer that paused is not done) or changed since: they are looked at again shortly."""
        todo = [v for v in versions if v.relpath not in cleared] if cleared else versions
        if not todo:
            return versions
        # off the loop, one hop per batch: even a local file's open may hang (a network block
        # device that stopped answering, an on-access scanner), and a daemon thread, unlike
        # the default executor's, holds neither the other sources' threads nor the exit
        busy = await in_daemon_thread(self.writers.busy, self.root, todo)
        if self.writers.unknown and not self._told_unknown:
            self._told_unknown = True
            log.warning(
                "source %s: cannot tell whether some files are still open for writing (%s); "
                "they are taken once settled",
                self.root,
                self.writers.why_unknown,
            )
        if not busy:
            return versions
        self.still_written([v for v in versions if v.relpath in busy], time.time())
        return [v for v in versions if v.relpath not in busy]

    def still_written(self, versions: list[FileVersion], now: float) -> None:
        """Look again shortly at files someone holds open for writing (or that changed)."""
        again = now + min(max(self.config.settle, WRITER_RECHECK), 2.0)
        for v in versions:
            log.debug("%s is still open for writing (or changed): not complete yet", v.relpath)
            self._pending[v.relpath] = ((v.size, v.mtime_ns, v.ino, v.ctime_ns), now)
            self._look_again(v.relpath, again)

    # ------------------------------------------------------------------ old enough

    def wait_for_age(self, versions: list[FileVersion]) -> set[str]:
        """Remember to look again at files a rule waits for (``min_age``), when they are old
        enough: one timer entry per file and due time, at most MAX_AGE_WAITS of them (the
        rescan finds the others). Returns their relpaths (none without ``age_due``)."""
        if self.age_due is None:
            return set()
        waiting: set[str] = set()
        for v in versions:
            due = self.age_due(v)
            if due is None:
                continue
            waiting.add(v.relpath)
            if self._ageing.get(v.relpath) == due:
                continue  # a rescan offered it again: its look is already due
            if len(self._ageing) >= MAX_AGE_WAITS and v.relpath not in self._ageing:
                if not self._told_ageing:
                    self._told_ageing = True
                    log.warning(
                        "source %s: more than %d files wait for min_age; the others are "
                        "found by the rescan (every %gs)",
                        self.root,
                        MAX_AGE_WAITS,
                        self.config.rescan,
                    )
                continue
            self._ageing[v.relpath] = due
            self._look_again(v.relpath, due)
        return waiting

    # ------------------------------------------------------------------ the timers

    def _look_again(self, rel: str, due: float) -> None:
        heapq.heappush(self._heap, (due, rel))
        self._wake.set()

    def wake(self) -> None:
        """End a ``next_due`` wait early (at a stop)."""
        self._wake.set()

    async def next_due(self, stop: asyncio.Event) -> list[str] | None:
        """The relpaths (sorted, perhaps none) whose look is due, once the earliest timer is
        due; None once ``stop`` is set."""
        while not stop.is_set():
            if not self._heap:
                self._wake.clear()
                await self._wake.wait()
                continue
            due, _ = self._heap[0]
            delay = due - time.time()
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), delay)
                continue
            now = time.time()
            due_now: list[str] = []
            while self._heap and self._heap[0][0] <= now:
                due, rel = heapq.heappop(self._heap)
                if rel in self._pending:
                    due_now.append(rel)
                elif self._ageing.get(rel) == due:
                    del self._ageing[rel]
                    due_now.append(rel)
            return sorted(set(due_now))
        return None
