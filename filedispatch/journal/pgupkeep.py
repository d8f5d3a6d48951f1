"""What the PostgreSQL journal does to its rows besides the work: an operator's retry and
forget, the one-time upgrades at start (re-keying old rows, re-queueing rows never tried), and
history retention (pruning, the compact keys of pruned versions). Every statement runs on the
writer; never plans, claims or finishes a row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from . import retention
from .base import number
from .pgconn import Conn, pg, stat_text
from .pgwriter import PgWriter


class PgUpkeep(PgWriter):
    """The upkeep writes of a PostgreSQL journal (see the module docstring)."""

    async def retry(self, dispatch_id: int) -> bool:
        """Re-queue a FAILED row (and the rows after it in its chain); False if not FAILED."""
        self._require_writable()

        async def op(conn: Conn) -> bool:
            cur = await conn.execute(
                "SELECT vkey, rule, step FROM dispatches WHERE id=%s AND status='FAILED'",
                (dispatch_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            await conn.execute(
                "UPDATE dispatches SET status='PENDING', attempts=0, next_attempt=0, reason=NULL, "
                "error_type=NULL, finished=NULL, started=NULL, detail='retry requested' "
                "WHERE vkey=%s AND rule=%s AND step>=%s AND status='FAILED'",
                tuple(row),
            )
            return True

        return await self.write(op)

    async def unkeyed(
        self, limit: int = 1000, after: str = ""
    ) -> list[tuple[str, str, str, str, int, int]]:
        """Versions recorded without the file's inode and ctime (see the SQLite journal)."""
        rows = await self.read(
            "SELECT vkey, MIN(source), MIN(root), MIN(relpath), MIN(size), MIN(mtime_ns) "
            "FROM dispatches WHERE vkey > ? AND ino IS NULL GROUP BY vkey ORDER BY vkey LIMIT ?",
            (after, limit),
        )
        return [(v, s, r, p, int(size), number(mt) or 0) for v, s, r, p, size, mt in rows]

    async def rekey(
        self, found: Sequence[tuple[str, str, int, int, int]], missing: Sequence[str]
    ) -> int:
        """Give old rows the key their file has now (see the SQLite journal); a row whose new
        key is already planned keeps its old key."""

        async def op(conn: Conn) -> int:
            changed = 0
            async with conn.cursor() as cur:
                for old, new, dev, ino, ctime in found:
                    await cur.execute(
                        "UPDATE dispatches d SET vkey=%s, dev=%s, ino=%s, ctime_ns=%s "
                        "WHERE d.vkey=%s AND d.ino IS NULL AND NOT EXISTS (SELECT 1 FROM "
                        "dispatches o WHERE o.vkey=%s AND o.step_key=d.step_key)",
                        (new, stat_text(dev), stat_text(ino), stat_text(ctime), old, new),
                    )
                    changed += max(cur.rowcount, 0)
                olds = [*missing, *(old for old, *_ in found)]
                await cur.execute(
                    "UPDATE dispatches SET ino=0 WHERE vkey = ANY(%s) AND ino IS NULL", (olds,)
                )
            return changed

        return await self.write(op)

    async def requeue_unrun(self, steps: Sequence[tuple[str, str]]) -> int:
        """Queue again FAILED rows no attempt was made for (see the SQLite journal)."""

        async def op(conn: Conn) -> int:
            changed = 0
            async with conn.cursor() as cur:
                for vkey, step_key in steps:
                    await cur.execute(
                        "UPDATE dispatches SET status='PENDING', next_attempt=0, finished=NULL, "
                        "started=NULL WHERE vkey=%s AND step_key=%s AND status='FAILED' "
                        "AND attempts=0",
                        (vkey, step_key),
                    )
                    changed += max(cur.rowcount, 0)
            return changed

        return await self.write(op)

    async def rekey_steps(self, keys: Mapping[str, str], now: float) -> int:
        """Give rows today's step keys and record the ``step-keys`` upgrade done, in one
        transaction (see the SQLite journal); a row whose version already has the new key keeps
        its old one."""
        pairs = [(new, old, new) for old, new in keys.items() if old != new]

        async def op(conn: Conn) -> int:
            changed = 0
            async with conn.cursor() as cur:
                for new, old, again in pairs:
                    await cur.execute(
                        "UPDATE dispatches d SET step_key=%s WHERE d.step_key=%s AND NOT EXISTS "
                        "(SELECT 1 FROM dispatches o WHERE o.vkey=d.vkey AND o.step_key=%s)",
                        (new, old, again),
                    )
                    changed += max(cur.rowcount, 0)
                await cur.execute("UPDATE upgrades SET done=%s WHERE name='step-keys'", (now,))
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

        async def op(conn: Conn) -> int:
            if dispatch_id is not None:
                cur = await conn.execute(
                    "DELETE FROM dispatches WHERE id=%s AND status != 'IN_PROGRESS'",
                    (dispatch_id,),
                )
            else:
                cur = await conn.execute(
                    "DELETE FROM dispatches WHERE relpath=%s "
                    "AND (%s::text IS NULL OR source=%s) AND status != 'IN_PROGRESS'",
                    (relpath, source, source),
                )
                await conn.execute(
                    pg(retention.FORGET_KEPT.replace("? IS NULL", "?::text IS NULL")),
                    (relpath, source, source),
                )
            return max(cur.rowcount, 0)

        return await self.write(op)

    # ------------------------------------------------------------------ retention

    async def prune(
        self, vkeys: Sequence[str], keep: Sequence[str], before: float
    ) -> tuple[int, int]:
        """See ``SqliteJournal.prune``; the rows are locked first, so a node claiming or
        finishing one of them meanwhile is waited for, and the check is made after it."""
        if not vkeys:
            return 0, 0
        marks = retention.marks(len(vkeys))

        async def op(conn: Conn) -> tuple[int, int]:
            await conn.execute(
                pg(f"SELECT 1 FROM dispatches WHERE vkey IN ({marks}) ORDER BY id FOR UPDATE"),
                list(vkeys),
            )
            cur = await conn.execute(pg(retention.PRUNABLE.format(keys=marks)), [*vkeys, before])
            found = [str(r[0]) for r in await cur.fetchall()]
            if not found:
                return 0, 0
            wanted = set(keep)
            kept = [k for k in found if k in wanted]
            if kept:
                await conn.execute(pg(retention.KEEP.format(keys=retention.marks(len(kept)))), kept)
            cur = await conn.execute(
                pg(retention.DELETE.format(keys=retention.marks(len(found)))), found
            )
            return max(cur.rowcount, 0), len(kept)

        return await self.write(op)

    async def drop_kept(self, vkeys: Sequence[str]) -> int:
        """Forget the kept keys of these versions (their source is gone); the keys removed."""
        if not vkeys:
            return 0

        async def op(conn: Conn) -> int:
            marks = retention.marks(len(vkeys))
            cur = await conn.execute(pg(retention.DROP_KEPT.format(keys=marks)), list(vkeys))
            return max(cur.rowcount, 0)

        return await self.write(op)

    async def vacuum_step(self, pages: int) -> int:
        """Nothing to do: the server's autovacuum makes the space of deleted rows reusable
        (docs/operations.md)."""
        return 0
