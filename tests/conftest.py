"""Shared test helpers: configs on disk, the real CLI as a subprocess, journal rows via sqlite3."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from filedispatch.processors.common import TMP_PREFIX

ROOT = Path(__file__).resolve().parent.parent

#: a test of a fast path itself (an inline lane...), which FILEDISPATCH_FASTPATH=0 turns off
needs_fastpath = pytest.mark.skipif(
    os.environ.get("FILEDISPATCH_FASTPATH", "1").strip() == "0",
    reason="tests a fast path, and FILEDISPATCH_FASTPATH=0 turns it off",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def delivery_name(db: Path, row: dict[str, Any]) -> str:
    """The name the SQLite journal ``db``'s ``row`` (from ``journal_rows``) gives its delivery
    outside the journal (``StepContext.delivery_id``): the journal's token, the row id and
    when the row was planned, in integer microseconds."""
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        [(token,)] = conn.execute("SELECT token FROM journal_identity").fetchall()
    return f"{token}-{row['id']}-{round(row['created'] * 1_000_000)}"


def journal_rows(
    db: Path | str, where: str = "1=1", params: tuple[Any, ...] = (), table: str = "dispatches"
) -> list[dict[str, Any]]:
    """Rows of the journal as dicts (opened read-only, safe while a service runs); ``db`` is a
    path, or a PostgreSQL URL (``where`` marks parameters with ``?`` either way). ``table``:
    ``uploads`` for the S3 upload ledger (ordered by when each began)."""
    order = "begun" if table == "uploads" else "id"
    sql = f"SELECT * FROM {table} WHERE {where} ORDER BY {order}"
    if isinstance(db, str):
        return _pg_rows(db, sql, params)
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _pg_rows(url: str, sql: str, params: tuple[Any, ...]) -> list[dict[str, Any]]:
    import decimal

    import psycopg
    from psycopg.rows import dict_row

    from .pgcluster import PASSWORD

    try:
        with psycopg.connect(url, password=PASSWORD, row_factory=dict_row) as conn:
            rows = conn.execute(sql.replace("%", "%%").replace("?", "%s"), params).fetchall()
    except psycopg.errors.UndefinedTable:
        return []
    return [
        {k: int(v) if isinstance(v, decimal.Decimal) else v for k, v in r.items()} for r in rows
    ]


async def until(predicate: Callable[[], Awaitable[object]], timeout: float = 60.0) -> Any:
    """``wait_until`` on the event loop: await ``predicate()`` until it is truthy."""
    deadline = time.monotonic() + timeout
    while not (value := await predicate()):
        assert time.monotonic() < deadline, "the state was not reached in time"
        await asyncio.sleep(0.05)
    return value


def wait_until(
    predicate: Callable[[], object], timeout: float = 20.0, interval: float = 0.05
) -> Any:
    """Poll ``predicate`` until it returns something truthy; fail the test on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def old(path: Path, data: bytes = b"x") -> Path:
    """A file that is complete (its mtime is well in the past), renamed into place whole, as
    a careful writer does: a service listing the folder meanwhile never sees it with its
    first mtime, a version of its own (two rows per step; seen in a loaded run of
    test_the_other_node_finishes_after_the_lister_is_killed). Written in place where the
    temporary folder is on another filesystem."""
    path.parent.mkdir(parents=True, exist_ok=True)
    past = time.time() - 3600
    staging = Path(tempfile.gettempdir())
    if os.stat(staging).st_dev != os.stat(path.parent).st_dev:
        path.write_bytes(data)
        os.utime(path, (past, past))
        return path
    fd, name = tempfile.mkstemp(dir=staging, prefix="old-")
    with os.fdopen(fd, "wb") as file:
        file.write(data)
        file.flush()
        os.utime(file.fileno(), (past, past))
    os.chmod(name, 0o644)  # what write_bytes would have made under the usual umask
    os.rename(name, path)
    return path


def delivered(folder: Path, temporaries: bool = True) -> dict[str, bytes]:
    """Every file under ``folder`` by its relative path, a delivery's temporary one included
    (so that an equality after a run also says none was left behind). Read while the service
    runs, a file can go between the listing and its read (a temporary renamed into place):
    it is left out, and its new name shows at the next look."""
    found: dict[str, bytes] = {}
    if not folder.exists():
        return found
    for p in folder.rglob("*"):
        if not temporaries and p.name.startswith(TMP_PREFIX):
            continue
        try:
            if p.is_file():
                found[p.relative_to(folder).as_posix()] = p.read_bytes()
        except FileNotFoundError:
            continue
    return found


def arrived(folder: Path) -> dict[str, bytes]:
    """``delivered`` without the temporaries of deliveries still under way: what a test waits
    for while the service runs (a copy's hidden temporary is not a file that arrived)."""
    return delivered(folder, temporaries=False)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str | Path,
    timeout: float = 60,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    input: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m filedispatch ARGS`` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "filedispatch", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env or cli_env(),
        cwd=cwd,
        input=input,
    )


def inotify_limited(setting: str, value: int) -> list[str]:
    """A command prefix that runs a process in a user namespace of its own whose inotify limit
    ``setting`` (``max_inotify_instances``, ``max_inotify_watches``: /proc/sys/user/) is
    ``value``: the kernel's refusals are real, and touch nothing outside. Skips the test where
    no user namespace can be made."""
    limited = f'echo {value} > /proc/sys/user/{setting} && exec "$@"'
    wrap = ["unshare", "--user", "--map-root-user", "sh", "-c", limited, "sh"]
    if subprocess.run([*wrap, "true"], capture_output=True).returncode != 0:
        pytest.skip("needs a user namespace of its own (unshare --user)")
    return wrap


