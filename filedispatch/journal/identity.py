"""The journal's identity token bound to where the journal lives: the fingerprint of its place
(an SQLite file's inode and birth time with the machine's id; a PostgreSQL cluster's system
identifier with the database's oid) is stored beside the token, and a journal found in another
place (a copy: a disk image, a restored backup, ``CREATE DATABASE ... TEMPLATE``) gets a token
of its own at open. Both backends' SQL for it is here; nothing here reads a row of history.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from ..birth import birth_time_ns

log = logging.getLogger(__name__)

#: the token and the place it was made for (NULL: an older journal, not bound yet)
READ_IDENTITY = "SELECT token, place FROM journal_identity"
#: the token (``{p}``: the backend's parameter mark) and place stored together
BIND = "UPDATE journal_identity SET token = {p}, place = {p}"
#: the PostgreSQL cluster and database: a copy made with ``CREATE DATABASE ... TEMPLATE`` has
#: another oid; one restored into another cluster another system identifier. A promoted
#: physical standby keeps both: it is the same journal
PG_PLACE = (
    "SELECT (SELECT system_identifier FROM pg_control_system())::text || ':' || "
    "(SELECT oid FROM pg_database WHERE datname = current_database())::text"
)
#: the database alone, where the role may not call ``pg_control_system()``
PG_PLACE_DATABASE = "SELECT '-:' || oid::text FROM pg_database WHERE datname = current_database()"


def sqlite_place(path: Path) -> str:
    """The place of the SQLite journal at ``path``: ``<inode>:<birth>:<machine id>``, where
    birth is the file's birth time (``b<ns>``) or, on a filesystem that keeps none, its device
    number (``d<st_dev>``). A copy of the file is a new file (another inode, another birth
    time) or on another machine; ``mv`` within one filesystem keeps both (the same journal),
    and so does a container's restart (its overlay's device number may change, the upper
    file's birth time does not). Raises OSError if ``path`` cannot be stat'ed."""
    st = os.stat(path)
    born = birth_time_ns(path)
    birth = f"d{st.st_dev}" if born is None else f"b{born}"
    return f"{st.st_ino}:{birth}:{machine_id()}"


def machine_id() -> str:
    """/etc/machine-id (systemd and dbus write it once per installation), "" if unreadable."""
    for name in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            return Path(name).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            continue
    return ""


def rebind(row: tuple[str, str | None], place: str) -> str | None:
    """The token to store for ``place`` when the journal's stored (token, place) ``row`` says
    it was made elsewhere: a new random one (8 lowercase hex characters); None when the token
    stays (the same place, or an older journal whose place was never stored: it is bound to
    this one without a change)."""
    token, stored = row
    if stored is None or stored == place:
        return None
    new = secrets.token_hex(4)
    while new == token:  # pragma: no cover - one chance in four billion
        new = secrets.token_hex(4)
    return new


def moved(where: str, old: str, new: str) -> None:
    """Say once, at WARNING, that the journal at ``where`` was found in another place."""
    log.warning(
        "the journal %s was copied or moved (it is not where its identity token %s was made): "
        "it is a journal of its own from now on, with the token %s. Temporary files named "
        "with %s are another journal's (or litter of this one's past: remove them by hand "
        "once no service of the old place runs)",
        where,
        old,
        new,
        old,
    )
