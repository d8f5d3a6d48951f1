"""The journal's identity token bound to where the journal lives: the fingerprint of its place
(an SQLite file's inode and birth time with the machine's id; a PostgreSQL cluster's system
identifier with the database's oid) is stored beside the token, and a journal found in another
place (a copy: a disk image, a restored backup, ``CREATE DATABASE ... TEMPLATE``) gets a token
of its own at open. The rows planned before such a rebind keep the token they were planned
under (``journal_tokens``: each earlier token with the highest row id it named), so that a row
in flight keeps its delivery's name. Both backends' SQL for it is here; nothing here reads a
row of history but the highest id.
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
#: each token the journal had before a rebind and the highest row id planned under it
#: (``{bigint}``: the backend's integer type of a row id)
TOKENS_TABLE = "CREATE TABLE journal_tokens (token TEXT NOT NULL, upto {bigint} NOT NULL)"
#: the earlier tokens, the oldest first
READ_TOKENS = "SELECT upto, token FROM journal_tokens ORDER BY upto"
#: the highest row id planned before delivery names carried the planned time (``Named``),
#: stored by the migration that made ``journal_tokens``
PLAIN_UPTO = [
    "ALTER TABLE journal_identity ADD COLUMN plain_upto {bigint}",
    "UPDATE journal_identity SET plain_upto = (SELECT COALESCE(MAX(id), 0) FROM dispatches)",
]
READ_PLAIN_UPTO = "SELECT COALESCE(plain_upto, 0) FROM journal_identity"
#: the token replaced at a rebind kept for the rows planned under it (``{p}``: parameter mark)
KEEP_TOKEN = (
    "INSERT INTO journal_tokens (token, upto) "
    "SELECT CAST({p} AS TEXT), COALESCE(MAX(id), 0) FROM dispatches"
)
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


def rebind(row: tuple[str, str | None], place: str) -> tuple[str, str] | None:
    """The (token, place) to store when the journal's stored (token, place) ``row`` is not
    ``place`` as it is; None when nothing is written. The token is a new random one (8
    lowercase hex characters) when the journal was made elsewhere; it stays for an older
    journal whose place was never stored (bound to this one), and for the same PostgreSQL
    database read by a role with other rights (``same_database``: the fuller place is kept)."""
    token, stored = row
    if stored == place:
        return None
    if stored is None:
        return token, place
    if same_database(stored, place):
        return (token, place) if stored.startswith(_OID_ONLY) else None
    new = secrets.token_hex(4)
    while new == token:  # pragma: no cover - one chance in four billion
        new = secrets.token_hex(4)
    return new, place


#: how a PostgreSQL place begins when read by a role that may not read the control data
_OID_ONLY = "-:"


def same_database(stored: str, place: str) -> bool:
    """Whether two PostgreSQL places, one of them read by a role that may not call
    ``pg_control_system()`` (``-:<oid>``), name the same database: what both can say is the
    oid. (An SQLite place never begins with ``-:``.)"""
    if not (stored.startswith(_OID_ONLY) or place.startswith(_OID_ONLY)):
        return False
    return stored.rpartition(":")[2] == place.rpartition(":")[2]


#: what names the rows planned before: ``Named.earlier`` and ``Named.plain_upto``
Names = tuple[tuple[tuple[int, str], ...], int]


class Named:
    """The journal's token, the tokens it had before for the rows planned under them, and the
    rows planned before delivery names carried the planned time."""

    #: the journal's identity token (``Journal.token``), read at ``open``
    token = ""
    #: (highest row id, token) of each earlier token, the oldest first (``READ_TOKENS``)
    earlier: tuple[tuple[int, str], ...] = ()
    #: the highest row id planned before names carried the planned time (``PLAIN_UPTO``)
    plain_upto = 0

    def named(self, row_id: int, created: float) -> tuple[str, float]:
        """The token and the planned time the delivery name of row ``row_id`` (planned at
        ``created``) carries (``StepContext.named_under`` and ``planned``): the token of its
        journal when it was planned, whatever the journal's token is now; 0.0 for the time
        of a row planned before names carried it, which keeps ``<token>-<row id>``."""
        token = self.token
        for upto, earlier in self.earlier:
            if row_id <= upto:
                token = earlier
                break
        return token, (0.0 if row_id <= self.plain_upto else created)


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
