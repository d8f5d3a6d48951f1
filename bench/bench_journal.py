"""Journal at scale (issue 16, goal 8): ``stats`` p50/p99 from the rollup against the same
groups counted from the rows, on a journal of N rows, in the same run; and the journal's cost
per file (plan -> claim -> finish through the real writer, and the inline lanes' plan_started
-> finish) on an empty journal against one of N rows, alternating. Prints figures; asserts
nothing.

    python bench/bench_journal.py [--rows 1000000] [--days 365] [--requests 100]
                                  [--files 5000] [--rounds 3] [--quick]   (100,000 rows)

Targets: stats?period=day|week|month p99 < 50 ms at 1M rows; per-file cost at N rows within
20% of the cost at 0 rows.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from multidict import MultiDict

from filedispatch.api.queries import parse_stats_query
from filedispatch.journal import Journal, PlannedStep, SqliteJournal, StepResult
from filedispatch.journal.reads import stats_sql
from filedispatch.models import FileVersion, Status

DESTINATIONS = [
    "/srv/out/documents",
    "/srv/out/images",
    "ftp://ftp.example.org/in",
    "https://api.example.org/upload",
    "sftp://deploy@backup.example.org/data",
]
EXTENSIONS = ["pdf", "png", "jpg", "txt", "mp4", "csv", "zip", "docx"]
DAY = 86400.0


async def create_schema(path: Path) -> None:
    async with Journal.open(path):  # type: ignore[attr-defined]
        pass  # the migrations, triggers and indexes


def fill(path: Path, rows: int, days: float, now: float) -> float:
    """``rows`` finished dispatches over ``days`` up to ``now``, in one transaction through
    the schema's triggers (the rollup is kept as they go in); seconds taken."""
    t0 = time.perf_counter()
    rnd = random.Random(16)
    start = now - days * DAY
    conn = sqlite3.connect(path, isolation_level=None)

    def gen() -> Any:
        for i in range(rows):
            created = start + (now - start) * i / rows
            ext = EXTENSIONS[rnd.randrange(len(EXTENSIONS))]
            failed = rnd.random() < 0.08
            name = f"file{i:07d}.{ext}"
            yield (
                f"bulk{i:09d}", "inbox", "/srv/inbox", f"{i % 97}/{name}", name, ext,
                rnd.randrange(100, 50_000_000), int(created * 1e9), "rule", 0, "0",
                DESTINATIONS[rnd.randrange(len(DESTINATIONS))], "file",
                "FAILED" if failed else "SUCCEEDED", 1, created, created + 0.01, created + 0.2, 3,
            )  # fmt: skip

    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO dispatches (vkey, source, root, relpath, filename, extension, size, "
        "mtime_ns, rule, step, step_key, destination, protocol, status, attempts, created, "
        "started, finished, duration_ms) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
        gen(),
    )
    conn.execute("COMMIT")
    # a service's writer checkpoints as it goes; one transaction of N rows leaves them all in
    # the WAL, which every read would then search
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    return time.perf_counter() - t0


def pct(samples: list[float], p: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


async def stats_latency(journal: SqliteJournal, requests: int) -> None:
    print(f"{'stats':<22}{'rollup p50':>12}{'p99':>9}{'rows p50':>11}{'p99':>9}  target p99")
    for period in ("day", "week", "month"):
        conditions = parse_stats_query(MultiDict({"period": period}), time.time()).filters()
        rollup: list[float] = []
        raw: list[float] = []
        for _ in range(requests):  # alternating, so load on the machine hits both alike
            t = time.perf_counter()
            got = await journal.stats(conditions, period)
            rollup.append((time.perf_counter() - t) * 1000)
            t = time.perf_counter()
            rows = await journal.read(*stats_sql(conditions))
            raw.append((time.perf_counter() - t) * 1000)
        assert sum(g.count for g in got) == sum(int(r[4]) for r in rows)
        print(
            f"period={period:<15}{pct(rollup, 50):>12.2f}{pct(rollup, 99):>9.2f}"
            f"{pct(raw, 50):>11.2f}{pct(raw, 99):>9.2f}  < 50 ms"
        )


async def per_file(journal: SqliteJournal, files: int, tag: str) -> tuple[float, float]:
    """(wall us, CPU us) per file: half through plan/claim/finish, half through plan_started
    -> finish, in batches of 500 as the dispatcher sends them."""
    now = time.time()
    versions = [
        FileVersion("inbox", Path("/srv/inbox"), f"{tag}/{i}.pdf", 1000 + i, i, i + 1, i, 1)
        for i in range(files)
    ]
    wall, cpu = time.perf_counter(), time.process_time()
    half = files // 2
    for i in range(0, half, 500):
        steps = [PlannedStep(v, "rule", 0, "k", "/srv/out", "file") for v in versions[i : i + 500]]
        await journal.plan(steps, now)
        groups = await journal.claim(500, now)
        await journal.finish([StepResult(d.id, Status.SUCCEEDED, 1) for g in groups for d in g])
    for i in range(half, files, 500):
        steps = [PlannedStep(v, "rule", 0, "k", "/srv/out", "file") for v in versions[i : i + 500]]
        ids = await journal.plan_started(steps, now)
        await journal.finish([StepResult(n, Status.SUCCEEDED, 1) for n in ids if n is not None])
    return (
        (time.perf_counter() - wall) / files * 1e6,
        (time.process_time() - cpu) / files * 1e6,
    )


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--days", type=float, default=365)
    ap.add_argument("--requests", type=int, default=100)
    ap.add_argument("--files", type=int, default=5000, help="files per per-file round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="100,000 rows, 30 requests, 2 rounds")
    args = ap.parse_args()
    if args.quick:
        args.rows, args.requests, args.rounds = min(args.rows, 100_000), 30, 2
    with tempfile.TemporaryDirectory() as tmp:
        empty, full = Path(tmp) / "empty.db", Path(tmp) / "full.db"
        await create_schema(empty)
        await create_schema(full)
        took = fill(full, args.rows, args.days, time.time())
        print(f"journal: {args.rows:,} rows over {args.days:g} days, filled in {took:.1f} s "
              f"({args.rows / took:,.0f} rows/s, rollup kept by the triggers)")  # fmt: skip
        async with SqliteJournal.open(full) as j:
            await stats_latency(j, args.requests)
        results: dict[str, list[tuple[float, float]]] = {"0": [], "N": []}
        for r in range(args.rounds):  # alternating, so the machine's load hits both alike
            for name, path in (
                (("0", empty), ("N", full)) if r % 2 == 0 else (("N", full), ("0", empty))
            ):
                async with SqliteJournal.open(path) as j:
                    results[name].append(await per_file(j, args.files, f"r{r}{name}"))
        w0 = statistics.median(w for w, _ in results["0"])
        c0 = statistics.median(c for _, c in results["0"])
        wn = statistics.median(w for w, _ in results["N"])
        cn = statistics.median(c for _, c in results["N"])
        print(
            f"per file (median of {args.rounds} rounds of {args.files:,} files, journal work only):"
        )
        print(f"  0 rows: {w0:.1f} us wall, {c0:.1f} us CPU")
        print(f"  {args.rows:,} rows: {wn:.1f} us wall, {cn:.1f} us CPU")
        print(f"  ratio N/0: wall {wn / w0:.2f}x, CPU {cn / c0:.2f}x  (target: at most 1.20x)")


if __name__ == "__main__":
    random.seed(16)
    asyncio.run(main())
