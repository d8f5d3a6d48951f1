"""Shared by the API, schemathesis and dashboard tests: a real service with real dispatches,
some of which fail (a folder that cannot be created, an FTP server that is not there).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .conftest import ServiceProcess, cli_env, free_port, journal_rows, wait_until, write_config

TOKEN = "t0ken-for-the-api-tests"
FTP_PASSWORD = "s3cret-Pa55word"
FILES = {  # inbox file -> size; .bin and .dat fail (see the rules); drop/f.txt is added
    "a.txt": 5,
    "b.pdf": 3000,
    "it's here.txt": 17,
    "c.png": 100,
    "d.bin": 64,
    "e.dat": 9,
}


BLOCKED = "blocker/sub/d.bin"  #: in the way of d.bin: its dispatch fails until it goes
BLOCKED_REASON = "already exists"


def unblock(root: Path) -> None:
    """The cause of d.bin's failure goes away."""
    (root / BLOCKED).unlink()


@dataclass
class Api:
    url: str
    root: Path
    db: Path | str  #: the journal: a path, or a PostgreSQL URL
    docs: Path
    ftp: str  #: the ftp destination as the API must show it
    service: ServiceProcess

    def rows(self, where: str = "1=1", params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        return journal_rows(self.db, where, params)


def old(path: Path, size: int) -> None:
    """A complete file (its mtime is well in the past) of ``size`` bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x" * size)
    past = time.time() - 3600
    os.utime(path, (past, past))


def api_config(root: Path, port: int, database: str | None = None, **api: Any) -> Path:
    inbox, drop = root / "inbox", root / "drop"
    inbox.mkdir(parents=True, exist_ok=True)
    drop.mkdir(exist_ok=True)
    # a file already where d.bin goes, and on_conflict: fail (unblock() takes it away)
    old(root / BLOCKED, 3)
    dead_port = free_port()  # nothing listens there: the FTP step fails at once
    return write_config(
        root / "config.yml",
        {
            "database": database_config(database) if database else str(root / "journal.db"),
            "sources": [
                {"path": str(inbox), "name": "inbox", "settle": 0.2, "rescan": 1},
                {"path": str(drop), "name": "drop", "settle": 0.2, "rescan": 1},
            ],
            "rules": [
                {"name": "docs", "extensions": ["txt", "pdf"], "to": str(root / "out" / "docs")},
                {"name": "images", "extensions": ["png"], "to": str(root / "out" / "images")},
                {
                    "name": "broken",
                    "extensions": ["bin"],
                    "to": {"url": str(root / "blocker" / "sub"), "on_conflict": "fail"},
                },
                {
                    "name": "remote",
                    "extensions": ["dat"],
                    "to": {
                        "url": f"ftp://bob:{FTP_PASSWORD}@127.0.0.1:{dead_port}/in",
                        "retry": {"attempts": 1},
                        "connect_timeout": 2,
                    },
                },
            ],
            "api": {"port": port, **api},
            "monitor": {"enabled": False},
        },
    )


def database_config(url: str) -> dict[str, str]:
    """``database:`` for a PostgreSQL URL of the test cluster (its password in the environment)."""
    from .pgcluster import PASSWORD_ENV

    return {"url": url, "password_env": PASSWORD_ENV}


def env_without_token(**extra: str) -> dict[str, str]:
    env = cli_env(**extra)
    if "FILEDISPATCH_API_TOKEN" not in extra:
        env.pop("FILEDISPATCH_API_TOKEN", None)
    return env


@contextlib.contextmanager
def running_api(
    root: Path, token: str | None = TOKEN, database: str | None = None
) -> Iterator[Api]:
    """The service on a free port with every file of FILES dispatched (or failed) for good;
    its journal in ``database`` (a PostgreSQL URL) or in a file under ``root``."""
    port = free_port()
    cfg = api_config(root, port, database, **({"token": token} if token else {}))
    for name, size in FILES.items():
        old(root / "inbox" / name, size)
    old(root / "drop" / "f.txt", 7)
    svc = ServiceProcess(cfg, env=env_without_token()).start()
    db: Path | str = database or root / "journal.db"
    try:
        wait_until(
            lambda: (
                len(rows := journal_rows(db)) == len(FILES) + 1
                and all(r["status"] in ("SUCCEEDED", "FAILED") for r in rows)
            ),
            30,
        )
        dead = next(r["destination"] for r in journal_rows(db) if r["protocol"] == "ftp")
        yield Api(f"http://127.0.0.1:{port}", root, db, root / "out" / "docs", dead, svc)
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.stop()


async def get_json(url: str, token: str = TOKEN) -> dict[str, Any]:
    """GET ``url`` with the bearer token; the JSON body of a 200 answer."""
    import aiohttp

    async with (
        aiohttp.ClientSession() as session,
        session.get(url, headers={"Authorization": f"Bearer {token}"}) as resp,
    ):
        assert resp.status == 200, await resp.text()
        body: dict[str, Any] = await resp.json()
        return body
