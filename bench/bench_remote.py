"""Remote benchmarks (issue 3): HTTP and FTP throughput through filedispatch, each against the
same client library (and curl) sending the same file to the same server in the same run.
Prints figures and ratios; asserts nothing.

    python bench/bench_remote.py [--size-mib 1024] [--files 1000] [--quick]

Servers run in subprocesses of their own (an aiohttp receiver that discards what it reads,
pyftpdlib writing to a temporary folder), so client and server never share one interpreter.
filedispatch runs as ``python -m filedispatch --once``; its time per file is the journal's
duration_ms (one attempt: connect, send, answer), and its peak RSS comes from wait4().
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from filedispatch.processors.http import LIMIT_PER_HOST

FTP_USER, FTP_PASSWORD = "bench", "bench-pw"
MIB = 1024 * 1024


# ----------------------------------------------------------------------------- servers


def serve_http() -> None:
    from aiohttp import web

    async def sink(request: web.Request) -> web.Response:
        n = 0
        while chunk := await request.content.readany():
            n += len(chunk)
        return web.Response(status=201, text=str(n))

    async def main() -> None:
        app = web.Application(client_max_size=1 << 40)
        app.router.add_route("*", "/{tail:.*}", sink)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
        await site.start()
        assert site._server is not None
        print(site._server.sockets[0].getsockname()[1], flush=True)  # type: ignore[attr-defined]
        await asyncio.Event().wait()

    asyncio.run(main())


def serve_ftp(root: str) -> None:
    import logging

    from pyftpdlib.authorizers import DummyAuthorizer
    from pyftpdlib.handlers import FTPHandler
    from pyftpdlib.servers import FTPServer

    logging.getLogger("pyftpdlib").setLevel(logging.ERROR)
    authorizer = DummyAuthorizer()
    authorizer.add_user(FTP_USER, FTP_PASSWORD, root, perm="elradfmwMT")
    handler = type("H", (FTPHandler,), {"authorizer": authorizer})
    server = FTPServer(("127.0.0.1", 0), handler)
    server.max_cons = 512
    print(server.address[1], flush=True)
    server.serve_forever()


def start_server(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    return proc, int(proc.stdout.readline())


# ----------------------------------------------------------------------------- baselines


def in_child(code: str, lines: int = 1) -> Any:
    """Run a client snippet in a fresh interpreter; it prints the seconds it took (or, with
    ``lines``, that many figures: a list of them)."""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    figures = [float(x) for x in out.stdout.strip().splitlines()[-lines:]]
    return figures[0] if lines == 1 else figures


def aiohttp_baseline(url: str, path: Path, mode: str) -> float:
    body = "open(path, 'rb')" if mode == "file" else "chunks()"
    return in_child(f"""
import asyncio, time, aiohttp
path = {str(path)!r}
async def chunks():
    with open(path, 'rb') as f:
        while data := f.read(256 * 1024):
            yield data
async def main():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as s:
        t0 = time.perf_counter()
        headers = {{'Content-Length': str({path.stat().st_size})}}
        async with s.put({url!r}, data={body}, headers=headers) as r:
            assert r.status == 201, r.status
            await r.read()
        print(time.perf_counter() - t0)
asyncio.run(main())
""")


def curl_baseline(url: str, path: Path) -> float | None:
    if shutil.which("curl") is None:
        return None
    out = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{time_total}", "-T", str(path), url],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(out.stdout)


def curl_parallel_baseline(url: str, folder: Path, parallel: int) -> dict[str, float] | None:
    """``curl --parallel --parallel-max N`` uploading every file of ``folder`` (PUT, keep-alive
    connections reused by curl itself): its wall seconds and CPU seconds (user + system)."""
    if shutil.which("curl") is None:
        return None
    names = sorted(os.listdir(folder))
    config = folder.parent / "curl-parallel.cfg"
    config.write_text(
        "".join(
            f'upload-file = "{folder / name}"\nurl = "{url}/{name}"\noutput = "/dev/null"\n'
            for name in names
        )
    )
    quiet = ["-sS", "--no-progress-meter", "--fail"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        ["curl", *quiet, "--parallel", "--parallel-max", str(parallel), "-K", str(config)]
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        print(f"  warning: curl --parallel exit {os.waitstatus_to_exitcode(status)}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "n": len(names)}


def aiohttp_parallel_baseline(url: str, folder: Path, parallel: int) -> dict[str, float]:
    """aiohttp alone, ``parallel`` tasks over one session, each file read whole and PUT: the
    floor of the client library filedispatch uses (wall and CPU seconds)."""
    out = in_child(
        f"""