class ServiceProcess:
    """The real service as a subprocess; logs go to a file the test can read."""

    def __init__(
        self,
        config: Path,
        *args: str,
        env: dict[str, str] | None = None,
        wrap: list[str] | None = None,
    ) -> None:
        """``wrap``: a command the service runs under (see ``inotify_limited``)."""
        self.config = config
        self.log_path = config.with_suffix(".log")
        self.args = args
        self.env = env or cli_env()
        self.wrap = wrap or []
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> ServiceProcess:
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [*self.wrap, sys.executable, "-m", "filedispatch", "-c", str(self.config), *self.args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
        )
        if wait_ready:
            wait_until(lambda: "watching" in self.log() or self.proc.poll() is not None, 30)  # type: ignore[union-attr]
            assert self.proc.poll() is None, self.log()
        return self

    def log(self) -> str:
        return (
            self.log_path.read_text(encoding="utf-8", errors="replace")
            if self.log_path.exists()
            else ""
        )

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        finally:
            self._log.close()
        return code

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)
        self._log.close()


@pytest.fixture
def service_factory() -> Iterator[Callable[..., ServiceProcess]]:
    started: list[ServiceProcess] = []

    def factory(config: Path, *args: str, **kw: Any) -> ServiceProcess:
        svc = ServiceProcess(config, *args, **kw)
        started.append(svc)
        return svc

    yield factory
    for svc in started:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.proc.kill()
            svc.proc.wait(30)


@pytest.fixture
def watch_steps(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The step (ms) of each look the change feed's watch takes, in order: the real
    ``RustNotify`` runs as it would, with a spy around it that writes the steps down (an idle
    wait, ``changes._idle_wait``, is written down as its step, then its looks at the hot
    step)."""
    from watchfiles._rust_notify import RustNotify

    from filedispatch.watcher import changes

    steps: list[int] = []

    class Spy:
        def __init__(self, *args: object) -> None:
            self._notify = RustNotify(*args)

        def watch(self, debounce: int, step: int, *rest: object) -> object:
            steps.append(step)
            return self._notify.watch(debounce, step, *rest)

        def close(self) -> None:
            self._notify.close()

    real_idle_wait = changes._idle_wait

    def idle_wait(notify: object, bell: object, step: int, *rest: object) -> object:
        steps.append(step)  # the idle level's wait counts as a look of its step
        return real_idle_wait(notify, bell, step, *rest)  # type: ignore[arg-type]

    monkeypatch.setattr(changes, "RustNotify", Spy)
    monkeypatch.setattr(changes, "_idle_wait", idle_wait)
    return steps


@pytest.fixture
def workspace(tmp_path: Path) -> dict[str, Path]:
    """inbox/, outbox/ and a journal path inside the test's temporary folder."""
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    return {"root": tmp_path, "inbox": inbox, "outbox": outbox, "db": tmp_path / "journal.db"}


@pytest.fixture
def other_fs(tmp_path: Path) -> Iterator[Path]:
    """A folder on another filesystem than tmp_path (/dev/shm is a tmpfs)."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or os.stat(shm).st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another filesystem")
    folder = Path(tempfile.mkdtemp(dir=shm))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def mounted_tmpfs(folder: Path, size: str = "1m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the block (skips without the right)."""
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip("needs the right to mount a tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


if TYPE_CHECKING:
    from .servers import FtpServer, S3Server, SftpServer


@pytest.fixture
def ftp(tmp_path: Path) -> Iterator[FtpServer]:
    """A pyftpdlib server on loopback, serving ``tmp_path/ftproot``."""
    from .servers import FtpServer  # servers.py imports this module

    server = FtpServer(tmp_path / "ftproot")
    yield server
    server.stop()


@pytest.fixture
def sftp(tmp_path: Path) -> Iterator[SftpServer]:
    """An asyncssh SFTP server on loopback, serving ``tmp_path/sftproot``."""
    from .servers import SftpServer

    server = SftpServer(tmp_path / "sftproot", tmp_path / "keys")
    yield server
    server.close()


@pytest.fixture
def s3(tmp_path: Path) -> Iterator[S3Server]:
    """moto's S3 API server on loopback with one bucket (no signature check)."""
    from .servers import S3Server

    server = S3Server(tmp_path / "s3")
    yield server
    server.stop()


# ---------------------------------------------------------------------------- journal backends

_PG_CLUSTER: list[Any] = []


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Any]:
    """A throwaway PostgreSQL cluster for the session (see tests/pgcluster.py)."""
    from . import pgcluster

    why = pgcluster.missing()
    if why is not None:
        pgcluster.unavailable(why)
    os.environ[pgcluster.PASSWORD_ENV] = pgcluster.PASSWORD  # services started later read it
    cluster = pgcluster.Cluster()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture
def pg_url(pg_cluster: Any) -> str:
    """The URL of a new, empty database (no password in it; see ``pgcluster.PASSWORD_ENV``)."""
    return str(pg_cluster.database())


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """What names a fresh journal, once per backend: a path, then a PostgreSQL database."""
    if request.param == "sqlite":
        return tmp_path / "j.db"
    from filedispatch.journal import PostgresTarget

    from . import pgcluster

    url = request.getfixturevalue("pg_url")
    return PostgresTarget(url, pgcluster.PASSWORD_ENV)
