"""Copy benchmark (issue 10.8): 1,000 files of 1 MiB copied to a local folder, against
``shutil.copyfile`` in a loop measured in the same run. Prints figures; asserts nothing.

    python bench/bench_copy.py [--copies 1000] [--mib 1] [--quick]

Figures per ``fsync`` setting: ``shutil.copyfile`` in a loop (the baseline), the copy step
alone with the previous read/write loop and with ``processors.local.copy_data`` (to a
temporary name, then renamed, as the service does), and the whole service (``mode: copy``,
from the first drop to the last SUCCEEDED row).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench_core import finished_times, start_service, stop, succeeded, wait_ready, write_config

from filedispatch.processors.local import copy_data


def make_files(folder: Path, n: int, size: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    block = os.urandom(size)  # one random block: no compression or deduplication helps
    paths = []
    for i in range(n):
        p = folder / f"f{i:06d}.dat"
        p.write_bytes(block)
        paths.append(p)
    return paths


def copyfile(src: Path, dst: Path) -> None:
    """The baseline: what ``shutil.copyfile`` does (sendfile(2) on Linux), then the rename."""
    shutil.copyfile(src, dst.with_name(f".tmp-{dst.name}"))
    os.rename(dst.with_name(f".tmp-{dst.name}"), dst)


def previous_copy(src: int, dst: int, st: os.stat_result) -> None:
    """The routine copy_data replaced: a read/write loop through a 1 MiB buffer."""
    del st
    with open(src, "rb", closefd=False) as fin, open(dst, "wb", closefd=False) as fout:
        shutil.copyfileobj(fin, fout, 1024 * 1024)


def copy_step(copy: Callable[[int, int, os.stat_result], None]) -> Callable[[Path, Path], None]:
    """The service's copy step with ``copy``: open, copy, mtime, rename (fsync: the caller)."""

    def step(src: Path, dst: Path) -> None:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        tmp = dst.with_name(f".tmp-{dst.name}")
        out = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        copy(fd, out, st)
        os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.close(out)
        os.close(fd)
        os.rename(tmp, dst)

    return step


WAYS = {
    "shutil.copyfile loop": copyfile,
    "previous routine": copy_step(previous_copy),
    "copy_data routine": copy_step(copy_data),
}


def in_process(files: list[Path], root: Path, fsync: bool, batch: int = 50) -> dict[str, float]:
    """files/s of each way; the ways take turns, ``batch`` files each, so that the machine's
    busy spells and the disk's writeback fall on all of them alike."""
    spent = dict.fromkeys(WAYS, 0.0)
    for way in WAYS:
        (root / way.replace(" ", "-")).mkdir(parents=True)
    for start in range(0, len(files), batch):
        chunk = files[start : start + batch]
        for way, copy in WAYS.items():
            folder = root / way.replace(" ", "-")
            t0 = time.perf_counter()
            for p in chunk:
                copy(p, folder / p.name)
                if fsync:
                    fd = os.open(folder / p.name, os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)
            spent[way] += time.perf_counter() - t0
    return {way: len(files) / t for way, t in spent.items()}


def service(root: Path, files: list[Path], fsync: bool) -> float:
    cfg = write_config(root, mode="copy", fsync=fsync)
    (root / "inbox").mkdir()
    proc = start_service(cfg)
    wait_ready(root / "journal.db")
    t0 = time.time()
    for p in files:
        os.rename(p, root / "inbox" / p.name)
    deadline = time.time() + 600
    while succeeded(root / "journal.db") < len(files) and time.time() < deadline:
        time.sleep(0.05)
    stop(proc)
    return len(files) / (max(finished_times(root / "journal.db").values()) - t0)


def one_round(run: Path, files: list[Path], fsync: bool) -> dict[str, float]:
    rates = in_process(files, run / "ways", fsync)
    os.sync()  # no writeback left over for the service
    rates["filedispatch service"] = service(run / "s", files, fsync)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--copies", type=int, default=1000)
    parser.add_argument("--mib", type=float, default=1.0, help="size of each file")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the median shown")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    args, _ = parser.parse_known_args()  # run_all.py hands every script the same arguments
    if args.quick:
        args.copies, args.repeat = 200, 1
    size = int(args.mib * (1 << 20))
    base = Path(tempfile.mkdtemp(prefix="fd-bench-copy-"))
    try:
        print(f"== copies: {args.copies} x {size / (1 << 20):g} MiB to a local folder")
        for fsync in (False, True):
            figures: dict[str, list[float]] = {}
            for i in range(args.repeat):  # the four interleaved, so a busy spell hits all
                run = base / f"fsync-{fsync}-{i}"
                files = make_files(run / "stage", args.copies, size)
                for name, rate in one_round(run, files, fsync).items():
                    figures.setdefault(name, []).append(rate)
                shutil.rmtree(run, ignore_errors=True)
            base_rate = statistics.median(figures["shutil.copyfile loop"])
            print(f"  fsync {str(fsync).lower()} (median of {args.repeat})")
            for name, rates in figures.items():
                rate = statistics.median(rates)
                print(
                    f"    {name:22s} {rate:7.0f} files/s {rate * size / (1 << 20):7.0f} MiB/s"
                    f"   ratio {rate / base_rate:5.2f}"
                )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
