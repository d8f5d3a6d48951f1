"""Hostile files tried / mishandled: the figure in docs/security.md ("Measured").

Runs the real service (an HTTP destination on loopback that refuses each file's first upload,
so there is a retry wait to swap things in) on a source holding hostile entries: links out of
the source, links and folders swapped in during the retry wait, FIFOs (present and swapped
in), a socket, device nodes (as root), a linked folder in a recursive source, names with odd
bytes, a file written slowly. An entry is mishandled when bytes from outside the source reach
the receiver, when the service stops answering ``/health`` or ignores SIGTERM, or when a
half-written file (or a non-regular file's bytes) is delivered.

    python bench/hostile_files.py [--keep]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from aiohttp import web


@dataclass
class Entry:
    """One hostile entry: how it is made, what may never arrive, what must arrive."""

    name: str
    forbidden: set[str] = field(default_factory=set)  #: sha256 that must never be received
    wanted: str | None = None  #: sha256 that must be received (a legitimate file)
    on_first_upload: Callable[[], None] | None = None  #: the swap, during the retry wait


class Receiver:
    """Answers 503 to each path's first upload (after running its swap), then 201."""

    def __init__(self) -> None:
        self.hits: dict[str, int] = {}
        self.got: list[tuple[str, str, int]] = []  #: path, sha256, size
        self.swaps: dict[str, Callable[[], None]] = {}
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, handle_signals=False)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.ready.set()
        self.loop.run_forever()

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        n = self.hits[request.path] = self.hits.get(request.path, 0) + 1
        if n == 1:
            swap = self.swaps.get(request.path.rsplit("/", 1)[-1])
            if swap is not None:
                swap()
            return web.Response(status=503, text="later")
        self.got.append((request.path, hashlib.sha256(body).hexdigest(), len(body)))
        return web.Response(status=201, text="ok")

    def close(self) -> None:
        try:
            asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        except Exception:  # closing a measuring tool: nothing more to say
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def twin(outside: Path, like: Path, tag: str) -> str:
    """A file outside the source with ``like``'s size and mtime; its sha256."""
    size = like.stat().st_size
    data = (f"SECRET {tag} ".encode() * size)[:size]
    path = outside / f"twin-{tag}"
    path.write_bytes(data)
    st = like.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return sha(data)


