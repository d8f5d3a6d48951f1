"""Several nodes (issue 12): a burst of files through the real service (the CLI as
subprocesses), on SQLite, on PostgreSQL with one node, and with two nodes sharing the inbox;
to a local folder and to a loopback HTTP receiver that takes 20 ms per upload (delivery-bound
work, where a second host helps). Prints figures; asserts nothing.

    python bench/bench_cluster.py [--files 10000] [--rounds 1] [--before REF] [--quick]

The SQLite path is also run from the code of ``--before`` (a git ref, default ``INT1``: the
code before this issue's node work) in the same run, rounds alternating, and the ratio
printed. PostgreSQL is a throwaway cluster (tests/pgcluster.py: needs root and Debian's
postgresql package).

Each figure: files per second from the moment the burst starts to be written into the inbox
(the services already up and watching) until the journal has a SUCCEEDED row for every file.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
#: the tip of the ``int1`` integration (the journal package and the split dispatcher, before
#: the node work), as a commit of main's history: a fresh clone has no ``int1`` branch
INT1 = "72b2d88"
sys.path.insert(0, str(ROOT))

from tests import pgcluster  # noqa: E402

PAYLOAD = b"x" * 4096
HTTP_DELAY_S = 0.02
#: CPU seconds the services used, per run label (less swayed by a busy machine than the time)
CPU: dict[str, list[float]] = {}
#: of which in the kernel: the part that swings from round to round on an ext4 without a
#: journal (its inode allocator passes over every recently deleted inode of a group, whoever
#: deleted them: docs/benchmarks.md, "Several nodes")
SYS: dict[str, list[float]] = {}
#: workers per node for the HTTP runs: few enough that the 20 ms per upload, not this 2-core
#: machine's CPU (shared by the nodes, the database and the receiver), bounds a node
HTTP_WORKERS = 4


class Receiver:
    """An aiohttp receiver on loopback, in a thread: each upload takes HTTP_DELAY_S seconds."""

    def __init__(self) -> None:
        self.count = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.port = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)

    async def _start(self) -> int:
        from aiohttp import web

        async def handle(request: web.Request) -> web.Response:
            await asyncio.sleep(HTTP_DELAY_S)
            await request.read()
            self.count += 1
            return web.Response(status=201)

        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", handle)
        self.runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        return int(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def config(root: Path, node: str, database: Any, to: Any, shared: bool, workers: int) -> Path:
    cfg = {
        "database": database,
        "workers": workers,
        "sources": [{"path": str(root / "inbox"), "name": "inbox", "settle": 0, "rescan": 0}],
        "rules": [{"name": "all", "glob": "*", "to": to}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    if shared:  # keys the code before this issue does not know: only where needed
        cfg["node"] = node
        cfg["sources"][0].update(shared=True, rescan=60, poll_interval=0.5)  # type: ignore[index]
    path = root / f"{node}.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path, code: Path) -> tuple[subprocess.Popen[bytes], Path]:
    log = cfg.with_suffix(".log")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(code))
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg)],
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        env=env,
        cwd=str(code),
    )
    deadline = time.monotonic() + 60
    while "watching" not in log.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the service did not start:\n{log.read_text(errors='replace')}")
        time.sleep(0.05)
    return proc, log


def succeeded_sqlite(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM dispatches WHERE status='SUCCEEDED'").fetchone()[0]
        )
    finally:
        conn.close()


def succeeded_pg(url: str) -> int:
    import psycopg

    with psycopg.connect(url, password=pgcluster.PASSWORD) as conn:
        row = conn.execute("SELECT COUNT(*) FROM dispatches WHERE status='SUCCEEDED'").fetchone()
        return int(row[0]) if row else 0


def burst(
    label: str,
    files: int,
    nodes: int,
    database: str,
    http: Receiver | None,
    code: Path = ROOT,
    workers: int = 16,
    cluster: pgcluster.Cluster | None = None,
) -> float:
    """One run: the services up, ``files`` written into the inbox, timed until all are
    recorded SUCCEEDED. Returns files per second."""
    root = Path(tempfile.mkdtemp(prefix="fd-bench-cluster-"))
    try:
        (root / "inbox").mkdir()
        if database == "sqlite":
            db: Any = str(root / "journal.db")
            count = lambda: succeeded_sqlite(root / "journal.db")  # noqa: E731
        else:
            assert cluster is not None
            url = str(cluster.database())
            db = {"url": url, "password_env": pgcluster.PASSWORD_ENV}
            count = lambda: succeeded_pg(url)  # noqa: E731
        to: Any = (
            {"url": f"http://127.0.0.1:{http.port}/up/{{name}}", "method": "PUT"}
            if http is not None
            else {"url": str(root / "outbox"), "mode": "copy"}
        )
        shared = database != "sqlite"
        procs = [
            start(config(root, f"n{i + 1}", db, to, shared, workers), code) for i in range(nodes)
        ]
        t0 = time.perf_counter()
        for i in range(files):
            (root / "inbox" / f"f{i:06d}.dat").write_bytes(PAYLOAD)
        while count() < files:
            if any(p.poll() is not None for p, _ in procs):
                raise SystemExit(f"{label}: a service ended:\n" + procs[0][1].read_text())
            time.sleep(0.1)
        elapsed = time.perf_counter() - t0
        for p, _ in procs:
            p.send_signal(signal.SIGTERM)
        cpu = kernel = 0.0
        for p, _ in procs:  # the CPU the services used, start and stop included
            _, _, usage = os.wait4(p.pid, 0)
            p.returncode = 0
            cpu += usage.ru_utime + usage.ru_stime
            kernel += usage.ru_stime
        CPU[label] = [*CPU.get(label, []), cpu]
        SYS[label] = [*SYS.get(label, []), kernel]
        rate = files / elapsed
        print(
            f"  {label:<40} {files} files in {elapsed:6.2f}s  {rate:8.0f} files/s  CPU {cpu:6.2f}s"
            f" (sys {kernel:5.2f}s)",
            flush=True,
        )
        return rate
    finally:
        shutil.rmtree(root, ignore_errors=True)


def checkout(ref: str) -> Path:
    """The code of ``ref`` in a temporary folder (git archive)."""
    folder = Path(tempfile.mkdtemp(prefix="fd-bench-before-"))
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", ref, "filedispatch"], capture_output=True, check=True
    )
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--before", default=INT1)
    parser.add_argument("--quick", action="store_true", help="1,000 files")
    parser.add_argument("--sqlite-only", action="store_true", help="only the SQLite ratio")
    args, _ = parser.parse_known_args()
    files = 1000 if args.quick else args.files
    print(f"bench_cluster: {files} files of {len(PAYLOAD)} bytes, {args.rounds} round(s)")

    before = checkout(args.before)
    # this code from a copy as well: both sides start the same way (their own bytecode cache,
    # the same kind of folder); run from the worktree, it measured 15-30% slower than a copy
    here = Path(tempfile.mkdtemp(prefix="fd-bench-here-"))
    shutil.copytree(
        ROOT / "filedispatch", here / "filedispatch", ignore=shutil.ignore_patterns("__pycache__")
    )
    try:
        print(f"SQLite, local folder: this code and {args.before}'s, rounds alternating")
        now, then = [], []
        for i in range(args.rounds):  # which goes first alternates too
            if i % 2:
                now.append(burst("sqlite local (this code)", files, 1, "sqlite", None, here))
            then.append(burst(f"sqlite local ({args.before})", files, 1, "sqlite", None, before))
            if not i % 2:
                now.append(burst("sqlite local (this code)", files, 1, "sqlite", None, here))
        ratio = statistics.median(now) / statistics.median(then)
        print(f"  throughput ratio this/{args.before} (medians): {ratio:.3f}")
        cpu_now = statistics.median(CPU["sqlite local (this code)"])
        cpu_then = statistics.median(CPU[f"sqlite local ({args.before})"])
        print(
            f"  CPU ratio this/{args.before} (medians, lower is better): {cpu_now / cpu_then:.3f}"
        )
        split = {
            side: (
                statistics.median(c - k for c, k in zip(CPU[label], SYS[label], strict=True)),
                statistics.median(SYS[label]),
            )
            for side, label in (
                ("this", "sqlite local (this code)"),
                ("then", f"sqlite local ({args.before})"),
            )
        }
        print(
            "  medians, user / sys CPU: this code {:.2f}s / {:.2f}s, {} {:.2f}s / {:.2f}s".format(
                *split["this"], args.before, *split["then"]
            )
        )
    finally:
        shutil.rmtree(before, ignore_errors=True)
        shutil.rmtree(here, ignore_errors=True)

    why = "--sqlite-only" if args.sqlite_only else pgcluster.missing()
    if why:
        print(f"PostgreSQL runs skipped: {why}")
        return 0
    cluster = pgcluster.Cluster()
    os.environ[pgcluster.PASSWORD_ENV] = pgcluster.PASSWORD
    receiver = Receiver()
    try:
        print("PostgreSQL, shared inbox, local folder")
        one = [burst("postgres 1 node local", files, 1, "pg", None, cluster=cluster)]
        two = [burst("postgres 2 nodes local", files, 2, "pg", None, cluster=cluster)]
        print(f"  two/one: {statistics.median(two) / statistics.median(one):.2f}x")
        print(
            f"HTTP receiver taking {HTTP_DELAY_S * 1000:.0f} ms per upload, {HTTP_WORKERS} "
            f"workers per node (at most {HTTP_WORKERS / HTTP_DELAY_S:.0f} files/s per node)"
        )
        burst("sqlite 1 node http", files, 1, "sqlite", receiver, workers=HTTP_WORKERS)
        one, two = [], []
        for _ in range(args.rounds):
            one.append(
                burst(
                    "postgres 1 node http",
                    files,
                    1,
                    "pg",
                    receiver,
                    workers=HTTP_WORKERS,
                    cluster=cluster,
                )
            )
            two.append(
                burst(
                    "postgres 2 nodes http",
                    files,
                    2,
                    "pg",
                    receiver,
                    workers=HTTP_WORKERS,
                    cluster=cluster,
                )
            )
        print(f"  two/one (delivery-bound): {statistics.median(two) / statistics.median(one):.2f}x")
    finally:
        receiver.close()
        cluster.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
