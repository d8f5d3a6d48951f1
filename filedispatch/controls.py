"""Delivery controls of a destination: content dedupe, time windows, rate and bandwidth limits.

A processor with controls is wrapped (``Controls.wrap``) in one that asks them before it
delivers: skip a file whose bytes the destination already has, wait for the window, take a
share of the rate and bandwidth. It decides and waits only: it never writes the journal
(the dispatcher records the outcome) and never touches the source.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from aiolimiter import AsyncLimiter

from .errors import OutsideWindowError
from .journal import DUPLICATE_OF
from .models import NAME_TAKEN, Outcome
from .naming import content_sha256
from .quantities import Window, parse_bandwidth, parse_rate

if TYPE_CHECKING:
    from .config import Step
    from .journal import Journal
    from .processors import Processor, StepContext

#: (destination, sha256) of deliveries made by this service, remembered until the journal
#: surely has them (their rows are committed in the background)
RECENT_DIGESTS = 10_000


@dataclasses.dataclass(frozen=True, slots=True)
class WindowState:
    """A destination's window now."""

    destination: str  #: as shown (redacted)
    window: str  #: as written
    open: bool
    opens: float | None  #: when it opens next (seconds since 1970); None while open


def window_state(steps: Iterable[Step], now: float | None = None) -> list[WindowState]:
    """The state of each destination that has a window (once per destination)."""
    now = time.time() if now is None else now
    out: dict[str, WindowState] = {}
    for step in steps:
        if step.window and step.display not in out:
            naming = getattr(step, "naming", None)
            opens = Window.parse(step.window).opens(now, naming.tz if naming else None)
            out[step.display] = WindowState(step.display, step.window, opens is None, opens)
    return list(out.values())


# ---------------------------------------------------------------------------- at delivery


class Controls:
    """The limiters and the dedupe memory, shared by every processor of one destination
    (steps that name the same destination share them, whatever rule they are in)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        #: (destination, its limit as written) -> the limiter: a reload that changes the
        #: limit gets a new one
        self._rates: dict[tuple[str, str], AsyncLimiter] = {}
        self._bandwidths: dict[tuple[str, str], AsyncLimiter] = {}
        self._recent: collections.OrderedDict[tuple[str, str], tuple[int, str]] = (
            collections.OrderedDict()
        )
        #: (destination, sha256) being sent now -> its lock and how many hold or wait for it
        self._sending: dict[tuple[str, str], tuple[asyncio.Lock, list[int]]] = {}

    @contextlib.asynccontextmanager
    async def one_at_a_time(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """One delivery of the same bytes to one destination at a time: the second finds
        the first's outcome instead of sending them again."""
        lock, users = self._sending.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                yield
        finally:
            users[0] -= 1
            if not users[0]:
                del self._sending[key]

    def wrap(self, step: Step, processor: Processor) -> Processor:
        """``processor`` behind the step's controls, or itself when it has none (so the
        dispatcher's inline lanes still find a ``Mover`` or ``BatchCopier``)."""
        if not has_controls(step):
            return processor
        return _Controlled(self, step, processor)

    def rate(self, step: Step) -> AsyncLimiter | None:
        if step.rate is None:
            return None
        limiter = self._rates.get((step.display, step.rate))
        if limiter is None:
            count, period = parse_rate(step.rate)
            limiter = self._rates[(step.display, step.rate)] = AsyncLimiter(count, period)
        return limiter

    def bandwidth(self, step: Step) -> AsyncLimiter | None:
        if step.bandwidth is None:
            return None
        key = (step.display, step.bandwidth)
        limiter = self._bandwidths.get(key)
        if limiter is None:
            limiter = self._bandwidths[key] = AsyncLimiter(parse_bandwidth(step.bandwidth), 1.0)
        return limiter

    async def duplicate(self, destination: str, digest: str) -> tuple[int, str] | None:
        """(dispatch id, location) of an earlier delivery of these bytes there, or None."""
        known = self._recent.get((destination, digest))
        if known is not None:
            return known
        return await self.journal.delivered_digest(destination, digest)

    def delivered(self, destination: str, digest: str, dispatch_id: int, location: str) -> None:
        self._recent[(destination, digest)] = (dispatch_id, location)
        while len(self._recent) > RECENT_DIGESTS:
            self._recent.popitem(last=False)


def has_controls(step: Step) -> bool:
    return bool(step.deduped or step.rate or step.bandwidth or step.window)


class _Controlled:
    """A processor behind its destination's controls (see ``Controls.wrap``)."""

    def __init__(self, controls: Controls, step: Step, inner: Processor) -> None:
        self.controls = controls
        self.step = step
        self.inner = inner
        self.window = Window.parse(step.window) if step.window else None

    async def deliver(self, ctx: StepContext) -> Outcome:
        step = self.step
        if self.window is not None:
            tz = getattr(step, "naming", None)
            opens = self.window.opens(time.time(), tz.tz if tz is not None else None)
            if opens is not None:
                raise OutsideWindowError(
                    f"outside the destination's window ({self.window.text}): waits until "
                    f"{datetime.fromtimestamp(opens).isoformat(' ', 'seconds')}",
                    opens,
                )
        if not step.deduped:
            return await self._send(ctx)
        digest = await asyncio.to_thread(content_sha256, ctx.version, ctx.input)
        async with self.controls.one_at_a_time((step.display, digest)):
            earlier = await self.controls.duplicate(step.display, digest)
            if earlier is not None and earlier[0] != ctx.dispatch_id:
                row, location = earlier
                return Outcome(
                    location,
                    detail=f"{DUPLICATE_OF}{row}: the same bytes (sha256 "
                    f"{digest[:12]}...) were delivered there; not sent again",
                    sha256=digest,
                )
            outcome = await self._send(ctx)
            if outcome.detail == NAME_TAKEN:  # nothing written: these bytes are not there
                return outcome
            if outcome.sha256 is None:
                outcome = dataclasses.replace(outcome, sha256=digest)
            self.controls.delivered(step.display, digest, ctx.dispatch_id, outcome.location)
            return outcome

    async def _send(self, ctx: StepContext) -> Outcome:
        rate = self.controls.rate(self.step)
        if rate is not None:
            await rate.acquire()
        bandwidth = self.controls.bandwidth(self.step)
        if bandwidth is not None:
            # paid before sending, in shares the bucket can hold: over any stretch of time the
            # bytes sent stay within the limit plus one second's worth
            left: float = ctx.version.size
            if ctx.input != ctx.version.path:  # a transform's output
                left = await asyncio.to_thread(os.path.getsize, ctx.input)
            while left > 0:
                share = min(left, bandwidth.max_rate)
                await bandwidth.acquire(share)
                left -= share
        return await self.inner.deliver(ctx)

    async def aclose(self) -> None:
        await self.inner.aclose()
