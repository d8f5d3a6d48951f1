"""Recovery: a FAILED dispatch sent again on request, and old journals' rows given today's keys.

Here the journal's answers meet the files: the journal never touches files, so what needs
both (is the file still there? was it moved to ``failed_dir``?) lives here. Used by the API,
the console and ``filedispatch history retry``; the service runs ``at_start`` (old rows
re-keyed, what a crash left in the destinations and the work folder removed) at start.
Never sends a file itself: a retried row is queued for the dispatcher, a file brought back is
found by the watcher.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import stat
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from . import fastpath, relocate, sourcefile
from .asyncutil import in_daemon_thread
from .config import Config, LocalDestination, S3Destination, SourceConfig, real_outside, real_roots
from .errors import JournalError
from .journal import Journal
from .models import Dispatch, FileVersion, Status
from .processors import threads
from .processors.local import sweep_temporaries
from .processors.s3uploads import import_files
from .router import legacy_step_keys, step_keys

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryAnswer:
    """What a retry request did: ``queued`` (the row waits for a worker), ``restored`` (the
    file was moved back from ``failed_dir`` into its source, where it is found again as a
    new version), or neither, with ``reason`` saying why not."""

    dispatch_id: int
    queued: bool = False
    restored: Path | None = None
    reason: str = ""
    found: bool = True  #: False: no dispatch has this id

    @property
    def ok(self) -> bool:
        return self.queued or self.restored is not None

    @property
    def message(self) -> str:
        if self.queued:
            return f"dispatch {self.dispatch_id} is queued again"
        if not self.found:
            return f"no dispatch with id {self.dispatch_id}"
        if self.restored is not None:
            return (
                f"dispatch {self.dispatch_id}: the file was moved back from failed_dir to "
                f"{self.restored}; it is dispatched again as a new version"
            )
        return f"dispatch {self.dispatch_id}: {self.reason}"


async def retry(
    journal: Journal, sources: Mapping[str, SourceConfig] | None, dispatch_id: int
) -> RetryAnswer:
    """Send a FAILED dispatch again: re-queue it if its file is still the version in its
    source; bring the file back from the source's ``failed_dir`` if it was moved there (the
    rows of the old version stay FAILED: the file comes back as a new version and runs the
    chain its rules name now); otherwise say why it cannot be retried.
    ``sources``: the configured sources by key (None: the config is not known, so
    ``failed_dir`` cannot be looked in)."""
    row = await journal.get(dispatch_id)
    if row is None:
        return RetryAnswer(dispatch_id, found=False, reason="no dispatch has this id")
    if row.status != Status.FAILED:
        return RetryAnswer(
            dispatch_id, reason=f"it is {row.status}; only a FAILED dispatch can be retried"
        )
    source = None if sources is None else sources.get(row.source)
    roots = [] if sources is None else real_roots(sources.values())
    where = await in_daemon_thread(_locate, row, source, roots)
    if where == "here":
        if await journal.retry(dispatch_id):
            return RetryAnswer(dispatch_id, queued=True)
        return RetryAnswer(dispatch_id, reason="it is no longer FAILED")
    if isinstance(where, Path):
        try:
            back = await in_daemon_thread(_restore, row, where, roots)
        except OSError as exc:
            return RetryAnswer(
                dispatch_id, reason=f"cannot move {where} back: {exc.strerror or exc}"
            )
        log.info("dispatch %d: moved %s back to %s", dispatch_id, where, back)
        return RetryAnswer(dispatch_id, restored=back)
    return RetryAnswer(dispatch_id, reason=where)


def _same(version: FileVersion, st: os.stat_result, *, moved: bool) -> bool:
    """``version.same_file``; a file moved since has a new ctime (a rename changes it), and
    one moved to another filesystem a new inode (it was copied, its mtime kept)."""
    if not moved:
        return version.same_file(st)
    if (st.st_size, st.st_mtime_ns) != (version.size, version.mtime_ns):
        return False
    if version.ino and st.st_dev != version.dev:
        return True  # moved to another filesystem: a copy (new inode) with the same mtime
    return not (version.ino and st.st_ino != version.ino)


def _locate(row: Dispatch, source: SourceConfig | None, roots: list[Path]) -> str | Path:
    """Where the row's file is: "here" (still in its source, unchanged), a Path in
    failed_dir, or the reason it cannot be found. ``roots``: every source folder, resolved
    (no link is followed inside one: ``config.real_outside``)."""
    version = row.version
    try:
        st = os.lstat(version.path)
    except FileNotFoundError:
        st = None
    if st is not None and _same(version, st, moved=False):
        return "here"
    try:
        parked = _in_failed_dir(version, source, roots)
    except OSError as exc:
        return f"cannot look in failed_dir: {exc.strerror or exc}"
    if st is not None:
        if parked is not None:  # the failed file cannot come back: its name is taken
            return (
                f"the file is in {parked}, but another file now has its name {version.path}; "
                "move one of them away and retry"
            )
        return f"{version.path} changed since it failed; its new version is dispatched on its own"
    if parked is not None:
        return parked
    if source is None:
        return f"{version.path} is no longer in its source (give the config to look in failed_dir)"
    return f"{version.path} is no longer in its source (nor in failed_dir): nothing to send"


def _in_failed_dir(
    version: FileVersion, source: SourceConfig | None, roots: list[Path]
) -> Path | None:
    """The file of ``version`` in its source's failed_dir (under a numbered name maybe): a
    regular file, looked for in the folder reached without following a link inside a source
    (a failed_dir in a hostile inbox swapped for a link to elsewhere is refused: OSError)."""
    if source is None or source.failed_dir is None:
        return None
    target = real_outside(source.failed_dir / version.relpath, roots)
    try:
        with sourcefile.held_folder(target.parent, make=False) as there:
            for candidate in relocate.numbered(target):
                try:
                    found = os.lstat(there / candidate.name)
                except FileNotFoundError:
                    return None
                if stat.S_ISREG(found.st_mode) and _same(version, found, moved=True):
                    return candidate
    except FileNotFoundError:
        return None
    return None


def _restore(row: Dispatch, found: Path, roots: list[Path]) -> Path:
    """Move ``found`` back to the row's place in its source, never over another file. Both
    folders are reached without following a link inside a source (``sourcefile.held_folder``):
    a subfolder of the inbox swapped for a link would have the file put where it points;
    the file itself is never read through a link."""
    path = row.version.path
    into = real_outside(path, roots)
    try:
        with (
            sourcefile.held_folder(found.parent, make=False) as there,
            sourcefile.held_folder(into.parent) as here,
        ):
            src, dst = there / found.name, here / into.name
            try:
                fastpath.rename_noreplace(os.fspath(src), os.fspath(dst))
            except fastpath.RenameUnavailable:  # failed_dir on another filesystem
                # copied under a hidden name, renamed once whole: never a half file there
                relocate.move_by_copy(src, dst, lambda: True, any_free_name=False, follow=False)
    except FileExistsError:
        raise OSError(f"another file now has the name {path}") from None
    return path


# ---------------------------------------------------------------------------- old journals


async def rekey_old_rows(journal: Journal, batch: int = 1000) -> int:
    """Give rows recorded before a version was also its inode and ctime the key their file
    has now, where the file is still there with the recorded size and mtime: without this,
    every file kept in a source would look new after an upgrade and be sent again. Runs
    once (checked rows are not looked at again). Returns how many rows were re-keyed."""
    total, after = 0, ""
    while True:
        rows = await journal.unkeyed(batch, after)
        if not rows:
            return total
        after = rows[-1][0]
        found, missing = await in_daemon_thread(_stat_old, rows)
        total += await journal.rekey(found, missing)


def _stat_old(
    rows: list[tuple[str, str, str, str, int, int]],
) -> tuple[list[tuple[str, str, int, int, int]], list[str]]:
    found: list[tuple[str, str, int, int, int]] = []
    missing: list[str] = []
    for vkey, source, root, relpath, size, mtime_ns in rows:
        try:
            st = os.stat(os.path.join(root, relpath))  # a followed link: its target
        except (OSError, ValueError):
            missing.append(vkey)
            continue
        if (st.st_size, st.st_mtime_ns) != (size, mtime_ns):
            missing.append(vkey)  # a new version since: it is dispatched as one
            continue
        version = FileVersion.from_stat(source, Path(root), relpath, st)
        found.append((vkey, version.key, st.st_dev, st.st_ino, st.st_ctime_ns))
    return found, missing


async def upgrade_step_keys(journal: Journal, config: Config) -> int | None:
    """Once per journal: give rows recorded when a step's key named every step before it the
    key it has now (the step and the transforms before it), for the chains of ``config``, so
    that an upgrade sends no kept file again. Rows of steps no rule names any more keep their
    old key (they are history). Returns the rows re-keyed, None when it was done before."""
    if not await journal.upgrade_due("step-keys"):
        return None
    keys: dict[str, str] = {}
    for rule in config.rules:
        keys.update(zip(legacy_step_keys(rule.to), step_keys(rule.to), strict=True))
    return await journal.rekey_steps(keys, time.time())


#: seconds the start waits for the sweeps of the local destinations' temporary files (a few
#: milliseconds each on a healthy disk), so that the first files are not refused while one
#: runs; past it the start goes on beside those still running (a hung mount)
SWEEP_WAIT_S = 2.0


async def at_start(journal: Journal, config: Config, workdir: Path, alone: bool = True) -> None:
    """Before any delivery: give an older journal's rows today's keys (``rekey_old_rows``,
    ``upgrade_step_keys``), end the removals of sources a stop interrupted
    (``finish_removals``), remove the temporary files a crash left in the local destinations
    (only when ``alone``: no other node is live, whose copies in progress they may be), and the
    chain work folders (under ``workdir``) no unfinished dispatch needs any more.
    Every file system walk runs in a thread. The sweep of each local destination runs in a
    daemon thread, waited for SWEEP_WAIT_S at most: a destination takes no copy until its
    sweep has returned (``threads.sweeping``), and one whose mount hangs holds nothing else."""
    rekeyed = await rekey_old_rows(journal)
    if rekeyed:
        log.info("gave %d dispatch(es) of an older journal the files' identity", rekeyed)
    upgraded = await upgrade_step_keys(journal, config)
    if upgraded:
        log.info("gave %d dispatch(es) of an older journal today's step keys", upgraded)
    await finish_removals(journal, config, alone)
    roots = {s.folder for r in config.rules for s in r.to if isinstance(s, LocalDestination)}
    if alone:
        inside = real_roots(config.sources)
        sweeps = {}
        for root in sorted(roots):  # each beside the start: see threads.sweeping
            sweep = in_daemon_thread(sweep_temporaries, [root], journal.token, inside)
            threads.sweeping(str(root), sweep)
            sweep.add_done_callback(_swept)
            sweeps[sweep] = root
        if sweeps:
            _done, left = await asyncio.wait(sweeps, timeout=SWEEP_WAIT_S)
            for sweep in left:
                log.warning(
                    "%s: the sweep of its temporary files has not returned after %gs (a hung "
                    "disk or mount?); the start goes on, and it takes no copy until it has",
                    sweeps[sweep],
                    SWEEP_WAIT_S,
                )
    else:
        log.info("other nodes are live: their temporary files in local destinations stay")
    active = await journal.active_version_keys()
    stale = await asyncio.to_thread(_stale_work, workdir, active)
    for folder in stale:
        await asyncio.to_thread(shutil.rmtree, folder, True)
    if stale:
        log.info("removed %d stale work folder(s) from %s", len(stale), workdir)


#: how long a look for interrupted removals, or the end of one, may go without a single entry
#: listed (or without returning) before the start goes on without it: a hung mount
STALL_S = 10.0


async def finish_removals(
    journal: Journal, config: Config, alone: bool = True, shared_only: bool = False
) -> None:
    """End what a stop (kill -9, power loss) interrupted in ``relocate.consume``: a source an
    after-action was removing is renamed to a hidden name carrying its version's key first,
    and unlinked only after a look. Each such file found in a source (its subfolders too if
    recursive) is removed if it is still the version the journal has under that key (it was
    delivered, and its move's copy placed, before the rename), else put back under its own
    name (a new version renamed over the source at that instant: dispatched on its own). A
    key the journal does not know leaves the file where it is, with a warning.

    Run at start before any delivery, when this service's own removals cannot be under way,
    and, in a cluster, once a lease for the shared sources (``removals_task``). A shared
    source while other nodes are live (``alone`` false): only files renamed more than two
    leases ago (by their ctime), whose node is gone or stuck (a removal's rename and unlink
    are microseconds apart); were two nodes to end one, they decide alike, and the second
    finds it gone. ``shared_only``: the unshared sources are left out (the periodic look).
    Each look and each end runs in a daemon thread; a look that lists nothing for
    ``STALL_S`` (a hung mount) is given up and the start goes on."""
    for source in config.sources:
        if shared_only and not source.shared:
            continue
        older = 2 * config.lease if source.shared and not alone else None
        found = await _looked(source, older)
        if not found:
            continue
        try:
            versions = await journal.versions([key for _path, key in found])
        except JournalError as exc:  # they stay; the next start looks again
            log.warning("cannot end the removals a stop interrupted in %s: %s", source.path, exc)
            continue
        for path, key in found:
            version = versions.get(key)
            if version is None:
                log.warning(
                    "%s: left by an interrupted removal, but no dispatch of this journal has "
                    "its version (key %s); it stays where it is",
                    path,
                    key,
                )
                continue
            # the device number is not compared: it differs between hosts that share a folder
            version = dataclasses.replace(version, dev=0)
            try:
                await _waited(in_daemon_thread(_finish, path, version, source))
            except (TimeoutError, OSError) as exc:
                log.warning("cannot end the interrupted removal of %s: %s", path, exc or "stuck")


def removals_task(
    journal: Journal, config: Callable[[], Config], every_s: float
) -> asyncio.Task[None]:
    """A task that ends other nodes' interrupted removals in the shared sources once every
    ``every_s`` seconds (a lease): in a cluster that is never stopped whole, a node that
    crashed mid-removal and came back while others were live would leave its file for ever.
    ``config`` gives the service's current config. The caller cancels it at the stop."""

    async def run() -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await finish_removals(journal, config(), alone=False, shared_only=True)
            except Exception as exc:  # one look's failure ends nothing: the next one comes
                log.warning("the look for interrupted removals failed: %s", exc)

    return asyncio.create_task(run(), name="finish-removals")


async def _looked(source: SourceConfig, older: float | None) -> list[tuple[Path, str]] | None:
    """``_leftovers`` of ``source`` in a daemon thread, waited for as long as it lists
    something every ``STALL_S``; None (logged) if it stalls or fails. ``older``: only files
    renamed more than that many seconds ago."""
    progress = [0]
    look = in_daemon_thread(_leftovers, source.path, source.recursive, progress, older)
    seen = -1
    while True:
        try:
            return await asyncio.wait_for(asyncio.shield(look), STALL_S)
        except TimeoutError:
            if progress[0] == seen:
                log.warning(
                    "%s: the look for removals a stop interrupted has listed nothing for %gs "
                    "(a hung disk or mount?); the start goes on without it",
                    source.path,
                    STALL_S,
                )
                return None
            seen = progress[0]
        except OSError as exc:
            log.warning("%s: cannot look for removals a stop interrupted: %s", source.path, exc)
            return None


async def _waited(call: asyncio.Future[T]) -> T:
    """``call`` (in a daemon thread) waited for ``STALL_S`` at most (TimeoutError)."""
    return await asyncio.wait_for(asyncio.shield(call), STALL_S)


def _leftovers(
    root: Path, recursive: bool, progress: list[int], older: float | None = None
) -> list[tuple[Path, str]]:
    """The files ``relocate.consume`` renamed and a stop left in ``root`` (its subfolders too
    if ``recursive``, no link followed: ``sourcefile.entries_beneath``), with the version key
    each name carries; ``older``: only those renamed more than that many seconds ago.
    ``progress[0]`` counts the entries listed (for ``_looked``)."""
    found = []
    before = time.time() - older if older is not None else None
    for entry in sourcefile.entries_beneath(root, recursive):
        progress[0] += 1
        key = relocate.gone_key(entry.name)
        if key is None:
            continue
        if before is not None:
            try:
                if entry.stat(follow_symlinks=False).st_ctime >= before:
                    continue  # another live node's removal may be under way
            except OSError:
                continue
        found.append((Path(entry.path), key))
    return found


def _finish(path: Path, version: FileVersion, source: SourceConfig) -> None:
    """Remove ``path`` if it is the very file of ``version``, else put it back under its
    name in its folder (``relocate.put_back``: the next free numbered name if taken)."""
    if sourcefile.same_at(version, source.follow_symlinks, path):
        os.unlink(path)
        log.info(
            "removed %s: the source %s, delivered, whose removal a stop interrupted",
            path,
            path.with_name(version.name),
        )
    else:
        relocate.put_back(path, path.with_name(version.name))


def _swept(sweep: asyncio.Future[int]) -> None:
    if not sweep.cancelled() and sweep.exception() is not None:
        log.error("the start-up sweep of temporary files failed: %s", sweep.exception())


def _stale_work(workdir: Path, active: set[str]) -> list[Path]:
    """The work folders of versions not in ``active`` (made private first)."""
    if not workdir.is_dir():
        return []
    workdir.chmod(0o700)
    return [p for p in workdir.iterdir() if p.name.split("-", 1)[0] not in active]


async def sweep_uploads(
    journal: Journal, config: Callable[[], Config], legacy: Path, every_s: float | None
) -> asyncio.Task[None] | None:
    """The S3 multipart uploads runs that are gone left open (the journal's ledger, after the
    ledger files of older versions in ``legacy`` are moved into it), aborted by a task of their
    own in the background: an S3 server that cannot be reached must not hold the start up.
    ``config`` gives the service's current config (a reload counts from the task's next
    look). ``every_s``: the task looks again that often for the service's whole life (a shared
    journal, whose other nodes may go at any time), and a reload that brings the first S3
    destination starts the sweeping within that time; None: once, at the start. None when
    there is nothing to do; the caller cancels the task at the stop."""
    await import_files(legacy, journal)
    if every_s is None:
        try:
            if not await journal.orphan_uploads():
                return None
        except JournalError as exc:
            log.warning("cannot look for unfinished S3 uploads: %s", exc)
            return None
    return asyncio.create_task(_sweep(journal, config, every_s), name="s3-sweep")


async def _sweep(journal: Journal, config: Callable[[], Config], every_s: float | None) -> None:
    """``sweep_orphans``, once the config has an S3 destination (looked at every ``every_s``
    seconds): a service that sends nothing to S3 never loads the S3 client."""
    while every_s is not None and not any(
        isinstance(s, S3Destination) for r in config().rules for s in r.to
    ):
        await asyncio.sleep(every_s)
    from .processors.s3 import sweep_orphans  # aiobotocore only where S3 is used

    await sweep_orphans(journal, config, every_s)
