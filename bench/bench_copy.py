"""Copy benchmarks (issue 16, goals 2 and 3): the service copying into a local folder against
baselines measured in the same run. Prints figures and same-run ratios; asserts nothing.

    python bench/bench_copy.py [--files 10000] [--copies 1000] [--mib 1] [--rounds 3]
        [--only burst|large|verify] [--before PATH] [--quick]

``burst`` (goal 2): ``--files`` files of 4 KiB renamed into a watched folder and copied by the
service with its default configuration (``mode: copy``, ``fsync: true``, ``verify: size``, the
API and the console on, on ports the kernel picks, INFO logging to a file; only ``settle: 0``),
from the first drop to the last SUCCEEDED row. Baselines: a Python loop that copies each file
to a temporary name, fsyncs it and renames it; ``rclone copy`` of the same files (which
neither fsyncs nor writes to a temporary name).

``large`` (goal 3): ``--copies`` files of ``--mib`` MiB, the same service with ``fsync: true``
(the default) and ``fsync: false``. Baselines: ``shutil.copyfile`` in a loop (then a rename),
the same loop with an fsync per file, a shell loop forking ``cp`` per file, ``rclone copy``.

``verify``: the CPU that ``verify: sha256`` costs a local copy per file, the way it is checked
now (the source hashed, the copy compared with it byte for byte) against hashing both, right
after a kernel copy (the bytes in the page cache), for 4 KiB, 1 MiB and 64 MiB files.

Each round makes fresh files for every way, syncs the disk, then runs the ways in an order
that rotates from round to round, so that the machine's busy spells (it is shared) fall on all
of them alike; figures are medians over ``--rounds``. Beside files/s, the CPU each way used
per file (user + system; the service's start-up and stop taken off, measured with one file).
``--before PATH`` also runs the service from another checkout (its ``filedispatch`` folder
under PATH), as one more way: a before/after comparison in the same run.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml
from bench_core import finished_times, stop, succeeded

from filedispatch.processors.local import copy_data, sha256_if_same

#: a way of copying: (folder of files to copy, an empty folder) -> (seconds, CPU seconds)
Way = Callable[[Path, Path], tuple[float, float]]


def make_files(folder: Path, n: int, size: int) -> None:
    folder.mkdir(parents=True)
    block = os.urandom(size)  # random bytes: no compression or deduplication helps
    for i in range(n):
        (folder / f"f{i:06d}.dat").write_bytes(block)


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _child(argv: list[str]) -> tuple[float, float]:
    """Run a command; its wall-clock and CPU seconds (from wait4)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[0]} failed: {' '.join(argv)}")
    return elapsed, usage.ru_utime + usage.ru_stime


