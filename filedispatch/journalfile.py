"""Where the journal file is and who may hold it: its path, and the lock that keeps a second
service (or ``mark-existing``) off a journal a service is using. No SQL here.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterator
from pathlib import Path

from .config import Config
from .errors import ServiceError
from .journal import default_path

log = logging.getLogger(__name__)


def journal_path(config: Config, db: Path | None = None) -> Path:
    """``db`` (``--db``), then ``database:``, then the per-user state folder; absolute."""
    return (db or config.database or default_path()).absolute()


@contextlib.contextmanager
def journal_lock(path: Path) -> Iterator[None]:
    """One service per journal: two would dispatch the same files twice."""
    lock_path = path.with_name(path.name + ".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ServiceError(
            f"cannot create the journal's lock file {lock_path}: {exc.strerror or exc}"
        ) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError(
                f"another filedispatch is already running on the journal {path}"
            ) from None
        try:  # the pid is for people; the lock alone keeps a second service out
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError as exc:
            log.warning("cannot write the pid into %s: %s", lock_path, exc.strerror or exc)
        yield
    finally:
        os.close(fd)
