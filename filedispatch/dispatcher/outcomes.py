"""Outcomes: an attempt's result made a journal row's, counted, logged and written.

Asks ``retry.decide`` whether a failure is tried again (the policy is there, not here);
writes outcomes without waiting, and runs an action on the source only once they are durable
(``when_durable``). Never delivers, never touches a source.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import retry
from ..config import Step
from ..errors import (
    DeliveryError,
    LeaseLostError,
    OutsideWindowError,
    SourceUnreadableError,
    SourceVanishedError,
    TransientDeliveryError,
)
from ..journal import StepResult
from ..models import Dispatch, FileVersion, Outcome, Status
from ..processors import StepContext
from .state import DispatchState

log = logging.getLogger("filedispatch.dispatcher")


class Outcomes:
    """Turns attempts into journal rows; the only part that writes outcomes."""

    def __init__(self, state: DispatchState) -> None:
        self.state = state
        self._last_write: asyncio.Future[None] | None = None
        #: each version's latest outcome write, until its after-action is scheduled: a write
        #: refused (FencedError: the node's lease ran out) must not let the source be touched
        #: because a later write of other rows went through
        self._version_writes: dict[str, asyncio.Future[None]] = {}
        self.delivered = DeliveryLog()

    def succeeded(
        self, row: Dispatch, attempt: int, outcome: Outcome, started: float
    ) -> StepResult:
        """The row's result for a delivery that succeeded (texts scrubbed of secrets);
        ``started``: Unix seconds, when this try started."""
        scrub = self.state.scrub
        return StepResult(
            row.id,
            Status.SUCCEEDED,
            attempt,
            location=scrub(outcome.location),  # a URL's query may carry a token
            detail=None if outcome.detail is None else scrub(outcome.detail),
            started=started,
            output=None if outcome.produced is None else str(outcome.produced),
            sha256=outcome.sha256,
            epoch=row.epoch,
        )

    def failed(
        self, row: Dispatch, step: Step, attempt: int, exc: DeliveryError, started: float
    ) -> StepResult:
        """The row's result for a failed attempt (``started``: Unix seconds, its start):
        PENDING until its retry is due, or FAILED (see ``retry.decide``). A retry is counted
        and logged here: the first of a row at WARNING, later ones at INFO, each line naming
        the destination once."""
        reason = self.state.scrub(str(exc) or type(exc).__name__)
        if isinstance(exc, OutsideWindowError):  # not an attempt: it waits for the window
            return StepResult(
                row.id,
                Status.PENDING,
                row.attempts,
                reason,
                next_attempt=exc.until,
                epoch=row.epoch,
            )
        if isinstance(exc, LeaseLostError):  # not an attempt: back to the queue, as it was
            self.state.lease_stops += 1
            log.warning(
                "%s: %s stopped: %s (deliveries stopped so far: %d; if it keeps happening, "
                "this host or its database pauses for longer than the lease: raise `lease`)",
                row.relpath,
                row.destination,
                reason,
                self.state.lease_stops,
            )
            return waiting(row, time.time())
        kind = retry.error_kind(exc)
        # row.started: when its first try started (None: this is its first)
        first = started if row.started is None else row.started
        decision = retry.decide(
            step.retry, exc, attempt, row.error_type, first_try_s=first, now_s=time.time()
        )
        if not decision.retry:
            return StepResult(
                row.id,
                Status.FAILED,
                attempt,
                reason=reason + decision.note,
                error_type=kind,
                started=started,
                epoch=row.epoch,
            )
        self.state.stats[row.destination].retried += 1
        log.log(
            logging.WARNING if attempt == 1 else logging.INFO,
            "%s -> %s: attempt %d failed (%s); retrying in %.1fs",
            row.relpath,
            row.destination,
            attempt,
            _without_place(reason, row.destination),
            decision.wait_s,
        )
        return StepResult(
            row.id,
            Status.PENDING,
            attempt,
            reason=reason,
            error_type=kind,
            started=started,
            next_attempt=time.time() + decision.wait_s,
            epoch=row.epoch,
        )

    def record(self, row: Dispatch, result: StepResult, version: FileVersion) -> None:
        """Write a worker's result and apply it to the row it has in hand."""
        self._version_writes[version.key] = self.write([result])
        row.status = result.status
        row.attempts = result.attempts
        row.error_type = result.error_type
        self.note(row.destination, result, version, row.rule)

    def write(self, results: list[StepResult]) -> asyncio.Future[None]:
        # Not awaited: a worker goes on while the writer commits many outcomes at once. The
        # source is only touched once this write is durable (see when_durable).
        fut = self._last_write = self.state.journal.finish_soon(results)
        fut.add_done_callback(report_write)
        if any(r.status == Status.PENDING for r in results):
            # a retry is planned: the feeder learns when it is due once the row says so
            fut.add_done_callback(lambda _: self.state.wake.set())
        return fut

    def forget_version(self, version: FileVersion) -> None:
        """The version's outcomes need no after-action: forget its latest write."""
        self._version_writes.pop(version.key, None)

    def note(self, destination: str, result: StepResult, version: FileVersion, rule: str) -> None:
        """Count and log an attempt's result (the journal write is separate); tell
        ``state.on_result`` (the notifier) of a row SUCCEEDED or FAILED for good."""
        stats = self.state.stats[destination]
        if result.status == Status.SUCCEEDED:
            stats.succeeded += 1
            stats.bytes += version.size
            self.delivered.add(destination, version.relpath, result.location)
        elif result.status == Status.FAILED:
            stats.failed += 1
            stats.last_error = result.reason
            log.error("%s -> %s failed: %s", version.relpath, destination, result.reason)
            self.state.wake.set()
        if self.state.on_result is not None and result.status in (Status.SUCCEEDED, Status.FAILED):
            self.state.on_result(rule, version, destination, result)

    def when_durable(self, action: Callable[[], None], version: FileVersion | None = None) -> None:
        """Run ``action`` once every outcome recorded so far is committed (never before), and
        never if the journal refused ``version``'s own latest outcome."""
        fut = self._last_write
        own = self._version_writes.pop(version.key, None) if version is not None else None

        def refused(f: asyncio.Future[None]) -> bool:
            if not f.cancelled() and f.exception() is None:
                return False
            why = "" if f.cancelled() else f": {f.exception()}"
            log.error("the journal did not confirm a delivery; the source is left in place%s", why)
            return True

        def run(f: asyncio.Future[None]) -> None:
            # writes commit in queue order: when the last is done, the version's own is too
            if own is not None and own is not f and own.done() and refused(own):
                return
            if not refused(f):
                action()

        if fut is None:
            action()
        elif fut.done():
            run(fut)
        else:
            fut.add_done_callback(run)


