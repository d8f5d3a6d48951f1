"""Core benchmarks (issue 2): local throughput, latency and memory, each against a baseline
measured in the same run. Prints figures; asserts nothing (timings never go in the test suite).

    python bench/bench_core.py [--files 10000] [--trickle 200] [--backlog 100000] [--quick]
        [--gate-rounds 15] [--once-rounds 5] [--before PATH-TO-AN-OLDER-CHECKOUT]
        [--only-gates] [--only-once]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

PAYLOAD = b"x" * 4096


def write_config(
    root: Path,
    settle: float = 0,
    mode: str = "move",
    fsync: bool = False,
    source: dict[str, object] | None = None,
    **extra: object,
) -> Path:
    cfg = {
        "database": str(root / "journal.db"),
        "sources": [{"path": str(root / "inbox"), "settle": settle, "rescan": 0, **(source or {})}],
        "rules": [
            {
                "name": "all",
                "glob": "*",
                "to": {"url": str(root / "outbox"), "mode": mode, "fsync": fsync},
            }
        ],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
        **extra,
    }
    root.mkdir(parents=True, exist_ok=True)
    path = root / "config.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def make_files(folder: Path, n: int, prefix: str = "f") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"{prefix}{i:06d}.dat"
        p.write_bytes(PAYLOAD)
        paths.append(p)
    return paths


def start_service(cfg: Path, *args: str, code: str | None = None) -> subprocess.Popen[bytes]:
    """The service on ``cfg``; ``code``: a checkout of filedispatch to run instead of this one."""
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--log-level", "WARNING", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd=code,
    )
    return proc


def wait_ready(db: Path, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while not db.exists() and time.time() < deadline:
        time.sleep(0.02)
    time.sleep(0.5)  # the start-up scan of an empty folder and the watch starting


def succeeded(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return int(
            conn.execute("SELECT COUNT(*) FROM dispatches WHERE status='SUCCEEDED'").fetchone()[0]
        )
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def finished_times(db: Path) -> dict[str, float]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return {
            r[0]: r[1]
            for r in conn.execute(
                "SELECT filename, finished FROM dispatches WHERE status='SUCCEEDED'"
            )
        }
    finally:
        conn.close()


def stop(proc: subprocess.Popen[bytes]) -> float:
    """SIGTERM, wait; the CPU seconds (user + system) the process used in its whole life."""
    proc.send_signal(signal.SIGTERM)
    deadline = time.time() + 60
    while time.time() < deadline:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return float(usage.ru_utime + usage.ru_stime)
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    return float("nan")


# ----------------------------------------------------------------------------- baselines


def baseline_rename(root: Path, n: int) -> float:
    src, dst = root / "rn-src", root / "rn-dst"
    files = make_files(src, n)
    dst.mkdir()
    t0 = time.perf_counter()
    for p in files:
        os.rename(p, dst / p.name)
    return n / (time.perf_counter() - t0)


def baseline_shell(root: Path, n: int) -> float | None:
    """``inotifywait -m | while read f; do mv ...; done``: one mv process per file."""
    if shutil.which("inotifywait") is None:
        return None
    stage, watched, dst = root / "sh-stage", root / "sh-in", root / "sh-out"
    files = make_files(stage, n)
    watched.mkdir()
    dst.mkdir()
    script = (
        f'inotifywait -q -m -e moved_to --format "%f" "{watched}" | '
        f'while read f; do mv "{watched}/$f" "{dst}/"; done'
    )
    proc = subprocess.Popen(["bash", "-c", script], start_new_session=True)
    time.sleep(1.0)
    t0 = time.perf_counter()
    for p in files:
        os.rename(p, watched / p.name)
    deadline = time.time() + 600
    while len(os.listdir(dst)) < n and time.time() < deadline:
        time.sleep(0.05)
    elapsed = time.perf_counter() - t0
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait()
    return n / elapsed


# ----------------------------------------------------------------------------- measurements


def staged_service(
    root: Path, n: int, code: str | None = None, **dest: Any
) -> tuple[list[Path], subprocess.Popen[bytes]]:
    """``n`` files ready to drop, and a running service watching an empty inbox."""
    cfg = write_config(root, **dest)
    files = make_files(root / "stage", n)
    (root / "inbox").mkdir()
    proc = start_service(cfg, code=code)
    wait_ready(root / "journal.db")
    return files, proc


def throughput(root: Path, n: int, code: str | None = None, **dest: Any) -> tuple[float, float]:
    """files/s from the first drop to the last SUCCEEDED row; and the last file's latency."""
    rate, last, _ = burst(root, n, code, **dest)
    return rate, last


