"""Planning: complete files from a watcher routed, and written to the journal as PENDING rows
(or handed to an inline lane); files the journal knew already settled.

Never delivers a file itself (the lanes and the workers do) and never decides a source's fate
(``fate.py`` does, through the after-actions).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

from ..asyncutil import in_daemon_thread
from ..birth import born
from ..config import SourceConfig
from ..content import facts_for, needs_content
from ..journal import PlannedStep, planned_steps
from ..limits import ItemBudget
from ..models import FileVersion, Status
from ..router import Chain
from ..textsafe import escape
from .after import ACTS, AfterActions
from .lanes import InlineLanes, Item, Known
from .state import DispatchState, first_unrun, marked

log = logging.getLogger("filedispatch.dispatcher")


class Planner:
    """Routes the files it is offered and plans them; settles the ones seen again."""

    def __init__(
        self,
        state: DispatchState,
        lanes: InlineLanes,
        after: AfterActions,
        max_items: int | None,
    ) -> None:
        self.state = state
        self.lanes = lanes
        self.after = after
        self.budget = ItemBudget(max_items) if max_items is not None else None
        self._classifiers: dict[str, object] = {}

    def clear(self) -> None:
        """Forget the classifier hooks loaded (the configuration changed)."""
        self._classifiers.clear()

    def route(self, version: FileVersion) -> list[Chain]:
        """The chains a version goes through, with the facts its rules need (may do I/O)."""
        router = self.state.router
        facts = facts_for(router, version, self._classifiers, self.state.learned)
        return router.route(version, facts)

    async def offer(self, source: SourceConfig, versions: Sequence[FileVersion]) -> int:
        """Plan complete files from a watcher: route them and write PENDING rows. Returns how
        many of them no rule takes (the watcher counts them among the files it skipped)."""
        state = self.state
        if not versions:
            return 0
        if source.shared:  # each host numbers devices its own way: the delivering node's differs
            versions = [dataclasses.replace(v, dev=0) if v.dev else v for v in versions]
        router = state.router
        if needs_content(router):
            routes = await in_daemon_thread(lambda: [self.route(v) for v in versions])
        else:
            routes = [router.route(v) for v in versions]
        if any(routes):  # the files a rule takes are recorded with their birth time
            versions = await in_daemon_thread(
                lambda: [born(v) if c else v for v, c in zip(versions, routes, strict=True)]
            )
        if self.budget is not None:  # --max-items: only work not done yet counts
            versions, routes = await self.budget.admit(
                versions, routes, state.journal, state.summary
            )
        steps: list[PlannedStep] = []
        matched: list[Known] = []
        moves: list[Item] = []
        copies: list[Item] = []
        unmatched = 0
        await self.lanes.prepare(source, routes)
        for version, chains in zip(versions, routes, strict=True):
            if not chains:
                unmatched += 1
                log.debug(
                    "skipping %s in %s: no rule takes it", escape(version.relpath), source.key
                )
                continue
            lane = self.lanes.lane(source, chains, version)
            if lane is not None:
                (moves if lane.move else copies).append((version, chains[0], lane))
                continue
            matched.append((version, chains))
            steps += planned_steps(version, chains)
        state.summary.unmatched += unmatched
        known: list[Known] = []
        if moves:
            known += await self.lanes.moves(source, moves)
        if copies:
            known += await self.lanes.copies(source, copies)
        if steps:
            new = await state.journal.plan(steps)
            if new:
                state.wake.set()
            if new < len(steps):
                known += matched
        if known:
            await self._settle_known(source, known)
        if steps or moves or copies:
            state.changed()
        return unmatched

    async def _settle_known(self, source: SourceConfig, known: list[Known]) -> None:
        """Files seen again: count the ones already done, queue again the steps that never ran
        behind a step that succeeds now, and finish their after-action (one a crash or a stop
        interrupted, or one the configuration asks for since)."""
        journal = self.state.journal
        if not journal.writable.is_set():
            return  # no source is touched while the journal fails; a later scan sees them
        states = await journal.version_states([v for v, _ in known])
        unrun: list[tuple[str, str]] = []
        for version, chains in known:
            rows = {key: (status, n) for key, status, n in states.get(version.key, [])}
            keys = [key for chain in chains for key in chain.keys]
            if not keys or any(key not in rows for key in keys):
                continue  # steps planned just now: they run first
            ready = [first_unrun(chain.keys, rows) for chain in chains]
            if any(ready):
                unrun += [(version.key, key) for key in ready if key is not None]
                continue
            statuses = [Status(rows[key][0]) for key in keys]
            if all(s == Status.SUCCEEDED for s in statuses):
                self.state.summary.already_done += 1
            was_marked = any(marked(*rows[key]) for key in keys)
            steps = [step for chain in chains for step in chain.steps]
            what = self.after.fate_of(source, steps, statuses, was_marked)
            if what in ACTS:
                self.after.act(source, version, what)
        if unrun and await journal.requeue_unrun(unrun):
            self.state.wake.set()

    async def reject(self, source: SourceConfig, version: FileVersion, reason: str) -> None:
        """A file that cannot be dispatched at all (an odd name): one FAILED row says why."""
        log.warning("cannot dispatch %r from %s: %s", version.relpath, source.key, reason)
        await self.state.journal.record_failed_name(version, "-", reason)
        self.state.summary.failed += 1
