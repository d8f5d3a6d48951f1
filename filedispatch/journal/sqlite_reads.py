"""The SQLite journal's read side beyond the journal's own connection: a pool of read-only
connections for the web app and the command line (``SqliteReader``), and the short read-only
looks of a simulation (``read_states``, ``read_digests``) that are safe while a service
writes. Never writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite

from ..errors import JournalError
from ..models import Status
from . import retention
from .base import DUPLICATE_OF, StepState
from .reads import DELIVERED_DIGEST, SqlReads


def read_states(path: Path, vkeys: Sequence[str]) -> dict[str, list[StepState]]:
    """For each version key: its rows' states, read through a read-only connection (safe
    while a service writes; nothing is created, so a missing journal gives ``{}``). Raises
    JournalError when the file is there but cannot be read."""
    if not path.exists():
        return {}
    out: dict[str, list[StepState]] = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    try:
        for i in range(0, len(vkeys), 500):
            chunk = list(vkeys[i : i + 500])
            keys = retention.marks(len(chunk))
            rows = conn.execute(
                "SELECT vkey, id, step_key, status, attempts FROM dispatches "
                f"WHERE vkey IN ({keys}) UNION ALL SELECT vkey, 0, step_key, status, marked "
                f"FROM kept WHERE vkey IN ({keys}) ORDER BY 2",
                chunk * 2,
            )
            for vkey, row_id, step_key, status, attempts in rows:
                out.setdefault(vkey, []).append(
                    StepState(row_id, step_key, Status(status), attempts)
                )
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    finally:
        conn.close()
    return out


def read_digests(
    path: Path, wanted: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, str]]:
    """For each (destination, sha256) the journal has a delivery of: that delivery's (id,
    location), as ``delivered_digest`` finds it, read like ``read_states`` (read-only; a
    missing journal gives ``{}``). Raises JournalError when it cannot be read."""
    if not path.exists() or not wanted:
        return {}
    out: dict[tuple[str, str], tuple[int, str]] = {}
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    try:
        for destination, sha256 in wanted:
            row = conn.execute(DELIVERED_DIGEST, (sha256, destination, DUPLICATE_OF)).fetchone()
            if row is not None:
                out[(destination, sha256)] = (int(row[0]), str(row[1]))
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    finally:
        conn.close()
    return out


class SqliteReader(SqlReads):
    """A small pool of read-only connections to the journal file (the web app's, the command
    line's): a slow history query never waits behind, or holds up, the dispatcher's reads."""

    def __init__(self, conns: Sequence[aiosqlite.Connection]) -> None:
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in conns:
            self._free.put_nowait(conn)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, size: int = 2) -> AsyncIterator[SqliteReader]:
        """Raises JournalError when the file is missing or is not a journal."""
        conns: list[aiosqlite.Connection] = []
        try:
            for _ in range(size):
                conn = await aiosqlite.connect(f"{path.as_uri()}?mode=ro", uri=True)
                conns.append(conn)
                await conn.execute("PRAGMA busy_timeout = 10000")
                await conn.execute("PRAGMA query_only = 1")
            await conns[0].execute("SELECT 1 FROM dispatches LIMIT 1")
        except sqlite3.Error as exc:
            for conn in conns:
                await conn.close()
            raise JournalError(f"cannot read the journal {path}: {exc}") from exc
        try:
            yield cls(conns)
        finally:
            for conn in conns:
                await conn.close()

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = await self._free.get()
        try:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc
        finally:
            self._free.put_nowait(conn)
