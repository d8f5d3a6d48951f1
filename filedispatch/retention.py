"""History retention (``history: {keep, max_rows}``): a task that prunes the journal's old rows
in small transactions, keeps the compact key of a pruned version whose source is still there,
forgets the keys of sources since removed, and gives freed pages back to the filesystem.

Never writes SQL (the journal's ``prune``, ``drop_kept`` and ``vacuum_step`` do) and never opens
a source file: whether a source is still there is one ``lstat`` in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .asyncutil import in_background, in_daemon_thread
from .config import HistoryConfig
from .errors import JournalError
from .journal import Journal

log = logging.getLogger("filedispatch.retention")

#: rows walked, and versions pruned, per transaction: small enough that a delivery's write
#: queued behind one waits a few milliseconds, not seconds
BATCH = 500
#: pages given back per step of an incremental vacuum (1 MiB with 4 KiB pages)
VACUUM_PAGES = 256
#: seconds after the start before the first pass (the start-up scan goes first)
FIRST_PASS_S = 60.0


@dataclass(slots=True)
class Pruned:
    """What one pass did."""

    rows: int = 0  #: rows deleted
    kept: int = 0  #: versions pruned whose compact key was kept (source still there)
    forgotten: int = 0  #: versions whose kept keys were dropped (source gone)


def source_present(root: str, relpath: str) -> bool:
    """Whether the file a kept key stands for may still be in its source: True unless its
    folder is there and the name is not (an unmounted or unreadable source, or a name the
    journal had to escape, counts as present: a key is only dropped when we know)."""
    if "\\" in relpath:
        return True
    try:
        if not stat.S_ISDIR(os.stat(root).st_mode):
            return True
    except OSError:
        return True
    try:
        os.lstat(Path(root) / relpath)
    except FileNotFoundError:
        return False
    except OSError:
        return True
    return True


def _present(pairs: Sequence[tuple[str, str, str]]) -> set[str]:
    return {key for key, root, relpath in pairs if source_present(root, relpath)}


async def prune_once(
    journal: Journal, history: HistoryConfig, now: float | None = None, *, local: bool = True
) -> Pruned:
    """One pass: prune what ``history`` allows at ``now`` (epoch seconds), then sweep the kept
    keys and vacuum. Each batch is its own transaction; between them the writer takes other
    work (dispatching never waits behind more than one batch).

    ``local``: this host sees every source the journal records (an SQLite journal). A shared
    PostgreSQL journal also holds other hosts' sources, which a folder of the same path here
    tells nothing about: every pruned version keeps its key, and no key is dropped."""
    now = time.time() if now is None else now
    done = Pruned()
    cutoff = now - history.keep if history.keep is not None else None
    excess = 0
    if history.max_rows is not None:
        excess = max(0, await journal.row_count() - history.max_rows)
    after = 0
    while cutoff is not None or excess > 0:
        rows = await journal.oldest(after, BATCH)
        if not rows:
            break
        chosen: dict[str, tuple[str, str, str]] = {}
        by_cap = 0  #: rows taken only because the journal is over ``max_rows``
        stop = False  #: met a row too young to prune by age, with the cap's share taken
        for r in rows:
            aged = cutoff is not None and r.created < cutoff
            if not aged and by_cap >= excess:
                stop = True
                break
            chosen.setdefault(r.vkey, (r.vkey, r.root, r.relpath))
            by_cap += not aged
            after = r.id
        if chosen:
            if local:
                keep = await in_daemon_thread(_present, list(chosen.values()))
            else:
                keep = set(chosen)
            before = now if by_cap or cutoff is None else cutoff
            n, kept = await journal.prune(list(chosen), sorted(keep), before)
            done.rows += n
            done.kept += kept
            excess -= n
        if stop and excess <= 0:
            break
        await asyncio.sleep(0)
    if local:
        done.forgotten = await sweep_kept(journal)
    while await journal.vacuum_step(VACUUM_PAGES) > 0:
        await asyncio.sleep(0)
    return done


async def sweep_kept(journal: Journal) -> int:
    """Drop the kept keys whose source file is gone (it cannot come back as the same version:
    a new file is a new inode or ctime). Returns the versions whose keys were dropped."""
    dropped = 0
    after = ""
    while True:
        keys = await journal.kept_keys(after, BATCH)
        if not keys:
            return dropped
        after = keys[-1].vkey
        pairs = [(k.vkey, k.root, k.relpath) for k in keys]
        present = await in_daemon_thread(_present, pairs)
        gone = [k for k, _, _ in pairs if k not in present]
        if gone:
            await journal.drop_kept(gone)
            dropped += len(gone)
        await asyncio.sleep(0)


async def _run(journal: Journal, history: Callable[[], HistoryConfig], local: bool) -> None:
    wait = FIRST_PASS_S
    while True:
        await asyncio.sleep(wait)
        config = history()
        wait = config.every
        if not config.enabled:
            continue
        try:
            done = await prune_once(journal, config, local=local)
        except JournalError as exc:  # the journal's health says the rest; try at the next pass
            log.warning("history retention: pass skipped: %s", exc)
            continue
        if done.rows or done.forgotten:
            log.info(
                "history retention: pruned %d row(s) (%d version(s) keep a compact key), "
                "forgot %d key(s) of removed sources",
                done.rows,
                done.kept,
                done.forgotten,
            )


@contextlib.asynccontextmanager
async def running(
    journal: Journal, history: Callable[[], HistoryConfig], *, local: bool
) -> AsyncIterator[None]:
    """Prune every ``history().every`` seconds while inside (the config in force is asked at
    each pass, so a reload applies at the next one); cancelled on the way out (a batch is a
    transaction: a pass stopped half-way leaves nothing half-done)."""
    async with in_background(_run(journal, history, local), "history-retention"):
        yield
