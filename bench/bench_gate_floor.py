"""The open-writers gate's floor: its system calls alone, without filedispatch around them.

Each round renames N files of 4 KiB out of a folder the way the inline move lane does (a
stat by name, ``rename``, an lstat of the result), looking at each first as the watcher does:

- ``lstat``: one lstat by full path (``open_writers: ignore``);
- ``lease``: an ``O_PATH | O_NOFOLLOW`` handle by name and its fstat (which replace the
  lstat), the handle reopened through ``/proc/PID/fd`` and a read lease asked, both closed
  (``open_writers: check``);

each with no watch on the folder, with a watchfiles watch as watchfiles makes it (a real open
raises an inotify ``IN_OPEN`` that wakes its thread), and with that watch as the service
keeps it (``fastpath.quiet_opens``: no ``IN_OPEN``). Prints the CPU time (user + system of
the whole process, watch thread included) per file, medians of alternated rounds.
Timings never go in the test suite; see docs/benchmarks.md.

    python bench/bench_gate_floor.py [--files 10000] [--rounds 5] [--quick]
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import shutil
import signal
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

from watchfiles._rust_notify import RustNotify

from filedispatch import fastpath

PATH = os.O_PATH | os.O_CLOEXEC | os.O_NOFOLLOW
READ = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def one_round(base: Path, n: int, look: str, watch: str) -> float:
    """CPU microseconds per file for one loop over ``n`` files."""
    src, dst = base / "src", base / "dst"
    shutil.rmtree(base, ignore_errors=True)
    src.mkdir(parents=True)
    dst.mkdir()
    names = [f"f{i:06d}.dat" for i in range(n)]
    for name in names:
        (src / name).write_bytes(b"x" * 4096)
    top = os.open(src, os.O_PATH | os.O_DIRECTORY)
    out = os.open(dst, os.O_PATH | os.O_DIRECTORY)
    proc = os.open(f"/proc/{os.getpid()}/fd", os.O_PATH | os.O_DIRECTORY)
    prefix = f"{src}/"

    def by_lstat(name: str) -> None:
        os.lstat(prefix + name)

    def by_lease(name: str) -> None:
        handle = os.open(name, PATH, dir_fd=top)
        os.fstat(handle)
        fd = os.open(str(handle), READ, dir_fd=proc)
        fcntl.fcntl(fd, fcntl.F_SETLEASE, fcntl.F_RDLCK)
        os.close(fd)
        os.close(handle)

    first: Callable[[str], None] = by_lease if look == "lease" else by_lstat
    stop = threading.Event()
    watcher = notify = None
    if watch != "none":
        others = fastpath.inotify_fds()
        notify = RustNotify([str(src)], False, False, 50, False, True)
        if watch == "quiet":
            fastpath.quiet_opens(src, fastpath.inotify_fds() - others)
        watcher = threading.Thread(target=notify.watch, args=(50, 10, 600_000, stop), daemon=True)
        watcher.start()
        time.sleep(0.5)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    for name in names:
        first(name)
        os.stat(name, dir_fd=top, follow_symlinks=False)
        os.rename(name, name, src_dir_fd=top, dst_dir_fd=out)
        os.lstat(f"{dst}/{name}")
    if watcher is not None:
        time.sleep(0.3)  # the watch thread reads what the loop raised
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    stop.set()
    if watcher is not None:
        watcher.join(5)
    if notify is not None:
        notify.close()
    for fd in (top, out, proc):
        os.close(fd)
    used = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return used / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="2,000 files, 3 rounds")
    args = parser.parse_args()
    if args.quick:
        args.files, args.rounds = 2000, 3
    signal.signal(signal.SIGIO, signal.SIG_IGN)  # as the service does
    base = Path(tempfile.mkdtemp(prefix="fd-floor-"))
    watches = ("none", "watch", "quiet")
    kinds = [(look, watch) for watch in watches for look in ("lstat", "lease")]
    cpu: dict[tuple[str, str], list[float]] = {k: [] for k in kinds}
    try:
        for _ in range(args.rounds):
            for look, watch in kinds:
                cpu[(look, watch)].append(one_round(base / "r", args.files, look, watch))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    med = {k: statistics.median(v) for k, v in cpu.items()}
    print(f"== gate floor: {args.files} x 4 KiB renamed, median of {args.rounds} rounds")
    labels = {"none": "no watch", "watch": "watchfiles' watch", "quiet": "without IN_OPEN"}
    for watch in watches:
        plain, leased = med[("lstat", watch)], med[("lease", watch)]
        label = f"{labels[watch]:18s}"
        print(
            f"  {label}  lstat {plain:6.1f} us/file  lease {leased:6.1f} us/file  "
            f"difference {leased - plain:5.1f} us"
        )


if __name__ == "__main__":
    main()
