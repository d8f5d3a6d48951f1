"""Delivery controls of a destination: content dedupe, time windows, rate and bandwidth limits.

A processor with controls is wrapped (``Controls.wrap``) in one that asks them before it
delivers: skip a file whose bytes the destination already has, wait for the window, take a
share of the rate; a ``Throttle`` paces the bytes as the processor sends them. It decides and
waits only: it never writes the journal (the dispatcher records the outcome) and never
touches the source.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import AsyncIterator, Iterable
from datetime import datetime
from typing import TYPE_CHECKING

from aiolimiter import AsyncLimiter

from .asyncutil import in_daemon_thread
from .errors import OutsideWindowError, TransientDeliveryError
from .journal import DUPLICATE_OF
from .models import NAME_TAKEN, Outcome
from .processors import inputs
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


class Throttle:
    """A destination's ``bandwidth``, paid as the bytes go: a processor that streams calls
    ``take(n)`` (or, in a worker thread, ``take_blocking(n)``) before it sends the next ``n``
    bytes, in pieces of at most ``chunk``. Every delivery to the destination draws on the same
    limiter, so all its connections together stay within the limit (plus one second's worth:
    the bucket starts full). One Throttle per delivery; ``close`` when it ends."""

    #: the most bytes sent between two takes (an eighth of a second's worth, 4 KiB to 1 MiB)
    chunk: int

    def __init__(self, limiter: AsyncLimiter) -> None:
        self.limiter = limiter
        self.chunk = int(min(max(limiter.max_rate // 8, 4096), 1024 * 1024))
        self.taken = 0  #: bytes paid for so far, by this delivery
        self._loop = asyncio.get_running_loop()
        self._closed = threading.Event()

    async def take(self, n: int) -> None:
        """Wait until ``n`` more bytes may be sent (in shares the bucket can hold)."""
        left = float(n)
        while left > 0:
            share = min(left, self.limiter.max_rate)
            await self.limiter.acquire(share)
            left -= share
        self.taken += n

    def take_blocking(self, n: int) -> None:
        """``take`` for a worker thread (a local copy): waits on the event loop's limiter.
        Raises TransientDeliveryError once the delivery was closed (cancelled, or the
        service stops) instead of waiting on."""
        try:
            waiting = asyncio.run_coroutine_threadsafe(self.take(n), self._loop)
        except RuntimeError:  # the loop is closed: the service is gone
            raise TransientDeliveryError("stopped while waiting for bandwidth") from None
        while not self._closed.wait(0.2):  # never waits past the delivery's end
            if waiting.done():
                waiting.result()
                return
        waiting.cancel()
        raise TransientDeliveryError("stopped while waiting for bandwidth")

    def close(self) -> None:
        self._closed.set()


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
        #: destination -> dispatch id -> done once that delivery's bytes are hashed and it
        #: queues for their lock (see ``in_order``)
        self._hashing: dict[str, dict[int, asyncio.Future[None]]] = {}

    @contextlib.asynccontextmanager
    async def in_order(self, destination: str, dispatch_id: int) -> AsyncIterator[None]:
        """Hash inside this, then take ``one_at_a_time`` right after it: of two files with the
        same bytes for one destination hashed at the same time, the one planned first (the
        lower dispatch id, as ``explain`` and ``--dry-run`` predict) is sent and the other
        finds it, whichever hash ends first. A delivery waits here for the hashes of lower
        ids under way for that destination, never for their sends."""
        hashing = self._hashing.setdefault(destination, {})
        mine = hashing[dispatch_id] = asyncio.get_running_loop().create_future()
        try:
            yield
            while earlier := [f for i, f in hashing.items() if i < dispatch_id]:
                await asyncio.wait(earlier)
        finally:
            # done before this delivery's next await, its ``one_at_a_time``: later ids
            # wake after it is queued for the lock, and locks are first come, first served
            mine.set_result(None)
            del hashing[dispatch_id]
            if not hashing:
                del self._hashing[destination]

    @contextlib.asynccontextmanager
    async def one_at_a_time(self, key: tuple[str, str]) -> AsyncIterator[None]:
        """One delivery of the same bytes to one destination at a time: the second finds
        the first's outcome instead of sending them again (in the order of ``in_order``)."""
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
        async with self.controls.in_order(step.display, ctx.dispatch_id):
            digest = await inputs.content_sha256(ctx)
        ctx = dataclasses.replace(ctx, sha256=digest)
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
        if bandwidth is None:
            return await self.inner.deliver(ctx)
        throttle = Throttle(bandwidth)
        if not getattr(self.inner, "paces", False):
            # a kind that does not stream (a command, a callable): paid before it runs
            size = ctx.version.size
            if ctx.input != ctx.version.path:  # a transform's output
                size = await in_daemon_thread(os.path.getsize, ctx.input)
            await throttle.take(size)
            return await self.inner.deliver(ctx)
        try:  # the processor pays per chunk as it sends (see Throttle)
            return await self.inner.deliver(dataclasses.replace(ctx, throttle=throttle))
        finally:
            throttle.close()

    async def aclose(self) -> None:
        await self.inner.aclose()
