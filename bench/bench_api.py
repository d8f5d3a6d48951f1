"""History API benchmark (issue 5): p50/p99 latency of GET /api/v1/logs and /api/v1/stats on a
journal of 1,000,000 rows, while a background loop keeps dispatching (plan -> claim -> finish
through the real journal writer). Baseline in the same run: the same SQL run directly with
sqlite3, no HTTP. Prints figures; asserts nothing.

    python bench/bench_api.py [--rows 1000000] [--days 365] [--requests 200] [--rate 500]
                              [--quick]    (100,000 rows, 50 requests)

Targets: p99 < 50 ms for the list, < 200 ms for stats?period=day.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import http.client
import json
import multiprocessing
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filedispatch.api import ServiceLink, serve
from filedispatch.api.queries import parse_log_query, parse_stats_query
from filedispatch.config import ApiConfig
from filedispatch.journal import Journal, PlannedStep, StepResult
from filedispatch.journal.reads import page_sql, stats_sql, where
from filedispatch.models import FileVersion, Status

DESTINATIONS = [
    ("/srv/out/documents", "file"),
    ("/srv/out/images", "file"),
    ("ftp://bob:***@ftp.example.org/in", "ftp"),
    ("https://api.example.org/upload", "http"),
    ("sftp://deploy@backup.example.org/data", "sftp"),
]
EXTENSIONS = ["pdf", "png", "jpg", "txt", "mp4", "csv", "zip", "docx"]
DAY = 86400.0


# --------------------------------------------------------------------------- the journal


async def create_schema(path: Path) -> None:
    async with Journal.open(path):
        pass  # runs the migrations, indexes included


def fill(path: Path, rows: int, days: float, now: float) -> float:
    """``rows`` finished dispatches spread evenly over ``days`` up to ``now``; one transaction."""
    t0 = time.perf_counter()
    rnd = random.Random(5)
    start = now - days * DAY
    conn = sqlite3.connect(path, isolation_level=None)

    def gen() -> Any:
        for i in range(rows):
            created = start + (now - start) * i / rows
            dest, proto = DESTINATIONS[rnd.randrange(len(DESTINATIONS))]
            ext = EXTENSIONS[rnd.randrange(len(EXTENSIONS))]
            failed = rnd.random() < 0.08
            name = f"file{i:07d}.{ext}"
            yield (
                f"bulk{i}", "inbox", "/srv/inbox", f"{i % 97}/{name}", name, ext,
                rnd.randrange(100, 50_000_000), int(created * 1e9), f"rule-{proto}", 0, "0",
                dest, proto, "FAILED" if failed else "SUCCEEDED", 1,
                "connection refused" if failed else None, created, created + 0.01,
                created + 0.2, rnd.randrange(1, 3000),
            )  # fmt: skip

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
        "mtime_ns, rule, step, step_key, destination, protocol, status, attempts, reason, "
        "created, started, finished, duration_ms) VALUES "
        "(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        gen(),
    )
    conn.execute("COMMIT")
    conn.execute("ANALYZE")
    conn.close()
    return time.perf_counter() - t0


# --------------------------------------------------------------------------- dispatching


@dataclass
class Writer:
    """Keeps the journal busy as a dispatching service would: plan, claim, finish."""

    journal: Journal
    rate: float
    planned: int = 0
    finished: int = 0

    async def run(self, stop: asyncio.Event) -> None:
        tick, n = 0.1, 0
        batch = max(1, int(self.rate * tick))
        while not stop.is_set():
            t0 = time.monotonic()
            now = time.time()
            steps = []
            for _ in range(batch):
                n += 1
                ext = EXTENSIONS[n % len(EXTENSIONS)]
                dest, proto = DESTINATIONS[n % len(DESTINATIONS)]
                v = FileVersion("inbox", Path("/srv/inbox"), f"live/{n}.{ext}", 1000 + n, n)
                steps.append(PlannedStep(v, f"rule-{proto}", 0, "0", dest, proto))
            self.planned += await self.journal.plan(steps, now)
            groups = await self.journal.claim(batch, now)
            results = [
                StepResult(d.id, Status.SUCCEEDED, 1, location="x", started=now)
                for g in groups
                for d in g
            ]
            await self.journal.finish(results)
            self.finished += len(results)
            await asyncio.sleep(max(0.0, tick - (time.monotonic() - t0)))


# --------------------------------------------------------------------------- measuring


def client(base: str, paths: list[str]) -> list[float]:
    """Sequential GETs on one keep-alive connection (run in another process); milliseconds."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    out = []
    for path in paths:
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = resp.read()
        out.append((time.perf_counter() - t0) * 1000)
        if resp.status != 200:
            raise RuntimeError(f"{path}: {resp.status} {body[:200]!r}")
    conn.close()
    return out


