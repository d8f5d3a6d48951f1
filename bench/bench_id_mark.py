"""What SQLite's row-id high-water mark costs each file: the journal's per-file work (plan ->
claim -> finish and plan_started -> finish, ``bench_journal.per_file``) on a journal with the
``id_mark`` triggers against one with them dropped (the baseline), alternating, in the same
run. Prints figures; asserts nothing.

    python bench/bench_id_mark.py [--files 5000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_journal import create_schema, per_file

from filedispatch.journal import SqliteJournal

DROP = ["DROP TRIGGER id_mark_insert", "DROP TRIGGER id_mark_delete"]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--files", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        paths = {"baseline": Path(tmp) / "baseline.db", "id_mark": Path(tmp) / "mark.db"}
        for path in paths.values():
            await create_schema(path)
        with sqlite3.connect(paths["baseline"]) as conn:
            for sql in DROP:
                conn.execute(sql)
        results: dict[str, list[tuple[float, float]]] = {k: [] for k in paths}
        for r in range(args.rounds):
            for name, path in paths.items():  # alternating: load on the machine hits both
                async with SqliteJournal.open(path) as journal:
                    results[name].append(await per_file(journal, args.files, f"r{r}"))
        print(f"{'journal':<10}{'wall us/file':>14}{'cpu us/file':>13}")
        med = {}
        for name, got in results.items():
            med[name] = (
                statistics.median(w for w, _ in got),
                statistics.median(c for _, c in got),
            )
            print(f"{name:<10}{med[name][0]:>14.1f}{med[name][1]:>13.1f}")
        wall = med["id_mark"][0] / med["baseline"][0]
        cpu = med["id_mark"][1] / med["baseline"][1]
        print(f"id_mark / baseline: {wall:.3f}x wall, {cpu:.3f}x CPU")


if __name__ == "__main__":
    asyncio.run(main())
