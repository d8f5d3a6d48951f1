"""S3 benchmark (issue 13): one large file and many 4 KiB files through filedispatch to moto's
S3 server on loopback, against aiobotocore's own put_object and multipart loop sending the
same files to the same server in the same run. Prints figures and ratios; asserts nothing.

    python bench/bench_s3.py [--size-mib 1024] [--files 1000] [--quick]

moto runs in a subprocess of its own; each baseline runs in a fresh interpreter with the same
part size (8 MiB), parts in flight (4) and, for small files, requests in flight (16, the
service's default workers) as filedispatch. filedispatch's time is the journal's: duration_ms
of the one attempt for the large file, first start to last finish for the small ones.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench_remote import in_child, make_big, make_small, mbps, run_filedispatch

MIB = 1024 * 1024
BUCKET, REGION, KEY_ID, SECRET = "bench", "us-east-1", "bench-key-id", "bench-secret-key"
PART, PARTS_IN_FLIGHT, WORKERS = 8 * MIB, 4, 16

CLIENT = f"""
import asyncio, os, sys, time
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

def client(endpoint):
    config = AioConfig(
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return get_session().create_client(
        "s3", endpoint_url=endpoint, region_name={REGION!r}, aws_access_key_id={KEY_ID!r},
        aws_secret_access_key={SECRET!r}, config=config,
    )
"""

MULTIPART = (
    CLIENT
    + f"""
async def main(endpoint, path, key):
    async with client(endpoint) as s3:
        t0 = time.perf_counter()
        fd, size = os.open(path, os.O_RDONLY), os.path.getsize(path)
        upload = await s3.create_multipart_upload(Bucket={BUCKET!r}, Key=key)
        ids = dict(Bucket={BUCKET!r}, Key=key, UploadId=upload["UploadId"])
        room, parts = asyncio.Semaphore({PARTS_IN_FLIGHT}), []

        async def send(n, data):
            try:
                answer = await s3.upload_part(PartNumber=n, Body=data, **ids)
                parts.append(dict(PartNumber=n, ETag=answer["ETag"]))
            finally:
                room.release()

        async with asyncio.TaskGroup() as group:
            for n, at in enumerate(range(0, size, {PART}), 1):
                await room.acquire()
                data = await asyncio.to_thread(os.pread, fd, {PART}, at)
                group.create_task(send(n, data))
        parts.sort(key=lambda p: p["PartNumber"])
        await s3.complete_multipart_upload(MultipartUpload=dict(Parts=parts), **ids)
        print(time.perf_counter() - t0)

asyncio.run(main(*sys.argv[1:]))
"""
)

PUTS = (
    CLIENT
    + f"""
async def main(endpoint, folder, prefix):
    names = sorted(os.listdir(folder))
    async with client(endpoint) as s3:
        t0 = time.perf_counter()
        room = asyncio.Semaphore({WORKERS})

        async def put(name):
            async with room:
                with open(os.path.join(folder, name), "rb") as f:
                    body = f.read()
                await s3.put_object(Bucket={BUCKET!r}, Key=prefix + name, Body=body)

        await asyncio.gather(*(put(n) for n in names))
        print(time.perf_counter() - t0)

asyncio.run(main(*sys.argv[1:]))
"""
)


def paired(
    repeat: int, base: Callable[[], float], ours: Callable[[], dict[str, Any]], key: str
) -> tuple[float, dict[str, Any]]:
    """The best of ``repeat`` runs of each, taken in turns (base, ours, base, ...) so a
    neighbour's load on the shared machine falls on both alike; ours with its highest RSS."""
    bases, runs = [], []
    for _ in range(repeat):
        bases.append(base())
        runs.append(ours())
    fastest = dict(min(runs, key=lambda r: r[key]))
    fastest["rss_mib"] = max(r["rss_mib"] for r in runs)
    return min(bases), fastest


def baseline(code: str, *args: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


def start_moto(log: Path) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(sys.executable).parent / "moto_server"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=out, stderr=out
        )
    deadline = time.monotonic() + 30
    while socket.socket().connect_ex(("127.0.0.1", port)) != 0:
        if time.monotonic() > deadline:
            raise SystemExit("moto_server did not start")
        time.sleep(0.05)
    endpoint = f"http://127.0.0.1:{port}"
    in_child(
        CLIENT
        + f"""
async def main():
    async with client({endpoint!r}) as s3:
        await s3.create_bucket(Bucket={BUCKET!r})
asyncio.run(main()); print(0)
"""
    )
    return proc, endpoint


def empty_bucket(endpoint: str) -> None:
    """moto holds every object in memory: drop them between runs."""
    in_child(
        CLIENT
        + f"""
async def main():
    async with client({endpoint!r}) as s3:
        async for page in s3.get_paginator("list_objects_v2").paginate(Bucket={BUCKET!r}):
            for item in page.get("Contents", []):
                await s3.delete_object(Bucket={BUCKET!r}, Key=item["Key"])
asyncio.run(main()); print(0)
"""
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the best counts")
    parser.add_argument("--quick", action="store_true", help="128 MiB, 300 files, one run each")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.files, args.repeat = 128, 300, 1
    size, rep = args.size_mib * MIB, args.repeat
    with tempfile.TemporaryDirectory(prefix="fd-bench-s3-") as tmp:
        root = Path(tmp)
        big_in, small_in = root / "big", root / "small"
        big_in.mkdir()
        big = big_in / "big.bin"
        make_big(big, size)
        make_small(small_in, args.files)
        moto, endpoint = start_moto(root / "moto.log")

        def dest(prefix: str) -> dict[str, Any]:
            return {
                "url": f"s3://{BUCKET}/{prefix}",
                "endpoint_url": endpoint,
                "region": REGION,
                "access_key_id": KEY_ID,
                "secret_access_key": SECRET,
                "part_size": PART,
                "part_concurrency": PARTS_IN_FLIGHT,
                "on_conflict": "overwrite",  # as the baseline: no conditional write
                "verify": "none",
            }

        def fd_run(folder: Path, prefix: str) -> dict[str, Any]:
            result = run_filedispatch(root, folder, dest(prefix))
            empty_bucket(endpoint)
            return result

        def base_run(code: str, *argv: str) -> float:
            seconds = baseline(code, endpoint, *argv)
            empty_bucket(endpoint)
            return seconds

        try:
            print(
                f"moto S3 server on loopback, {os.cpu_count()} CPUs, best of {rep} run(s); "
                f"parts of {PART // MIB} MiB, {PARTS_IN_FLIGHT} in flight"
            )
            print(f"one file of {args.size_mib} MiB:")
            base, fd = paired(
                rep,
                lambda: base_run(MULTIPART, str(big), "base.bin"),
                lambda: fd_run(big_in, "fd/"),
                "attempt",
            )
            print(f"  aiobotocore multipart loop  {mbps(size, base):8.0f} MB/s")
            print(
                f"  filedispatch                {mbps(size, fd['attempt']):8.0f} MB/s"
                f"  ratio {base / fd['attempt']:.2f} of aiobotocore"
                f"; peak RSS {fd['rss_mib']:.0f} MiB; whole run {fd['wall']:.1f}s"
            )
            big.unlink()
            n = args.files
            print(f"{n} files of 4 KiB ({WORKERS} at once):")
            seconds, fd = paired(
                rep,
                lambda: base_run(PUTS, str(small_in), "base/"),
                lambda: fd_run(small_in, "small/"),
                "span",
            )
            base = n / seconds
            rate = fd["n"] / fd["span"]
            print(f"  aiobotocore put_object      {base:8.0f} files/s")
            print(
                f"  filedispatch                {rate:8.0f} files/s"
                f"  ratio {rate / base:.2f} of aiobotocore; peak RSS {fd['rss_mib']:.0f} MiB"
            )
        finally:
            moto.terminate()
            moto.wait(30)


if __name__ == "__main__":
    main()
