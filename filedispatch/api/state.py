"""What the web app holds: its typed keys, the service link, and its own journal readers.

``ServiceLink``, the narrow status interface the console and the progress report share, is
in ``link.py``. The app reads the journal on read-only connections of its own, so a slow
history query never waits behind, or holds up, the dispatcher's reads; writes (retry,
forget) go through the journal's single writer. Nothing here serves HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiosqlite
from aiohttp import web

from ..errors import JournalError
from ..journal import Journal
from ..link import ServiceLink


class Reader:
    """A small pool of read-only connections to the journal."""

    def __init__(self, conns: Sequence[aiosqlite.Connection]) -> None:
        self._free: asyncio.Queue[aiosqlite.Connection] = asyncio.Queue()
        for conn in conns:
            self._free.put_nowait(conn)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: Path, size: int = 2) -> AsyncIterator[Reader]:
        conns: list[aiosqlite.Connection] = []
        try:
            for _ in range(size):
                conn = await aiosqlite.connect(f"{path.as_uri()}?mode=ro", uri=True)
                conns.append(conn)
                await conn.execute("PRAGMA busy_timeout = 10000")
                await conn.execute("PRAGMA query_only = 1")
            yield cls(conns)
        except sqlite3.Error as exc:
            raise JournalError(f"the web app cannot read the journal {path}: {exc}") from exc
        finally:
            for conn in conns:
                await conn.close()

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        conn = await self._free.get()
        try:
            async with conn.execute(sql, params) as cur:
                return list(await cur.fetchall())
        except sqlite3.Error as exc:
            raise JournalError(f"journal read failed: {exc}") from exc
        finally:
            self._free.put_nowait(conn)


journal_key = web.AppKey("journal", Journal)
reader_key = web.AppKey("reader", Reader)
link_key = web.AppKey("link", ServiceLink)
token_key: web.AppKey[str | None] = web.AppKey("token")