def python_loop(fsync: bool) -> Way:
    """Copy each file to a temporary name (``shutil.copyfile``: sendfile on Linux), fsync it
    if asked, rename it into place."""

    def run(src: Path, dst: Path) -> tuple[float, float]:
        names = sorted(os.listdir(src))
        c0, t0 = _self_cpu(), time.perf_counter()
        for name in names:
            tmp = dst / f".tmp-{name}"
            shutil.copyfile(src / name, tmp)
            if fsync:
                fd = os.open(tmp, os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            os.rename(tmp, dst / name)
        return time.perf_counter() - t0, _self_cpu() - c0

    return run


def cp_loop(src: Path, dst: Path) -> tuple[float, float]:
    """A shell loop that forks ``cp`` per file."""
    return _child(
        ["bash", "-c", 'for f in "$1"/*; do cp "$f" "$2"/; done', "-", str(src), str(dst)]
    )


def rclone(src: Path, dst: Path) -> tuple[float, float]:
    """``rclone copy`` with its defaults (4 transfers, 8 checkers)."""
    return _child(["rclone", "copy", "--config", "/dev/null", str(src), str(dst)])


def service(fsync: bool, code: str | None) -> Way:
    """The service with its default configuration (see the module docstring): the files are
    renamed into its watched folder; from the first drop to the last SUCCEEDED row."""

    def run(src: Path, dst: Path) -> tuple[float, float]:
        root = dst.parent / f"{dst.name}-service"
        inbox, db = root / "inbox", root / "journal.db"
        inbox.mkdir(parents=True)
        to: object = str(dst) if fsync else {"url": str(dst), "fsync": False}
        cfg = {
            "database": str(db),
            "sources": [{"path": str(inbox), "settle": 0}],
            "rules": [{"name": "all", "glob": "*", "to": to}],
            "api": {"port": 0},
            "monitor": {"port": 0, "console_port": 0},
        }
        (root / "config.yml").write_text(yaml.safe_dump(cfg))
        env = dict(os.environ)
        if code is not None:
            env["PYTHONPATH"] = code
        with (root / "service.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "filedispatch", "-c", str(root / "config.yml")],
                stdout=log,
                stderr=log,
                env=env,
                cwd=code,
            )
        deadline = time.time() + 60
        while b"watching" not in (root / "service.log").read_bytes() and time.time() < deadline:
            time.sleep(0.02)  # "watching N source(s)": the service is up
        time.sleep(0.5)  # and its watch too
        names = sorted(os.listdir(src))
        t0 = time.time()
        for name in names:
            os.rename(src / name, inbox / name)
        deadline = time.time() + 900
        while succeeded(db) < len(names) and time.time() < deadline:
            time.sleep(0.05)
        cpu = stop(proc)
        end = max(finished_times(db).values(), default=time.time())
        return end - t0, cpu

    return run


def idle_cpu(base: Path, fsync: bool, code: str | None) -> float:
    """The service's CPU seconds for a start, one file and a stop (median of 3)."""
    used = []
    for i in range(3):
        make_files(base / f"idle-{i}" / "src", 1, 4096)
        used.append(service(fsync, code)(base / f"idle-{i}" / "src", base / f"idle-{i}" / "dst")[1])
    return statistics.median(used)


def compare(
    title: str,
    base: Path,
    ways: dict[str, Way],
    n: int,
    size: int,
    rounds: int,
    idle: dict[str, float],
    reference: str,
    targets: dict[str, str],
    pairs: tuple[tuple[str, str, str], ...] = (),
) -> None:
    """Run every way ``rounds`` times, rotating the order; print medians and ratios."""
    rates: dict[str, list[float]] = {w: [] for w in ways}
    cpus: dict[str, list[float]] = {w: [] for w in ways}
    names = list(ways)
    for r in range(rounds):
        run = base / f"round-{r}"
        for i, _ in enumerate(names):
            make_files(run / f"src-{i}", n, size)
            (run / f"dst-{i}").mkdir()
        os.sync()  # the files just made are not written back on the first way's time
        order = names[r % len(names) :] + names[: r % len(names)]
        for way in order:
            i = names.index(way)
            elapsed, cpu = ways[way](run / f"src-{i}", run / f"dst-{i}")
            got = len(os.listdir(run / f"dst-{i}"))
            if got != n:
                print(f"    warning: {way} left {got} files of {n}")
            rates[way].append(n / elapsed)
            cpus[way].append(max(cpu - idle.get(way, 0.0), 0.0) / n)
        shutil.rmtree(run, ignore_errors=True)
    ref = statistics.median(rates[reference])
    print(f"== {title} (median of {rounds} rounds, ways alternated)")
    print(f"    {'way':34s} {'files/s':>8s} {'MiB/s':>7s} {'CPU/file':>9s}   ratio to it")
    for way in names:
        rate = statistics.median(rates[way])
        cpu_us = statistics.median(cpus[way]) * 1e6
        print(
            f"    {way:34s} {rate:8.0f} {rate * size / (1 << 20):7.1f} {cpu_us:7.0f}us"
            f"   {ref / rate:6.2f}x {targets.get(way, '')}"
        )
    for a, b, goal in pairs:
        ratio = statistics.median(rates[a]) / statistics.median(rates[b])
        print(f"    {a} / {b}: {ratio:.2f}x {goal}")
    print(f"    (ratio: the service's files/s over each way's; all runs: {rates})")


def _sha256_both(src: int, copy: int) -> str | None:
    """The earlier check: both files hashed, the digests compared."""
    sums = []
    for fd in (src, copy):
        digest, offset = hashlib.sha256(), 0
        while data := os.pread(fd, 1 << 20, offset):
            digest.update(data)
            offset += len(data)
        sums.append(digest.hexdigest())
    return sums[0] if sums[0] == sums[1] else None


def verify_cost(base: Path, rounds: int) -> None:
    """CPU per file of verify: sha256 after a kernel copy, the two ways taking turns."""
    print(f"== verify: sha256 of a local copy, CPU per file (median of {rounds} rounds)")
    for size, n in ((4096, 2000), (1 << 20, 100), (64 << 20, 4)):
        folder = base / f"verify-{size}"
        make_files(folder, n, size)
        pairs = []
        for p in sorted(folder.iterdir()):
            src = os.open(p, os.O_RDONLY)
            out = os.open(p.with_suffix(".copy"), os.O_RDWR | os.O_CREAT, 0o644)
            copy_data(src, out, os.fstat(src))
            pairs.append((src, out))
        spent: dict[str, list[float]] = {"hash both": [], "hash one, compare": []}
        for _ in range(rounds):
            for way, check in (("hash both", _sha256_both), ("hash one, compare", sha256_if_same)):
                c0 = _self_cpu()
                for src, out in pairs:
                    assert check(src, out) is not None
                spent[way].append((_self_cpu() - c0) / n)
        for src, out in pairs:
            os.close(src)
            os.close(out)
        both, one = (statistics.median(v) * 1e6 for v in spent.values())
        print(
            f"    {size // 1024:8d} KiB   hash both {both:9.0f} us   hash one, compare "
            f"{one:9.0f} us   ratio {one / both:5.2f}"
        )
        shutil.rmtree(folder)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000, help="files of the burst (4 KiB)")
    parser.add_argument("--copies", type=int, default=1000, help="files of the large copies")
    parser.add_argument("--mib", type=float, default=1.0, help="size of each large file")
    parser.add_argument("--rounds", type=int, default=3, help="runs of each way; medians shown")
    parser.add_argument("--only", choices=("burst", "large", "verify"))
    parser.add_argument("--before", metavar="PATH", help="also run the service from there")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args, _ = parser.parse_known_args()  # run_all.py hands every script the same arguments
    if args.quick:
        args.files, args.copies, args.rounds = 2000, 200, 1
    has_rclone = shutil.which("rclone") is not None
    if not has_rclone:
        print("  (rclone is not installed: apt-get install rclone; its baseline is left out)")
    base = Path(tempfile.mkdtemp(prefix="fd-bench-copy-"))
    try:
        if args.only in (None, "verify"):
            verify_cost(base, max(args.rounds, 3))
        if args.only == "verify":
            return
        idle = {"filedispatch (defaults)": idle_cpu(base / "idle", True, None)}
        idle["filedispatch, fsync: false"] = idle["filedispatch (defaults)"]
        if args.before:
            idle["before (defaults)"] = idle_cpu(base / "idle-before", True, args.before)
            idle["before, fsync: false"] = idle["before (defaults)"]
        if args.only in (None, "burst"):
            ways = {
                "filedispatch (defaults)": service(True, None),
                "Python copy + fsync loop": python_loop(fsync=True),
                "filedispatch, fsync: false": service(False, None),
            }
            if args.before:
                ways["before (defaults)"] = service(True, args.before)
            if has_rclone:
                ways["rclone copy (no fsync)"] = rclone
            compare(
                f"burst: {args.files} x 4 KiB into a watched folder, mode: copy, fsync",
                base / "burst",
                ways,
                args.files,
                4096,
                args.rounds,
                idle,
                "filedispatch (defaults)",
                {
                    "Python copy + fsync loop": "(goal >= 0.8)",
                    "rclone copy (no fsync)": "(goal > 1)",
                },
                (("filedispatch, fsync: false", "rclone copy (no fsync)", "(like for like)"),),
            )
        if args.only in (None, "large"):
            size = int(args.mib * (1 << 20))
            ways = {
                "filedispatch (defaults)": service(True, None),
                "filedispatch, fsync: false": service(False, None),
                "shutil.copyfile loop": python_loop(fsync=False),
                "shutil.copyfile + fsync loop": python_loop(fsync=True),
                "cp loop (a fork per file)": cp_loop,
            }
            if has_rclone:
                ways["rclone copy (no fsync)"] = rclone
            if args.before:
                ways["before (defaults)"] = service(True, args.before)
                ways["before, fsync: false"] = service(False, args.before)
            compare(
                f"large: {args.copies} x {args.mib:g} MiB into a watched folder, mode: copy",
                base / "large",
                ways,
                args.copies,
                size,
                args.rounds,
                idle,
                "filedispatch (defaults)",
                {
                    "shutil.copyfile loop": "(goal >= 0.7)",
                    "cp loop (a fork per file)": "(goal > 1)",
                },
                (
                    ("filedispatch, fsync: false", "shutil.copyfile loop", "(goal >= 0.7)"),
                    ("filedispatch, fsync: false", "cp loop (a fork per file)", "(goal > 1)"),
                    ("filedispatch (defaults)", "shutil.copyfile + fsync loop", ""),
                ),
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
