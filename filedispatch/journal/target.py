"""What names a journal: a path (an SQLite file) or a PostgreSQL database (``PostgresTarget``).

A ``PostgresTarget`` never holds a password: libpq finds it (``PGPASSWORD``, a service file, a
pgpass file), or ``password_env`` names the environment variable that holds it, read only
when connecting. Nothing here connects.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

#: URL schemes that name a PostgreSQL database
SCHEMES = ("postgresql://", "postgres://")
#: libpq connection parameters that are secrets (its documentation, "Parameter Key Words")
SECRET_PARAMETERS = frozenset({"password", "sslpassword"})


def is_postgres(text: str) -> bool:
    """Whether ``text`` is a PostgreSQL URL (rather than a path)."""
    return text.startswith(SCHEMES)


def url_problem(url: str) -> str | None:
    """Why ``url`` cannot name the journal database, or None."""
    if not is_postgres(url):
        return "must start with postgresql://"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 -- raises ValueError for a port that is not a number
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    # libpq also takes any connection parameter as a query parameter (?password=...)
    given = {key.lower() for key, _ in parse_qsl(parts.query, keep_blank_values=True)}
    if parts.password is not None or given & SECRET_PARAMETERS:
        return (
            "must not hold a password (user:password@ or ?password=, ?sslpassword=): put it "
            "in PGPASSWORD, in a pgpass file, or in the environment variable that "
            "database.password_env names"
        )
    return None


@dataclass(frozen=True, slots=True)
class PostgresTarget:
    """A PostgreSQL database as the journal: ``url`` (no password in it) and the name of the
    environment variable holding the password, if any."""

    url: str
    password_env: str | None = None

    @property
    def shown(self) -> str:
        """The database for messages: the URL, which holds no password."""
        return self.url

    def __str__(self) -> str:
        return self.shown

    def password(self) -> str | None:
        """The password from ``password_env`` (None: libpq finds one, or none is needed)."""
        return os.environ.get(self.password_env) or None if self.password_env else None

    def scrub(self, text: str) -> str:
        """``text`` with the password (if one is known here) replaced by ``***``."""
        for secret in (self.password(), os.environ.get("PGPASSWORD")):
            if secret and len(secret) >= 4:
                text = text.replace(secret, "***")
        return text


#: what names a journal
Database = Path | PostgresTarget
