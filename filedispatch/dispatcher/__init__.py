"""Dispatching: plan routed files into the journal, then run them with a fixed pool of workers.

claim (journal) -> processor -> outcome (journal) -> after-action on the source. The source is
moved or removed only after the journal has committed that every destination has the file.
``Dispatcher`` composes the parts, each in its module: ``planning`` (route and plan),
``lanes`` (the inline lanes), ``feeder`` (claim and queue), ``workers`` (run chains),
``outcomes`` (results, retries via ``retry.py``, journal writes), ``after`` (the source's
after-action, decided by ``fate.py``); ``state`` is what they share.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, SourceConfig
from ..journal import Journal, StepResult
from ..models import Dispatch, FileVersion
from ..processors import Registry
from ..router import Chain, Router
from .after import AfterActions
from .feeder import Feeder
from .lanes import InlineLanes
from .outcomes import Outcomes
from .planning import Planner
from .state import DestinationStats, DispatchState, RunSummary
from .workers import Workers

if TYPE_CHECKING:
    from ..learn import Learned

__all__ = ["DestinationStats", "Dispatcher", "RunSummary"]


class Dispatcher:
    """Owns the worker pool; fed by ``offer()``, stopped by the service's stop event."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        registry: Registry,
        *,
        workdir: Path,
        max_items: int | None = None,
        on_change: Callable[[], None] | None = None,
        consume_marked: bool = False,
        learned: Learned | None = None,
    ) -> None:
        self.state = state = DispatchState(
            config,
            journal,
            registry,
            workdir=workdir,
            consume_marked=consume_marked,
            learned=learned,
            on_change=on_change,
        )
        self.outcomes = Outcomes(state)
        self.after = AfterActions(state, self.outcomes)
        self.lanes = InlineLanes(state, self.outcomes, self.after)
        self.planner = Planner(state, self.lanes, self.after, max_items)
        self.feeder = Feeder(state)
        self.workers = Workers(state, self.feeder, self.outcomes, self.after)
        self.released = 0  #: claimed rows given back at the stop

    # ------------------------------------------------------------------ what others read

    @property
    def config(self) -> Config:
        return self.state.config

    @property
    def on_result(self) -> Callable[[str, FileVersion, str, StepResult], None] | None:
        """Told (rule, version, destination, result) when a row SUCCEEDED or FAILED for good;
        must return at once and never raise (the notifier)."""
        return self.state.on_result

    @on_result.setter
    def on_result(
        self, listener: Callable[[str, FileVersion, str, StepResult], None] | None
    ) -> None:
        self.state.on_result = listener

    @property
    def router(self) -> Router:
        """The rules in force (replaced on reload)."""
        return self.state.router

    @property
    def sources(self) -> dict[str, SourceConfig]:
        return self.state.sources

    @property
    def summary(self) -> RunSummary:
        return self.state.summary

    @property
    def stats(self) -> dict[str, DestinationStats]:
        return self.state.stats

    @property
    def in_flight(self) -> dict[int, Dispatch]:
        return self.state.in_flight

    @property
    def stopped_sources(self) -> set[str]:
        return self.state.stopped_sources

    @property
    def running(self) -> int:
        """Deliveries running now: the workers' and the files of copy batches."""
        return len(self.state.in_flight) + self.state.batched

    @property
    def paused(self) -> bool:
        return not self.state.running.is_set()

    # ------------------------------------------------------------------ control

    def reconfigure(self, config: Config) -> None:
        """Switch rules and sources (SIGHUP); rows in flight finish under their old steps."""
        self.state.configure(config)
        self.planner.clear()
        self.lanes.clear()
        # new deliveries use processors built from the new options; old ones close once idle
        self.state.registry.retire_unused(step for rule in config.rules for step in rule.to)
        self.state.wake.set()

    def stopping(self, grace_s: float) -> None:
        """The service stops: inline copy batches still running ``grace_s`` seconds from now
        are called off, as the workers' deliveries are once the drain's grace has passed."""
        asyncio.get_running_loop().call_later(grace_s, self.state.halted.set)

    def pause(self) -> None:
        self.state.running.clear()

    def resume(self) -> None:
        self.state.running.set()
        self.state.wake.set()

    def wake(self) -> None:
        self.state.wake.set()

    # ------------------------------------------------------------------ planning

    def route(self, version: FileVersion) -> list[Chain]:
        """The chains a version goes through (may do I/O: a MIME type, a classifier)."""
        return self.planner.route(version)

    async def offer(self, source: SourceConfig, versions: Sequence[FileVersion]) -> int:
        """Plan complete files from a watcher: route them and write PENDING rows. Returns how
        many of them no rule takes (the watcher counts them among the files it skipped)."""
        return await self.planner.offer(source, versions)

    async def reject(self, source: SourceConfig, version: FileVersion, reason: str) -> None:
        """A file that cannot be dispatched at all (an odd name): one FAILED row says why."""
        await self.planner.reject(source, version, reason)

    # ------------------------------------------------------------------ running

    async def run(self, stop: asyncio.Event) -> None:
        """Feed and run workers until ``stop``; then give back unstarted work and drain."""
        self.state.stop = stop
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self.workers.worker(), name=f"worker-{i}")
                for i in range(self.state.config.workers)
            ]
            await self.feeder.feed(stop)
            self.released = await self.feeder.release_queued()
            for _ in workers:
                await self.feeder.queue.put([])  # an empty group tells a worker to exit
        await self.after.moves_done()
        self.outcomes.delivered.flush()  # the last batch's line, before the loop stops

    async def wait_idle(self) -> None:
        """Wait until nothing is due, queued, running or waiting for a retry, nor moving to a
        ``done_dir`` or ``failed_dir`` (``--once``: its stop would call the moves off), but a
        move stuck in a hung folder only for a while (``AfterActions.moves_idle``)."""
        await self.feeder.wait_idle()
        await self.after.moves_idle()

    async def moves_done(self) -> None:
        """Wait for the after-actions running in threads (moves to another filesystem)."""
        await self.after.moves_done()
