"""The inline lanes: new files into a local folder that skip the claim, the queue and the
workers, renamed on the event loop or copied in batches.

Their rows are inserted IN_PROGRESS, the files delivered in chunks, each chunk's outcomes
recorded in one write; for a burst into a local folder this is most of the work saved. Used
only where ``fastpath.INLINE_LANES``; never for a file the workers must keep in order.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import cast

from .. import fastpath
from ..asyncutil import first_completed, in_daemon_thread, settle
from ..config import SourceConfig, Step
from ..errors import TransientDeliveryError
from ..fate import renamed_by_delivery
from ..journal import PlannedStep, StepResult
from ..models import Dispatch, FileVersion, Outcome, Status
from ..processors import BatchCopier, Mover, MoveUnavailable, StepContext
from ..processors.threads import CALL_OFF_PATIENCE_S
from ..router import Chain
from .after import AfterActions
from .outcomes import Outcomes, as_delivery_error, report_write
from .state import DispatchState

log = logging.getLogger("filedispatch.dispatcher")

#: files moved inline per journal write; the next chunk's rows commit while one moves
INLINE_CHUNK = 512
#: files copied per batch (each holds an open file until the batch is flushed)
COPY_CHUNK = 128
#: files larger than this (bytes) are copied by the workers, several at once, not in batches
COPY_MAX_SIZE = 1024 * 1024
#: chunks planned ahead of the one being delivered
INLINE_AHEAD = 2
#: copy batches in flight at once: while one waits for the disk (its fsyncs), the next is
#: copied (the copies are system calls, which release the GIL); each is one delivery against
#: the destination's ``concurrency``
COPY_BATCHES = 2


@dataclass(frozen=True, slots=True)
class Lane:
    """How a new file skips the queue: renamed on the loop, or copied in a batch."""

    step: Step
    processor: Mover | BatchCopier
    move: bool  #: renamed inline (Mover), else copied in a batch (BatchCopier)


def _key(source: SourceConfig, chains: list[Chain]) -> tuple[str, str] | None:
    """The key of the lane a new file of ``source`` routed through ``chains`` may take, or
    None where none can: a shared source's files are queued, for whichever node is free, and
    a label is recorded by plan(), which the lanes do not use."""
    if not fastpath.INLINE_LANES or len(chains) != 1 or source.shared:
        return None
    return None if chains[0].label is not None else (source.key, chains[0].rule)


#: a file on an inline lane: its version, its rule's chain, the lane
Item = tuple[FileVersion, Chain, Lane]
#: an inline delivery's outcome: version, result, source already gone (renamed), its step
Done = tuple[FileVersion, StepResult, bool, Step]
#: a file the journal knew already, with the chains its rules route it through now
Known = tuple[FileVersion, list[Chain]]
#: a chunk's new row ids, None where the version was planned before
Ids = list[int | None]


class InlineLanes:
    """Chooses a new file's lane and delivers the files of each lane in chunks."""

    def __init__(self, state: DispatchState, outcomes: Outcomes, after: AfterActions) -> None:
        self.state = state
        self.outcomes = outcomes
        self.after = after
        #: (source, rule) -> how its new files skip the workers, or None
        self._lanes: dict[tuple[str, str], Lane | None] = {}

    def clear(self) -> None:
        """Forget the lanes chosen (the configuration changed)."""
        self._lanes.clear()

    async def prepare(self, source: SourceConfig, routes: list[list[Chain]]) -> None:
        """Find the lanes of ``source``'s rules among ``routes`` not looked at yet (``lane``
        then only reads what was found)."""
        for chains in routes:
            key = _key(source, chains)
            if key is not None and key not in self._lanes:
                self._lanes[key] = await self._find(source, chains[0].steps)

    def lane(self, source: SourceConfig, chains: list[Chain], version: FileVersion) -> Lane | None:
        """How a new file skips the queue and the workers, if it can (as ``prepare`` found)."""
        key = _key(source, chains)
        if key is None or not self.state.may_start() or source.key in self.state.stopped_sources:
            return None
        lane = self._lanes.get(key)
        if lane is None or (not lane.move and version.size > COPY_MAX_SIZE):
            return None
        sem = self.state.semaphore(lane.step)
        return None if sem is not None and sem.locked() else lane

    async def _find(self, source: SourceConfig, steps: tuple[Step, ...]) -> Lane | None:
        if len(steps) != 1 or source.stop_on_error:  # stop_on_error: strictly in order
            return None
        step = steps[0]
        processor = self.state.registry.get(step)
        if renamed_by_delivery(source, steps) and isinstance(processor, Mover):
            # a mkdir and two stats, one of them in the destination: in a thread, never the
            # loop (a destination on a mount that hangs), and given CALL_OFF_PATIENCE_S
            look = in_daemon_thread(processor.can_move_from, source.path)
            try:
                if await asyncio.wait_for(asyncio.shield(look), CALL_OFF_PATIENCE_S):
                    return Lane(step, processor, move=True)
            except TimeoutError:
                look.add_done_callback(lambda f: f.cancelled() or f.exception())
                log.warning(
                    "%s: looking whether its files can be renamed into their destination has not "
                    "ended in %gs (a hung disk or mount?); they go through the workers",
                    source.key,
                    CALL_OFF_PATIENCE_S,
                )
                return None
        if isinstance(processor, BatchCopier):
            return Lane(step, processor, move=False)
        return None

    async def moves(self, source: SourceConfig, items: list[Item]) -> list[Known]:
        """Rename ``items`` into place; the versions the journal knew already are returned."""
        return await self._inline(source, items, INLINE_CHUNK, self._move_chunk)

    async def copies(self, source: SourceConfig, items: list[Item]) -> list[Known]:
        """Copy ``items`` in batches; the versions the journal knew already are returned."""
        return await self._inline(source, items, COPY_CHUNK, self._copy_chunk, COPY_BATCHES)

    async def _inline(
        self,
        source: SourceConfig,
        items: list[Item],
        size: int,
        run: Callable[
            [SourceConfig, list[Item], Ids, int | None, float],
            Coroutine[None, None, list[Known]],
        ],
        parallel: int = 1,
    ) -> list[Known]:
        """Deliver ``items`` in chunks of ``size`` with ``run``, ``parallel`` chunks at once.
        Pipelined: the journal commits the next chunks' rows while one is delivered."""
        known: list[Known] = []
        chunks = [items[i : i + size] for i in range(0, len(items), size)]
        ahead = collections.deque(self._plan_started(c) for c in chunks[:INLINE_AHEAD])
        running: collections.deque[asyncio.Task[list[Known]]] = collections.deque()
        try:
            for i, chunk in enumerate(chunks):
                if self.state.halted.is_set():  # planned rows resume at the next start
                    break
                epoch, now, planned = ahead.popleft()
                ids = await planned
                if i + INLINE_AHEAD < len(chunks):
                    ahead.append(self._plan_started(chunks[i + INLINE_AHEAD]))
                if parallel == 1:  # the moves: on the loop, nothing to overlap
                    known += await run(source, chunk, ids, epoch, now)
                    continue
                while len(running) >= parallel:
                    known += await running.popleft()
                running.append(asyncio.create_task(run(source, chunk, ids, epoch, now)))
            while running:
                known += await running.popleft()
        except BaseException as exc:
            # the chunks still running record what they delivered, unless this is a stop
            if isinstance(exc, asyncio.CancelledError):
                for task in running:
                    task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        finally:
            for _, _, planned in ahead:  # after a failure these rows wait for a restart
                planned.add_done_callback(report_write)
        return known

    def _plan_started(self, chunk: list[Item]) -> tuple[int | None, float, asyncio.Future[Ids]]:
        """Queue the chunk's rows, IN_PROGRESS; the fencing token they carry (read when they
        are queued, as the journal does), the time they are planned at (their ``created``,
        part of each delivery's name) and their ids to come."""
        steps = [
            PlannedStep(v, c.rule, 0, c.keys[0], lane.step.display, lane.step.kind)
            for v, c, lane in chunk
        ]
        now = time.time()
        return self.state.epoch(), now, self.state.journal.plan_started(steps, now)

    def _begin_chunk(
        self, chunk: list[Item], ids: Ids, epoch: int | None, now: float
    ) -> tuple[list[Known], list[Done], list[tuple[Lane, StepContext]]]:
        """Sort a planned chunk: versions the journal knew, rows handed back because dispatching
        was paused meanwhile or the lease they were planned under may be lost (the workers, of
        this node or another, take them later), and the work to do."""
        known: list[Known] = []
        given_back: list[Done] = []
        work: list[tuple[Lane, StepContext]] = []
        fence = self.state.fence(epoch)  # one for the chunk: its rows share the epoch
        for (version, chain, lane), row_id in zip(chunk, ids, strict=True):
            if row_id is None:
                known.append((version, [chain]))
            elif not self.state.may_start() or not self.state.holds_lease(epoch):
                pending = StepResult(row_id, Status.PENDING, 0, epoch=epoch)
                given_back.append((version, pending, False, lane.step))
            else:
                ctx = StepContext(
                    row_id,
                    version,
                    version.path,
                    chain.rule,
                    0,
                    1,
                    self.state.workdir,
                    fence=fence,
                    epoch=epoch,
                    journal=self.state.journal.token,
                    planned=now,  # the rows' ``created``
                )
                work.append((lane, ctx))
        return known, given_back, work

    async def _move_chunk(
        self, source: SourceConfig, chunk: list[Item], ids: Ids, epoch: int | None, now: float
    ) -> list[Known]:
        """Rename a chunk whose IN_PROGRESS rows are committed (under ``epoch``), then queue
        their outcomes.

        No await inside: nothing can interrupt it between a move and its record.
        """
        known, done, work = self._begin_chunk(chunk, ids, epoch, now)
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
                self.state.wake.set()  # give it to a worker, which links or copies
                pending = StepResult(ctx.dispatch_id, Status.PENDING, 0, epoch=epoch)
                done.append((version, pending, False, lane.step))
                continue
            except Exception as exc:
                outcome = exc
            result = self._result(ctx, lane, outcome, started, epoch)
            moved = isinstance(outcome, Outcome) and outcome.detail == "moved"
            done.append((version, result, moved, lane.step))
        self._record(source, done)
        return known

    async def _copy_chunk(
        self, source: SourceConfig, chunk: list[Item], ids: Ids, epoch: int | None, now: float
    ) -> list[Known]:
        """Copy a chunk of small files whose IN_PROGRESS rows are committed (under ``epoch``),
        in one thread per destination, then queue their outcomes in one write."""
        known, done, work = self._begin_chunk(chunk, ids, epoch, now)
        groups: dict[int, list[tuple[Lane, StepContext]]] = {}
        for lane, ctx in work:
            groups.setdefault(id(lane.processor), []).append((lane, ctx))
        for group in groups.values():
            started = time.time()  # each group is one batch: its files share its duration
            lane = group[0][0]
            sem = self.state.semaphore(lane.step)  # a batch is one delivery in flight
            if sem is not None:
                await sem.acquire()
            self.state.batched += len(group)
            try:
                outcomes = await self._batch(lane, [c for _, c in group])
            finally:
                self.state.batched -= len(group)
                if sem is not None:
                    sem.release()
            if outcomes is None:  # the stop: left IN_PROGRESS, as a cancelled attempt is
                continue
            shared = f"copied in a batch of {len(group)} files; the duration is the batch's"
            for (lane, ctx), outcome in zip(group, outcomes, strict=True):
                if isinstance(outcome, Outcome) and outcome.detail is None and len(group) > 1:
                    outcome = dataclasses.replace(outcome, detail=shared)
                result = self._result(ctx, lane, outcome, started, epoch)
                done.append((ctx.version, result, False, lane.step))
        self._record(source, done)
        return known

    async def _batch(self, lane: Lane, ctxs: list[StepContext]) -> list[Outcome | Exception] | None:
        """``copy_batch`` within the step's ``timeout``, which bounds the batch as a whole
        (each of its files then fails that attempt, transient), and until the stop's grace
        runs out (``state.halted``: None, the rows resume at the next start). Either way the
        batch is called off as a worker's copy is (``threads.CopyThreads.run``): what it had
        not renamed yet is never published, and a retry finds what it had."""
        if self.state.halted.is_set():
            return None
        step = lane.step
        task = asyncio.ensure_future(cast(BatchCopier, lane.processor).copy_batch(ctxs))
        try:
            await first_completed(task, self.state.halted.wait(), timeout=step.timeout)
        finally:
            if not task.done():
                task.cancel()
            await settle(task)
        if not task.cancelled():  # done before it could be called off
            return task.result()
        if self.state.halted.is_set():
            log.warning(
                "%s: a batch of %d new file(s) called off at the stop (resumed at the next start)",
                step.display,
                len(ctxs),
            )
            return None
        timed_out = TransientDeliveryError(f"timed out after {step.timeout:g}s")
        return [timed_out] * len(ctxs)

    def _result(
        self,
        ctx: StepContext,
        lane: Lane,
        outcome: Outcome | Exception,
        started: float,
        epoch: int | None,
    ) -> StepResult:
        """The row's outcome for one inline delivery (counted and logged); ``epoch``: the
        token its row was planned under."""
        if isinstance(outcome, Outcome):
            result = StepResult(
                ctx.dispatch_id, Status.SUCCEEDED, 1, location=outcome.location,
                detail=outcome.detail, started=started, sha256=outcome.sha256, epoch=epoch,
            )  # fmt: skip
        else:
            error = as_delivery_error(outcome, ctx)
            v = ctx.version
            row = Dispatch(
                ctx.dispatch_id, v.source, str(v.root), v.relpath, v.size, v.mtime_ns, ctx.rule,
                0, lane.step.display, lane.step.kind, Status.IN_PROGRESS, 0, None, None,
                started, started, None, None, 0.0, epoch=epoch,
            )  # fmt: skip
            result = self.outcomes.failed(row, lane.step, 1, error, started)
        self.outcomes.note(lane.step.display, result, ctx.version, ctx.rule)
        return result

    def _record(self, source: SourceConfig, done: list[Done]) -> None:
        """One write for a chunk's outcomes; then, once it is durable, the after-actions."""
        if not done:
            return
        self.outcomes.write([r for _, r, _, _ in done])
        for version, result, gone, step in done:
            self.after.conclude(source, version, (step,), [result.status], gone=gone)
