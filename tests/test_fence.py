"""The fence of a delivery (``StepContext.fence``, issue 12): a node of several that may have
lost its lease must call a delivery off before its result becomes visible, because another
node may be delivering the same file.

Each destination kind, on a real server on loopback, delivers one file while counting its
fence's calls; then, for every one of those calls in turn, a second file whose fence fails
at that call. Whichever call fails, the last one before the delivery becomes visible
included, the second file must not be at its final name, no temporary or partial copy may be
left, and the delivery raises LeaseLostError.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config
from filedispatch.errors import LeaseLostError
from filedispatch.models import FileVersion, Outcome
from filedispatch.processors import Registry, StepContext

from .servers import HttpReceiver, old_file, remote_config

#: bytes of each file: several chunks for the streaming kinds, several parts for S3
SIZE = 11 * 1024 * 1024


@dataclass
class Destination:
    """A destination of one kind: its config mapping and what it holds now."""

    step: dict[str, Any]
    holds: Callable[[], dict[str, str]]  #: name -> SHA-256 of each complete thing held
    stop: Callable[[], None]
    #: a kind that puts the bytes under a temporary name first: the largest file there now,
    #: in bytes (its fence must be asked once more after the whole copy is there)
    staged: Callable[[], int] | None = None


def _folder(root: Path) -> Callable[[], dict[str, str]]:
    def holds() -> dict[str, str]:
        if not root.exists():
            return {}
        return {
            p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*")
            if p.is_file()
        }

    return holds


def _largest(root: Path) -> Callable[[], int]:
    def largest() -> int:
        sizes = [p.stat().st_size for p in root.rglob("*") if p.is_file()]
        return max(sizes, default=0)

    return largest


@pytest.fixture(params=["local", "http", "ftp", "sftp", "s3"])
def destination(request: Any, tmp_path: Path) -> Iterator[Destination]:
    kind = request.param
    if kind == "local":
        out = tmp_path / "out"
        yield Destination({"url": out.as_uri()}, _folder(out), lambda: None, _largest(out))
    elif kind == "http":
        receiver = HttpReceiver()

        def received() -> dict[str, str]:
            return {r.path.rsplit("/", 1)[-1]: r.sha256 for r in receiver.received}

        yield Destination(
            {"url": f"{receiver.url}/up/{{name}}", "method": "PUT"}, received, receiver.close
        )
    elif kind == "ftp":
        from .servers import FtpServer

        ftp = FtpServer(tmp_path / "ftproot")
        root = tmp_path / "ftproot" / "in"
        yield Destination({"url": ftp.url("/in/")}, _folder(root), ftp.stop, _largest(root))
    elif kind == "sftp":
        from .servers import SftpServer

        sftp = SftpServer(tmp_path / "sftproot", tmp_path / "keys")
        step = {
            "url": sftp.url("/in/"),
            "key_file": str(sftp.key_file),
            "known_hosts": str(sftp.known_hosts),
        }
        root = tmp_path / "sftproot" / "in"
        yield Destination(step, _folder(root), sftp.close, _largest(root))
    else:
        from .servers import S3Server

        s3 = S3Server(tmp_path / "s3")

        def objects() -> dict[str, str]:
            uploads = s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", [])
            assert uploads == [], "a multipart upload was left open"
            return {k.rsplit("/", 1)[-1]: v for k, v in s3.objects().items()}

        yield Destination(s3.dest("in/", part_size=5 * 1024 * 1024), objects, s3.stop)


class Fence:
    """Counts its calls, and raises at call ``fail_at`` (1 for the first; 0: never).
    ``probe``: called at each call, its answers kept in ``seen``."""

    def __init__(self, fail_at: int = 0, probe: Callable[[], int] | None = None) -> None:
        self.calls = 0
        self.fail_at = fail_at
        self.probe = probe
        self.seen: list[int] = []

    def __call__(self) -> None:
        self.calls += 1
        if self.probe is not None:
            self.seen.append(self.probe())
        if self.calls == self.fail_at:
            raise LeaseLostError("the test's fence")


def test_a_fence_that_fails_at_any_call_leaves_nothing_visible(
    tmp_path: Path, destination: Destination
) -> None:
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    config = load_config(remote_config(ws, destination.step))
    source, step = config.sources[0], config.rules[0].to[0]
    files = {
        name: old_file(ws["inbox"] / name, SIZE) for name in ["first.bin", "second.bin"]
    }  # random bytes
    digests = {n: hashlib.sha256(p.read_bytes()).hexdigest() for n, p in files.items()}

    def context(name: str, fence: Fence, dispatch_id: int) -> StepContext:
        version = FileVersion.from_stat(source.key, source.path, name, os.stat(files[name]))
        work = tmp_path / "work"
        return StepContext(dispatch_id, version, files[name], "remote", 0, 1, work, fence=fence)

    async def run() -> tuple[Fence, list[tuple[int, BaseException | Outcome]]]:
        registry = Registry()
        try:
            counting = Fence(probe=destination.staged)
            outcome = await registry.get(step).deliver(context("first.bin", counting, 1))
            assert isinstance(outcome, Outcome)
            tries: list[tuple[int, BaseException | Outcome]] = []
            for k in range(1, counting.calls + 1):
                try:
                    got: BaseException | Outcome = await registry.get(step).deliver(
                        context("second.bin", Fence(k), 1 + k)
                    )
                except LeaseLostError as exc:
                    got = exc
                tries.append((k, got))
            return counting, tries
        finally:
            await registry.aclose()

    try:
        counting, tries = asyncio.run(run())
        calls = counting.calls
        assert calls >= 1, "the delivery never asked its fence"
        if destination.staged is not None:  # asked last with the whole copy in place, unnamed
            assert counting.seen[-1] == SIZE, f"the last fence call saw {counting.seen}"
        for k, got in tries:
            assert isinstance(got, LeaseLostError), f"call {k} of {calls} failed: {got!r}"
        # only the first file, whole: the second is neither at its name nor left partial
        assert destination.holds() == {"first.bin": digests["first.bin"]}
    finally:
        destination.stop()
