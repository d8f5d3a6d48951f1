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
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config
from filedispatch.models import FileVersion, Outcome
from filedispatch.processors import Registry, StepContext, called_off

from .servers import old_file, remote_config


def _setup(tmp_path: Path, data: bytes) -> tuple[Any, FileVersion, Path, Path]:
    out = tmp_path / "out"
    ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
    config = load_config(remote_config(ws, {"url": out.as_uri()}))
    source = config.sources[0]
    src = old_file(ws["inbox"] / "big.bin", data)
    version = FileVersion.from_stat(source.key, source.path, "big.bin", os.stat(src))
    return config, version, src, out


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
    at_rename, go_on = threading.Event(), threading.Event()

    def held() -> None:  # attempt 1's thread, its copy whole, short of its rename
        at_rename.set()
        go_on.wait(60)

    def ctx(attempt: int, **more: Any) -> StepContext:
        return StepContext(7, version, src, "r", 0, attempt, tmp_path / "work", epoch=epoch, **more)

    registry = Registry()
    processor = registry.get(config.rules[0].to[0])
    try:
        first = asyncio.create_task(processor.deliver(ctx(1, fence=held)))
        await asyncio.to_thread(at_rename.wait, 60)
        first.cancel()  # the step's timeout: wait_for cancels the await
        for _ in range(20):  # let the cancellation reach the delivery (loop turns, no clock)
            await asyncio.sleep(0)
        ended_early = first.done()
        go_on.set()
        with pytest.raises(asyncio.CancelledError):
            await first
        left = sorted(p.name for p in out.iterdir())
        outcome = await processor.deliver(ctx(2, resuming=True))
    finally:
        go_on.set()
        await registry.aclose()
    assert not ended_early, "the timed-out delivery ended while its thread could still rename"
    assert left == [], f"the timed-out attempt left or published: {left}"
    assert isinstance(outcome, Outcome) and (out / "big.bin").read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["big.bin"]


def test_a_called_off_batch_publishes_nothing_and_leaves_no_temporary(tmp_path: Path) -> None:
    """The batch lane's copies (``copy_batch``, one thread for many small files) are called
    off the same way: a batch called off before its renames leaves nothing behind."""
    config, version, src, out = _setup(tmp_path, b"small")
    registry = Registry()
    processor = registry.get(config.rules[0].to[0])
    off = threading.Event()
    off.set()
    base = StepContext(7, version, src, "r", 0, 1, tmp_path / "work")
    try:
        [outcome] = processor.copy_batch([called_off(base, off)])  # type: ignore[attr-defined]
    finally:
        asyncio.run(registry.aclose())
    assert "called off" in str(outcome)
    assert not out.exists() or list(out.iterdir()) == []
