"""Progress of long operations: a bar on a terminal, a plain line every few seconds elsewhere.

It only reports what it is told (or, for the service's start-up backlog, what the journal
counts); it never decides when work is done and never slows the work down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, TextIO

from .asyncutil import in_background

if TYPE_CHECKING:
    from .journal import Journal

log = logging.getLogger(__name__)

#: seconds between plain lines when not on a terminal (tests set it lower)
EVERY_ENV = "FILEDISPATCH_PROGRESS_EVERY"
BAR_WIDTH = 30


def _every() -> float:
    try:
        return max(0.05, float(os.environ.get(EVERY_ENV, "10")))
    except ValueError:
        return 10.0


class _ClearBar(logging.Filter):
    """Wipes the bar off the terminal line before a log record is written there."""

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream

    def filter(self, record: logging.LogRecord) -> bool:
        self.stream.write("\r\x1b[K")
        return True


class Progress:
    """``update(done, total)`` as often as you like; it draws at most a few times a second.

    On a terminal: ``label [#####.....] 120/500 24% 35.1/s`` redrawn in place. Elsewhere:
    ``label: 120/500 files (24%), 35.1/s`` every ``FILEDISPATCH_PROGRESS_EVERY`` seconds
    (10 by default), through ``emit`` (``print`` to the stream unless given, e.g. ``log.info``).
    """

    def __init__(
        self,
        label: str,
        *,
        total: int | None = None,
        unit: str = "files",
        stream: TextIO | None = None,
        emit: Callable[[str], object] | None = None,
    ) -> None:
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _isatty(self.stream)
        self.every = 0.2 if self.tty else _every()
        self._emit = emit
        self.started = time.monotonic()
        self._last = float("-inf")  # the first update shows at once
        self.done = 0
        self._drawn = False
        self.shown = False  #: whether anything was drawn or printed yet
        self._filter: _ClearBar | None = None

    def __enter__(self) -> Progress:
        if self.tty:  # log lines written to the same terminal first wipe the bar
            self._filter = _ClearBar(self.stream)
            for handler in _handlers_on(self.stream):
                handler.addFilter(self._filter)
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.monotonic()
        if now - self._last < self.every:
            return
        self._last = now
        self.shown = True
        if self.tty:
            self.stream.write("\r\x1b[K" + self.bar())
            self.stream.flush()
            self._drawn = True
        else:
            self._line(self.text())

    def close(self, summary: str | None = None) -> None:
        """Remove the bar; print ``summary`` (or nothing) as an ordinary line."""
        if self._filter is not None:
            for handler in _handlers_on(self.stream):
                handler.removeFilter(self._filter)
            self._filter = None
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False
        if summary:
            self._line(summary)

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        return self.done / elapsed if elapsed > 0 else 0.0

    def bar(self) -> str:
        if not self.total:
            return f"{self.label}: {self.done} {self.unit} {self.rate():.1f}/s"
        frac = min(1.0, self.done / self.total)
        filled = int(frac * BAR_WIDTH)
        return (
            f"{self.label} [{'#' * filled}{'.' * (BAR_WIDTH - filled)}] "
            f"{self.done}/{self.total} {frac:.0%} {self.rate():.1f}/s"
        )

    def text(self) -> str:
        if not self.total:
            return f"{self.label}: {self.done} {self.unit}, {self.rate():.1f}/s"
        return (
            f"{self.label}: {self.done}/{self.total} {self.unit} "
            f"({self.done / self.total:.0%}), {self.rate():.1f}/s"
        )

    def _line(self, text: str) -> None:
        if self._emit is not None:
            self._emit(text)
        else:
            print(text, file=self.stream, flush=True)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _handlers_on(stream: TextIO) -> list[logging.Handler]:
    return [
        h
        for h in logging.getLogger().handlers
        if isinstance(h, logging.StreamHandler) and getattr(h, "stream", None) is stream
    ]


# ---------------------------------------------------------------------------- the service


@contextlib.asynccontextmanager
async def backlog(journal: Journal, scanned: Callable[[], bool]) -> AsyncIterator[None]:
    """Report the start-up scan and the backlog it plans until both are done, then go quiet.

    Counted in deliveries (journal rows) finished since the start against those still to do;
    ``scanned()`` tells whether every source's start-up scan is done (``ServiceLink.scanned``).
    """
    async with in_background(_report_backlog(journal, scanned), "progress"):
        yield


async def _report_backlog(journal: Journal, scanned_now: Callable[[], bool]) -> None:
    since = time.time()
    progress = Progress("dispatching", unit="deliveries", emit=log.info)
    poll = 0.5 if progress.tty else min(1.0, progress.every)
    with progress:
        while True:
            await asyncio.sleep(poll)
            try:
                done, left = await journal.progress(since)
            except Exception:  # progress is a nicety: it must never stop the service
                return
            scanned = scanned_now()
            if scanned and left == 0:
                if progress.shown:  # quiet when it was quick
                    progress.close(
                        f"start-up backlog done: {done} deliveries in "
                        f"{time.monotonic() - progress.started:.1f}s"
                    )
                return
            progress.label = "dispatching" if scanned else "scanning and dispatching"
            # while the scan still plans, the total grows: no fraction is shown until it is known
            progress.total = done + left if scanned else None
            progress.update(done)