def follow(base: str, first: str, pages: int) -> list[float]:
    """Follow ``next`` links from ``first`` for ``pages`` pages (cursor pagination)."""
    parts = urlsplit(base)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=60)
    out, path = [], first
    for _ in range(pages):
        t0 = time.perf_counter()
        conn.request("GET", path)
        resp = conn.getresponse()
        body = json.loads(resp.read())
        out.append((time.perf_counter() - t0) * 1000)
        if not body["next"]:
            break
        nxt = urlsplit(body["next"])
        path = f"{nxt.path}?{nxt.query}"
    conn.close()
    return out


def raw_sql(db: Path, paths: list[str], now: float) -> list[float]:
    """Baseline: the SQL the API runs for each path, straight on sqlite3 (count + page)."""
    from multidict import MultiDict

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    out = []
    for path in paths:
        route, _, query = path.partition("?")
        params: MultiDict[str] = MultiDict(parse_qsl(query, keep_blank_values=True))
        t0 = time.perf_counter()
        if route.endswith("/stats"):
            sq = parse_stats_query(params, now)
            conn.execute(*stats_sql(sq.filters())).fetchall()
        else:
            q = parse_log_query(params)
            sql_where, values = where(q.conditions)
            conn.execute(f"SELECT COUNT(*) FROM dispatches{sql_where}", values).fetchall()
            conn.execute(*page_sql(q.page())).fetchall()
        out.append((time.perf_counter() - t0) * 1000)
    conn.close()
    return out


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


def line(name: str, ms: list[float], target: float | None, base: list[float] | None) -> str:
    p50, p99 = statistics.median(ms), pct(ms, 99)
    verdict = "" if target is None else ("ok  " if p99 < target else "MISS")
    tgt = f"< {target:>4.0f}" if target else "   -  "
    raw = f"{statistics.median(base):7.1f} {pct(base, 99):7.1f}" if base else " " * 15
    return f"{name:<46} {len(ms):>4} {p50:7.1f} {p99:7.1f} {max(ms):7.1f}  {tgt} {verdict} {raw}"


