"""Handing complete files on, in batches, one batch in flight: a name that is not valid
UTF-8 is rejected, the open-writers gate is asked last, the files are planned (``emit``),
the ``min_age`` timers are set, and a consumed ``.done`` marker is removed. It never moves
or sends a file; a batch the journal refused is offered again by a later scan.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Awaitable, Callable

from ..config import SourceConfig
from ..errors import JournalError
from ..models import FileVersion
from .entries import valid_name
from .gates import Gates

#: plans complete files; returns how many of them no rule takes (None: not counted)
Emit = Callable[[SourceConfig, list[FileVersion]], Awaitable[int | None]]
Reject = Callable[[SourceConfig, FileVersion, str], Awaitable[None]]


class Batches:
    """Feeds complete files of one source to ``emit``, a batch at a time."""

    def __init__(
        self,
        config: SourceConfig,
        gates: Gates,
        emit: Emit,
        reject: Reject,
        failed: Callable[[BaseException], None],
    ) -> None:
        self.config = config
        self._gates = gates
        self._emit_cb = emit
        self._reject_cb = reject
        self._failed = failed  #: told of a batch the journal refused
        self._emitting: asyncio.Task[int] | None = None

    async def drain(self) -> None:
        """Wait for the batch in flight (how it ended is reported by _handed_on)."""
        task, self._emitting = self._emitting, None
        if task is not None:
            await asyncio.wait([task])

    def _handed_on(self, task: asyncio.Task[int]) -> None:
        """A batch handed on in the background failed (the journal could not be written):
        say so now and rescan soon. The files are still there and are offered again."""
        if not task.cancelled() and task.exception() is not None:
            self._failed(task.exception())  # type: ignore[arg-type]

    async def emit(
        self, versions: list[FileVersion], wait: bool = True, cleared: set[str] | None = None
    ) -> int:
        """Hand complete files on, in order; how many no rule takes (0 unless waited for).
        With ``wait=False`` it returns once the batch has started, so the next batch of events
        is read while this one is being committed; the next call waits for it first (one
        batch in flight, never more). ``cleared``: relpaths the open-writers gate already
        passed in the look that found them."""
        await self.drain()
        if not versions:
            return 0
        if wait:
            try:
                return await self._hand_on(versions, cleared or set())
            except JournalError as exc:  # a scan goes on; the files are offered again
                self._failed(exc)
        else:
            self._emitting = asyncio.create_task(
                self._hand_on(versions, cleared or set()), name=f"emit:{self.config.path}"
            )
            self._emitting.add_done_callback(self._handed_on)
        return 0

    async def _hand_on(self, versions: list[FileVersion], cleared: set[str]) -> int:
        good = [v for v in versions if valid_name(v.relpath)]
        for v in versions:
            if not valid_name(v.relpath):
                await self._reject_cb(self.config, v, "the file name is not valid UTF-8")
        if good and self.config.open_writers == "check":
            good = await self._gates.no_writers(good, cleared)
        unmatched = (await self._emit_cb(self.config, good) or 0) if good else 0
        waiting = self._gates.wait_for_age(good)
        if self.config.ready == "done":
            for v in good:
                if v.relpath not in waiting:  # its marker is needed when it is looked at again
                    with contextlib.suppress(OSError):
                        os.unlink(f"{v.path}.done")
        return unmatched
