"""Claiming and feeding: due PENDING rows claimed from the journal, grouped by file version,
and put on the bounded queue the workers take from; given back at shutdown.

Never delivers; the workers report to it when they start and finish a group, so it knows
when nothing is left to do (``wait_idle``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from ..asyncutil import first_completed
from ..errors import JournalError
from ..journal import StepResult
from ..models import Dispatch, Status
from .outcomes import waiting
from .state import IDLE_CHECK_S, DispatchState

log = logging.getLogger("filedispatch.dispatcher")

#: seconds before claiming again after the journal refused a claim
RETRY_CLAIM_S = 1.0
#: versions claimed at most per claim
CLAIM_PAGE = 256


class Feeder:
    """Claims work into the queue; tells when the queue is empty and no worker is busy."""

    def __init__(self, state: DispatchState) -> None:
        self.state = state
        self.queue: asyncio.Queue[list[Dispatch]] = asyncio.Queue(maxsize=state.config.workers * 8)
        self._room = asyncio.Event()
        self._idle = asyncio.Event()
        self._busy = 0

    async def take(self) -> list[Dispatch]:
        """The next group of rows for a worker; an empty group tells it to exit."""
        group = await self.queue.get()
        if self.queue.qsize() <= self.queue.maxsize // 2:
            self._room.set()
        return group

    def started(self) -> None:
        """A worker started on a group."""
        self._busy += 1
        self._idle.clear()

    def finished(self) -> None:
        """A worker is done with its group."""
        self._busy -= 1
        if self._busy == 0:
            self.state.wake.set()

    async def feed(self, stop: asyncio.Event) -> None:
        """Claim due work into the queue until ``stop``, in pages, while not paused and while
        the journal takes writes."""
        state, journal = self.state, self.state.journal
        while not stop.is_set():
            if not state.running.is_set():
                await first_completed(stop.wait(), state.running.wait())
                continue
            if not journal.writable.is_set():
                await first_completed(stop.wait(), journal.writable.wait())
                continue
            if not state.node_alive.is_set():  # the lease may have run out: claim nothing
                await first_completed(stop.wait(), state.node_alive.wait())
                continue
            state.wake.clear()
            room = self.queue.maxsize - self.queue.qsize()
            if room < self.queue.maxsize // 2:  # claim in pages, not one group at a time
                self._room.clear()
                await first_completed(stop.wait(), self._room.wait())
                continue
            skip = frozenset(state.stopped_sources)
            try:
                batch = await journal.claim(min(room, CLAIM_PAGE), time.time(), skip)
                due = None if batch else await journal.next_due()
            except JournalError as exc:  # unreadable (removed), or given up at a stop
                if journal.writable.is_set():
                    log.error("cannot claim work: %s", exc)
                await first_completed(stop.wait(), timeout=RETRY_CLAIM_S)
                continue
            for group in batch:
                self.queue.put_nowait(group)  # only the feeder puts, so there is room
            if batch:
                continue
            if self._busy == 0 and self.queue.empty():
                self._idle.set()
            timeout = state.idle_check_s
            if due is not None:
                timeout = min(timeout, max(0.0, due - time.time()) + 0.01)
            await first_completed(stop.wait(), state.wake.wait(), timeout=timeout)

    async def release_queued(self) -> int:
        """At shutdown: claimed versions no worker started go back to PENDING (or, while the
        journal fails, stay IN_PROGRESS and are resumed at the next start). Returns how many
        rows went back."""
        results: list[StepResult] = []
        while not self.queue.empty():
            results += [
                waiting(d, d.next_attempt)
                for d in self.queue.get_nowait()
                if d.status == Status.IN_PROGRESS
            ]
        try:
            await self.state.journal.finish(results)
        except JournalError as exc:
            log.warning("%d claimed dispatch(es) resume at the next start: %s", len(results), exc)
        return len(results)

    async def wait_idle(self) -> None:
        """Wait until nothing is due, queued, running or waiting for a retry (``--once``)."""
        state, journal = self.state, self.state.journal
        while True:
            self._idle.clear()
            state.wake.set()
            await self._idle.wait()
            if not await journal.unfinished():
                return
            if state.stopped_sources and set(state.sources) <= state.stopped_sources:
                return
            due = await journal.next_due()
            if due is not None:
                await asyncio.sleep(min(IDLE_CHECK_S, max(0.05, due - time.time())))
