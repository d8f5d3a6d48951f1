"""Idle CPU and latency (issue 16, goal 5), with the default configuration: API and console on,
INFO logging, ``settle: 0`` so that latency is the service's own.

- **idle**: the CPU time (all threads, from each thread's ``schedstat``) the service uses in
  ``--idle-seconds`` with nothing to do, as a share of one core; beside it ``inotifywait -m``
  on the same kind of folder over the same window (the event-driven floor, about 0).
- **latency**: ``--trickle`` files renamed into the inbox at 20 per second; for each, the time
  from its drop to its journal row's ``finished``; p50 and p99. Before them one file is
  dropped alone after 32 s of quiet, and its latency shown apart ("first file": the
  watch is idle then, see filedispatch/watcher/changes.py); the trickle starts once it arrived. The
  baseline is an
  ``inotifywait | mv`` pipeline in bash over the same drops, timed by ``$EPOCHREALTIME`` after
  each ``mv``.

With ``--before PATH`` (an older checkout, e.g. made with ``git archive``) the same figures for
that code, in the same run. Prints figures; asserts nothing (timings never go in the tests).

    python bench/bench_idle.py [--idle-seconds 30] [--trickle 200] [--rounds 2] [--before PATH]

Targets (issue 16): idle under 0.1% of a core; p99 at most 10 ms plus ``settle``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import bench_core as core
import yaml

#: quiet before the first drop: longer than the watch's hot and warm spells (PACE in
#: filedispatch/watcher/changes.py), so it is idle
COOL_S = 32.0


def write_config(root: Path) -> Path:
    cfg = {
        "database": str(root / "journal.db"),
        "sources": [{"path": str(root / "inbox"), "settle": 0}],
        "rules": [
            {"name": "all", "glob": "*", "to": {"url": str(root / "outbox"), "mode": "move"}}
        ],
        "api": {"port": 0},
        "monitor": {"port": 0, "console_port": 0},
    }
    (root / "inbox").mkdir(parents=True)
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(root: Path, code: str | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    cfg = write_config(root)
    with open(root / "service.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "filedispatch", "-c", str(cfg)],
            stdout=subprocess.DEVNULL,
            stderr=log,
            env=env,
            cwd=code,
        )
    core.wait_ready(root / "journal.db")
    return proc


def cpu_seconds(pid: int) -> float:
    """Seconds on a CPU of every thread of ``pid`` so far: the sum of the first field of each
    thread's ``/proc/PID/task/TID/schedstat`` (nanoseconds the scheduler counted it running).
    ``/proc/PID/stat``'s utime + stime are sampled at each clock tick (1/SC_CLK_TCK s): over a
    minute an idle service gets only a few ticks, so that figure moves in steps of about 0.017%
    of a core, as large as what is measured."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


def idle_share(pid: int, seconds: float) -> float:
    """The share of one core ``pid`` uses over ``seconds`` (after 2 s for start-up to end)."""
    time.sleep(2)
    before, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - before) / (time.monotonic() - t0)


def service_idle(base: Path, seconds: float, code: str | None) -> float:
    proc = start(base, code)
    try:
        return idle_share(proc.pid, seconds)
    finally:
        core.stop(proc)


def inotify_idle(base: Path, seconds: float) -> float:
    (base / "inbox").mkdir(parents=True)
    proc = subprocess.Popen(
        ["inotifywait", "-m", "-q", str(base / "inbox")], stdout=subprocess.DEVNULL
    )
    try:
        return idle_share(proc.pid, seconds)
    finally:
        proc.terminate()
        proc.wait()


def drop(files: list[Path], inbox: Path, rate: float) -> dict[str, float]:
    dropped: dict[str, float] = {}
    for p in files:
        dropped[p.name] = time.time()
        os.rename(p, inbox / p.name)
        time.sleep(1 / rate)
    return dropped


def percentiles(latencies_ms: list[float]) -> tuple[float, float, float]:
    """p50 and p99 of the trickle, and the latency of the first file (dropped alone before
    it, after a quiet spell: it meets an idle watch, see filedispatch/watcher/changes.py)."""
    lat = sorted(latencies_ms[1:])
    return statistics.median(lat), lat[max(0, int(len(lat) * 0.99) - 1)], latencies_ms[0]


