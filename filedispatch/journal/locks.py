"""The locks that keep the services of one journal apart, by their keys: the one-service lock
(a file beside an SQLite journal, a session advisory lock in a PostgreSQL database) and the
schema lock a PostgreSQL service holds beside it; and the SQLite journal's lock around a
migration. ``place`` takes the service's locks; the migrations look at them. Holds nothing
past a call.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import JournalError

#: any number: the key of the one-service lock in a PostgreSQL database
SERVICE_LOCK = 0x66645F73
#: any number: the first key of a lock each service holds (shared) beside the one-service
#: lock, the second key being the schema version its code knows, so that a migration tells
#: the services of an older version apart (``pgschema.migrate``)
SCHEMA_LOCK = 0x66645F76


@contextlib.contextmanager
def migrating(path: Path) -> Iterator[None]:
    """Around a migration of the SQLite journal at ``path``: its one-service lock held, unless
    this process holds it already (the service migrating at its start). A service of an older
    version running on it meanwhile would go on writing rows as the schema it opened says
    (naming their deliveries the old way, which the newer version resuming one would not):
    refused (JournalError, naming its pid), the journal left as it is. A service starting
    during the migration finds the lock taken, and after it a schema newer than it knows."""
    fd = open_lock_file(path, JournalError)
    try:
        if not flocked(fd) and _key(fd) not in _HELD:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            # another process: told by the lock file, not by the pid written in it (two
            # processes in their own pid namespaces may both be pid 1)
            raise JournalError(
                f"the journal {path} needs an upgrade of its schema, and a filedispatch "
                f"of an older version runs on it (pid {holder or 'unknown'}): stop it "
                "first (it goes on writing rows under the schema it opened, and a row "
                "could be named two ways); the journal is left as it is"
            )
        yield
    finally:
        os.close(fd)


#: (device, inode) of the lock files whose one-service lock this process holds (``held``):
#: told apart by the file, not by the pid written in it, which two processes in their own
#: pid namespaces (containers) may share
_HELD: set[tuple[int, int]] = set()


def _key(fd: int) -> tuple[int, int]:
    st = os.fstat(fd)
    return st.st_dev, st.st_ino


@contextlib.contextmanager
def held(fd: int) -> Iterator[None]:
    """While inside, this process holds the one-service lock of the lock file open as
    ``fd`` (for ``migrating``)."""
    key = _key(fd)
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)


def open_lock_file(path: Path, error: type[Exception]) -> int:
    """A descriptor of the lock file beside the SQLite journal at ``path``, made if need be;
    ``error`` names the file when it cannot be."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise error(
            f"cannot create the journal's lock file {lock_path}: {exc.strerror or exc}"
        ) from None


def flocked(fd: int) -> bool:
    """Whether the lock on ``fd`` was taken; False when another descriptor holds it (another
    process, or another open of this one)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True
