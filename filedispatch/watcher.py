"""Watching sources: a start-up scan, watchfiles events, periodic reconcile scans, readiness gates.

Events are only hints; the folder is the truth. A file is handed on (as a ``FileVersion``)
only once it is complete: settled, unlocked, or marked done, and open for writing by nobody.
Links follow one rule in the scan and the watch. The watcher never sends, moves or deletes a
file (except the ``.done`` marker it consumed); it stats files in threads, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import os
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import watchfiles

from . import sourcefile
from .changes import watch_changes
from .config import DEFAULT_IGNORE, SourceConfig
from .errors import JournalError
from .models import FileVersion
from .patterns import GlobSet
from .sourcefile import WriterCheck
from .textsafe import escape

log = logging.getLogger(__name__)

NETWORK_FS = frozenset(
    {
        "nfs",
        "nfs4",
        "cifs",
        "smb3",
        "smbfs",
        "9p",
        "afs",
        "ceph",
        "glusterfs",
        "lustre",
        "davfs",
        "fuse.sshfs",
        "fuse.rclone",
        "fuse.s3fs",
        "fuse.gcsfuse",
        "fuse.davfs2",
    }
)
#: filesystems on a local disk (or in memory), where opening a regular file never waits for
#: a server: the open-writers gate runs inline there (a thread per batch costs more in GIL
#: hand-overs than the few syscalls per file it would move off the loop)
LOCAL_FS = frozenset({"ext2", "ext3", "ext4", "xfs", "btrfs", "tmpfs", "f2fs", "zfs", "jfs"})
BATCH = 500
#: files waiting to be old enough for a rule (``min_age``) that are remembered for a timely
#: look; beyond this many, the later ones are found by the periodic rescan instead
MAX_AGE_WAITS = 100_000
#: seconds between looks at a file someone still holds open for writing (at least; ``settle``
#: is used when longer, up to 2 s)
WRITER_RECHECK = 0.25

#: why an entry of a source is passed over, as counted in ``SourceWatcher.skipped``, the
#: ``--once`` summary and the API's status (each with the words its DEBUG line gives)
SKIP_REASONS: dict[str, str] = {
    "hidden": "a hidden name (it starts with a dot)",
    "ignored": "an ignore pattern matches it",
    "unmatched": "no rule takes it",
    "subfolder": "a folder, and the source is not recursive",
    "not_regular": "not a regular file (a FIFO, socket or device is never opened)",
    "link": "a symbolic link not followed (follow_symlinks is false, or it leads outside)",
}

#: plans complete files; returns how many of them no rule takes (None: not counted)
Emit = Callable[[SourceConfig, list[FileVersion]], Awaitable[int | None]]
#: a file's (inode, ctime_ns, device), kept with its size and mtime
Ident = tuple[int, int, int]
Reject = Callable[[SourceConfig, FileVersion, str], Awaitable[None]]
#: when a file handed on will be old enough for the rule that waits for it (seconds since 1970)
AgeDue = Callable[[FileVersion], float | None]


def mount_fstype(path: Path, mounts_file: str = "/proc/self/mounts") -> str | None:
    """The filesystem type of the mount holding ``path`` (None if it cannot be told)."""
    try:
        with open(mounts_file, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return None
    target = str(path.resolve())
    best, best_type = "", None
    for line in lines:
        parts = line.split()
        if len(parts) < 3:
            continue
        mnt = parts[1].replace("\\040", " ")
        if (target == mnt or target.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, best_type = mnt, parts[2]
    return best_type


def is_network_fs(fstype: str | None) -> bool:
    return fstype is not None and (fstype in NETWORK_FS or fstype.startswith("fuse.sshfs"))


def describe_writer_check(root: Path) -> str:
    """One line for ``check``: how (and whether) files still being written are told apart."""
    try:
        with open("/proc/sys/fs/leases-enable", encoding="ascii") as fh:
            leases = fh.read().strip() == "1"
    except OSError:
        leases = False
    fstype = mount_fstype(root)
    if leases and not is_network_fs(fstype):
        if os.geteuid() == 0:
            return "leases (root: every file)"
        return (
            f"leases for files owned by uid {os.geteuid()}; others by /proc (only this user's "
            "processes are visible: a writer of another user is not seen)"
        )
    why = "leases are off (fs.leases-enable)" if not leases else f"no leases on {fstype}"
    if os.geteuid() == 0:
        return f"/proc scan ({why})"
    return f"/proc scan of this user's processes only ({why}); writers on other hosts unseen"


def _ident(st: os.stat_result) -> Ident:
    return st.st_ino, st.st_ctime_ns, st.st_dev


def no_skips() -> dict[str, int]:
    """A zero count for every reason in SKIP_REASONS."""
    return dict.fromkeys(SKIP_REASONS, 0)


def total_skips(watchers: Iterable[Any]) -> dict[str, int]:
    """What the watchers' last scans passed over, per reason (each has ``skipped``)."""
    total = no_skips()
    for w in watchers:
        for reason, count in w.skipped.items():
            total[reason] += count
    return total


