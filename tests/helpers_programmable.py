"""Callables for tests/test_programmable.py, named in configs as ``tests.helpers_programmable:X``.

Each records what it was given as one JSON line in the file named by its ``log`` keyword, so a
test can read back exactly how the service called it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import threading
from pathlib import Path
from typing import Any

from filedispatch.processors import StepContext

#: set by a test to release ``hang`` (so no thread outlives the test for long)
RELEASE = threading.Event()


def _note(log: str, **fields: Any) -> None:
    with open(log, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(fields) + "\n")


def _ctx(context: StepContext) -> dict[str, Any]:
    return {
        "path": str(context.path),
        "relpath": context.relpath,
        "source": context.source,
        "rule": context.rule,
        "dispatch_id": context.dispatch_id,
        "delivery_id": context.delivery_id,
        "attempt": context.attempt,
        "step": context.step,
    }


def record(path: str, *args: Any, log: str, context: StepContext, **kwargs: Any) -> dict[str, Any]:
    """A sync callable that wants the context; returns a value (recorded as detail)."""
    _note(
        log,
        kind="sync",
        path=path,
        args=args,
        kwargs=kwargs,
        thread=threading.current_thread().name,
        ctx=_ctx(context),
    )
    return {"seen": Path(path).name}


def plain(path, *args, **kwargs):  # type: ignore[no-untyped-def]
    """A Rattail-style function: no context parameter, so none is passed."""
    _note(kwargs.pop("log"), kind="plain", path=path, args=args, kwargs=kwargs)


async def arecord(path: str, tag: str, *, log: str, context: StepContext) -> str:
    """An async callable, awaited on the service's loop."""
    await asyncio.sleep(0)
    _note(log, kind="async", path=path, tag=tag, loop=True, ctx=_ctx(context))
    return "async done"


class Recorder:
    """A class step: instantiated once, then its instance is called for each file."""

    instances = 0

    def __init__(self) -> None:
        type(self).instances += 1
        self.calls = 0

    def __call__(self, path: str, prefix: str, *, log: str) -> None:
        self.calls += 1
        _note(
            log,
            kind="class",
            path=path,
            prefix=prefix,
            instance=id(self),
            calls=self.calls,
            instances=type(self).instances,
        )


class AsyncRecorder:
    """An async class step: made on the service's loop, its instance awaited."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()  # fails in a worker thread
        self.lock = asyncio.Lock()
        self.calls = 0

    async def __call__(self, path: str, *, log: str, context: StepContext) -> int:
        async with self.lock:
            self.calls += 1
        assert asyncio.get_running_loop() is self.loop
        _note(log, kind="async-class", path=path, ctx=_ctx(context))
        return self.calls


def fail(path: str, message: str) -> None:
    raise ValueError(f"{message}: {Path(path).name}")


def exits(path: str) -> None:
    sys.exit(3)


def hang(path: str) -> None:
    RELEASE.wait(30)


def upper_copy(path: str, *, counter: str, context: StepContext) -> Path:
    """A transform: writes an upper-cased copy into the work folder and returns its path."""
    _note(counter, kind="upper_copy", path=path)
    out = context.workdir / f"{Path(path).stem}.upper{Path(path).suffix}"
    out.write_bytes(Path(path).read_bytes().upper())
    return out


def flaky_once(path: str, marker: str, *, log: str) -> str:
    """Fails the first time it sees a file, succeeds from then on (a retry is needed)."""
    _note(log, kind="flaky", path=path)
    done = Path(marker)
    if not done.exists():
        done.write_text("failed once")
        raise ConnectionError("the far end is not up yet")
    return "ok on retry"


class Flaky:
    """Raises the exception types given in ``sequence``, one per call, then succeeds."""

    def __init__(self) -> None:
        self.seen = 0

    def __call__(self, path: str, *sequence: str) -> str:
        self.seen += 1
        if self.seen <= len(sequence):
            raise {"OSError": OSError, "KeyError": KeyError, "RuntimeError": RuntimeError}[
                sequence[self.seen - 1]
            ](f"failure {self.seen}")
        return "ok"


async def overlap(path: str, *, log: str) -> None:
    """Notes when it starts and ends, 0.2 s apart, so a test can count calls running at once."""
    _note(log, event="start", path=path)
    await asyncio.sleep(0.2)
    _note(log, event="end", path=path)


def remove(path: str) -> None:
    """Deletes the file it is given (for a test of a source vanishing mid-chain)."""
    Path(path).unlink()


class Tagger:
    """A class step that notes each file with its ``tag``, and notes when it is closed."""

    def __init__(self) -> None:
        self.log: str | None = None

    def __call__(self, path: str, *, log: str, tag: str) -> None:
        self.log = log
        _note(log, kind="tag", path=path, tag=tag, instance=id(self))

    def close(self) -> None:
        if self.log is not None:
            _note(self.log, kind="closed", instance=id(self))