# --------------------------------------------------------------------------- main


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="fd-bench-api-"))
    db = tmp / "journal.db"
    now = time.time()
    await create_schema(db)
    print(f"building a journal of {args.rows:,} rows over {args.days:g} days in {db} ...")
    took = fill(db, args.rows, args.days, now)
    print(f"  built in {took:.1f}s ({args.rows / took:,.0f} rows/s), {db.stat().st_size >> 20} MiB")

    rnd = random.Random(7)
    n = args.requests
    day = time.strftime("%Y-%m-%d", time.gmtime(now - 60 * DAY))
    day2 = time.strftime("%Y-%m-%d", time.gmtime(now - 30 * DAY))
    rng = f"created__gte={day}&created__lte={day2}"
    in_range = int(args.rows * 31 / args.days * 0.92)  # SUCCEEDED rows in the range, roughly
    lists: dict[str, list[str]] = {
        "list status+range -created (page 1)": [
            f"/api/v1/logs?status=SUCCEEDED&{rng}&ordering=-created&limit=50"
        ]
        * n,
        "list status+range -created (offset, deep)": [
            f"/api/v1/logs?status=SUCCEEDED&{rng}&ordering=-created&limit=50"
            f"&offset={rnd.randrange(0, max(1, in_range - 50))}"
            for _ in range(n)
        ],
        "list status+range -byte_size (offset)": [
            f"/api/v1/logs?status=FAILED&{rng}&ordering=-byte_size&limit=50"
            f"&offset={rnd.randrange(0, 2000)}"
            for _ in range(n)
        ],
        "list status+range created (oldest first)": [
            f"/api/v1/logs?status=SUCCEEDED&{rng}&ordering=created&limit=50"
        ]
        * n,
    }
    stats = {"stats period=day (last 30 days)": ["/api/v1/stats?period=day"] * max(20, n // 4)}
    extra = {
        "stats period=week (11 weeks)": ["/api/v1/stats?period=week"] * 10,
        "stats period=month (12 months)": ["/api/v1/stats?period=month"] * 5,
        "list no filter -created (count of all rows)": ["/api/v1/logs?limit=50"] * 20,
        "list filename contains (full scan)": ["/api/v1/logs?filename=0042&limit=50"] * 10,
    }

    async with Journal.open(db) as journal:
        link = ServiceLink(lambda: {"version": "bench", "uptime_s": 1.0}, lambda: None)
        config = ApiConfig(host="127.0.0.1", port=0, token_env=None)
        async with serve(config, journal, link) as url:
            base = url.rstrip("/")
            writer = Writer(journal, args.rate)
            stop = asyncio.Event()
            task = asyncio.create_task(writer.run(stop), name="writer")
            loop = asyncio.get_running_loop()
            ctx = multiprocessing.get_context("spawn")
            results: list[tuple[str, list[float], float | None, list[float] | None]] = []
            t_start = time.monotonic()
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
                await loop.run_in_executor(pool, client, base, ["/health"] * 5)  # warm up

                async def measure(
                    group: dict[str, list[str]], target: float | None, fn: Callable[..., Any]
                ) -> None:
                    for name, paths in group.items():
                        ms = await loop.run_in_executor(pool, fn, base, paths)
                        baseline = await loop.run_in_executor(pool, raw_sql, db, paths[:50], now)
                        results.append((name, ms, target, baseline))

                await measure(lists, 50, client)
                deep = f"/api/v1/logs?status=SUCCEEDED&{rng}&ordering=-created&limit=50"
                cursor_ms = await loop.run_in_executor(
                    pool, follow, base, deep + f"&offset={in_range // 2}", n
                )
                results.append(("list ... follow next (cursor, deep pages)", cursor_ms, 50, None))
                await measure(stats, 200, client)
                await measure(extra, None, client)
            elapsed = time.monotonic() - t_start
            stop.set()
            await task

    print(
        f"\nwhile measuring ({elapsed:.0f}s) the background dispatcher planned "
        f"{writer.planned:,} and finished {writer.finished:,} rows "
        f"({writer.finished / elapsed:,.0f}/s through the journal writer)\n"
    )
    print(
        f"{'request':<46} {'n':>4} {'p50':>7} {'p99':>7} {'max':>7}  target      "
        f"{'raw p50':>7} {'raw p99':>7}   (ms; raw = same SQL on sqlite3, no HTTP)"
    )
    for name, ms, target, baseline in results:
        print(line(name, ms, target, baseline))
    for p in tmp.iterdir():
        p.unlink()
    tmp.rmdir()


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--days", type=float, default=365, help="history span of the rows")
    parser.add_argument("--requests", type=int, default=200, help="requests per list scenario")
    parser.add_argument("--rate", type=float, default=500, help="rows/s the writer dispatches")
    parser.add_argument("--quick", action="store_true", help="100,000 rows, 50 requests")
    args, unknown = parser.parse_known_args()  # bench/run_all.py passes every script's options
    if unknown:
        print(f"(ignoring options for other benchmarks: {' '.join(unknown)})")
    if args.quick:
        args.rows, args.requests = min(args.rows, 100_000), min(args.requests, 50)
    asyncio.run(main(args))


if __name__ == "__main__":
    cli()
