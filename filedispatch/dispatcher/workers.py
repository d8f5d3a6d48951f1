"""The workers: a fixed pool, each taking a claimed file version and running its chains, one
step at a time, through the step's processor.

A row is matched to its step by its key (``router.step_keys``), not by its position. Outcomes
go to ``Outcomes``, the source's fate to ``AfterActions``. Never inspects a foreign library's
exceptions: processors raise our Transient/Permanent errors.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
import time
from collections import defaultdict
from pathlib import Path

from ..asyncutil import first_completed
from ..config import Step
from ..errors import (
    DeliveryError,
    JournalError,
    SourceVanishedError,
    TransientDeliveryError,
)
from ..fate import renamed_by_delivery
from ..journal import StepResult
from ..models import Dispatch, FileVersion, Outcome, Status
from ..processors import Processor, StepContext, inputs
from ..processors.common import named_by_content
from .after import AfterActions, check_unchanged
from .feeder import Feeder
from .outcomes import Outcomes, as_delivery_error, waiting
from .state import DispatchState, marked, unrun

log = logging.getLogger("filedispatch.dispatcher")

#: seconds before a version whose dispatch hit a bug is tried again
BUG_RETRY_S = 60.0
#: a claimed version not started: the lease it was claimed under may be lost
LOST_CLAIM = "%s: claimed under a lease this node may have lost; not started, left to the queue"


class Workers:
    """Runs claimed versions; ``worker`` is one member of the pool."""

    def __init__(
        self, state: DispatchState, feeder: Feeder, outcomes: Outcomes, after: AfterActions
    ) -> None:
        self.state = state
        self.feeder = feeder
        self.outcomes = outcomes
        self.after = after

    async def worker(self) -> None:
        """Take groups from the feeder until it hands out an empty one."""
        state, journal = self.state, self.state.journal
        while True:
            group = await self.feeder.take()
            if not group:
                return
            if group[0].source in state.stopped_sources:  # stop_on_error: give it back
                self._give_back(group)
                continue
            epoch, current = group[0].epoch, state.epoch()
            if None not in (epoch, current) and epoch != current:
                # claimed under a lease this node lost (it joined again since): those rows
                # were requeued for any node to take (a lost epoch's rows are orphans), and
                # may run elsewhere now; never started here, and nothing to give back
                log.info(LOST_CLAIM, group[0].relpath)
                continue
            if not state.holds_lease(epoch):
                # claimed before this node's lease may have run out: another node may run it
                # now, so it is not started here. Given back, not dropped: if the lease turns
                # out to be renewed in time, nothing else would put its rows back in the queue
                # (if another node took them meanwhile, the journal refuses this, harmlessly)
                log.info(LOST_CLAIM, group[0].relpath)
                self._give_back(group)
                continue
            if not journal.writable.is_set():  # claimed before the journal failed
                await first_completed(journal.writable.wait(), state.stop.wait())
                if not journal.writable.is_set():
                    continue  # stopping: its rows stay IN_PROGRESS, resumed at the next start
            self.feeder.started()
            try:
                await self.run_version(group)
            except JournalError as exc:  # only when stopping: the rows resume at the next start
                log.error("%s not recorded: %s", group[0].relpath, exc)
            except Exception:  # a bug must cost one file a delay, not the worker
                log.exception("unexpected error while dispatching %s", group[0].relpath)
                later = time.time() + BUG_RETRY_S
                await self._finish_quietly(
                    [
                        StepResult(
                            d.id, Status.PENDING, d.attempts, next_attempt=later, epoch=d.epoch
                        )
                        for d in group
                        if d.status == Status.IN_PROGRESS
                    ]
                )
            finally:
                self.feeder.finished()
                state.changed()

    def _give_back(self, group: list[Dispatch]) -> None:
        """Put a claimed version that is not run here back in the queue, due now, as it was."""
        now = time.time()
        self.outcomes.write([waiting(d, now) for d in group if d.status == Status.IN_PROGRESS])

    async def _finish_quietly(self, results: list[StepResult]) -> None:
        try:
            await self.state.journal.finish(results)
        except JournalError as exc:
            log.error("the journal could not record an outcome: %s", exc)

    async def run_version(self, rows: list[Dispatch]) -> None:
        """Run a claimed version's current chains (the steps its rules name now). Rows of steps
        no longer in the configuration are set aside: claimed ones fail with that reason, final
        ones are history. So a version whose step was fixed runs its new chain."""
        version = rows[0].version
        source = self.state.sources.get(version.source)
        current: list[Dispatch] = []
        gone: list[Dispatch] = []
        for d in rows:
            place = self._place(d)
            if place is None:
                gone.append(d)
            else:  # its position in the chain now, which may differ from when it was planned
                d.step = place
                current.append(d)
        left = [d for d in gone if d.status == Status.IN_PROGRESS]
        if left:
            note = "this step is no longer in the configuration (its rule changed)"
            self.outcomes.write(
                [
                    StepResult(d.id, Status.FAILED, d.attempts, reason=note, epoch=d.epoch)
                    for d in left
                ]
            )
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
            was_marked = any(marked(d.status, d.attempts) for d in current)
            self.after.conclude(source, version, steps, statuses, marked=was_marked)

    def _place(self, row: Dispatch) -> int | None:
        """Where a row's step is in its rule's chain now, None if no longer there. Matched by
        the row's step key, which names the step and the transforms before it, so adding,
        removing or reordering other steps leaves its rows in place (``router.step_keys``)."""
        rule = self.state.router.by_name.get(row.rule)
        if rule is None:
            return None
        steps = rule.chain.steps
        if row.step_key is None:  # a row not read by claim: its destination must still match
            ok = row.step < len(steps) and steps[row.step].display == row.destination
            return row.step if ok else None
        return rule.chain.position(row.step_key)

    def _step(self, row: Dispatch) -> Step | None:
        """The step a row is for, as configured now (see ``_place``)."""
        place = self._place(row)
        return None if place is None else self.state.router.by_name[row.rule].chain.steps[place]

    async def _run_chain(
        self, version: FileVersion, rows: list[Dispatch], may_move: bool
    ) -> list[Status]:
        """Run a rule's steps in order; a failure stops the chain, a retry pauses it."""
        rows.sort(key=lambda d: d.step)
        workdir = self.state.workdir / f"{version.key}-{_safe(rows[0].rule)}"
        current = version.path
        for i, row in enumerate(rows):
            if row.status == Status.SUCCEEDED:
                produced = Path(row.output) if row.output else None
                if produced is None:
                    continue
                if produced.exists():
                    current = produced
                    continue
                row.status = Status.IN_PROGRESS  # a transform's output is gone: make it again
            elif unrun(row.status, row.attempts):
                row.status = Status.IN_PROGRESS  # the steps before it all succeed now
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
            results = [
                StepResult(d.id, Status.FAILED, d.attempts, reason=note, epoch=d.epoch)
                for d in rest
            ]
        else:
            rest = [d for d in rest if d.status == Status.IN_PROGRESS]
            results = [waiting(d, row.next_attempt) for d in rest]
        if not results:
            return
        await self.state.journal.finish(results)
        for d, r in zip(rest, results, strict=True):
            d.status = r.status

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
                epoch=row.epoch,
            )
            self.outcomes.record(row, result, version)
            return result
        named_under, planned = self.state.journal.named(row.id, row.created)
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
            fence=self.state.fence(row.epoch),
            epoch=row.epoch,
            journal=self.state.journal.token,
            planned=planned,
            named_under=named_under,
        )
        if not self.state.holds_lease(row.epoch):
            # the lease the row was claimed under may have run out (the node was frozen, or
            # cut off): another node may run this row now, so it is not started here; it goes
            # back to the queue as it was (refused by the journal if it was requeued already)
            result = waiting(row, time.time())
            self.outcomes.record(row, result, version)
            return result
        self.state.in_flight[row.id] = row
        sem = self.state.semaphore(step)
        try:
            if sem is not None:
                await sem.acquire()
            try:
                if row.attempts and current is version.path:
                    changed = await self._unchanged(version, step)
                    if changed is not None:
                        raise SourceVanishedError(changed)
                ctx.fence()  # the semaphore may have kept it waiting past the lease
                # not cancelled when the lease is lost: a processor stops at its next fence,
                # with its own cleanup; a command or a callable runs to its end
                outcome = await self._deliver(step, ctx)
            finally:
                if sem is not None:
                    sem.release()
        except DeliveryError as exc:
            result = self.outcomes.failed(row, step, attempt, exc, started)
        else:
            result = self.outcomes.succeeded(row, attempt, outcome, started)
        finally:
            self.state.in_flight.pop(row.id, None)
        self.outcomes.record(row, result, version)
        return result

    async def _unchanged(self, version: FileVersion, step: Step) -> str | None:
        """``check_unchanged`` before a retry, in a daemon thread (a stat on a hung mount never
        returns), within the step's ``timeout``."""
        look = inputs.in_source_thread(
            version.path.parent, "looking at", check_unchanged, version, self.state.follows(version)
        )
        try:
            return await asyncio.wait_for(look, step.timeout)
        except TimeoutError:
            raise TransientDeliveryError(
                f"timed out after {step.timeout:g}s looking at the source file"
            ) from None

    async def _deliver(self, step: Step, ctx: StepContext) -> Outcome:
        registry = self.state.registry
        processor = registry.acquire(step)
        try:
            if step.timeout is not None:
                return await asyncio.wait_for(_named_then_sent(step, processor, ctx), step.timeout)
            return await _named_then_sent(step, processor, ctx)
        except TimeoutError as exc:
            if step.timeout is None:  # a processor's own timeout it did not translate
                raise TransientDeliveryError(f"timed out: {exc}") from exc
            raise TransientDeliveryError(f"timed out after {step.timeout:g}s") from None
        except Exception as exc:  # ours, or a processor bug / a foreign error not translated
            error = as_delivery_error(exc, ctx)
            if error is exc:
                raise
            raise error from error.__cause__
        finally:
            registry.release(processor)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:60]


async def _named_then_sent(step: Step, processor: Processor, ctx: StepContext) -> Outcome:
    """``processor.deliver(ctx)``, the input's SHA-256 worked out first, off the event loop,
    when the destination names files by it (``{sha256}``)."""
    if named_by_content(step):
        ctx = dataclasses.replace(ctx, sha256=await inputs.content_sha256(ctx))
    return await processor.deliver(ctx)