def burst(root: Path, n: int, code: str | None = None, **dest: Any) -> tuple[float, float, float]:
    """``throughput``, and the CPU seconds the service used in all (start-up included)."""
    files, proc = staged_service(root, n, code, **dest)
    t0 = time.time()
    for p in files:
        os.rename(p, root / "inbox" / p.name)
    t_last_drop = time.time()
    deadline = time.time() + 600
    while succeeded(root / "journal.db") < n and time.time() < deadline:
        time.sleep(0.05)
    cpu = stop(proc)
    times = finished_times(root / "journal.db")
    end = max(times.values())
    last_name = files[-1].name
    return n / (end - t0), times[last_name] - t_last_drop, cpu


def latency(root: Path, n: int, rate: float) -> tuple[float, float]:
    files, proc = staged_service(root, n)
    dropped: dict[str, float] = {}
    for p in files:
        dropped[p.name] = time.time()
        os.rename(p, root / "inbox" / p.name)
        time.sleep(1 / rate)
    deadline = time.time() + 60
    while succeeded(root / "journal.db") < n and time.time() < deadline:
        time.sleep(0.05)
    stop(proc)
    times = finished_times(root / "journal.db")
    lat = sorted((times[k] - dropped[k]) * 1000 for k in dropped)
    return statistics.median(lat), lat[int(len(lat) * 0.99) - 1]


def peak_rss_mib(root: Path, n: int, code: str | None = None) -> float:
    """Peak RSS of ``--once`` over ``n`` files waiting in the folder (``code``: a checkout of
    filedispatch to run instead of this one)."""
    cfg = write_config(root)
    make_files(root / "inbox", n)
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--once", "--log-level", "WARNING"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=code,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if succeeded(root / "journal.db") != n:
        print(f"  warning: only {succeeded(root / 'journal.db')} of {n} delivered")
    return usage.ru_maxrss / 1024


def make_waiting(folder: Path, n: int) -> list[Path]:
    """``n`` files that have been waiting a while: their mtime a minute back, so the default
    ``settle`` (1 s) has passed for all of them, as it has for a real backlog (files written
    just before the start would be held back by the gate, and the run would time the gate)."""
    paths = make_files(folder, n)
    old = time.time() - 60
    for p in paths:
        os.utime(p, (old, old))
    return paths


def once_backlog(root: Path, n: int, code: str | None = None) -> tuple[float, float, float, float]:
    """``--once`` over ``n`` files waiting, ``mode: move``, the default config otherwise (the
    API and console are off with ``--once``; INFO logging): seconds from the start of the
    process to the first file moved and to its exit, its peak RSS in MiB, and the CPU seconds
    (user + system) it used (``code``: a checkout of filedispatch to run instead of this one).
    """
    inbox, outbox = root / "inbox", root / "outbox"
    make_waiting(inbox, n)
    outbox.mkdir()
    cfg = root / "config.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": str(root / "journal.db"),
                "sources": [{"path": str(inbox)}],
                "rules": [{"name": "all", "glob": "*", "to": {"url": str(outbox), "mode": "move"}}],
            }
        )
    )
    env = dict(os.environ)
    if code is not None:
        env["PYTHONPATH"] = code
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--once"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
        cwd=code,
    )
    first = float("nan")
    while True:  # a cheap look: the folder's link count does not change, its size does
        if first != first and any(True for _ in os.scandir(outbox)):
            first = time.perf_counter() - t0
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.001 if first != first else 0.05)
    total = time.perf_counter() - t0
    if first != first:
        first = total
    proc.returncode = os.waitstatus_to_exitcode(status)
    if len(os.listdir(outbox)) != n or proc.returncode != 0:
        print(f"  warning: exit {proc.returncode}, {len(os.listdir(outbox))} of {n} moved")
    return first, total, usage.ru_maxrss / 1024, usage.ru_utime + usage.ru_stime