class DeliveryLog:
    """Logs deliveries: each file at DEBUG, and at INFO one line per destination for all the
    files delivered in one turn of the event loop (a batch).

    A file delivered alone keeps its own INFO line (``a.txt -> /out/a.txt``); a burst gets
    ``128 files -> /out: a.txt, b.txt, c.txt and 125 more``. A log line costs tens of
    microseconds (format, scrub, escape, write): once per file it was about 15% of the CPU a
    burst of small moves takes (docs/benchmarks.md). The journal keeps every file's row.
    """

    NAMED = 3  #: files named in a batch's line

    def __init__(self) -> None:
        #: destination -> [count, the first NAMED relpaths, the only file's location]
        self._batch: dict[str, tuple[int, list[str], str | None]] = {}
        self._flush: asyncio.Handle | None = None

    def add(self, destination: str, relpath: str, location: str | None) -> None:
        log.debug("%s -> %s", relpath, location)
        if not log.isEnabledFor(logging.INFO):
            return
        count, names, _ = self._batch.get(destination, (0, [], None))
        if count < self.NAMED:
            names.append(relpath)
        self._batch[destination] = (count + 1, names, location)
        if self._flush is None:
            try:
                self._flush = asyncio.get_running_loop().call_soon(self.flush)
            except RuntimeError:  # no loop (a synchronous caller): nothing to gather
                self.flush()

    def flush(self) -> None:
        """Write the batch's lines now (also called when the service stops)."""
        self._flush = None
        batch, self._batch = self._batch, {}
        for destination, (count, names, location) in batch.items():
            if count == 1:
                log.info("%s -> %s", names[0], location)
                continue
            more = count - len(names)
            listed = ", ".join(names) + (f" and {more} more" if more else "")
            log.info("%d files -> %s: %s", count, destination, listed)


def _without_place(reason: str, destination: str) -> str:
    """A reason without the destination's URL in front (the log line names it already)."""
    head, sep, rest = reason.partition(": ")
    return rest if sep and head.startswith(destination.rstrip("/")) else reason


def waiting(row: Dispatch, next_attempt: float) -> StepResult:
    """A row handed back to wait (PENDING), its last error kept."""
    return StepResult(
        row.id,
        Status.PENDING,
        row.attempts,
        reason=row.reason,
        error_type=row.error_type,
        next_attempt=next_attempt,
        epoch=row.epoch,
    )


def as_delivery_error(exc: Exception, ctx: StepContext) -> DeliveryError:
    """Any exception a delivery raised, as one of ours; a new error keeps the foreign one as
    its ``__cause__`` (the journal's ``error_type``).

    A foreign exception is a processor bug or an error it did not translate: transient,
    except a source that vanished (final). A source the service may not read yet (EACCES,
    EPERM: an upload tool that creates files 0600, then fixes the mode) is worth retrying,
    within the step's retry policy; a destination that refuses us is not. Told apart by the
    file the error names."""
    if isinstance(exc, DeliveryError):
        cause = exc.__cause__
        if (
            isinstance(cause, PermissionError)
            and not isinstance(exc, SourceUnreadableError)
            and cause.filename is not None
            and os.fsdecode(cause.filename) == os.fspath(ctx.input)
        ):
            error: DeliveryError = SourceUnreadableError(str(exc))
            error.__cause__ = cause
            return error
        return exc
    if isinstance(exc, FileNotFoundError) and not ctx.input.exists():
        error = SourceVanishedError(f"the file {ctx.input} vanished before it was sent")
    else:
        error = TransientDeliveryError(f"{type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def report_write(fut: asyncio.Future[Any]) -> None:
    """An outcome nobody awaits: a journal failure is logged here, not lost."""
    if not fut.cancelled() and fut.exception() is not None:
        log.error("the journal could not record an outcome: %s", fut.exception())