def valid_name(relpath: str) -> bool:
    try:
        relpath.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _end_if_removed(changes: set[tuple[watchfiles.Change, str]], root: Path) -> None:
    """Raise FileNotFoundError if ``changes`` hold the removal of ``root`` itself: the watch
    on a removed folder hears nothing of a folder made again at its path, so it must end and
    a new one begin (which fails, and is retried, while the folder is missing)."""
    if (watchfiles.Change.deleted, str(root)) in changes:
        raise FileNotFoundError(f"the folder {root} was removed")


class SourceWatcher:
    """Feeds complete files of one source to ``emit``, in batches."""

    def __init__(
        self,
        config: SourceConfig,
        emit: Emit,
        reject: Reject,
        exclude: list[Path] | None = None,
        age_due: AgeDue | None = None,
    ) -> None:
        self.config = config
        self._age_due = age_due
        #: files a rule waits for (``min_age``): relpath -> when to look again
        self._ageing: dict[str, float] = {}
        self._told_ageing = False
        self.root = config.path
        self._prefix = str(config.path).rstrip(os.sep) + os.sep
        self._emit_cb = emit
        self._reject_cb = reject
        self.ignore = GlobSet.compile(config.ignore_globs)
        self.exclude = [p for p in (exclude or []) if p != self.root]
        for extra in (config.done_dir, config.failed_dir):
            if extra is not None:
                self.exclude.append(extra)
        #: files seen but not complete yet: (size, mtime_ns, inode, ctime_ns) and when first seen
        self._pending: dict[str, tuple[tuple[int, int, int, int], float]] = {}
        self._too_long: set[str] = set()  # paths past PATH_MAX, already reported
        self._heap: list[tuple[float, str]] = []
        self._wake = asyncio.Event()
        self._baseline: set[tuple[str, int, int]] = set()
        self._rescan_now = asyncio.Event()
        self.ready = asyncio.Event()  #: set once the start-up scan has been handed on
        self.polling = False
        self.last_error: str | None = None
        self.scans = 0
        #: entries the last full scan passed over, per reason (see SKIP_REASONS)
        self.skipped: dict[str, int] = no_skips()
        self._emitting: asyncio.Task[int] | None = None
        self._real_root = os.path.realpath(self.root)
        self.writers = WriterCheck()  #: the open-writers gate (``open_writers: check``)
        self._local_fs = False  #: decided at start: see LOCAL_FS
        self._told_unknown = False

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Watch until ``stop`` is set."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.error("source %s cannot be created: %s", self.root, exc.strerror or exc)
        self._real_root = os.path.realpath(self.root)
        self._local_fs = mount_fstype(self.root) in LOCAL_FS
        self.polling = self._decide_polling()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._settle_loop(stop), name=f"settle:{self.config.key}")
            tg.create_task(self._events(stop), name=f"watch:{self.config.key}")
            await self.scan(initial=True)
            self.ready.set()
            tg.create_task(self._rescan_loop(stop), name=f"rescan:{self.config.key}")
            await stop.wait()
            self._wake.set()
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

    async def _events(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                feed = watch_changes(
                    self.root,
                    stop,
                    recursive=self.config.recursive,
                    force_polling=self.polling,
                    poll_delay_ms=int(self.config.poll_interval * 1000),
                )
                async with contextlib.aclosing(feed):
                    async for changes in feed:
                        await self._on_changes(changes)
                        _end_if_removed(changes, self.root)
                await self.drain()
            except Exception as exc:  # the watch ended: say why, rescan, watch again
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.warning(
                    "watching %s failed (%s); rescanning and watching again",
                    self.root,
                    self.last_error,
                )
                self._rescan_now.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
                asyncio.get_running_loop().call_later(0.5, self._rescan_now.set)  # once it is up

    async def _on_changes(self, changes: set[tuple[watchfiles.Change, str]]) -> None:
        mode = self.config.ready
        paths: set[str] = set()
        for change, raw in changes:
            rel = self._relative(raw)
            if rel is None:
                continue
            if change == watchfiles.Change.deleted:
                if mode == "lock" and rel.endswith(".lock"):
                    paths.add(rel[:-5])
                self._pending.pop(rel, None)
                continue
            if mode == "done" and rel.endswith(".done"):
                paths.add(rel[:-5])
                continue
            paths.add(rel)
        ready, cleared = await self._observe(sorted(paths))
        await self._emit(ready, wait=False, cleared=cleared)

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

    @property
    def unsettled(self) -> int:
        """Files seen but not yet complete (still being written, or within ``settle``)."""
        return len(self._pending)

    def request_rescan(self) -> None:
        self._rescan_now.set()

    # ------------------------------------------------------------------ scanning

    async def scan(self, initial: bool) -> None:
        """Walk the source and offer every complete file (oldest first)."""
        # compact tuples: a folder of 100,000 files must stay cheap to hold
        skips: Counter[str] = Counter()
        found = await asyncio.to_thread(
            lambda: sorted(
                (st.st_mtime_ns, rel, st.st_size, st.st_ino, st.st_ctime_ns, st.st_dev)
                for rel, st in self.walk(skips=skips)
            )
        )
        self.scans += 1
        if initial and not self.config.process_existing:
            self._baseline = {(rel, size, mtime) for mtime, rel, size, *_ in found}
            self.skipped = no_skips() | skips
            log.info(
                "source %s: %d existing file(s) left alone (process_existing: false)",
                self.root,
                len(found),
            )
            return
        now = time.time()
        ready: list[FileVersion] = []
        for mtime, rel, size, ino, ctime, dev in found:
            v = self._consider(rel, size, mtime, now, (ino, ctime, dev))
            if v is not None:
                ready.append(v)
                if len(ready) >= BATCH:
                    skips["unmatched"] += await self._emit(ready)
                    ready = []
        skips["unmatched"] += await self._emit(ready)
        self.skipped = no_skips() | skips

    async def _scan_tree(self, folder: Path) -> None:
        found = await asyncio.to_thread(lambda: list(self.walk(folder)))
        now = time.time()
        await self._emit(
            [
                v
                for rel, st in found
                if (v := self._consider(rel, st.st_size, st.st_mtime_ns, now, _ident(st)))
            ]
        )

    def walk(
        self, top: Path | None = None, skips: Counter[str] | None = None
    ) -> Iterator[tuple[str, os.stat_result]]:
        """(relpath, stat) of candidate regular files; never leaves the source, never loops.
        Each entry passed over is logged at DEBUG and counted in ``skips`` by reason."""
        root = str(self.root)
        seen: set[tuple[int, int]] = set()
        stack = [str(top or self.root)]
        follow = self.config.follow_symlinks
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                # iterated, not listed: a DirEntry keeps its stat, 100,000 of them add up
                with os.scandir(folder) as entries:
                    for entry in entries:
                        found = self._entry(entry, root, follow, skips)
                        if found is None:
                            continue
                        name, est = found
                        if est is None:
                            stack.append(name)
                        else:
                            yield name, est
            except OSError as exc:
                log.warning("cannot list %s: %s", folder, exc.strerror or exc)

    def _entry(
        self, entry: os.DirEntry[str], root: str, follow: bool, skips: Counter[str] | None
    ) -> tuple[str, os.stat_result | None] | None:
        """(relpath, stat) for a file to take, (path, None) for a folder to enter, else None."""
        rel = entry.path[len(root) + 1 :] if entry.path.startswith(root + "/") else entry.name
        if self._ignored(rel):
            self._skip(skips, self._why_ignored(rel), rel)
            return None
        try:
            if entry.is_symlink() and not self._link_allowed(entry.path):
                self._skip(skips, "link", rel)
                return None
            est = entry.stat(follow_symlinks=follow)
        except OSError as exc:
            if exc.errno == errno.ENAMETOOLONG and entry.path not in self._too_long:
                # no call can reach it by its path: say so once, rather than skip it unseen
                self._too_long.add(entry.path)
                log.warning(
                    "skipping %s: its path is %d bytes, longer than this system allows "
                    "(PATH_MAX, 4096)",
                    "..." + rel[-200:] if len(rel) > 200 else rel,
                    len(os.fsencode(entry.path)),
                )
            return None
        if stat.S_ISDIR(est.st_mode):
            if not self.config.recursive:
                self._skip(skips, "subfolder", rel)
            elif not self._excluded(entry.path):  # done_dir, failed_dir: ours, not counted
                return entry.path, None
            return None
        if stat.S_ISREG(est.st_mode):
            return None if self._marker(rel) else (rel, est)
        self._skip(skips, "not_regular", rel)
        return None

    # ------------------------------------------------------------------ for a simulation

    def why_not(self, rel: str) -> str | None:
        """Why the watcher would never hand on the file at ``rel`` (relative to the source),
        by the rules it applies in the scan and the watch; None if it could. For ``explain``:
        it stats the file, so it is not for the event loop."""
        parts = rel.split("/")
        for i in range(len(parts)):
            if self._ignored("/".join(parts[: i + 1])):
                what = "name" if i == len(parts) - 1 else "folder"
                defaults = (
                    " (the defaults: see ignore_defaults)"
                    if self._ignored_by_default("/".join(parts[: i + 1]))
                    else ""
                )
                return f"ignored by the source: its {what} matches ignore{defaults}"
        if "/" in rel and not self.config.recursive:
            return "in a sub-folder, and the source is not recursive"
        path = self._prefix + rel
        if self.exclude and self._excluded(path):
            return "in a folder the service keeps out (done_dir, failed_dir or a destination)"
        if not valid_name(rel):
            return "the file name is not valid UTF-8: recorded as FAILED, never sent"
        if self._marker(rel):
            return f"a ready: {self.config.ready} marker, not a file to send"
        folder = rel.rpartition("/")[0]
        if folder and not self._folder_allowed(folder, {}):
            return "below a linked folder (follow_symlinks is false, or it leads outside)"
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not self._link_allowed(path):
                    why = (
                        "leads outside the source"
                        if self.config.follow_symlinks
                        else ("follow_symlinks is false")
                    )
                    return f"a symbolic link: not followed ({why})"
                st = os.stat(path)
        except OSError as exc:
            return f"cannot be read: {exc.strerror or exc}"
        if not stat.S_ISREG(st.st_mode):
            return "not a regular file (a folder, FIFO, socket or device is never taken)"
        return None

    def _ignored_by_default(self, rel: str) -> bool:
        defaults = GlobSet.compile(DEFAULT_IGNORE if self.config.ignore_defaults else ())
        return bool(defaults) and defaults.match(rel)

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

    # ------------------------------------------------------------------ readiness

    def _relative(self, raw: str) -> str | None:
        prefix = self._prefix
        if not raw.startswith(prefix):
            return None
        rel = raw[len(prefix) :]
        if not rel or (self.exclude and self._excluded(raw)):
            return None
        if self._ignored(rel):
            self._skip(None, self._why_ignored(rel), rel)
            return None
        if not self.config.recursive and "/" in rel:
            self._skip(None, "subfolder", rel.partition("/")[0])
            return None
        return rel

    def _ignored(self, rel: str) -> bool:
        if self.ignore.on_name is not None:
            for part in rel.split("/"):
                if self.ignore.on_name.match(part):
                    return True
        return self.ignore.on_path is not None and self.ignore.on_path.match(rel) is not None

    def _skip(self, skips: Counter[str] | None, reason: str, rel: str) -> None:
        """Count an entry passed over and say so at DEBUG (the name escaped: the writer's)."""
        if skips is not None:
            skips[reason] += 1
        log.debug("skipping %s in %s: %s", escape(rel), self.config.key, SKIP_REASONS[reason])

    def _why_ignored(self, rel: str) -> str:
        """For a path ``_ignored`` holds: "hidden" when a part of it starts with a dot."""
        return "hidden" if any(part.startswith(".") for part in rel.split("/")) else "ignored"

    def _excluded(self, path: str) -> bool:
        return any(path == str(e) or path.startswith(str(e) + os.sep) for e in self.exclude)

    def _marker(self, rel: str) -> bool:
        mode = self.config.ready
        return (mode == "lock" and rel.endswith(".lock")) or (
            mode == "done" and rel.endswith(".done")
        )

    def _link_allowed(self, path: str) -> bool:
        """The one rule for links, files and folders alike, in the scan and the watch: with
        ``follow_symlinks: false`` never followed; with true, only if it stays in the source."""
        if not self.config.follow_symlinks:
            return False
        if sourcefile.inside(self._real_root, path) is None:
            log.debug("skipping %s: its link leads outside the source", path)
            return False
        return True

    def _folder_allowed(self, folder: str, cache: dict[str, bool]) -> bool:
        """Whether files below ``folder`` (relative) belong to the source: the folder is
        reached without a link (or, with ``follow_symlinks``, only through links that stay
        inside). The live watch follows linked folders; their events end here."""
        allowed = cache.get(folder)
        if allowed is None:
            real = os.path.realpath(self._prefix + folder)
            if real == os.path.join(self._real_root, folder):
                allowed = True
            else:
                allowed = self._link_allowed(self._prefix + folder)
            cache[folder] = allowed
        return allowed

    def _look(self, rels: list[str]) -> list[tuple[str, str, os.stat_result | None]]:
        """(relpath, what it is now, its stat) for each: "file" (a regular file to consider),
        "clear" or "busy" (one the open-writers gate looked at in the same look: nobody, or
        someone, holds it open for writing), "dir" (a folder to scan), "gone", or "skip".
        Runs in a thread: a stat may block."""
        cache: dict[str, bool] = {}
        found: list[tuple[str, str, os.stat_result | None]] = []
        top, lease = self._gate_here()
        try:
            for rel in rels:
                path = self._prefix + rel
                folder = rel.rpartition("/")[0]
                if folder and not self._folder_allowed(folder, cache):
                    self._skip(None, "link", folder)
                    found.append((rel, "skip", None))
                    continue
                verdict: bool | tuple[int, int] | None = None
                try:
                    if lease is not None and not folder:
                        st, verdict = self.writers.look(top, rel, lease)
                    else:
                        st = os.lstat(path)
                    if stat.S_ISLNK(st.st_mode):
                        if not self._link_allowed(path):
                            self._skip(None, "link", rel)
                            found.append((rel, "skip", None))
                            continue
                        st = os.stat(path)
                except OSError:
                    found.append((rel, "gone", None))
                    continue
                if stat.S_ISDIR(st.st_mode):
                    found.append((rel, "dir" if self.config.recursive else "skip", st))
                elif stat.S_ISREG(st.st_mode) and not self._marker(rel):
                    # a lease refused or not possible (None, (dev, ino)): the gate asks again
                    what = "busy" if verdict is True else "clear" if verdict is False else "file"
                    found.append((rel, what, st))
                else:  # FIFOs, sockets, devices: never offered, never opened
                    if not stat.S_ISREG(st.st_mode):
                        self._skip(None, "not_regular", rel)
                    found.append((rel, "skip", None))
        finally:
            if lease is not None:
                os.close(top)
        return found

    def _gate_here(self) -> tuple[int, sourcefile.Lease | None]:
        """A descriptor of the source folder and the lease check, when the open-writers gate
        runs within the look (``open_writers: check`` on a local disk: the handle that gives
        the file's lstat is the one the lease is taken through, so the gate costs no look of
        its own); (-1, None) otherwise."""
        if self.config.open_writers != "check" or not self._local_fs:
            return -1, None
        try:
            top = sourcefile.open_root(self.root)
        except OSError:
            return -1, None
        return top, self.writers.leaser(top)

    async def _observe(self, rels: list[str]) -> tuple[list[FileVersion], set[str]]:
        """Look at files named by events (or due after settling), off the loop: the complete
        ones, and the relpaths of those the open-writers gate cleared in the same look."""
        if not rels:
            return [], set()
        looks = await asyncio.to_thread(self._look, rels)
        now = time.time()
        ready: list[FileVersion] = []
        cleared: set[str] = set()
        busy: list[FileVersion] = []
        for rel, what, st in looks:
            if st is not None and what in ("file", "clear", "busy"):
                v = self._consider(rel, st.st_size, st.st_mtime_ns, now, _ident(st))
                if v is None:
                    continue
                if what == "busy":
                    busy.append(v)
                    continue
                if what == "clear":
                    cleared.add(rel)
                ready.append(v)
            elif what == "dir":  # a folder moved in whole sends one event
                await self._scan_tree(Path(self._prefix + rel))
            elif what == "gone":
                self._pending.pop(rel, None)
        if busy:
            self._still_written(busy, now)
        return ready, cleared

    def _consider(
        self, rel: str, size: int, mtime_ns: int, now: float, ident: Ident
    ) -> FileVersion | None:
        """The version if the file is complete now; otherwise remember to look again."""
        if self._baseline and (rel, size, mtime_ns) in self._baseline:
            return None
        mode = self.config.ready
        if mode != "settle":
            marker = f"{self._prefix}{rel}.{mode}"  # NAME.lock must be gone, NAME.done there
            if os.path.lexists(marker) == (mode == "lock"):
                return None
            return self._version(rel, size, mtime_ns, ident)
        settle = self.config.settle
        age = now - mtime_ns / 1e9
        if settle <= 0 or (age >= 0 and age >= settle):
            if self._pending:
                self._pending.pop(rel, None)
            return self._version(rel, size, mtime_ns, ident)
        # mtime is recent (or from a skewed clock): wait until the file stays put, the same
        # inode and ctime too (a file swapped in during the quiet period starts it again)
        shape = (size, mtime_ns, ident[0], ident[1])
        seen = self._pending.get(rel)
        if seen is not None and seen[0] == shape:
            if now - seen[1] >= settle:
                del self._pending[rel]
                return self._version(rel, size, mtime_ns, ident)
            due = seen[1] + settle
        else:
            self._pending[rel] = (shape, now)
            due = now + settle
        self._look_again(rel, due)
        return None

    def _look_again(self, rel: str, due: float) -> None:
        heapq.heappush(self._heap, (due, rel))
        self._wake.set()

    async def drain(self) -> None:
        """Wait for the batch in flight (how it ended is reported by _handed_on)."""
        task, self._emitting = self._emitting, None
        if task is not None:
            await asyncio.wait([task])

    def _handed_on(self, task: asyncio.Task[int]) -> None:
        """A batch handed on in the background failed (the journal could not be written):
        say so now and rescan soon. The files are still there and are offered again."""
        if not task.cancelled() and task.exception() is not None:
            self._hand_on_failed(task.exception())  # type: ignore[arg-type]

    def _hand_on_failed(self, exc: BaseException) -> None:
        self.last_error = f"{type(exc).__name__}: {exc}"
        log.error(
            "handing on files from %s failed (%s); they are offered again at a rescan",
            self.root,
            self.last_error,
        )
        asyncio.get_running_loop().call_later(1.0, self._rescan_now.set)

    def _version(self, rel: str, size: int, mtime_ns: int, ident: Ident) -> FileVersion:
        ino, ctime_ns, dev = ident
        return FileVersion(self.config.key, self.root, rel, size, mtime_ns, ino, ctime_ns, dev)

    async def _no_writers(
        self, versions: list[FileVersion], cleared: set[str]
    ) -> list[FileVersion]:
        """The versions nobody holds open for writing any more, and still as seen (those in
        ``cleared`` were looked at so in the same look). The others are still being written
        (a writer that paused is not done) or changed since: they are looked at again shortly."""
        todo = [v for v in versions if v.relpath not in cleared] if cleared else versions
        if not todo:
            return versions
        if self._local_fs:  # a lease on a local file is a few syscalls that never wait
            busy = self.writers.busy(self.root, todo)
        else:
            busy = await asyncio.to_thread(self.writers.busy, self.root, todo)
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
        self._still_written([v for v in versions if v.relpath in busy], time.time())
        return [v for v in versions if v.relpath not in busy]

    def _still_written(self, versions: list[FileVersion], now: float) -> None:
        """Look again shortly at files someone holds open for writing (or that changed)."""
        again = now + min(max(self.config.settle, WRITER_RECHECK), 2.0)
        for v in versions:
            log.debug("%s is still open for writing (or changed): not complete yet", v.relpath)
            self._pending[v.relpath] = ((v.size, v.mtime_ns, v.ino, v.ctime_ns), now)
            self._look_again(v.relpath, again)

    async def _settle_loop(self, stop: asyncio.Event) -> None:
        """Look again at unsettled files when their quiet period is over."""
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
            ready, cleared = await self._observe(sorted(set(due_now)))
            await self._emit(ready, cleared=cleared)

    async def _emit(
        self, versions: list[FileVersion], wait: bool = True, cleared: set[str] | None = None
    ) -> int:
        """Hand complete files on, in order; how many no rule takes (0 unless waited for).
        With ``wait=False`` it returns once the batch has started, so the next batch of events
        is read while this one is being committed; the next call waits for it first (one
        batch in flight, never more). ``cleared``: relpaths the open-writers gate already
        passed in the look that found them."""
        await self.drain()
        if not versions:
            return 0
        if wait:
            try:
                return await self._hand_on(versions, cleared or set())
            except JournalError as exc:  # a scan goes on; the files are offered again
                self._hand_on_failed(exc)
        else:
            self._emitting = asyncio.create_task(
                self._hand_on(versions, cleared or set()), name=f"emit:{self.root}"
            )
            self._emitting.add_done_callback(self._handed_on)
        return 0

    async def _hand_on(self, versions: list[FileVersion], cleared: set[str]) -> int:
        good = [v for v in versions if valid_name(v.relpath)]
        for v in versions:
            if not valid_name(v.relpath):
                await self._reject_cb(self.config, v, "the file name is not valid UTF-8")
        if good and self.config.open_writers == "check":
            good = await self._no_writers(good, cleared)
        unmatched = (await self._emit_cb(self.config, good) or 0) if good else 0
        waiting = self._wait_for_age(good) if self._age_due is not None else set()
        if self.config.ready == "done":
            for v in good:
                if v.relpath not in waiting:  # its marker is needed when it is looked at again
                    with contextlib.suppress(OSError):
                        os.unlink(f"{v.path}.done")
        return unmatched

    def _wait_for_age(self, versions: list[FileVersion]) -> set[str]:
        """Remember to look again at files a rule waits for (``min_age``), when they are old
        enough: one timer entry per file and due time, at most MAX_AGE_WAITS of them (the
        rescan finds the others). Returns their relpaths."""
        assert self._age_due is not None
        waiting: set[str] = set()
        for v in versions:
            due = self._age_due(v)
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

    @property
    def ageing(self) -> int:
        """Files a rule waits for until they are old enough (``min_age``)."""
        return len(self._ageing)