def old(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def build(root: Path, follow: bool) -> list[Entry]:
    """The hostile entries, made in ``root/in`` (and ``root/outside``)."""
    inbox, outside = root / "in", root / "outside"
    inbox.mkdir(parents=True)
    outside.mkdir()
    secret = outside / "secret.key"
    secret.write_bytes(b"-----BEGIN PRIVATE KEY----- not yours\n")
    entries: list[Entry] = []

    os.symlink(secret, inbox / "link-out.key")
    entries.append(Entry("link-out.key", {sha(secret.read_bytes())}))

    os.symlink("../outside/secret.key", inbox / "link-out-relative.key")
    entries.append(Entry("link-out-relative.key", {sha(secret.read_bytes())}))

    (outside / "dir").mkdir()
    old(outside / "dir" / "there-at-start.txt", b"outside, there at start")
    os.symlink(outside / "dir", inbox / "extdir")
    entries.append(Entry("extdir", {sha(b"outside, there at start"), sha(b"outside, later")}))

    r1 = old(inbox / "swap-link.txt", b"planned bytes of swap-link.txt\n")
    forbidden = twin(outside, r1, "1")

    def swap_link() -> None:
        os.symlink(outside / "twin-1", inbox / ".l")
        os.rename(inbox / ".l", inbox / "swap-link.txt")

    entries.append(Entry("swap-link.txt", {forbidden}, None, swap_link))

    r2 = old(inbox / "sub" / "swap-folder.txt", b"planned bytes in a folder\n")
    (outside / "fake-sub").mkdir()
    data = (b"SECRET folder " * 10)[: r2.stat().st_size]
    fake = outside / "fake-sub" / "swap-folder.txt"
    fake.write_bytes(data)
    os.utime(fake, ns=(r2.stat().st_atime_ns, r2.stat().st_mtime_ns))

    def swap_folder() -> None:
        os.rename(inbox / "sub", root / "sub-moved-away")
        os.symlink(outside / "fake-sub", inbox / "sub")

    entries.append(Entry("swap-folder.txt", {sha(data)}, None, swap_folder))

    os.mkfifo(inbox / "fifo.bin")
    entries.append(Entry("fifo.bin"))

    old(inbox / "swap-fifo.bin", b"a planned file that becomes a FIFO")

    def swap_fifo() -> None:
        os.mkfifo(inbox / ".f")
        os.rename(inbox / ".f", inbox / "swap-fifo.bin")

    entries.append(Entry("swap-fifo.bin", set(), None, swap_fifo))

    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(inbox / "sock"))  # kept bound for the run (closed with the process)
    entries.append(Entry("sock"))
    _keep.append(sock)

    if os.geteuid() == 0:
        os.mknod(inbox / "random-dev", stat.S_IFCHR | 0o600, os.makedev(1, 8))
        entries.append(Entry("random-dev"))
        os.mknod(inbox / "zero-dev", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        entries.append(Entry("zero-dev"))

    for tag, name in (
        ("newline", "line\nbreak.txt"),
        ("bidi", "invoice\u202etxt.exe"),
        ("dash", "-rf.txt"),
        ("long", "L" * 250 + ".txt"),
        ("spaces", "  spaced  .txt"),
    ):
        data = f"odd name {tag}".encode()
        old(inbox / name, data)
        entries.append(Entry(name, set(), sha(data)))
    bad = os.fsencode(str(inbox)) + b"/bad-\xff-utf8.txt"
    with open(bad, "wb") as fh:
        fh.write(b"not utf-8 name")
    entries.append(Entry("bad-\udcff-utf8.txt"))

    if follow:
        old(inbox / ".store" / "target.bin", b"a link inside the source")
        os.symlink(".store/target.bin", inbox / "link-in.bin")
        entries.append(Entry("link-in.bin", set(), sha(b"a link inside the source")))
    return entries


_keep: list[socket.socket] = []


def slow_writer(inbox: Path, done: threading.Event, half: threading.Event) -> tuple[str, str]:
    """Writes 110,000 bytes, pauses 2.6 s (past settle), writes 110,000 more; (half, whole)."""
    first, second = os.urandom(110_000), os.urandom(110_000)

    def run() -> None:
        with open(inbox / "slow.bin", "wb") as fh:
            fh.write(first)
            fh.flush()
            half.set()
            time.sleep(2.6)  # the scenario itself: a writer that pauses
            fh.write(second)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    return sha(first), sha(first + second)


def health(port: int) -> float | None:
    """Seconds /health took to answer 200, or None."""
    t0 = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as resp:
            return time.monotonic() - t0 if resp.status == 200 else None
    except OSError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run(root: Path, follow: bool) -> tuple[int, list[str]]:
    """Tries one service; returns (entries tried, what was mishandled)."""
    entries = build(root, follow)
    rx = Receiver()
    for e in entries:
        if e.on_first_upload is not None:
            rx.swaps[e.name.rsplit("/", 1)[-1]] = e.on_first_upload
    port = free_port()
    cfg = {
        "database": str(root / "journal.db"),
        "sources": [
            {
                "path": str(root / "in"),
                "recursive": True,
                "settle": 0.5,
                "follow_symlinks": follow,
                "ignore_defaults": False,
                "ignore": [".l", ".f", ".store"],
            }
        ],
        "rules": [
            {
                "name": "all",
                "glob": "**",
                "to": {
                    "url": f"http://127.0.0.1:{rx.port}/up/{{relpath}}",
                    "retry": {"attempts": 4, "delay": 0.3, "jitter": False},
                },
            }
        ],
        "api": {"enabled": True, "port": port},
        "monitor": {"enabled": False},
    }
    (root / "c.yml").write_text(yaml.safe_dump(cfg))
    log = open(root / "service.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(root / "c.yml")],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    bad: list[str] = []
    try:
        deadline = time.monotonic() + 30
        while health(port) is None:
            if time.monotonic() > deadline or proc.poll() is not None:
                return len(entries) + 1, ["the service did not start"]
            time.sleep(0.1)
        done, half = threading.Event(), threading.Event()
        half_sha, whole_sha = slow_writer(root / "in", done, half)
        (root / "outside" / "dir" / "later.txt").write_bytes(b"outside, later")
        slowest = 0.0
        settled = time.monotonic() + 60
        while time.monotonic() < settled:
            took = health(port)
            if took is None:
                bad.append("/health stopped answering")
                break
            slowest = max(slowest, took)
            if done.is_set() and _quiet(root / "journal.db"):
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            bad.append("SIGTERM ignored for 30 s")
            proc.kill()
        got = {h for _, h, _ in rx.got}
        for e in entries:
            if e.forbidden & got:
                bad.append(f"{e.name!r}: bytes from outside the source were sent")
            if e.wanted is not None and e.wanted not in got and not _failed_alone(root, e):
                bad.append(f"{e.name!r}: neither delivered nor failed with a reason")
        if half_sha in got:
            bad.append("slow.bin: the half-written file was delivered")
        if whole_sha not in got:
            bad.append("slow.bin: the whole file never arrived")
        special = [p for p, _, _ in rx.got if any(n in p for n in ("fifo", "sock", "-dev"))]
        bad += [f"{p}: a special file's bytes were sent" for p in special]
        print(f"  follow_symlinks {str(follow).lower()}: slowest /health {slowest * 1000:.0f} ms")
        return len(entries) + 1, bad
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
        rx.close()


def _rows(db: Path) -> list[tuple[str, str, str | None]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        return list(conn.execute("SELECT relpath, status, reason FROM dispatches"))
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def _quiet(db: Path) -> bool:
    """Every row final, the slow writer's file among them."""
    rows = _rows(db)
    return any(rel == "slow.bin" for rel, _, _ in rows) and all(
        s in ("SUCCEEDED", "FAILED") for _, s, _ in rows
    )


def _failed_alone(root: Path, e: Entry) -> bool:
    return any(
        rel.endswith(e.name) and s == "FAILED" and reason
        for rel, s, reason in _rows(root / "journal.db")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="fd-hostile-"))
    tried, mishandled = 0, []
    try:
        for follow in (False, True):
            n, bad = run(base / f"follow-{follow}", follow)
            tried += n
            mishandled += bad
        print(f"hostile files tried: {tried}; mishandled: {len(mishandled)}")
        for line in mishandled:
            print(f"  - {line}")
    finally:
        if args.keep:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 1 if mishandled else 0


if __name__ == "__main__":
    raise SystemExit(main())
