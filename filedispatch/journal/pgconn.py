"""Connections to a PostgreSQL journal: the libpq connection string, connecting, the session
settings a node's connections carry, and what counts as an outage.

Shared by the writer (``pgwriter.py``) and the lease connection (``pgnodes.py``); never logs
the password and holds no connection itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor
from pathlib import Path
from typing import Any, TypeVar

import psycopg

from .target import PostgresTarget

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
#: a write: run by the writer inside the group transaction
PgOp = Callable[[Conn], Awaitable[T]]

#: seconds to wait for a connection (at open, from the pool)
CONNECT_TIMEOUT_S = 10.0


@functools.lru_cache(maxsize=256)
def pg(sql: str) -> bytes:
    """A statement written with ``?`` marks (the shared reads) as psycopg takes it."""
    return sql.replace("%", "%%").replace("?", "%s").encode()


def stat_text(value: int | None) -> str | None:
    """A stat number for a NUMERIC column (sent as text: it may pass 2**63)."""
    return None if value is None else str(value)


def outage(exc: BaseException) -> bool:
    """Whether an error means "the database cannot take writes now" (the server is gone,
    restarting, out of disk, refusing logins) rather than "this write is wrong"."""
    return isinstance(exc, psycopg.OperationalError | psycopg.InterfaceError | OSError)


def conninfo(target: PostgresTarget) -> str:
    """The libpq connection string (with the password from ``password_env``, if set: never
    log it)."""
    password = target.password()
    extra = {"password": password} if password else {}
    return psycopg.conninfo.make_conninfo(
        target.url, connect_timeout=int(CONNECT_TIMEOUT_S), **extra
    )


async def connect(target: PostgresTarget, resolver: Executor | None = None) -> Conn:
    """A new autocommit connection; raises psycopg's errors (OSError too, from the look-up).

    psycopg looks a host name up in the loop's default executor, where slow copies may hold
    every thread for longer than a lease. With ``resolver`` the names are looked up there
    instead (libpq's own order of attempts: each host, each of its addresses), and psycopg
    is handed the addresses."""
    info = conninfo(target)
    if resolver is None:
        return await exact_floats(await psycopg.AsyncConnection.connect(info, autocommit=True))
    loop = asyncio.get_running_loop()
    params = psycopg.conninfo.conninfo_to_dict(info)
    attempts = await loop.run_in_executor(resolver, psycopg.conninfo.conninfo_attempts, params)
    failed: psycopg.OperationalError | None = None
    for attempt in attempts:
        try:
            conn = await psycopg.AsyncConnection.connect(
                psycopg.conninfo.make_conninfo("", **attempt), autocommit=True
            )
            return await exact_floats(conn)
        except psycopg.OperationalError as exc:
            failed = exc
    raise failed or psycopg.OperationalError(f"no address to connect to {target.shown}")


async def exact_floats(conn: Conn) -> Conn:
    """``conn``, its floats given as text exact to the last bit: a row's ``created`` names
    its delivery in whole microseconds (``StepContext.planned``), so it must read back as it
    was written, on every node. PostgreSQL 11 gives 15 significant digits by default (a
    time of day to 10 microseconds), and a role or database may set ``extra_float_digits``
    to 0 on any version; 3 gives 17 digits on 11, the shortest exact text from 12 on."""
    await conn.execute("SELECT set_config('extra_float_digits', '3', false)")
    return conn


async def configure(conn: Conn) -> None:
    """Each pooled connection reads floats exactly (``exact_floats``) and counts local days in
    this process's time zone."""
    await exact_floats(conn)
    zone = local_zone()
    if zone:
        with contextlib.suppress(psycopg.Error):
            await conn.execute("SELECT set_config('TimeZone', %s, false)", (zone,))


@functools.cache
def local_zone() -> str | None:
    """This process's time zone as an IANA name (``TZ``, else /etc/localtime), or None."""
    tz = os.environ.get("TZ", "").lstrip(":")
    if tz and not tz.startswith("/"):
        return tz
    link = Path(tz or "/etc/localtime")
    with contextlib.suppress(OSError):
        name = str(link.resolve())
        if "zoneinfo/" in name:
            return name.split("zoneinfo/", 1)[1]
    return None


async def limit_waits(conn: Conn, lease_s: float) -> None:
    """A node frozen inside a transaction (SIGSTOP, a VM paused) must not keep its row locks
    past its lease: the server ends such a session after half a lease, and the locked rows are
    free for the other nodes (the writer reconnects when the node wakes). And a writer must not
    wait on another's locks until its own lease runs out: after a quarter of a lease the
    statement fails, and the batch is tried again (``pgwriter._CONFLICTS``)."""
    idle, lock = max(500, int(lease_s * 500)), max(200, int(lease_s * 250))
    await conn.execute(
        "SELECT set_config('idle_in_transaction_session_timeout', %s, false), "
        "set_config('lock_timeout', %s, false)",
        (str(idle), str(lock)),
    )