def baseline_rclone(root: Path, n: int) -> float | None:
    """Seconds of ``rclone move SRC DST`` over ``n`` files (local to local: renames). DST
    exists, as filedispatch's destination does: into a missing DST, rclone renames the
    whole folder at once (its server-side DirMove) and moves no file by itself."""
    if shutil.which("rclone") is None:
        return None
    make_waiting(root / "rc-src", n)
    (root / "rc-dst").mkdir()
    t0 = time.perf_counter()
    subprocess.run(
        ["rclone", "move", str(root / "rc-src"), str(root / "rc-dst")],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - t0


def python_start() -> float:
    """Seconds to start and end a bare interpreter (the floor of any start-up)."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "pass"], check=True)
    return time.perf_counter() - t0


def once(base: Path, n: int, rounds: int, before: str | None = None) -> None:
    """``--once`` over a backlog against a rename loop and ``rclone move`` of the same number
    of files, alternated; medians of ``rounds`` (with ``before``: that checkout too)."""
    runs: dict[str, list[float]] = {"rename": [], "rclone": [], "first": [], "total": []}
    runs |= {"python": [], "cpu": [], "before_first": [], "before_total": [], "before_cpu": []}
    for i in range(rounds):
        if before is not None:
            first, total, _, cpu = once_backlog(base / f"once-before-{i}", n, code=before)
            runs["before_first"].append(first)
            runs["before_total"].append(total)
            runs["before_cpu"].append(cpu)
        runs["rename"].append(n / baseline_rename(base / f"once-rn-{i}", n))
        rc = baseline_rclone(base / f"once-rc-{i}", n)
        if rc is not None:
            runs["rclone"].append(rc)
        first, total, _, cpu = once_backlog(base / f"once-fd-{i}", n)
        runs["first"].append(first)
        runs["total"].append(total)
        runs["cpu"].append(cpu)
        runs["python"].append(python_start())
    med = {k: statistics.median(v) for k, v in runs.items() if v}
    print(f"  (median of {rounds} alternated rounds; seconds, process start included)")
    print(f"  os.rename loop          {med['rename']:8.3f} s")
    if "rclone" in med:
        print(f"  rclone move             {med['rclone']:8.3f} s")
    else:
        print("  rclone move             (not installed: apt-get install rclone)")
    print(f"  filedispatch --once     {med['total']:8.3f} s   ({med['cpu']:.3f} s of CPU)")
    print(f"  ratio to os.rename      {med['total'] / med['rename']:8.2f}x   (target <= 3)")
    if "rclone" in med:
        print(f"  ratio to rclone move    {med['total'] / med['rclone']:8.2f}x   (target < 1)")
    print(
        f"  first file moved after  {med['first']:8.3f} s   (target < 0.3; a bare python "
        f"starts and ends in {med['python']:.3f} s)"
    )
    if before is not None:
        print(
            f"  {before}: --once {med['before_total']:.3f} s "
            f"({med['before_total'] / med['rename']:.2f}x os.rename; {med['before_cpu']:.3f} s "
            f"of CPU), first file moved after {med['before_first']:.3f} s"
        )


#: the bench's own patch of a copy of the package (bench only: no user option turns these off):
#: (file, text, replacement) that take out the identity comparisons around each delivery and
#: before each after-action; run with ``open_writers: ignore``, the copy has none of the gates.
#: Each text must be found exactly once, or the bench stops (the code moved: fix the patch).
NO_GATES_PATCH = (
    (  # every comparison of a version with what is at its name now (models.FileVersion)
        "models.py",
        "        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):\n",
        "        return True  # bench: no identity gate\n"
        "        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):\n",
    ),
    (  # the fstat after a copy or an upload has read the whole file
        "sourcefile.py",
        "    if identity(os.fstat(fd)) != identity(before):\n",
        "    if False:  # bench: no identity gate\n",
    ),
    (  # the lstat of a file renamed inline (mode: move), to catch a swap during the rename
        "processors/local.py",
        "            got = os.lstat(final)\n",
        "            return  # bench: no identity gate\n",
    ),
    (  # the lstat before an after-action (delete, done_dir)
        "dispatcher/after.py",
        "            st = _identity(path, source.follow_symlinks)\n",
        "            st = None  # type: ignore[assignment]  # bench: no identity gate\n",
    ),
)


def without_gates(dest: Path) -> str:
    """A copy of this checkout's package in ``dest`` with NO_GATES_PATCH applied, compiled as
    the original is (see installed_bytecode); returns the folder to run it from."""
    package = Path(__file__).resolve().parent.parent / "filedispatch"
    shutil.copytree(package, dest / "filedispatch", ignore=shutil.ignore_patterns("__pycache__"))
    for name, text, replacement in NO_GATES_PATCH:
        path = dest / "filedispatch" / name
        code = path.read_text()
        if code.count(text) != 1:
            raise SystemExit(f"bench: the no-gates patch no longer fits {name}: {text!r}")
        path.write_text(code.replace(text, replacement))
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(dest)], check=True)
    return str(dest)


def gates(base: Path, n: int, rounds: int, before: str | None) -> None:
    """The readiness and identity gates' cost: the same burst with ``open_writers: check``
    (the default), with ``ignore`` (the lease off) and with this code patched to have no
    gates at all (``ignore`` and NO_GATES_PATCH), in turns so the machine's load falls on
    all alike; with ``before``, also an older checkout run with its defaults (``--before
    PATH``). Each ratio is given two ways: of the medians, and the median of each round's
    own ratio (bursts of one round run back to back, under the same load)."""
    bare = without_gates(base / "no-gates")
    settings = ["check", "ignore", "none"] + (["before"] if before is not None else [])
    runs: dict[str, list[float]] = {k: [] for k in settings}
    cpu: dict[str, list[float]] = {k: [] for k in [*settings, "idle"]}
    for i in range(rounds):
        # the order turns each round, so no setting always follows the same one
        for gate in settings[i % len(settings) :] + settings[: i % len(settings)]:
            where = base / f"gate-{gate}-{i}"
            if gate in ("check", "ignore"):
                rate, _, used = burst(where, n, source={"open_writers": gate})
            elif gate == "none":
                rate, _, used = burst(where, n, code=bare, source={"open_writers": "ignore"})
            else:
                rate, _, used = burst(where, n, code=before)
            shutil.rmtree(where, ignore_errors=True)
            runs[gate].append(rate)
            cpu[gate].append(used)
        where = base / f"gate-idle-{i}"
        _, _, used = burst(where, 1)  # start-up and stop, one file
        shutil.rmtree(where, ignore_errors=True)
        cpu["idle"].append(used)
    idle = statistics.median(cpu["idle"])
    # CPU per file, start-up taken off: the machine's other load moves it less than files/s
    each = {k: [(c - idle) / n * 1e6 for c in v] for k, v in cpu.items() if k != "idle"}
    med = {k: statistics.median(v) for k, v in runs.items()}
    per = {k: statistics.median(v) for k, v in each.items()}
    print(f"  (median of {rounds} rounds, one burst of each setting a round; CPU per file")
    print(f"  without start-up: {idle:.2f} s for a start and stop with one file)")
    labels = {"check": "open_writers: check", "ignore": "open_writers: ignore"}
    labels |= {"none": "no gates (patched)", "before": f"{before}"}
    for k in settings:
        print(f"  {labels[k]:22s}{med[k]:10.0f} files/s  {per[k]:7.1f} us CPU/file")
    print("  ratio               files/s      by CPU    round by round: files/s  by CPU")
    for a, b, what in (
        ("check", "ignore", "the lease"),
        ("ignore", "none", "the identity checks"),
        ("check", "none", "all the gates"),
        ("check", "before", "against --before"),
    ):
        if b in med:
            rate = statistics.median(x / y for x, y in zip(runs[a], runs[b], strict=True))
            used = statistics.median(y / x for x, y in zip(each[a], each[b], strict=True))
            print(
                f"  {a + '/' + b:14s}{med[a] / med[b]:10.3f}  {per[b] / per[a]:10.3f}"
                f"   {rate:21.3f}  {used:6.3f}   ({what})"
            )
    print("  (target: all the gates >= 0.90, by CPU and by files/s)")


def memory(base: Path, n: int, before: str | None = None) -> None:
    print(f"== memory: {n} files waiting, --once")
    idle = peak_rss_mib(base / "e", 1)
    peak = peak_rss_mib(base / "f", n)
    print(f"  baseline (1 file)   {idle:7.1f} MiB")
    print(f"  peak RSS            {peak:7.1f} MiB   ratio {peak / idle:5.2f}   (target <= 128 MiB)")
    if before is not None:
        old = peak_rss_mib(base / "b", n, code=before)
        print(f"  {before}: peak RSS {old:7.1f} MiB")


def installed_bytecode(prefix: Path, before: str | None = None) -> None:
    """Run the service as an installed one does: from compiled bytecode (pip compiles a
    package as it installs it). Without this, a checkout under PYTHONDONTWRITEBYTECODE
    compiles the modules it imports (60 for `--once`) at every start, about 0.4 s of CPU
    that no installed service pays. ``before``: an older checkout, compiled alike."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = str(prefix)  # beside the bench's files, not the code
    packages = [Path(__file__).resolve().parent.parent / "filedispatch"]
    if before is not None:
        packages.append(Path(before).resolve() / "filedispatch")
    for package in packages:
        subprocess.run([sys.executable, "-m", "compileall", "-q", str(package)], check=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--trickle", type=int, default=200)
    parser.add_argument("--backlog", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="smaller sizes, for a smoke run")
    parser.add_argument(
        "--gate-rounds",
        type=int,
        default=15,
        help="bursts per setting in the gates section (runs of 5 or 7 rounds gave ratios "
        "from 0.82 to 0.93 on one quiet machine: the lease's share is near the noise)",
    )
    parser.add_argument("--once-rounds", type=int, default=5, help="rounds of the --once section")
    parser.add_argument(
        "--before",
        metavar="PATH",
        help="an older checkout of filedispatch, run beside this one in the gates, --once and "
        "memory sections",
    )
    parser.add_argument(
        "--only-gates", action="store_true", help="run only the gates section (with --files)"
    )
    parser.add_argument(
        "--only-once",
        action="store_true",
        help="run only the --once section (with --files, --backlog and --once-rounds)",
    )
    args = parser.parse_args()
    if args.quick:
        args.files, args.trickle, args.backlog = 2000, 60, 10_000
    base = Path(tempfile.mkdtemp(prefix="fd-bench-"))
    installed_bytecode(base / "pycache", args.before)
    try:
        if args.only_once:
            print(f"== --once: {args.files} x 4 KiB waiting, mode: move, default config")
            once(base / "o", args.files, args.once_rounds, args.before)
            memory(base / "m", args.backlog, args.before)
            return
        print(f"== gates: {args.files} x 4 KiB moved; the lease on and off, no gates at all")
        gates(base / "g", args.files, args.gate_rounds, args.before)
        if args.only_gates:
            return
        print(f"== throughput: {args.files} x 4 KiB, settle 0, move to a local folder")
        rename = baseline_rename(base / "a", args.files)
        shell = baseline_shell(base / "b", args.files)
        rate, last = throughput(base / "c", args.files)
        print(f"  os.rename baseline      {rename:10.0f} files/s")
        if shell is None:
            print(
                "  inotifywait|mv baseline  (inotifywait not installed: apt-get install "
                "inotify-tools)"
            )
        else:
            print(f"  inotifywait|mv baseline {shell:10.0f} files/s")
        print(f"  filedispatch            {rate:10.0f} files/s")
        print(f"  ratio to os.rename      {rate / rename:10.3f}   (target >= 0.15)")
        if shell:
            print(f"  ratio to inotifywait|mv {rate / shell:10.1f}   (target >= 10)")
        print(
            f"  last file of the burst  {last * 1000:10.0f} ms after the last drop (target <= 1000)"
        )

        print("== the same burst copied (mode: copy, the source kept; no target)")
        for fsync in (False, True):
            rate, last = throughput(base / f"copy-{fsync}", args.files, mode="copy", fsync=fsync)
            ms = last * 1000
            print(f"  fsync {str(fsync).lower():5s}  {rate:10.0f} files/s   last file {ms:6.0f} ms")

        print(f"== latency: {args.trickle} files at 20/s, settle 0")
        p50, p99 = latency(base / "d", args.trickle, 20.0)
        print(f"  p50 {p50:7.1f} ms   p99 {p99:7.1f} ms   (target p99 <= 100)")

        print(f"== --once: {args.files} x 4 KiB waiting, mode: move, default config")
        once(base / "o", args.files, args.once_rounds, args.before)
        memory(base / "m", args.backlog, args.before)
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
