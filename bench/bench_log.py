"""The burst at the default log level (issue 16, goal 1): 10,000 files of 4 KiB renamed into a
watched folder, ``mode: move``, the service logging at INFO into a file, as the default
configuration does (``bench_core`` runs at WARNING). Prints files/s, the service's CPU per file
and its log lines, against an ``os.rename`` loop over the same files in the same run; with
``--before PATH`` also an older checkout, alternated with this one, and the ratios.
Asserts nothing (timings never go in the test suite).

    python bench/bench_log.py [--files 10000] [--rounds 3] [--before PATH] [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_core as core


def start_logging(cfg: Path, *args: str, code: str | None = None) -> subprocess.Popen[bytes]:
    """The service at its default level, its log in ``service.log`` beside ``cfg``."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    with open(cfg.parent / "service.log", "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "filedispatch", "-c", str(cfg), *args],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=code,
        )


def one(base: Path, n: int, code: str | None) -> tuple[float, float, int]:
    """files/s, CPU microseconds per file and log lines of one burst."""
    with tempfile.TemporaryDirectory(dir=base) as d:
        root = Path(d)
        rate, _, cpu = core.burst(root, n, code)
        with open(root / "service.log", "rb") as log:
            lines = sum(1 for _ in log)
        return rate, cpu / n * 1e6, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--before", help="an older checkout, run alternately with this one")
    parser.add_argument("--quick", action="store_true", help="2,000 files, 1 round")
    args, _ = parser.parse_known_args()  # make bench passes every script the same options
    n, rounds = (2_000, 1) if args.quick else (args.files, args.rounds)
    core.start_service = start_logging
    checkouts: dict[str, str | None] = {"this checkout": None}
    if args.before:
        checkouts["before"] = os.path.abspath(args.before)
    results: dict[str, list[tuple[float, float, int]]] = {k: [] for k in checkouts}
    renames: list[float] = []
    with tempfile.TemporaryDirectory() as d:
        base = Path(d)
        for r in range(rounds):
            order = list(checkouts.items())
            for name, code in order if r % 2 == 0 else reversed(order):
                results[name].append(one(base, n, code))
            with tempfile.TemporaryDirectory(dir=base) as rd:
                renames.append(core.baseline_rename(Path(rd), n))
    rename = statistics.median(renames)
    print(f"burst of {n} x 4 KiB, mode: move, INFO log to a file; medians of {rounds}")
    print(f"  os.rename loop: {rename:,.0f} files/s")
    medians = {}
    for name, runs in results.items():
        rate = statistics.median(x[0] for x in runs)
        cpu = statistics.median(x[1] for x in runs)
        lines = statistics.median(x[2] for x in runs)
        medians[name] = (rate, cpu)
        print(
            f"  {name}: {rate:,.0f} files/s = {rate / rename:.3f}x the rename loop, "
            f"{cpu:.1f} us CPU per file, {lines:.0f} log lines"
        )
    if "before" in medians:
        (rate, cpu), (rate0, cpu0) = medians["this checkout"], medians["before"]
        print(f"  ratio this/before: files/s {rate / rate0:.3f}, CPU per file {cpu / cpu0:.3f}")


if __name__ == "__main__":
    main()