import asyncio, os, resource, time, aiohttp
folder = {str(folder)!r}
names = sorted(os.listdir(folder))
async def main():
    todo = list(names)
    connector = aiohttp.TCPConnector(limit_per_host={parallel})
    async with aiohttp.ClientSession(connector=connector) as s:
        async def worker():
            while todo:
                name = todo.pop()
                with open(os.path.join(folder, name), 'rb') as f:
                    data = f.read()
                async with s.put({url!r} + '/' + name, data=data) as r:
                    assert r.status == 201, r.status
                    await r.read()
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range({parallel})))
        wall = time.perf_counter() - t0
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        print(r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime)
        print(wall)
asyncio.run(main())
""",
        lines=2,
    )
    return {"wall": out[1], "cpu": out[0], "n": len(os.listdir(folder))}


def aioftp_baseline(port: int, path: Path, remote: str) -> float:
    return in_child(f"""
import asyncio, time, aioftp
async def main():
    t0 = time.perf_counter()
    async with aioftp.Client.context('127.0.0.1', {port}, {FTP_USER!r}, {FTP_PASSWORD!r}) as c:
        await c.upload({str(path)!r}, {remote!r}, write_into=True)
    print(time.perf_counter() - t0)
asyncio.run(main())
""")


def aioftp_small_baseline(port: int, folder: Path, fresh: bool) -> float:
    """Seconds for aioftp to upload every file of ``folder``, reusing one login or not."""
    return in_child(f"""
import asyncio, os, time, aioftp
folder = {str(folder)!r}
names = sorted(os.listdir(folder))
async def login():
    c = aioftp.Client()
    await c.connect('127.0.0.1', {port})
    await c.login({FTP_USER!r}, {FTP_PASSWORD!r})
    return c
async def main():
    await (await login()).make_directory('/small-base')
    t0 = time.perf_counter()
    c = None
    for name in names:
        if c is None:
            c = await login()
        await c.upload(os.path.join(folder, name), '/small-base/' + name, write_into=True)
        if {fresh!r}:
            await c.quit()
            c = None
    print(time.perf_counter() - t0)
