"""Which backend a ``database`` names, and opening it: a path is an SQLite file.

Owns no connection itself; each backend module owns its own.
"""

from __future__ import annotations

import os
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import JournalError

if TYPE_CHECKING:
    from .base import Journal, JournalReader


def connect(
    database: str | os.PathLike[str], *, hold: bool = True
) -> AbstractAsyncContextManager[Journal]:
    """The journal ``database`` names, to open with ``async with``: a path names an SQLite
    file. See ``Journal.open``."""
    from .sqlite import SqliteJournal

    return SqliteJournal.open(database, hold=hold)


def open_reader(database: str | os.PathLike[str]) -> AbstractAsyncContextManager[JournalReader]:
    """Reads of a journal that must exist already (the command line's history): raises
    JournalError naming it when it does not."""
    from .sqlite_reads import SqliteReader

    path = Path(database)
    if not path.exists():
        raise JournalError(f"no journal at {path}")
    return SqliteReader.open(path, 1)
