"""The thread hop of a local copy: ``asyncutil.in_daemon_thread`` (the service's own daemon
threads, since the hung-mount fix) against ``asyncio.to_thread`` (the loop's default executor,
before it), measured in the same run. Prints figures and the same-run ratio; asserts nothing.

    python bench/bench_threads.py [--calls 20000] [--rounds 5] [--parallel 1] [--quick]

Each way runs ``--calls`` calls of a function that does nothing (the hop alone), ``--parallel``
at once, in rounds whose order alternates so that the machine's busy spells (it is shared)
fall on both alike; the median of ``--rounds`` is printed, in microseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

from filedispatch.asyncutil import in_daemon_thread


def _nothing() -> None:
    return None


async def _run(hop: Callable[[], Awaitable[None]], calls: int, parallel: int) -> float:
    """Seconds for ``calls`` hops, ``parallel`` in flight at once."""

    async def one_lane(n: int) -> None:
        for _ in range(n):
            await hop()

    t0 = time.perf_counter()
    await asyncio.gather(*(one_lane(calls // parallel) for _ in range(parallel)))
    return time.perf_counter() - t0


async def main(calls: int, rounds: int, parallel: int) -> None:
    ways: dict[str, Callable[[], Awaitable[None]]] = {
        "in_daemon_thread": lambda: in_daemon_thread(_nothing),
        "asyncio.to_thread": lambda: asyncio.to_thread(_nothing),
    }
    for hop in ways.values():  # warm up: threads started, code paths hot
        await _run(hop, 1000, parallel)
    times: dict[str, list[float]] = {name: [] for name in ways}
    for r in range(rounds):
        order = list(ways) if r % 2 == 0 else list(reversed(ways))
        for name in order:
            times[name].append(await _run(ways[name], calls, parallel))
    print(f"== thread hop: {calls} calls, {parallel} at once (median of {rounds} rounds)")
    base = statistics.median(times["asyncio.to_thread"])
    for name, runs in times.items():
        med = statistics.median(runs)
        per_call = med / calls * 1e6
        print(f"    {name:20s} {per_call:8.1f} us/call   ratio to to_thread {med / base:5.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--parallel", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="fewer calls, for a smoke run")
    args, _ = parser.parse_known_args()  # make bench passes every script the same options
    asyncio.run(main(2_000 if args.quick else args.calls, args.rounds, args.parallel))