asyncio.run(main())
""")


# ----------------------------------------------------------------------------- filedispatch


def run_filedispatch(root: Path, inbox: Path, dest: dict[str, Any]) -> dict[str, Any]:
    """``--once`` over ``inbox``; the journal's timings and the process's peak RSS."""
    db = root / f"journal-{time.monotonic_ns()}.db"
    cfg = root / "bench.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "database": str(db),
                "sources": [{"path": str(inbox), "settle": 0, "rescan": 0}],
                "rules": [{"name": "remote", "glob": "*", "to": dest}],
                "api": {"enabled": False},
                "monitor": {"enabled": False},
            }
        )
    )
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--once", "--log-level", "ERROR"],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    cpu = usage.ru_utime + usage.ru_stime
    conn = sqlite3.connect(db)
    try:
        rows = conn.execute(
            "SELECT status, started, finished, duration_ms FROM dispatches"
        ).fetchall()
    finally:
        conn.close()
    ok = [r for r in rows if r[0] == "SUCCEEDED"]
    if code != 0 or len(ok) != len(rows):
        print(f"  warning: exit {code}, {len(ok)} of {len(rows)} delivered")
    return {
        "wall": wall,
        "span": max(r[2] for r in ok) - min(r[1] for r in ok) if ok else float("nan"),
        "attempt": sum(r[3] for r in ok) / 1000 if ok else float("nan"),
        "rss_mib": usage.ru_maxrss / 1024,
        "cpu": cpu,
        "n": len(ok),
    }


def make_big(path: Path, size: int) -> None:
    block = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)


def make_small(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"s{i:05d}.dat").write_bytes(os.urandom(4096))


def mbps(size: int, seconds: float) -> float:
    return size / MIB / seconds


def best(repeat: int, run: Any, key: str | None = None) -> Any:
    """The fastest of ``repeat`` runs (the machine is shared: the best run is the least
    disturbed); for filedispatch runs, with the highest peak RSS of them all."""
    results = [run(i) for i in range(repeat)]
    if key is None:
        return min(results)
    fastest = dict(min(results, key=lambda r: r[key]))
    fastest["rss_mib"] = max(r["rss_mib"] for r in results)
    return fastest


def http_small(root: Path, small_in: Path, url: str, rep: int) -> None:
    """filedispatch, ``curl --parallel`` and aiohttp alone with the same parallelism (the
    default 16 workers, under the session's 32 connections per host), alternating, on the
    same receiver. CPU per file: filedispatch's whole process (start-up included; a run over
    an empty folder shows the start-up apart), curl's, aiohttp's sending loop."""
    parallel = min(16, LIMIT_PER_HOST)
    empty = root / "empty"
    empty.mkdir(exist_ok=True)
    fds: list[dict[str, Any]] = []
    curls: list[dict[str, float]] = []
    aios: list[dict[str, float]] = []
    for _ in range(rep):
        curl = curl_parallel_baseline(f"{url}/curl", small_in, parallel)
        if curl is not None:
            curls.append(curl)
        fds.append(run_filedispatch(root, small_in, {"url": f"{url}/small/{{name}}"}))
        aios.append(aiohttp_parallel_baseline(f"{url}/aio", small_in, parallel))
    idle = run_filedispatch(root, empty, {"url": f"{url}/small/{{name}}"})["cpu"]
    fd = min(fds, key=lambda r: r["span"])
    rate = fd["n"] / fd["span"]
    cpu_fd = min(r["cpu"] for r in fds) / fd["n"] * 1e6
    aio = min(aios, key=lambda r: r["wall"])
    arate = aio["n"] / aio["wall"]
    cpu_aio = min(r["cpu"] for r in aios) / aio["n"] * 1e6
    ratios = f"ratio {rate / arate:.2f} of aiohttp alone"
    if curls:
        curl = min(curls, key=lambda r: r["wall"])
        crate = curl["n"] / curl["wall"]
        cpu_curl = min(r["cpu"] for r in curls) / curl["n"] * 1e6
        print(f"  HTTP curl --parallel-max {parallel}   {crate:6.0f} files/s", end="")
        print(f"; {cpu_curl:.0f} us CPU/file")
        ratios = f"ratio {rate / crate:.2f} of curl --parallel, " + ratios
    print(f"  HTTP aiohttp alone, {parallel} tasks {arate:6.0f} files/s", end="")
    print(f"; {cpu_aio:.0f} us CPU/file")
    print(
        f"  HTTP filedispatch              {rate:6.0f} files/s; {cpu_fd:.0f} us CPU/file "
        f"({idle * 1e6 / fd['n']:.0f} of them start-up)  {ratios}"
        f"; peak RSS {fd['rss_mib']:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the best counts")
    parser.add_argument("--ftp-pool", type=int, default=None, help="FTP pool_size (default: 4)")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 300 files, one run each")
    parser.add_argument(
        "--http-small", action="store_true", help="only HTTP small files, against curl --parallel"
    )
    parser.add_argument("--serve-http", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-ftp", metavar="ROOT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_http:
        return serve_http()
    if args.serve_ftp:
        return serve_ftp(args.serve_ftp)
    if args.quick:
        args.size_mib, args.files, args.repeat = 128, 300, 1
    size, rep = args.size_mib * MIB, args.repeat
    if args.http_small:
        with tempfile.TemporaryDirectory(prefix="fd-bench-remote-") as tmp:
            make_small(Path(tmp) / "small", args.files)
            http, http_port = start_server("--serve-http")
            try:
                print(f"{args.files} files of 4 KiB, loopback, {os.cpu_count()} CPUs:")
                http_small(Path(tmp), Path(tmp) / "small", f"http://127.0.0.1:{http_port}", rep)
            finally:
                http.terminate()
                http.wait(10)
        return
    with tempfile.TemporaryDirectory(prefix="fd-bench-remote-") as tmp:
        root = Path(tmp)
        big_in, small_in, ftp_root = root / "big", root / "small", root / "ftproot"
        big_in.mkdir()
        ftp_root.mkdir()
        big = big_in / "big.bin"
        make_big(big, size)
        make_small(small_in, args.files)
        http, http_port = start_server("--serve-http")
        ftp, ftp_port = start_server("--serve-ftp", str(ftp_root))
        url = f"http://127.0.0.1:{http_port}"
        ftp_url = f"ftp://{FTP_USER}:{FTP_PASSWORD}@127.0.0.1:{ftp_port}"

        def ftp_big(i: int) -> dict[str, Any]:
            result = run_filedispatch(root, big_in, {"url": f"{ftp_url}/fd{i}/"})
            shutil.rmtree(ftp_root / f"fd{i}")
            return result

        def ftp_base(i: int) -> float:
            seconds = aioftp_baseline(ftp_port, big, "/base.bin")
            (ftp_root / "base.bin").unlink()
            return seconds

        try:
            print(
                f"one file of {args.size_mib} MiB, loopback, {os.cpu_count()} CPUs, "
                f"best of {rep} run(s)"
            )
            print("HTTP (aiohttp receiver):")
            base_file = best(rep, lambda i: aiohttp_baseline(f"{url}/base", big, "file"))
            base_chunks = best(rep, lambda i: aiohttp_baseline(f"{url}/base", big, "chunks"))
            curl = best(rep, lambda i: curl_baseline(f"{url}/curl", big) or 0.0) or None
            dest = {"url": f"{url}/fd/{{name}}", "method": "PUT"}
            fd = best(rep, lambda i: run_filedispatch(root, big_in, dest), "attempt")
            top = min(base_file, base_chunks)
            print(f"  aiohttp, open file       {mbps(size, base_file):8.0f} MB/s")
            print(f"  aiohttp, 256 KiB chunks  {mbps(size, base_chunks):8.0f} MB/s")
            if curl is not None:
                print(f"  curl -T                  {mbps(size, curl):8.0f} MB/s")
            print(
                f"  filedispatch             {mbps(size, fd['attempt']):8.0f} MB/s"
                f"  ratio {top / fd['attempt']:.2f} of the best aiohttp"
                + (f", {curl / fd['attempt']:.2f} of curl" if curl is not None else "")
                + f"; peak RSS {fd['rss_mib']:.0f} MiB; whole run {fd['wall']:.1f}s"
            )
            print("FTP (pyftpdlib):")
            base_ftp = best(rep, ftp_base)
            fd = best(rep, ftp_big, "attempt")
            print(f"  aioftp upload()          {mbps(size, base_ftp):8.0f} MB/s")
            print(
                f"  filedispatch             {mbps(size, fd['attempt']):8.0f} MB/s"
                f"  ratio {base_ftp / fd['attempt']:.2f} of aioftp"
                f"; peak RSS {fd['rss_mib']:.0f} MiB; whole run {fd['wall']:.1f}s"
            )
            big.unlink()
            n = args.files
            print(f"{n} files of 4 KiB:")
            fresh = n / best(rep, lambda i: aioftp_small_baseline(ftp_port, small_in, True))
            reuse = n / best(rep, lambda i: aioftp_small_baseline(ftp_port, small_in, False))
            pool = {"pool_size": args.ftp_pool} if args.ftp_pool else {}
            fd = best(
                rep,
                lambda i: run_filedispatch(root, small_in, {"url": f"{ftp_url}/sm{i}/", **pool}),
                "span",
            )
            rate = fd["n"] / fd["span"]
            print(f"  FTP aioftp, a login per file   {fresh:7.0f} files/s")
            print(f"  FTP aioftp, one login          {reuse:7.0f} files/s")
            print(
                f"  FTP filedispatch (pool of {args.ftp_pool or 4})   {rate:7.0f} files/s"
                f"  ratio {rate / fresh:.2f} of a login per file, {rate / reuse:.2f} of one"
                f"; peak RSS {fd['rss_mib']:.0f} MiB"
            )
            http_small(root, small_in, url, rep)
        finally:
            for proc in (http, ftp):
                proc.terminate()
                proc.wait(10)


if __name__ == "__main__":
    main()