def drop_after_one(
    files: list[Path], inbox: Path, arrived: Callable[[int], bool]
) -> dict[str, float]:
    """The first of ``files`` dropped alone, then (once ``arrived(1)``) the rest at 20/s."""
    dropped = drop(files[:1], inbox, 20.0)
    deadline = time.time() + 30
    while not arrived(1) and time.time() < deadline:
        time.sleep(0.01)
    return dropped | drop(files[1:], inbox, 20.0)


def service_latency(base: Path, n: int, code: str | None) -> tuple[float, float, float]:
    proc = start(base, code)
    files = core.make_files(base / "stage", n + 1)
    try:
        time.sleep(COOL_S)
        dropped = drop_after_one(
            files, base / "inbox", lambda k: core.succeeded(base / "journal.db") >= k
        )
        deadline = time.time() + 120
        while core.succeeded(base / "journal.db") < n + 1 and time.time() < deadline:
            time.sleep(0.05)
    finally:
        core.stop(proc)
    times = core.finished_times(base / "journal.db")
    return percentiles([(times[k] - dropped[k]) * 1000 for k in dropped])


def pipeline_latency(base: Path, n: int) -> tuple[float, float, float]:
    files = core.make_files(base / "stage", n + 1)
    (base / "inbox").mkdir()
    (base / "outbox").mkdir()
    script = (
        'inotifywait -m -q -e moved_to --format %f "$1" | while IFS= read -r f; do '
        'mv -- "$1/$f" "$2/$f"; echo "$f $EPOCHREALTIME"; done'
    )
    with open(base / "moved.txt", "wb") as out:
        proc = subprocess.Popen(
            ["bash", "-c", script, "bash", str(base / "inbox"), str(base / "outbox")],
            stdout=out,
            start_new_session=True,
        )
    time.sleep(COOL_S)  # inotifywait's watch in place
    dropped = drop_after_one(files, base / "inbox", lambda k: len(os.listdir(base / "outbox")) >= k)
    deadline = time.time() + 60
    while len(os.listdir(base / "outbox")) < n + 1 and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)  # the last echo
    os.killpg(proc.pid, 15)
    proc.wait()
    moved = dict(line.split() for line in (base / "moved.txt").read_text().splitlines())
    return percentiles([(float(moved[k]) - dropped[k]) * 1000 for k in dropped])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument("--trickle", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before", metavar="PATH", help="an older checkout, run alike")
    parser.add_argument("--quick", action="store_true", help="10 s idle, 60 files, 1 round")
    args = parser.parse_args()
    if args.quick:
        args.idle_seconds, args.trickle, args.rounds = 10.0, 60, 1
    if shutil.which("inotifywait") is None:
        sys.exit("bench_idle needs inotifywait for its baselines: apt-get install inotify-tools")
    codes: dict[str, str | None] = {"filedispatch": None}
    if args.before:
        codes[f"before ({args.before})"] = args.before
    idle: dict[str, list[float]] = {"inotifywait -m": []}
    lat: dict[str, list[tuple[float, float, float]]] = {"inotifywait | mv": []}
    base = Path(tempfile.mkdtemp(prefix="fd-bench-idle-"))
    try:
        for r in range(args.rounds):
            idle["inotifywait -m"].append(inotify_idle(base / f"i{r}", args.idle_seconds))
            lat["inotifywait | mv"].append(pipeline_latency(base / f"p{r}", args.trickle))
            for i, (name, code) in enumerate(codes.items()):
                idle.setdefault(name, []).append(
                    service_idle(base / f"s{r}-{i}", args.idle_seconds, code)
                )
                lat.setdefault(name, []).append(
                    service_latency(base / f"l{r}-{i}", args.trickle, code)
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)
    print(f"== idle: share of one core over {args.idle_seconds:.0f} s, median of {args.rounds}")
    for name, shares in idle.items():
        print(f"  {name:40s} {statistics.median(shares) * 100:7.3f} %   (target < 0.1 %)")
    print(f"== latency: {args.trickle} files at 20/s, settle 0, median of {args.rounds} runs")
    for name, runs in lat.items():
        p50, p99, first = (statistics.median(run[i] for run in runs) for i in range(3))
        print(
            f"  {name:32s} p50 {p50:6.1f} ms   p99 {p99:6.1f} ms   first file {first:6.1f} ms"
            "   (target p99 <= 10)"
        )


if __name__ == "__main__":
    main()
