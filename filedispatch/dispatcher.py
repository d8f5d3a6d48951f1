"""Dispatching: plan routed files into the journal, then run them with a fixed pool of workers.

claim (journal) -> processor -> outcome (journal) -> after-action on the source. The source is
moved or removed only after the journal has committed that every destination has the file.
Processors' own exceptions never reach here: they raise our Transient/Permanent errors.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import random
import shutil
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from . import fastpath, relocate, sourcefile
from .asyncutil import first_completed
from .config import Config, SourceConfig, Step, scrub, secrets_of
from .content import facts_for, needs_content
from .errors import (
    DeliveryError,
    JournalError,
    PermanentDeliveryError,
    SourceUnreadableError,
    SourceVanishedError,
    TransientDeliveryError,
)
from .fate import Fate, fate, renamed_by_delivery
from .journal import Journal, PlannedStep, StepResult, planned_steps
from .models import Dispatch, FileVersion, Outcome, Status
from .processors import BatchCopier, Mover, MoveUnavailable, Registry, StepContext
from .router import Chain, Router

if TYPE_CHECKING:
    from .learn import Learned

log = logging.getLogger(__name__)


#: files moved inline per journal write; the next chunk's rows commit while one moves
INLINE_CHUNK = 512
#: files copied per batch (each holds an open file until the batch is flushed)
COPY_CHUNK = 128
#: files larger than this are copied by the workers, several at once, not in batches
COPY_MAX_SIZE = 1024 * 1024
#: chunks planned ahead of the one being delivered
INLINE_AHEAD = 2
#: seconds before claiming again after the journal refused a claim
RETRY_CLAIM_S = 1.0


@dataclass(frozen=True, slots=True)
class Lane:
    """How a new file skips the queue: renamed on the loop, or copied in a batch."""

    step: Step
    processor: Mover | BatchCopier
    move: bool  #: renamed inline (Mover), else copied in a batch (BatchCopier)


#: a file on an inline lane: its version, its rule's chain, the lane
Item = tuple[FileVersion, Chain, Lane]
#: an inline delivery's outcome: version, result, source already gone (renamed), its step
Done = tuple[FileVersion, StepResult, bool, Step]
#: a file the journal knew already, with the chains its rules route it through now
Known = tuple[FileVersion, list[Chain]]


@dataclass
class DestinationStats:
    """Counters for one destination, for the status API and the console."""

    succeeded: int = 0
    failed: int = 0
    retried: int = 0
    bytes: int = 0
    last_error: str | None = None


@dataclass
class RunSummary:
    """What a ``--once`` run did (and what a long run has done so far)."""

    processed: int = 0  #: file versions whose every destination succeeded in this run
    already_done: int = 0  #: versions found already dispatched
    unmatched: int = 0  #: files no rule takes
    failed: int = 0  #: versions with a destination FAILED for good in this run
    skipped: int = 0  #: not offered because of --max-items


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
        self.config = config
        #: the learned rules' models (see learn.learning); None: those rules take no file
        self.learned = learned
        #: files recorded by ``mark-existing`` get their after-action like delivered ones
        self.consume_marked = consume_marked
        self.router = Router(config)
        self.journal = journal
        self.registry = registry
        self.workdir = workdir
        self.max_items = max_items
        self.sources = {s.key: s for s in config.sources}
        self.summary = RunSummary()
        self.stats: dict[str, DestinationStats] = defaultdict(DestinationStats)
        self.in_flight: dict[int, Dispatch] = {}
        self.stopped_sources: set[str] = set()
        self._offered = 0
        self._wake = asyncio.Event()
        self._running = asyncio.Event()
        self._running.set()
        self._stop = asyncio.Event()  #: the service's stop, once ``run`` has it
        self._queue: asyncio.Queue[list[Dispatch]] = asyncio.Queue(maxsize=config.workers * 8)
        self._idle = asyncio.Event()
        self._busy = 0
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self._on_change = on_change
        self._classifiers: dict[str, object] = {}
        self._room = asyncio.Event()
        self._secrets = secrets_of(config)
        self.released = 0
        self._last_write: asyncio.Future[None] | None = None
        self._batched = 0  #: files in copy batches running now
        #: (source, rule) -> how its new files skip the workers, or None
        self._lanes: dict[tuple[str, str], Lane | None] = {}
        #: after-actions that move a file to another filesystem, run in threads
        self._moving: set[asyncio.Task[object]] = set()

    # ------------------------------------------------------------------ configuration

    def reconfigure(self, config: Config) -> None:
        """Switch rules and sources (SIGHUP); rows in flight finish under their old steps."""
        self.config = config
        self.router = Router(config)
        self.sources = {s.key: s for s in config.sources}
        self._classifiers.clear()
        self._lanes.clear()
        self._secrets = secrets_of(config)
        # new deliveries use processors built from the new options; old ones close once idle
        self.registry.retire_unused(step for rule in config.rules for step in rule.to)
        self._wake.set()

    # ------------------------------------------------------------------ planning

    def route(self, version: FileVersion) -> list[Chain]:
        facts = facts_for(self.router, version, self._classifiers, self.learned)
        return self.router.route(version, facts)

    async def offer(self, source: SourceConfig, versions: Sequence[FileVersion]) -> None:
        """Plan complete files from a watcher: route them and write PENDING rows."""
        if self.max_items is not None:
            room = max(0, self.max_items - self._offered)
            self.summary.skipped += max(0, len(versions) - room)
            versions = versions[:room]
        if not versions:
            return
        if needs_content(self.router):
            routes = await asyncio.to_thread(lambda: [self.route(v) for v in versions])
        else:
            routes = [self.router.route(v) for v in versions]
        steps: list[PlannedStep] = []
        matched: list[Known] = []
        moves: list[Item] = []
        copies: list[Item] = []
        for version, chains in zip(versions, routes, strict=True):
            if not chains:
                self.summary.unmatched += 1
                log.debug("no rule takes %s", version.relpath)
                continue
            lane = self._lane(source, chains, version)
            if lane is not None:
                (moves if lane.move else copies).append((version, chains[0], lane))
                continue
            matched.append((version, chains))
            steps += planned_steps(version, chains)
        self._offered += len(matched) + len(moves) + len(copies)
        known: list[Known] = []
        if moves:
            known += await self._inline(source, moves, INLINE_CHUNK, self._move_chunk)
        if copies:
            known += await self._inline(source, copies, COPY_CHUNK, self._copy_chunk)
        if steps:
            new = await self.journal.plan(steps)
            if new:
                self._wake.set()
            if new < len(steps):
                known += matched
        if known:
            await self._settle_known(source, known)
        if (steps or moves or copies) and self._on_change:
            self._on_change()

    # ------------------------------------------------------------------ the inline lanes

    def _lane(self, source: SourceConfig, chains: list[Chain], version: FileVersion) -> Lane | None:
        """How a new file skips the queue and the workers, if it can (see _inline)."""
        if not fastpath.INLINE_LANES or len(chains) != 1 or chains[0].label is not None:
            return None  # a label is recorded by plan(), which the lanes do not use
        if not self._may_start() or source.key in self.stopped_sources:
            return None
        key = (source.key, chains[0].rule)
        if key in self._lanes:
            lane = self._lanes[key]
        else:
            lane = self._lanes[key] = self._find_lane(source, chains[0].steps)
        if lane is None or (not lane.move and version.size > COPY_MAX_SIZE):
            return None
        sem = self._semaphore(lane.step)
        return None if sem is not None and sem.locked() else lane

    def _find_lane(self, source: SourceConfig, steps: tuple[Step, ...]) -> Lane | None:
        if len(steps) != 1 or source.stop_on_error:  # stop_on_error: strictly in order
            return None
        step = steps[0]
        processor = self.registry.get(step)
        if (
            renamed_by_delivery(source, steps)
            and isinstance(processor, Mover)
            and processor.can_move_from(source.path)
        ):
            return Lane(step, processor, move=True)
        if isinstance(processor, BatchCopier):
            return Lane(step, processor, move=False)
        return None

    async def _inline(
        self,
        source: SourceConfig,
        items: list[Item],
        size: int,
        run: Callable[[SourceConfig, list[Item], list[int | None]], Awaitable[list[Known]]],
    ) -> list[Known]:
        """New files that skip the claim, the queue and the workers: their rows are inserted
        IN_PROGRESS, the files delivered in chunks by ``run``, each chunk's outcomes recorded
        in one write. For a burst into a local folder this is most of the work saved. Returns
        the versions the journal already knew (they are settled by the caller instead).

        Pipelined: the journal commits the next chunks' rows while one is delivered.
        """
        known: list[Known] = []
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        ahead = collections.deque(self._plan_started(c) for c in chunks[:INLINE_AHEAD])
        try:
            for i, chunk in enumerate(chunks):
                ids = await ahead.popleft()
                if i + INLINE_AHEAD < len(chunks):
                    ahead.append(self._plan_started(chunks[i + INLINE_AHEAD]))
                known += await run(source, chunk, ids)
        finally:
            for planned in ahead:  # after a failure these rows wait for a restart
                planned.add_done_callback(_report_write)
        return known

    def _plan_started(self, chunk: list[Item]) -> asyncio.Future[list[int | None]]:
        steps = [
            PlannedStep(v, c.rule, 0, c.keys[0], lane.step.display, lane.step.kind)
            for v, c, lane in chunk
        ]
        return self.journal.plan_started(steps, time.time())

    def _begin_chunk(
        self, chunk: list[Item], ids: list[int | None]
    ) -> tuple[list[Known], list[Done], list[tuple[Lane, StepContext]]]:
        """Sort a planned chunk: versions the journal knew, rows handed back because dispatching
        was paused meanwhile (the workers take them on resume), and the work to do."""
        known: list[Known] = []
        given_back: list[Done] = []
        work: list[tuple[Lane, StepContext]] = []
        for (version, chain, lane), row_id in zip(chunk, ids, strict=True):
            if row_id is None:
                known.append((version, [chain]))
            elif not self._may_start():
                pending = StepResult(row_id, Status.PENDING, 0)
                given_back.append((version, pending, False, lane.step))
            else:
                ctx = StepContext(row_id, version, version.path, chain.rule, 0, 1, self.workdir)
                work.append((lane, ctx))
        return known, given_back, work

    async def _move_chunk(
        self, source: SourceConfig, chunk: list[Item], ids: list[int | None]
    ) -> list[Known]:
        """Rename a chunk whose IN_PROGRESS rows are committed, then queue their outcomes.

        No await inside: nothing can interrupt it between a move and its record.
        """
        known, done, work = self._begin_chunk(chunk, ids)
        for lane, ctx in work:
            version = ctx.version
            started = time.time()
            try:
                outcome: Outcome | Exception = cast(Mover, lane.processor).move_now(ctx)
            except MoveUnavailable as exc:
                log.info(
                    "%s cannot be renamed into %s (%s)", version.relpath, lane.step.display, exc
                )
                if not exc.this_file:
                    self._lanes[(version.source, ctx.rule)] = None
                self._wake.set()  # give it to a worker, which links or copies
                pending = StepResult(ctx.dispatch_id, Status.PENDING, 0)
                done.append((version, pending, False, lane.step))
                continue
            except Exception as exc:
                outcome = exc
            result = self._inline_result(ctx, lane, outcome, started)
            moved = isinstance(outcome, Outcome) and outcome.detail == "moved"
            done.append((version, result, moved, lane.step))
        self._record_inline(source, done)
        return known

    async def _copy_chunk(
        self, source: SourceConfig, chunk: list[Item], ids: list[int | None]
    ) -> list[Known]:
        """Copy a chunk of small files whose IN_PROGRESS rows are committed, in one thread per
        destination, then queue their outcomes in one write."""
        known, done, work = self._begin_chunk(chunk, ids)
        groups: dict[int, list[tuple[Lane, StepContext]]] = {}
        for lane, ctx in work:
            groups.setdefault(id(lane.processor), []).append((lane, ctx))
        started = time.time()
        for group in groups.values():
            lane = group[0][0]
            copier = cast(BatchCopier, lane.processor)
            sem = self._semaphore(lane.step)  # a batch is one delivery in flight
            if sem is not None:
                await sem.acquire()
            self._batched += len(group)
            try:
                outcomes = await asyncio.to_thread(copier.copy_batch, [c for _, c in group])
            finally:
                self._batched -= len(group)
                if sem is not None:
                    sem.release()
            for (lane, ctx), outcome in zip(group, outcomes, strict=True):
                result = self._inline_result(ctx, lane, outcome, started)
                done.append((ctx.version, result, False, lane.step))
        self._record_inline(source, done)
        return known

    def _inline_result(
        self, ctx: StepContext, lane: Lane, outcome: Outcome | Exception, started: float
    ) -> StepResult:
        """The row's outcome for one inline delivery (counted and logged)."""
        if isinstance(outcome, Outcome):
            result = StepResult(
                ctx.dispatch_id, Status.SUCCEEDED, 1, location=outcome.location,
                detail=outcome.detail, started=started, sha256=outcome.sha256,
            )  # fmt: skip
        else:
            if isinstance(outcome, DeliveryError):
                error = _source_unreadable(outcome, ctx) or outcome
            else:
                error = _unexpected(outcome, ctx)
            v = ctx.version
            row = Dispatch(
                ctx.dispatch_id, v.source, str(v.root), v.relpath, v.size, v.mtime_ns, ctx.rule,
                0, lane.step.display, lane.step.kind, Status.IN_PROGRESS, 0, None, None,
                started, started, None, None, 0.0,
            )  # fmt: skip
            result = self._failure(row, lane.step, 1, error, started)
        self._note(lane.step.display, result, ctx.version)
        return result

    def _record_inline(self, source: SourceConfig, done: list[Done]) -> None:
        """One write for a chunk's outcomes; then, once it is durable, the after-actions."""
        if not done:
            return
        self._write([r for _, r, _, _ in done])
        for version, result, gone, step in done:
            self._conclude(source, version, (step,), [result.status], gone=gone)

    async def _settle_known(self, source: SourceConfig, known: list[Known]) -> None:
        """Files seen again: count the ones already done, and finish their after-action (one a
        crash or a stop interrupted, or one the configuration asks for since)."""
        if not self.journal.writable.is_set():
            return  # no source is touched while the journal fails; a later scan sees them
        states = await self.journal.version_states([v for v, _ in known])
        for version, chains in known:
            rows = {key: (status, n) for key, status, n in states.get(version.key, [])}
            keys = [key for chain in chains for key in chain.keys]
            if not keys or any(key not in rows for key in keys):
                continue  # steps planned just now: they run first
            statuses = [Status(rows[key][0]) for key in keys]
            if all(s == Status.SUCCEEDED for s in statuses):
                self.summary.already_done += 1
            marked = any(_marked(*rows[key]) for key in keys)
            steps = [step for chain in chains for step in chain.steps]
            what = fate(source, steps, statuses, marked=marked and not self.consume_marked)
            if what in _ACTS:
                self._after_action(source, version, what)

    async def reject(self, source: SourceConfig, version: FileVersion, reason: str) -> None:
        """A file that cannot be dispatched at all (an odd name): one FAILED row says why."""
        log.warning("cannot dispatch %r from %s: %s", version.relpath, source.key, reason)
        await self.journal.record_failed_name(version, "-", reason)
        self.summary.failed += 1

    # ------------------------------------------------------------------ running

    def pause(self) -> None:
        self._running.clear()

    def _may_start(self) -> bool:
        """New work starts only while not paused and while the journal takes writes: a
        delivery the journal cannot record is one it would repeat after a restart."""
        return self._running.is_set() and self.journal.writable.is_set()

    def resume(self) -> None:
        self._running.set()
        self._wake.set()

    @property
    def running(self) -> int:
        """Deliveries running now: the workers' and the files of copy batches."""
        return len(self.in_flight) + self._batched

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def wake(self) -> None:
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        """Feed and run workers until ``stop``; then give back unstarted work and drain."""
        self._stop = stop
        async with asyncio.TaskGroup() as tg:
            workers = [
                tg.create_task(self._worker(), name=f"worker-{i}")
                for i in range(self.config.workers)
            ]
            await self._feed(stop)
            self.released = await self._release_queued()
            for _ in workers:
                await self._queue.put([])  # an empty group tells a worker to exit
        await self.moves_done()

    async def _feed(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if not self._running.is_set():
                await first_completed(stop.wait(), self._running.wait())
                continue
            if not self.journal.writable.is_set():
                await first_completed(stop.wait(), self.journal.writable.wait())
                continue
            self._wake.clear()
            room = self._queue.maxsize - self._queue.qsize()
            if room < self._queue.maxsize // 2:  # claim in pages, not one group at a time
                self._room.clear()
                await first_completed(stop.wait(), self._room.wait())
                continue
            skip = frozenset(self.stopped_sources)
            try:
                batch = await self.journal.claim(min(room, 256), time.time(), skip)
                due = None if batch else await self.journal.next_due()
            except JournalError as exc:  # unreadable (removed), or given up at a stop
                if self.journal.writable.is_set():
                    log.error("cannot claim work: %s", exc)
                await first_completed(stop.wait(), timeout=RETRY_CLAIM_S)
                continue
            for group in batch:
                self._queue.put_nowait(group)  # only the feeder puts, so there is room
            if batch:
                continue
            if self._busy == 0 and self._queue.empty():
                self._idle.set()
            timeout = 5.0 if due is None else min(5.0, max(0.0, due - time.time()) + 0.01)
            await first_completed(stop.wait(), self._wake.wait(), timeout=timeout)

    async def _release_queued(self) -> int:
        """At shutdown: claimed versions no worker started go back to PENDING (or, while the
        journal fails, stay IN_PROGRESS and are resumed at the next start)."""
        results: list[StepResult] = []
        while not self._queue.empty():
            results += [
                _waiting(d, d.next_attempt)
                for d in self._queue.get_nowait()
                if d.status == Status.IN_PROGRESS
            ]
        try:
            await self.journal.finish(results)
        except JournalError as exc:
            log.warning("%d claimed dispatch(es) resume at the next start: %s", len(results), exc)
        return len(results)

    async def _worker(self) -> None:
        while True:
            group = await self._queue.get()
            if self._queue.qsize() <= self._queue.maxsize // 2:
                self._room.set()
            if not group:
                return
            if group[0].source in self.stopped_sources:  # stop_on_error: give it back
                self.journal.finish_soon(
                    [
                        StepResult(d.id, Status.PENDING, d.attempts, reason=d.reason)
                        for d in group
                        if d.status == Status.IN_PROGRESS
                    ]
                )
                continue
            if not self.journal.writable.is_set():  # claimed before the journal failed
                await first_completed(self.journal.writable.wait(), self._stop.wait())
                if not self.journal.writable.is_set():
                    continue  # stopping: its rows stay IN_PROGRESS, resumed at the next start
            self._busy += 1
            self._idle.clear()
            try:
                await self._run_version(group)
            except JournalError as exc:  # only when stopping: the rows resume at the next start
                log.error("%s not recorded: %s", group[0].relpath, exc)
            except Exception:  # a bug must cost one file a delay, not the worker
                log.exception("unexpected error while dispatching %s", group[0].relpath)
                await self._finish_quietly(
                    [
                        StepResult(d.id, Status.PENDING, d.attempts, next_attempt=time.time() + 60)
                        for d in group
                        if d.status == Status.IN_PROGRESS
                    ]
                )
            finally:
                self._busy -= 1
                if self._busy == 0:
                    self._wake.set()
                if self._on_change:
                    self._on_change()

    async def _finish_quietly(self, results: list[StepResult]) -> None:
        try:
            await self.journal.finish(results)
        except JournalError as exc:
            log.error("the journal could not record an outcome: %s", exc)

    async def wait_idle(self) -> None:
        """Wait until nothing is due, queued, running or waiting for a retry (``--once``)."""
        while True:
            self._idle.clear()
            self._wake.set()
            await self._idle.wait()
            if not await self.journal.unfinished():
                return
            if self.stopped_sources and set(self.sources) <= self.stopped_sources:
                return
            due = await self.journal.next_due()
            if due is not None:
                await asyncio.sleep(min(5.0, max(0.05, due - time.time())))

    # ------------------------------------------------------------------ one file version

    async def _run_version(self, rows: list[Dispatch]) -> None:
        """Run a claimed version's current chains (the steps its rules name now). Rows of steps
        no longer in the configuration are set aside: claimed ones fail with that reason, final
        ones are history. So a version whose step was fixed runs its new chain."""
        version = rows[0].version
        source = self.sources.get(version.source)
        current: list[Dispatch] = []
        gone: list[Dispatch] = []
        for d in rows:
            (current if self._current(d) else gone).append(d)
        left = [d for d in gone if d.status == Status.IN_PROGRESS]
        if left:
            note = "this step is no longer in the configuration (its rule changed)"
            self._write([StepResult(d.id, Status.FAILED, d.attempts, reason=note) for d in left])
            for d in left:
                d.status = Status.FAILED
        if not current:
            return
        steps = [self._step(d) for d in current]
        # the source may be renamed into place only when it is consumed and this is its one
        # step: a link or a later step would share the fate of a live source
        may_move = source is not None and renamed_by_delivery(source, steps)
        chains: dict[str, list[Dispatch]] = defaultdict(list)
        for d in current:
            chains[d.rule].append(d)
        if len(chains) == 1:  # the common case: no gather, no extra tasks
            statuses = await self._run_chain(version, current, may_move)
        else:
            final = await asyncio.gather(
                *(self._run_chain(version, c, may_move) for c in chains.values())
            )
            statuses = [s for chain_statuses in final for s in chain_statuses]
        if source is not None:
            marked = any(_marked(d.status, d.attempts) for d in current)
            self._conclude(source, version, steps, statuses, marked=marked)

    def _current(self, row: Dispatch) -> bool:
        """Whether a row is for a step its rule names now (the same step, after the same ones)."""
        rule = self.router.by_name.get(row.rule)
        if rule is None or row.step >= len(rule.chain.steps):
            return False
        if row.step_key is None:  # a row not read by claim: its destination must still match
            return rule.chain.steps[row.step].display == row.destination
        return rule.chain.keys[row.step] == row.step_key

    def _conclude(
        self,
        source: SourceConfig,
        version: FileVersion,
        steps: Sequence[Step | None],
        statuses: list[Status],
        *,
        marked: bool = False,
        gone: bool = False,
    ) -> None:
        """Count a version whose rows are all final, and schedule its source's after-action
        (see fate.fate). ``gone``: the delivery already renamed the source away."""
        if all(s == Status.SUCCEEDED for s in statuses):
            self.summary.processed += 1
        elif all(s in (Status.SUCCEEDED, Status.FAILED) for s in statuses):
            self.summary.failed += 1
            if source.stop_on_error and source.key not in self.stopped_sources:
                self.stopped_sources.add(source.key)
                log.error(
                    "source %s stops dispatching after a failure (stop_on_error); "
                    "fix the cause and restart",
                    source.key,
                )
        what = fate(source, steps, statuses, marked=marked and not self.consume_marked)
        if what in _ACTS and not gone:
            self._when_durable(lambda: self._after_action(source, version, what))

    def _when_durable(self, action: Callable[[], None]) -> None:
        """Run ``action`` once every outcome recorded so far is committed (never before)."""
        fut = self._last_write

        def run(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                log.error("the journal did not confirm a delivery; the source is left in place")
                return
            action()

        if fut is None:
            action()
        elif fut.done():
            run(fut)
        else:
            fut.add_done_callback(run)

    def _step(self, row: Dispatch) -> Step | None:
        rule = self.router.by_name.get(row.rule)
        if rule is None or row.step >= len(rule.chain.steps):
            return None
        return rule.chain.steps[row.step]

    async def _run_chain(
        self, version: FileVersion, rows: list[Dispatch], may_move: bool
    ) -> list[Status]:
        """Run a rule's steps in order; a failure stops the chain, a retry pauses it."""
        rows.sort(key=lambda d: d.step)
        workdir = self.workdir / f"{version.key}-{_safe(rows[0].rule)}"
        current = version.path
        for i, row in enumerate(rows):
            if row.status == Status.SUCCEEDED:
                produced = self._produced(row)
                if produced is None:
                    continue
                if produced.exists():
                    current = produced
                    continue
                row.status = Status.IN_PROGRESS  # a transform's output is gone: make it again
            if row.status != Status.IN_PROGRESS:
                # FAILED: the chain stopped there (the later steps cannot run, whatever they
                # are now); PENDING: a retry is not due yet (the later steps wait for it)
                await self._hold_rest(row, rows[i + 1 :])
                break
            result = await self._attempt(row, version, current, workdir, may_move)
            if result.status == Status.SUCCEEDED:
                if result.output:
                    current = Path(result.output)
                continue
            row.next_attempt = result.next_attempt
            await self._hold_rest(row, rows[i + 1 :])
            break
        statuses = [d.status for d in rows]
        if all(s in (Status.SUCCEEDED, Status.FAILED) for s in statuses) and workdir.exists():
            await asyncio.to_thread(shutil.rmtree, workdir, True)
        return statuses

    async def _hold_rest(self, row: Dispatch, rest: list[Dispatch]) -> None:
        """The steps after ``row``, which did not succeed: after a FAILED step they fail too
        (none will ever run); behind a PENDING one they wait for its retry. None is left
        IN_PROGRESS, so no run ever waits for rows nothing will run."""
        if row.status == Status.FAILED:
            rest = [d for d in rest if d.status in (Status.IN_PROGRESS, Status.PENDING)]
            note = f"not run: step {row.step + 1} ({row.destination}) failed"
            results = [StepResult(d.id, Status.FAILED, d.attempts, reason=note) for d in rest]
        else:
            rest = [d for d in rest if d.status == Status.IN_PROGRESS]
            results = [_waiting(d, row.next_attempt) for d in rest]
        if not results:
            return
        await self.journal.finish(results)
        for d, r in zip(rest, results, strict=True):
            d.status = r.status

    @staticmethod
    def _produced(row: Dispatch) -> Path | None:
        return Path(row.output) if row.output else None

    def _semaphore(self, step: Step) -> asyncio.Semaphore | None:
        if step.concurrency is None:
            return None
        key = f"{step.identity()}\0{step.concurrency}"
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = asyncio.Semaphore(step.concurrency)
        return sem

    async def _attempt(
        self, row: Dispatch, version: FileVersion, current: Path, workdir: Path, may_move: bool
    ) -> StepResult:
        step = self._step(row)
        attempt = row.attempts + 1
        started = time.time()
        if step is None or row.destination != step.display:
            result = StepResult(
                row.id,
                Status.FAILED,
                row.attempts,
                started=started,
                reason="this destination is no longer in the configuration",
            )
            self._record(row, result, version)
            return result
        ctx = StepContext(
            dispatch_id=row.id,
            version=version,
            input=current,
            rule=row.rule,
            step=row.step,
            attempt=attempt,
            workdir=workdir,
            resuming=row.started is not None,  # claimed before: a crash may have hit mid-way
            may_move=may_move,
            label=row.label,
        )
        self.in_flight[row.id] = row
        sem = self._semaphore(step)
        try:
            if sem is not None:
                await sem.acquire()
            try:
                if row.attempts and current is version.path:
                    _check_unchanged(version, self._follows(version))
                outcome = await self._deliver(step, ctx)
            finally:
                if sem is not None:
                    sem.release()
        except DeliveryError as exc:
            result = self._failure(row, step, attempt, exc, started)
        else:
            result = StepResult(
                row.id,
                Status.SUCCEEDED,
                attempt,
                location=self._scrub(outcome.location),  # a URL's query may carry a token
                detail=None if outcome.detail is None else self._scrub(outcome.detail),
                started=started,
                output=None if outcome.produced is None else str(outcome.produced),
                sha256=outcome.sha256,
            )
        finally:
            self.in_flight.pop(row.id, None)
        self._record(row, result, version)
        return result

    async def _deliver(self, step: Step, ctx: StepContext) -> Outcome:
        processor = self.registry.acquire(step)
        try:
            if step.timeout is not None:
                return await asyncio.wait_for(processor.deliver(ctx), step.timeout)
            return await processor.deliver(ctx)
        except PermanentDeliveryError as exc:
            unreadable = _source_unreadable(exc, ctx)
            if unreadable is None:
                raise
            raise unreadable from exc.__cause__
        except DeliveryError:
            raise
        except TimeoutError as exc:
            if step.timeout is None:  # a processor's own timeout it did not translate
                raise TransientDeliveryError(f"timed out: {exc}") from exc
            raise TransientDeliveryError(f"timed out after {step.timeout:g}s") from None
        except Exception as exc:  # a processor bug or a foreign error it did not translate
            raise _unexpected(exc, ctx) from exc
        finally:
            self.registry.release(processor)

    def _failure(
        self, row: Dispatch, step: Step, attempt: int, exc: DeliveryError, started: float
    ) -> StepResult:
        reason = self._scrub(str(exc) or type(exc).__name__)
        kind = type(exc.__cause__ or exc).__name__
        policy = step.retry
        retry = isinstance(exc, TransientDeliveryError) and attempt < policy.attempts
        if retry and policy.same_error and row.error_type not in (None, kind):
            retry = False
            reason += f" (a different error than before, {row.error_type}: not retried)"
        if not retry:
            if isinstance(exc, TransientDeliveryError) and policy.attempts > 1:
                reason = f"{reason} (gave up after {attempt} attempts)"
            return StepResult(
                row.id, Status.FAILED, attempt, reason=reason, error_type=kind, started=started
            )
        wait = policy.wait(attempt)
        if policy.jitter:
            wait *= random.uniform(0.8, 1.2)
        hint = getattr(exc, "retry_after", None)
        if hint is not None:
            wait = max(wait, min(float(hint), policy.max_delay or float(hint)))
        self.stats[row.destination].retried += 1
        log.info(
            "%s -> %s: attempt %d failed (%s); retrying in %.1fs",
            row.relpath,
            row.destination,
            attempt,
            reason,
            wait,
        )
        return StepResult(
            row.id,
            Status.PENDING,
            attempt,
            reason=reason,
            error_type=kind,
            started=started,
            next_attempt=time.time() + wait,
        )

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _record(self, row: Dispatch, result: StepResult, version: FileVersion) -> None:
        self._write([result])
        row.status = result.status
        row.attempts = result.attempts
        row.error_type = result.error_type
        self._note(row.destination, result, version)

    def _write(self, results: list[StepResult]) -> None:
        # Not awaited: a worker goes on while the writer commits many outcomes at once. The
        # source is only touched once this write is durable (see _when_durable).
        self._last_write = self.journal.finish_soon(results)
        self._last_write.add_done_callback(_report_write)

    def _note(self, destination: str, result: StepResult, version: FileVersion) -> None:
        """Count and log an attempt's result (the journal write is separate)."""
        stats = self.stats[destination]
        if result.status == Status.SUCCEEDED:
            stats.succeeded += 1
            stats.bytes += version.size
            log.info("%s -> %s", version.relpath, result.location)
        elif result.status == Status.FAILED:
            stats.failed += 1
            stats.last_error = result.reason
            log.error("%s -> %s failed: %s", version.relpath, destination, result.reason)
        if result.status == Status.FAILED:
            self._wake.set()

    # ------------------------------------------------------------------ after-actions

    def _after_action(self, source: SourceConfig, version: FileVersion, what: Fate) -> None:
        """Delete the source, or move it to done_dir or failed_dir, if it is still the very
        file that was delivered (same device, inode, size, mtime and ctime); a file that
        changed since is a new version, dispatched on its own, and stays.

        Inline: an unlink or a same-filesystem rename is one quick syscall, and a thread hop
        per file would cost more than the work itself. A move to another filesystem copies
        the bytes, so it runs in a thread.
        """
        path = version.path
        try:
            st = _identity(path, source.follow_symlinks)
        except FileNotFoundError:
            return
        except OSError as exc:
            log.warning("cannot check %s after dispatch: %s", path, exc.strerror or exc)
            return
        if not version.same_file(st):
            log.info("%s changed since it was dispatched; it stays (a new version)", path)
            return
        try:
            if what is Fate.DELETE:
                os.unlink(path)  # a symbolic link itself, never its target
                return
            folder = source.done_dir if what is Fate.DONE_DIR else source.failed_dir
            assert folder is not None
            target = folder / version.relpath
            target.parent.mkdir(parents=True, exist_ok=True)
            relocate.rename_free(path, target)
        except fastpath.RenameUnavailable:
            unchanged = functools.partial(_unchanged, version, source.follow_symlinks)
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(
                    relocate.move_by_copy, path, target, unchanged, any_free_name=True
                )
            )
            self._moving.add(task)
            task.add_done_callback(self._moved)
        except OSError as exc:
            log.error("after-action %s on %s failed: %s", what, path, exc.strerror or exc)

    def _follows(self, version: FileVersion) -> bool:
        source = self.sources.get(version.source)
        return source is not None and source.follow_symlinks

    def _moved(self, task: asyncio.Task[object]) -> None:
        self._moving.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("after-action: moving a source by copying failed: %s", exc)

    async def moves_done(self) -> None:
        """Wait for the after-actions running in threads (moves to another filesystem)."""
        while self._moving:
            await asyncio.wait(set(self._moving))


#: the fates that act on the source file
_ACTS = (Fate.DELETE, Fate.DONE_DIR, Fate.FAILED_DIR)


def _waiting(row: Dispatch, next_attempt: float) -> StepResult:
    """A row handed back to wait (PENDING), its last error kept."""
    return StepResult(
        row.id,
        Status.PENDING,
        row.attempts,
        reason=row.reason,
        error_type=row.error_type,
        next_attempt=next_attempt,
    )


def _marked(status: Status | str, attempts: int) -> bool:
    """A SUCCEEDED row no attempt made: ``mark-existing`` recorded it without sending."""
    return status == Status.SUCCEEDED and attempts == 0


def _identity(path: Path, follow_symlinks: bool) -> os.stat_result:
    """The source as its version saw it: the link's target where links are followed."""
    st = os.lstat(path)
    if follow_symlinks and stat.S_ISLNK(st.st_mode):
        st = os.stat(path)
    return st


def _unchanged(version: FileVersion, follow_symlinks: bool) -> bool:
    """Whether the source is still the very file of ``version`` (for a move by copy)."""
    return version.same_file(_identity(version.path, follow_symlinks))


def _unexpected(exc: Exception, ctx: StepContext) -> DeliveryError:
    """A foreign exception from a processor, as one of ours (a vanished source is final)."""
    if isinstance(exc, FileNotFoundError) and not ctx.input.exists():
        return SourceVanishedError(f"the file {ctx.input} vanished before it was sent")
    return TransientDeliveryError(f"{type(exc).__name__}: {exc}")


def _check_unchanged(version: FileVersion, follow_symlinks: bool) -> None:
    """Before a retry: time has passed, and a source that changed since (a chmod, a rewrite)
    is a new version, dispatched on its own; this one must not send its bytes too."""
    try:
        st = _identity(version.path, follow_symlinks)
    except FileNotFoundError:
        raise SourceVanishedError(f"the file {version.path} vanished before it was sent") from None
    except OSError:
        return  # the delivery meets it again and says why
    if not version.same_file(st):
        raise SourceVanishedError(sourcefile.describe_change(version, st))


def _source_unreadable(exc: DeliveryError, ctx: StepContext) -> DeliveryError | None:
    """A source the service may not read yet (EACCES, EPERM: an upload tool that creates files
    0600, then fixes the mode) is worth retrying, within the step's retry policy; a
    destination that refuses us is not. Told apart by the file the error names."""
    cause = exc.__cause__
    if not isinstance(cause, PermissionError) or isinstance(exc, SourceUnreadableError):
        return None
    if cause.filename is None or os.fsdecode(cause.filename) != os.fspath(ctx.input):
        return None
    return SourceUnreadableError(str(exc))


def _report_write(fut: asyncio.Future[Any]) -> None:
    """An outcome nobody awaits: a journal failure is logged here, not lost."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("the journal could not record an outcome: %s", fut.exception())


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]
