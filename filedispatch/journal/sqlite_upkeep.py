"""The SQLite journal's upkeep: the changes made to recorded history rather than to work in
flight (an operator's retry and forget, mark-existing, the start-up's re-keying of older rows)
and retention's part (pruning, the kept keys, giving free pages back, the integrity check).
Each change is one write through the journal's group commit; nothing here touches a file.
"""

from __future__ import annotations

import abc
import sqlite3
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TypeVar

from . import retention
from .base import HealthReport, PlannedStep
from .reads import SqlReads
from .sqlite_writer import Op, Rows

T = TypeVar("T")


class SqliteUpkeep(SqlReads, HealthReport):
    """History edits and retention over the journal's ``write`` and ``read``."""

    @abc.abstractmethod
    async def write(self, op: Op[T] | Rows) -> T:
        """Run ``op`` inside the next group commit and return its result once committed."""

    @abc.abstractmethod
    async def plan(self, steps: Iterable[PlannedStep], now: float | None = None) -> int:
        """Insert PENDING rows for steps not planned before; returns how many are new."""

    # ------------------------------------------------------------------ history

    async def retry(self, dispatch_id: int) -> bool:
        """Re-queue a FAILED row (and the rows after it in its chain); False if not FAILED.

        Raises JournalError at once while the journal is failing (``health``).
        """
        self._require_writable()

        def op(conn: sqlite3.Connection) -> bool:
            row = conn.execute(
                "SELECT vkey, rule, step FROM dispatches WHERE id=? AND status='FAILED'",
                (dispatch_id,),
            ).fetchone()
            if row is None:
                return False
            conn.execute(
                "UPDATE dispatches SET status='PENDING', attempts=0, next_attempt=0, started=NULL, "
                "reason=NULL, error_type=NULL, finished=NULL, detail='retry requested' "
                "WHERE vkey=? AND rule=? AND step>=? AND status='FAILED'",
                tuple(row),
            )
            return True

        return await self.write(op)

    async def unkeyed(
        self, limit: int = 1000, after: str = ""
    ) -> list[tuple[str, str, str, str, int, int]]:
        """Versions recorded before a version was also its inode and ctime (``ino IS NULL``):
        (vkey, source, root, relpath, size, mtime_ns), at most ``limit`` of them, in key order
        from the first key above ``after`` (pass the last key of a batch for the next one: the
        index is walked once in all, not once per batch)."""
        rows = await self.read(
            "SELECT vkey, source, root, relpath, size, mtime_ns FROM dispatches "
            "WHERE vkey > ? AND ino IS NULL GROUP BY vkey ORDER BY vkey LIMIT ?",
            (after, limit),
        )
        return [tuple(r) for r in rows]

    async def rekey(
        self, found: Sequence[tuple[str, str, int, int, int]], missing: Sequence[str]
    ) -> int:
        """Give old rows the key their file has now: ``found`` is (old vkey, new vkey, dev,
        ino, ctime_ns) for files still there with the recorded size and mtime; ``missing``
        are old vkeys whose file is gone or changed (marked checked with ino 0, so they are
        not looked at again). Returns the rows re-keyed. A row whose new key is already
        planned keeps its old key (its history stays; the new row says what happens now).
        """

        def op(conn: sqlite3.Connection) -> int:
            changed = conn.executemany(
                "UPDATE OR IGNORE dispatches SET vkey=?, dev=?, ino=?, ctime_ns=? "
                "WHERE vkey=? AND ino IS NULL",
                [(new, dev, ino, ctime, old) for old, new, dev, ino, ctime in found],
            ).rowcount
            conn.executemany(
                "UPDATE dispatches SET ino=0 WHERE vkey=? AND ino IS NULL",
                [(old,) for old in missing] + [(old,) for old, *_ in found],
            )
            return changed

        return await self.write(op)

    async def requeue_unrun(self, steps: Sequence[tuple[str, str]]) -> int:
        """Queue again FAILED rows no attempt made ("not run" behind a step that failed), given
        as (vkey, step_key): the steps before them succeed now. Returns the rows queued."""

        def op(conn: sqlite3.Connection) -> int:
            return conn.executemany(
                "UPDATE dispatches SET status='PENDING', next_attempt=0, finished=NULL, "
                "started=NULL WHERE vkey=? AND step_key=? AND status='FAILED' AND attempts=0",
                steps,
            ).rowcount

        return await self.write(op)

    async def rekey_steps(self, keys: Mapping[str, str], now: float) -> int:
        """Give rows the step keys of today (``keys``: old step key -> new one) and record the
        ``step-keys`` upgrade done, in one transaction. Idempotent: a key already changed is not
        found again. A row whose new key its version has already keeps its old one (as in
        ``rekey``). Returns the rows changed."""
        pairs = [(new, old) for old, new in keys.items() if old != new]

        def op(conn: sqlite3.Connection) -> int:
            sql = "UPDATE OR IGNORE dispatches SET step_key=? WHERE step_key=?"
            changed = conn.executemany(sql, pairs).rowcount
            conn.execute("UPDATE upgrades SET done=? WHERE name='step-keys'", (now,))
            return changed

        return await self.write(op)

    async def forget(
        self,
        dispatch_id: int | None = None,
        *,
        source: str | None = None,
        relpath: str | None = None,
    ) -> int:
        """Delete history so the file is sent again at the next rescan or start; the rows removed.

        Raises JournalError at once while the journal is failing (``health``).
        """
        self._require_writable()

        def op(conn: sqlite3.Connection) -> int:
            if dispatch_id is not None:
                cur = conn.execute(
                    "DELETE FROM dispatches WHERE id=? AND status != 'IN_PROGRESS'", (dispatch_id,)
                )
            else:
                cur = conn.execute(
                    "DELETE FROM dispatches WHERE relpath=? AND (? IS NULL OR source=?) "
                    "AND status != 'IN_PROGRESS'",
                    (relpath, source, source),
                )
                conn.execute(retention.FORGET_KEPT, (relpath, source, source))
            return cur.rowcount

        return await self.write(op)

    async def mark_done(self, steps: Iterable[PlannedStep]) -> int:
        """Record steps as SUCCEEDED without sending (dirsend's --store-only)."""
        steps = list(steps)
        now = time.time()
        new = await self.plan(steps, now)

        def op(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "UPDATE dispatches SET status='SUCCEEDED', finished=?, duration_ms=0, "
                "detail='marked as already dispatched (mark-existing): not sent' "
                "WHERE vkey=? AND step_key=? AND status='PENDING'",
                [(now, s.version.key, s.step_key) for s in steps],
            )

        await self.write(op)
        return new

    # ------------------------------------------------------------------ retention

    async def prune(
        self, vkeys: Sequence[str], keep: Sequence[str], before: float
    ) -> tuple[int, int]:
        """In one transaction: delete the rows of those ``vkeys`` whose every row SUCCEEDED and
        finished before ``before`` (any other is left whole), keeping the compact key of those
        also in ``keep`` (their source is still there). Returns (rows deleted, versions
        whose key was kept)."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            found = [
                r[0]
                for r in conn.execute(
                    retention.PRUNABLE.format(keys=retention.marks(len(vkeys))), [*vkeys, before]
                )
            ]
            if not found:
                return 0, 0
            wanted = set(keep)
            kept = [k for k in found if k in wanted]
            if kept:
                conn.execute(retention.KEEP.format(keys=retention.marks(len(kept))), kept)
            marks = retention.marks(len(found))
            return conn.execute(retention.DELETE.format(keys=marks), found).rowcount, len(kept)

        return await self.write(op) if vkeys else (0, 0)

    async def drop_kept(self, vkeys: Sequence[str]) -> int:
        """Forget the kept keys of these versions (their source is gone); the keys removed."""

        def op(conn: sqlite3.Connection) -> int:
            marks = retention.marks(len(vkeys))
            return conn.execute(retention.DROP_KEPT.format(keys=marks), list(vkeys)).rowcount

        return await self.write(op) if vkeys else 0

    async def vacuum_step(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the filesystem (a journal created with
        ``auto_vacuum = INCREMENTAL``; an older one keeps them for new rows); returns the free
        pages left that a later step can give back (0 when none or not possible)."""

        def op(conn: sqlite3.Connection) -> int:
            if int(conn.execute("PRAGMA auto_vacuum").fetchone()[0]) != 2:
                return 0
            conn.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()
            return int(conn.execute("PRAGMA freelist_count").fetchone()[0])

        return await self.write(op)

    async def integrity_check(self) -> str:
        rows = await self.read("PRAGMA integrity_check")
        return str(rows[0][0]) if rows else "no answer"
