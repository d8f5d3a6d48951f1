"""Which backend a ``database`` names, and opening it: a path is an SQLite file, a
``PostgresTarget`` a PostgreSQL database.

Owns no connection itself; each backend module owns its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..errors import JournalError, JournalUnavailableError
from .base import RETRY_FIRST_S, RETRY_MAX_S
from .target import PostgresTarget

T = TypeVar("T")

log = logging.getLogger("filedispatch.journal")

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .base import Journal, JournalReader, StepState


@contextlib.contextmanager
def needs_psycopg() -> Iterator[None]:
    """Around an import of the PostgreSQL backend: without psycopg, a JournalError saying
    what to install (an SQLite journal never needs it)."""
    try:
        yield
    except ImportError as exc:
        raise JournalError(
            f"a PostgreSQL journal needs psycopg 3 and psycopg_pool ({exc}): "
            "pip install 'filedispatch[postgres]'"
        ) from None


def open_journal(
    database: str | os.PathLike[str] | PostgresTarget, *, hold: bool = True
) -> AbstractAsyncContextManager[Journal]:
    """The journal ``database`` names, to open with ``async with``: a path names an SQLite
    file, a ``PostgresTarget`` a PostgreSQL database. See ``Journal.open``."""
    if isinstance(database, PostgresTarget):
        with needs_psycopg():
            from .postgres import PostgresJournal
        return PostgresJournal.open(database, hold=hold)
    from .sqlite import SqliteJournal

    return SqliteJournal.open(database, hold=hold)


async def open_when_ready(
    stack: contextlib.AsyncExitStack,
    database: str | os.PathLike[str] | PostgresTarget,
    stop: asyncio.Event,
) -> Journal | None:
    """The journal ``database`` names, opened into ``stack`` once it can be: a journal that
    cannot be opened now (``JournalUnavailableError``: a full disk, a server down) is tried
    again as ``when_ready`` says, rather than a crash at every restart. None when ``stop``
    is set meanwhile."""
    return await when_ready(
        lambda: stack.enter_async_context(open_journal(database)), stop, JournalUnavailableError
    )


async def when_ready(
    attempt: Callable[[], Awaitable[T]],
    stop: asyncio.Event,
    retry_on: type[Exception] = JournalError,
    what: str = "",
) -> T | None:
    """``attempt()``'s result once it does not raise ``retry_on``: tried again after 1 s,
    doubling up to RETRY_MAX_S seconds, each new reason logged once (after ``what``, e.g.
    "node a cannot join: "). None when ``stop`` is set meanwhile."""
    delay, said = RETRY_FIRST_S, ""
    while True:
        try:
            return await attempt()
        except retry_on as exc:
            if str(exc) != said:
                said = str(exc)
                log.error(
                    "%s%s; waiting for it (retried every %g s at most)", what, exc, RETRY_MAX_S
                )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
            return None
        delay = min(delay * 2, RETRY_MAX_S)


def open_reader(
    database: str | os.PathLike[str] | PostgresTarget,
) -> AbstractAsyncContextManager[JournalReader]:
    """Reads of a journal that must exist already (the command line's history): raises
    JournalError naming it when it does not."""
    if isinstance(database, PostgresTarget):
        with needs_psycopg():
            from .postgres import open_reader as postgres_reader
        return postgres_reader(database)
    from .sqlite_reads import SqliteReader

    path = Path(database)
    if not path.exists():
        raise JournalError(f"no journal at {path}")
    return SqliteReader.open(path, 1)


def read_states(
    database: str | os.PathLike[str] | PostgresTarget, vkeys: Sequence[str]
) -> dict[str, list[StepState]]:
    """For each version key: its rows' states, read without opening the journal for writing
    (``explain``, ``--dry-run``, ``mark-existing --dry-run``); ``{}`` for an SQLite journal
    that does not exist yet. Raises JournalError when it cannot be read."""
    if isinstance(database, PostgresTarget):
        with needs_psycopg():
            from .postgres import read_states as postgres_states
        return postgres_states(database, vkeys)
    from .sqlite_reads import read_states as sqlite_states

    return sqlite_states(Path(database), vkeys)


def read_digests(
    database: str | os.PathLike[str] | PostgresTarget, wanted: Sequence[tuple[str, str]]
) -> dict[tuple[str, str], tuple[int, str]]:
    """For each (destination as shown, sha256 hex) that the journal holds a delivery of: the
    (dispatch id, location) of the first, as ``dedupe: content`` finds it at delivery; read
    without opening the journal for writing (``explain``, ``--dry-run``). ``{}`` for an SQLite
    journal that does not exist yet. Raises JournalError when it cannot be read."""
    if isinstance(database, PostgresTarget):
        with needs_psycopg():
            from .postgres import read_digests as postgres_digests
        return postgres_digests(database, wanted)
    from .sqlite_reads import read_digests as sqlite_digests

    return sqlite_digests(Path(database), wanted)
