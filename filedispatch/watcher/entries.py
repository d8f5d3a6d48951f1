"""Which entries of a source are candidates: the one rule for names (ignore patterns, hidden
names, markers, valid UTF-8), folders (recursive, kept-out folders) and links, applied alike
by the scan's walk, the events' look and ``explain``. It stats; it never opens a file, and
runs in a thread (a stat may block), except ``relative``, which only reads the name.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import sourcefile
from ..config import DEFAULT_IGNORE, SourceConfig
from ..naming import OWN_PREFIX
from ..patterns import GlobSet
from ..sourcefile import WriterCheck
from ..textsafe import escape

log = logging.getLogger(__name__)

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

#: what a look found at a relpath: "file", "clear", "busy", "dir", "gone" or "skip" (see
#: ``Entries.look``), with its stat when it is a file or a folder
Look = tuple[str, str, os.stat_result | None]


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


class Entries:
    """The entries of one source that may be handed on: its names, folders and links."""

    def __init__(self, config: SourceConfig, exclude: list[Path] | None = None) -> None:
        self.config = config
        self.root = config.path
        self.prefix = str(config.path).rstrip(os.sep) + os.sep
        self.ignore = GlobSet.compile(config.ignore_globs)
        self.exclude = [p for p in (exclude or []) if p != self.root]
        for extra in (config.done_dir, config.failed_dir):
            if extra is not None:
                self.exclude.append(extra)
        self._too_long: set[str] = set()  # paths past PATH_MAX, already reported
        self.real_root = os.path.realpath(self.root)
        #: folders (not links) the last whole walk listed, the source's own included
        self.folders: int | None = None

    def find_root(self) -> None:
        """Resolve the source folder again (at start, once it has been made)."""
        self.real_root = os.path.realpath(self.root)

    # ------------------------------------------------------------------ names

    def relative(self, raw: str) -> str | None:
        """The relpath of an event's path, if it names a candidate (None: passed over)."""
        prefix = self.prefix
        if not raw.startswith(prefix):
            return None
        rel = raw[len(prefix) :]
        if not rel or (self.exclude and self.excluded(raw)):
            return None
        if self.ignored(rel):
            self.skip(None, self.why_ignored(rel), rel)
            return None
        if not self.config.recursive and "/" in rel:
            self.skip(None, "subfolder", rel.partition("/")[0])
            return None
        return rel

    def ignored(self, rel: str) -> bool:
        """Whether an ignore pattern (the defaults included, unless turned off) matches a part
        of ``rel``, or a part is a name of filedispatch's own work (``OWN_PREFIX``), which is
        never taken whatever the patterns say: a crash's leftover taken as a new file would be
        delivered a second time under another name."""
        if OWN_PREFIX in rel and any(p.startswith(OWN_PREFIX) for p in rel.split("/")):
            return True
        if self.ignore.on_name is not None:
            for part in rel.split("/"):
                if self.ignore.on_name.match(part):
                    return True
        return self.ignore.on_path is not None and self.ignore.on_path.match(rel) is not None

    def skip(self, skips: Counter[str] | None, reason: str, rel: str) -> None:
        """Count an entry passed over and say so at DEBUG (the name escaped: the writer's)."""
        if skips is not None:
            skips[reason] += 1
        log.debug("skipping %s in %s: %s", escape(rel), self.config.key, SKIP_REASONS[reason])

    def why_ignored(self, rel: str) -> str:
        """For a path ``ignored`` holds: "hidden" when a part of it starts with a dot."""
        return "hidden" if any(part.startswith(".") for part in rel.split("/")) else "ignored"

    def excluded(self, path: str) -> bool:
        return any(path == str(e) or path.startswith(str(e) + os.sep) for e in self.exclude)

    def marker(self, rel: str) -> bool:
        mode = self.config.ready
        return (mode == "lock" and rel.endswith(".lock")) or (
            mode == "done" and rel.endswith(".done")
        )

    # ------------------------------------------------------------------ links

    def link_allowed(self, path: str) -> bool:
        """The one rule for links, files and folders alike, in the scan and the watch: with
        ``follow_symlinks: false`` never followed; with true, only if it stays in the source."""
        if not self.config.follow_symlinks:
            return False
        if sourcefile.inside(self.real_root, path) is None:
            log.debug("skipping %s: its link leads outside the source", path)
            return False
        return True

    def folder_allowed(self, folder: str, cache: dict[str, bool]) -> bool:
        """Whether files below ``folder`` (relative) belong to the source: the folder is
        reached without a link (or, with ``follow_symlinks``, only through links that stay
        inside). The live watch follows linked folders; their events end here."""
        allowed = cache.get(folder)
        if allowed is None:
            real = os.path.realpath(self.prefix + folder)
            if real == os.path.join(self.real_root, folder):
                allowed = True
            else:
                allowed = self.link_allowed(self.prefix + folder)
            cache[folder] = allowed
        return allowed

    # ------------------------------------------------------------------ the scan's walk

    def walk(
        self, top: Path | None = None, skips: Counter[str] | None = None
    ) -> Iterator[tuple[str, os.stat_result]]:
        """(relpath, stat) of candidate regular files; never leaves the source, never loops.
        Each entry passed over is logged at DEBUG and counted in ``skips`` by reason."""
        root = str(self.root)
        seen: set[tuple[int, int]] = set()
        stack = [str(top or self.root)]
        follow = self.config.follow_symlinks
        listed = 0  # folders that are not links: each one inotify must watch
        while stack:
            folder = stack.pop()
            try:
                st = os.stat(folder)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                # iterated, not listed: a DirEntry keeps its stat, 100,000 of them add up
                with os.scandir(folder) as entries:
                    # counted once it opens: a folder this process cannot read cannot be
                    # watched either
                    listed += not os.path.islink(folder)
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
        if top is None:
            self.folders = listed

    def _entry(
        self, entry: os.DirEntry[str], root: str, follow: bool, skips: Counter[str] | None
    ) -> tuple[str, os.stat_result | None] | None:
        """(relpath, stat) for a file to take, (path, None) for a folder to enter, else None."""
        rel = entry.path[len(root) + 1 :] if entry.path.startswith(root + "/") else entry.name
        if self.ignored(rel):
            self.skip(skips, self.why_ignored(rel), rel)
            return None
        try:
            if entry.is_symlink() and not self.link_allowed(entry.path):
                self.skip(skips, "link", rel)
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
                self.skip(skips, "subfolder", rel)
            elif not self.excluded(entry.path):  # done_dir, failed_dir: ours, not counted
                return entry.path, None
            return None
        if stat.S_ISREG(est.st_mode):
            return None if self.marker(rel) else (rel, est)
        self.skip(skips, "not_regular", rel)
        return None

    # ------------------------------------------------------------------ the events' look

    def look(
        self, rels: list[str], top: int, lease: sourcefile.Lease | None, writers: WriterCheck
    ) -> list[Look]:
        """(relpath, what it is now, its stat) for each: "file" (a regular file to consider),
        "clear" or "busy" (one the open-writers gate looked at in the same look: nobody, or
        someone, holds it open for writing), "dir" (a folder to scan), "gone", or "skip".
        With a ``lease`` (taken through ``top``, the source folder's descriptor), the files
        directly in the source are leased by ``writers`` as they are looked at."""
        cache: dict[str, bool] = {}
        found: list[Look] = []
        for rel in rels:
            path = self.prefix + rel
            folder = rel.rpartition("/")[0]
            if folder and not self.folder_allowed(folder, cache):
                self.skip(None, "link", folder)
                found.append((rel, "skip", None))
                continue
            verdict: bool | tuple[int, int] | None = None
            try:
                if lease is not None and not folder:
                    st, verdict = writers.look(top, rel, lease)
                else:
                    st = os.lstat(path)
                if stat.S_ISLNK(st.st_mode):
                    if not self.link_allowed(path):
                        self.skip(None, "link", rel)
                        found.append((rel, "skip", None))
                        continue
                    st = os.stat(path)
            except OSError:
                found.append((rel, "gone", None))
                continue
            if stat.S_ISDIR(st.st_mode):
                found.append((rel, "dir" if self.config.recursive else "skip", st))
            elif stat.S_ISREG(st.st_mode) and not self.marker(rel):
                # a lease refused or not possible (None, (dev, ino)): the gate asks again
                what = "busy" if verdict is True else "clear" if verdict is False else "file"
                found.append((rel, what, st))
            else:  # FIFOs, sockets, devices: never offered, never opened
                if not stat.S_ISREG(st.st_mode):
                    self.skip(None, "not_regular", rel)
                found.append((rel, "skip", None))
        return found

    # ------------------------------------------------------------------ for a simulation

    def why_not(self, rel: str) -> str | None:
        """Why the watcher would never hand on the file at ``rel`` (relative to the source),
        by the rules it applies in the scan and the watch; None if it could. For ``explain``:
        it stats the file, so it is not for the event loop."""
        parts = rel.split("/")
        for i in range(len(parts)):
            what = "name" if i == len(parts) - 1 else "folder"
            if parts[i].startswith(OWN_PREFIX):
                return f"its {what} is one filedispatch gives its own work files ({OWN_PREFIX}...)"
            if self.ignored("/".join(parts[: i + 1])):
                defaults = (
                    " (the defaults: see ignore_defaults)"
                    if self._ignored_by_default("/".join(parts[: i + 1]))
                    else ""
                )
                return f"ignored by the source: its {what} matches ignore{defaults}"
        if "/" in rel and not self.config.recursive:
            return "in a sub-folder, and the source is not recursive"
        path = self.prefix + rel
        if self.exclude and self.excluded(path):
            return "in a folder the service keeps out (done_dir, failed_dir or a destination)"
        if not valid_name(rel):
            return "the file name is not valid UTF-8: recorded as FAILED, never sent"
        if self.marker(rel):
            return f"a ready: {self.config.ready} marker, not a file to send"
        folder = rel.rpartition("/")[0]
        if folder and not self.folder_allowed(folder, {}):
            return "below a linked folder (follow_symlinks is false, or it leads outside)"
        try:
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                if not self.link_allowed(path):
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
