"""A local copy runs in a worker thread, which no cancellation can stop (a step's ``timeout``,
the stop). Such a delivery is called off and waited for: its thread notices at its next chunk
or before its rename, removes its temporary file, and only then does the cancelled delivery
end. Otherwise a retry of the same claim (the same temporary name) could be published half
written by the old thread's rename (a6 review, HIGH 2: ``1310720 of 8388608`` bytes
published), or the old thread could publish after its step was recorded as timed out.

Real files, the real processor; the copy is held at its fence (as a slow fsync would hold
it) to make the moment deterministic."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import select
import struct
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest

from filedispatch.config import load_config
from filedispatch.errors import NetworkError, TransientDeliveryError
from filedispatch.models import FileVersion, Outcome
from filedispatch.processors import Registry, StepContext

from .conftest import ServiceProcess, old, wait_until
from .pgcluster import PASSWORD
from .servers import old_file, remote_config
from .test_cluster import _node_config


def _setup(tmp_path: Path, data: bytes) -> tuple[Any, FileVersion, Path, Path]:
    out = tmp_path / "out"
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    config = load_config(remote_config(ws, {"url": out.as_uri()}))
    source = config.sources[0]
    src = old_file(ws["inbox"] / "big.bin", data)
    version = FileVersion.from_stat(source.key, source.path, "big.bin", os.stat(src))
    return config, version, src, out


async def _cancelled_at_its_rename(start: Callable[[Callable[[], None]], Awaitable[Any]]) -> bool:
    """Start a delivery (``start(fence)``) whose thread is held at its fence (its copy whole,
    short of its rename, as a slow fsync would hold it), cancel it (a step's timeout), then
    let the thread go on: whether the cancelled delivery had ended while its thread was held.
    Fails unless it ends cancelled."""
    at_rename, go_on = threading.Event(), threading.Event()

    def held() -> None:
        at_rename.set()
        go_on.wait(60)

    task = asyncio.ensure_future(start(held))
    try:
        await asyncio.to_thread(at_rename.wait, 60)
        task.cancel()
        for _ in range(20):  # let the cancellation reach the delivery (loop turns, no clock)
            await asyncio.sleep(0)
        ended_early = task.done()
    finally:
        go_on.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    return ended_early


@pytest.mark.parametrize("epoch", [5, None], ids=["postgresql", "sqlite"])
async def test_a_timed_out_local_copy_ends_with_its_thread_and_publishes_nothing(
    tmp_path: Path, epoch: int | None
) -> None:
    """Attempt 1's copy is whole and its thread short of the rename when the step times out
    (the await is cancelled). The cancelled delivery does not end while the thread may still
    rename; once the thread goes on, it renames nothing and leaves no temporary file; the
    retry then delivers the file whole. Before: the delivery ended at once, and the thread
    renamed whatever lay under the shared temporary name later (a retry's partial copy)."""
    data = os.urandom(8 << 20)
    config, version, src, out = _setup(tmp_path, data)

    def ctx(attempt: int, **more: Any) -> StepContext:
        return StepContext(7, version, src, "r", 0, attempt, tmp_path / "work", epoch=epoch, **more)

    registry = Registry()
    processor = registry.get(config.rules[0].to[0])
    try:
        ended_early = await _cancelled_at_its_rename(
            lambda held: processor.deliver(ctx(1, fence=held))
        )
        left = sorted(p.name for p in out.iterdir())
        outcome = await processor.deliver(ctx(2, resuming=True))
    finally:
        await registry.aclose()
    assert not ended_early, "the timed-out delivery ended while its thread could still rename"
    assert left == [], f"the timed-out attempt left or published: {left}"
    assert isinstance(outcome, Outcome) and (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]


async def test_a_cancelled_batch_publishes_nothing_and_leaves_no_temporary(
    tmp_path: Path,
) -> None:
    """The batch lane's copies (``copy_batch``, one thread for many small files) are called
    off the same way: a batch cancelled with its copy whole, short of its rename, ends once
    its thread has, and leaves nothing behind."""
    config, version, src, out = _setup(tmp_path, b"small")
    registry = Registry()
    processor = registry.get(config.rules[0].to[0])
    try:
        ended_early = await _cancelled_at_its_rename(
            lambda held: processor.copy_batch(  # type: ignore[attr-defined]
                [StepContext(7, version, src, "r", 0, 1, tmp_path / "work", fence=held)]
            )
        )
    finally:
        await registry.aclose()
    assert not ended_early, "the cancelled batch ended while its thread could still rename"
    assert sorted(p.name for p in out.iterdir()) == []


class _OpenGate:
    """fanotify permission events on a folder: each open of a file in it waits until the
    test allows it, as an open or a write waits on a hung NFS or SMB mount (the kernel's own
    mechanism, no stand-in for the processor's code; needs CAP_SYS_ADMIN, else skipped)."""

    def __init__(self, folder: Path) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.fanotify_mark.argtypes = [
            ctypes.c_int, ctypes.c_uint, ctypes.c_uint64, ctypes.c_int, ctypes.c_char_p
        ]  # fmt: skip
        self.fd = libc.fanotify_init(0x4 | 0x1, os.O_RDONLY)  # FAN_CLASS_CONTENT, CLOEXEC
        if self.fd < 0:
            pytest.skip(f"fanotify: {os.strerror(ctypes.get_errno())}")
        # FAN_OPEN_PERM on the folder's files (FAN_EVENT_ON_CHILD); AT_FDCWD
        if libc.fanotify_mark(self.fd, 0x1, 0x10000 | 0x08000000, -100, bytes(folder)) != 0:
            os.close(self.fd)
            pytest.skip(f"fanotify_mark: {os.strerror(ctypes.get_errno())}")
        self.held = threading.Event()  # an open waits at the gate
        self._lock = threading.Lock()
        self._open = False
        self._pending: list[int] = []
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _answer(self, efd: int) -> None:
        os.write(self.fd, struct.pack("iI", efd, 0x01))  # FAN_ALLOW
        os.close(efd)

    def _serve(self) -> None:
        while not self._stop:
            if not select.select([self.fd], [], [], 0.05)[0]:
                continue
            buf = os.read(self.fd, 4096)
            at = 0
            while at < len(buf):
                size, _, _, _, _, efd, _ = struct.unpack_from("IBBHQii", buf, at)
                at += size
                with self._lock:
                    if self._open:
                        self._answer(efd)
                    else:
                        self._pending.append(efd)
                        self.held.set()

    def release(self) -> None:
        """Let every open through, now and from now on."""
        with self._lock:
            self._open = True
            for efd in self._pending:
                self._answer(efd)
            self._pending.clear()

    def close(self) -> None:
        self.release()
        self._stop = True
        self._thread.join(5)
        with contextlib.suppress(OSError):
            os.close(self.fd)


async def test_a_timed_out_copy_into_a_hung_folder_ends_and_its_retry_waits(
    tmp_path: Path,
) -> None:
    """A copy into a folder whose filesystem hangs (an NFS or SMB mount that stopped
    answering: the open of its temporary file waits, inside a system call no fence reaches).
    Its step times out: the attempt ends after CALL_OFF_PATIENCE_S all the same, saying so,
    and a retry of the row waits (a transient error) while the stuck thread could still
    rename that temporary name, as does any other file's attempt into that folder, without a
    thread; once the mount answers, the thread ends (called off: nothing published) and the
    retry delivers. Before (c6 review of 9c2a93f): the attempt waited for
    the thread as long as the mount hung, and with it the worker and the service's stop."""
    from filedispatch.errors import TransientDeliveryError

    data = os.urandom(1 << 20)
    config, version, src, out = _setup(tmp_path, data)
    out.mkdir()
    gate = _OpenGate(out)
    registry = Registry()
    processor = registry.get(config.rules[0].to[0])

    def ctx(attempt: int, row: int = 7) -> StepContext:
        return StepContext(row, version, src, "r", 0, attempt, tmp_path / "work")

    try:
        first = asyncio.create_task(processor.deliver(ctx(1)))
        assert await asyncio.to_thread(gate.held.wait, 60), "the copy never opened its file"
        first.cancel()  # the step's timeout
        with pytest.raises(asyncio.CancelledError):
            await first  # after CALL_OFF_PATIENCE_S (10 s), the mount still hung
        with pytest.raises(TransientDeliveryError, match="stuck in a system call"):
            await processor.deliver(ctx(2))
        # another file (a worker's copy, a batch) fails at once too, naming the folder: a
        # thread per attempt would stick beside the first for as long as the mount hangs
        with pytest.raises(TransientDeliveryError, match=f"{out}: .*stuck in a system call"):
            await asyncio.wait_for(processor.deliver(ctx(1, row=8)), 60)  # a bound, no timing
        batch = await asyncio.wait_for(
            processor.copy_batch([ctx(1, row=9), ctx(1, row=10)]),  # type: ignore[attr-defined]
            60,
        )
        assert all(isinstance(r, NetworkError) for r in batch), batch  # retried as an outage
        with gate._lock:
            assert len(gate._pending) == 1, "a refused attempt opened a file in the hung folder"
        gate.release()  # the mount answers again
        while True:  # the retry is due again once the stuck thread has ended
            try:
                outcome = await processor.deliver(ctx(3))
                break
            except TransientDeliveryError:
                await asyncio.sleep(0.05)
    finally:
        gate.close()
        await registry.aclose()
    assert isinstance(outcome, Outcome) and (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]


async def test_a_copy_does_not_wait_for_the_loops_default_executor(tmp_path: Path) -> None:
    """The loop's default executor is full of slow work (other ``to_thread`` calls of the
    service); a copy still runs at once, in a daemon thread of its own. Before, copies took
    that executor's threads: a copy waited behind the slow work, and copies stuck in a hung
    folder left every ``to_thread`` of the service waiting (d6 review)."""
    data = os.urandom(1 << 20)
    config, version, src, out = _setup(tmp_path, data)
    loop = asyncio.get_running_loop()
    slow = threading.Event()
    busy = [asyncio.ensure_future(asyncio.to_thread(slow.wait, 120)) for _ in range(64)]
    registry = Registry()
    processor = registry.get(config.rules[0].to[0])
    try:
        for _ in range(5):  # the slow work reaches the executor (loop turns, no clock)
            await asyncio.sleep(0)
        executor = loop._default_executor  # type: ignore[attr-defined]
        assert executor is not None and executor._work_queue.qsize() > 0, "precondition"
        ctx = StepContext(7, version, src, "r", 0, 1, tmp_path / "work")
        outcome = await asyncio.wait_for(processor.deliver(ctx), 60)  # a bound, not a timing
        still_busy = not any(f.done() for f in busy)
    finally:
        slow.set()
        await asyncio.gather(*busy)
        await registry.aclose()
    assert still_busy, "precondition: the slow work was still running"
    assert isinstance(outcome, Outcome) and (out / "big.bin").read_bytes() == data


def test_a_stop_beside_a_hung_folder_ends_the_nodes_lease(tmp_path: Path, pg_url: str) -> None:
    """A node copies a file into a local folder whose filesystem hangs (the open of the
    copy's temporary file waits), and is stopped (SIGTERM, ``shutdown_grace: 0.5``). After
    the grace the dispatcher is cancelled (``Service._shutdown``: ``task.cancel(); await
    task``, no bound), and the cancelled copy now waits for its thread: the drain never ends,
    so the node never leaves, and its lease task goes on renewing; the rows it holds
    (IN_PROGRESS under its live epoch) are never taken over by the other nodes (c6 review of
    9c2a93f). Now the copy is waited for CALL_OFF_PATIENCE_S at most, and the node leaves."""
    (tmp_path / "inbox").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    cfg = _node_config(tmp_path, pg_url, "n1", {"url": out.as_uri()}, shutdown_grace=0.5)
    gate = _OpenGate(out)
    node = ServiceProcess(cfg)
    left = False
    try:
        node.start()
        old(tmp_path / "inbox" / "a.txt", b"a" * 100_000)
        assert gate.held.wait(60), node.log()
        node.signal(15)

        def lease_ended() -> bool:
            with psycopg.connect(pg_url, password=PASSWORD) as db:
                row = db.execute("SELECT lease_until < now() FROM nodes WHERE name='n1'").fetchone()
            return bool(row and row[0])

        with contextlib.suppress(AssertionError):  # the mount hangs longer than this
            left = wait_until(lease_ended, 60)
    finally:
        gate.close()
        with contextlib.suppress(Exception):
            node.stop(60)
    assert left, (
        "the stopped node kept renewing its lease while its drain waited for a copy stuck in "
        "a hung folder: its work is never taken over. Log:\n" + node.log()[-2000:]
    )


async def test_a_retry_after_a_reload_waits_for_the_stuck_copy_of_its_row(tmp_path: Path) -> None:
    """A copy into a hung folder times out and outlives CALL_OFF_PATIENCE_S (stuck in its
    open). The operator then reloads with a longer ``timeout`` for that step: the Registry
    keys processors by the step's whole configuration, so the retry gets a new
    LocalProcessor, whose own CopyThreads knows nothing of the stuck thread
    (processors/threads.py ``_stuck`` was per processor): the retry of the same row was not
    refused, and opened the very temporary name the stuck thread holds open with O_TRUNC and
    may still write, truncate or remove (d6 review). The stuck rows are one registry for the
    process now."""
    data = os.urandom(2 << 20)
    out = tmp_path / "out"
    out.mkdir()
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    src = old_file(ws["inbox"] / "big.bin", data)
    before = load_config(remote_config(ws, {"url": out.as_uri(), "timeout": 5}))
    after = load_config(remote_config(ws, {"url": out.as_uri(), "timeout": 60}, file="b.yml"))
    source = before.sources[0]
    version = FileVersion.from_stat(source.key, source.path, "big.bin", os.stat(src))

    def ctx(attempt: int) -> StepContext:
        return StepContext(7, version, src, "r", 0, attempt, tmp_path / "work")

    gate = _OpenGate(out)
    registry = Registry()
    retry: asyncio.Task[object] | None = None
    refused = False
    try:
        first = asyncio.create_task(registry.get(before.rules[0].to[0]).deliver(ctx(1)))
        assert await asyncio.to_thread(gate.held.wait, 60), "the copy never opened its file"
        first.cancel()  # the step's timeout
        with pytest.raises(asyncio.CancelledError):
            await first  # after CALL_OFF_PATIENCE_S, still stuck in its open
        registry.retire_unused([after.rules[0].to[0]])  # the reload
        processor = registry.get(after.rules[0].to[0])
        retry = asyncio.create_task(processor.deliver(ctx(2)))

        def settled() -> bool:  # refused, or its own open waits at the gate beside the first
            with gate._lock:
                return retry.done() or len(gate._pending) >= 2  # type: ignore[union-attr]

        while not settled():
            await asyncio.sleep(0.05)
        if retry.done():
            refused = isinstance(retry.exception(), TransientDeliveryError)
    finally:
        gate.close()
        if retry is not None:
            with contextlib.suppress(BaseException):
                await retry
        await registry.aclose()
    assert refused, (
        "after a reload the retry of a row whose copy is stuck in a hung folder was not "
        "refused: it opened the same temporary name beside the stuck thread"
    )
