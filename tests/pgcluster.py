"""A throwaway PostgreSQL cluster for the tests: Debian's server binaries, run as the
``postgres`` user (the server refuses root) in a temporary folder, on a free loopback port,
with fsync off. Logins over TCP need a password (scram), so the journal's ``password_env``
path is the one exercised.

In CI (``CI=true``) a missing PostgreSQL fails the tests that need it, naming what is missing;
elsewhere they are skipped with the same words.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

#: the environment variable the test configs name in ``password_env``
PASSWORD_ENV = "FD_TEST_PG_PASSWORD"
PASSWORD = "journal-pw-7f3c9e"
USER = "fdtest"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def missing() -> str | None:
    """What is missing to run a cluster here, or None."""
    if os.geteuid() != 0:
        return "the PostgreSQL tests start a cluster as the postgres user and need root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "no postgres user: install Debian's postgresql package (apt-get install postgresql)"
    if not glob.glob("/usr/lib/postgresql/*/bin/initdb"):
        return (
            "no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb): install "
            "Debian's postgresql package (apt-get install postgresql)"
        )
    try:
        import psycopg  # noqa: F401
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg and psycopg_pool are not installed: pip install 'filedispatch[postgres]'"
    return None


def unavailable(why: str) -> None:
    """Fail (in CI) or skip (elsewhere) a test that needs PostgreSQL."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"PostgreSQL is needed and missing: {why}", pytrace=False)
    pytest.skip(f"PostgreSQL is missing: {why}")


class Cluster:
    """A running cluster; ``database()`` makes a new empty database and returns its URL."""

    def __init__(self) -> None:
        bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
        self.bin = Path(bins)
        self.root = Path(tempfile.mkdtemp(prefix="fd-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._names = itertools.count(1)
        pw = pwd.getpwnam("postgres")
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        os.chown(pwfile, pw.pw_uid, pw.pw_gid)
        self._as_postgres(
            str(self.bin / "initdb"),
            "-D",
            str(self.data),
            "-U",
            USER,
            "--pwfile",
            str(pwfile),
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
            "-E",
            "UTF8",
        )
        self.start()

    def _as_postgres(self, *cmd: str) -> None:
        done = subprocess.run(
            ["runuser", "-u", "postgres", "--", *cmd],
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stdout}{done.stderr}")

    def start(self) -> None:
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off"
        )
        self._as_postgres(
            str(self.bin / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            str(self.root / "log"),
            "-w",
            "-t",
            "60",
            "start",
        )

    def stop(self, mode: str = "fast") -> None:
        self._as_postgres(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"
        )

    def url(self, name: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{name}"

    def database(self) -> str:
        """A new empty database; its URL (no password in it)."""
        import psycopg

        name = f"fd_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), password=PASSWORD, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def close(self) -> None:
        try:
            self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
