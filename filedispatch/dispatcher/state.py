"""What the dispatcher's parts share: the configuration in force, the journal, the counters.

Behaviour lives in the parts (planning, lanes, feeder, workers, outcomes, after-actions);
this holds their common state and the few questions each of them asks of it. No I/O.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import Config, SourceConfig, Step, scrub, secrets_of
from ..errors import LeaseLostError
from ..journal import Journal, StepResult
from ..models import Dispatch, FileVersion, Status
from ..processors import Registry, unfenced
from ..router import Router

#: seconds the feeder sleeps at most when nothing is due (a wake-up comes sooner)
IDLE_CHECK_S = 5.0

if TYPE_CHECKING:
    from ..learn import Learned


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
    #: delivered files left in their source folder, not moved: their done_dir or failed_dir
    #: hangs, the stop called the move off (a later scan or start moves them), or the move
    #: or removal failed (the log says why)
    unmoved: int = 0


class DispatchState:
    """The state the dispatcher's parts share (one per service)."""

    def __init__(
        self,
        config: Config,
        journal: Journal,
        registry: Registry,
        *,
        workdir: Path,
        consume_marked: bool,
        on_change: Callable[[], None] | None,
        learned: Learned | None = None,
    ) -> None:
        self.journal = journal
        #: the learned rules' models (see learn.learning); None: those rules take no file
        self.learned = learned
        self.registry = registry
        self.workdir = workdir
        #: files recorded by ``mark-existing`` get their after-action like delivered ones
        self.consume_marked = consume_marked
        self.summary = RunSummary()
        self.stats: dict[str, DestinationStats] = defaultdict(DestinationStats)
        self.in_flight: dict[int, Dispatch] = {}  #: rows a worker is delivering, by id
        self.batched = 0  #: files in copy batches running now
        self.lease_stops = 0  #: deliveries stopped by their fence (a lease that may be lost)
        self.stopped_sources: set[str] = set()  #: stopped by ``stop_on_error``
        self.wake = asyncio.Event()  #: new work may be due: the feeder claims again
        self.running = asyncio.Event()  #: cleared while paused
        self.running.set()
        self.stop = asyncio.Event()  #: the service's stop, once the dispatcher runs
        #: the stop's grace has run out: inline copy batches still running are called off
        self.halted = asyncio.Event()
        #: set while this node's lease is held (always, with one node): cleared, nothing new
        #: is claimed or started, since another node may take the work over
        self.node_alive = asyncio.Event()
        self.node_alive.set()
        #: whether the lease a row was claimed under (its ``epoch``; None: any) is still held,
        #: asked right before each delivery starts (the event above may lag behind the clock
        #: after the process was frozen, and a node that joined again holds a new lease, under
        #: which rows claimed before were never claimed)
        self.holds_lease: Callable[[int | None], bool] = lambda epoch: self.node_alive.is_set()
        #: the fencing token rows planned now carry (``Journal.plan_started``; None: SQLite)
        self.epoch: Callable[[], int | None] = lambda: None
        #: seconds the feeder waits at most when nothing is due; shorter when other nodes plan
        #: work too, since their planning wakes no one here
        self.idle_check_s = IDLE_CHECK_S
        self._on_change = on_change
        #: told (rule, version, destination, result) when a row SUCCEEDED or FAILED for good
        #: (the notifier); must return at once and never raise
        self.on_result: Callable[[str, FileVersion, str, StepResult], None] | None = None
        self._semaphores: dict[str, asyncio.Semaphore] = {}
        self.configure(config)

    def configure(self, config: Config) -> None:
        self.config = config
        self.router = Router(config)
        self.sources = {s.key: s for s in config.sources}
        self.secrets = secrets_of(config)

    def follow_lease(
        self,
        alive: asyncio.Event,
        holds: Callable[[int | None], bool],
        epoch: Callable[[], int | None],
    ) -> None:
        """Follow this node's lease (``cluster.Membership``): ``alive`` while it is held,
        ``holds(epoch)`` whether the lease a row was claimed under still is (read from the
        clock; safe from any thread), ``epoch()`` the token rows planned now carry."""
        self.node_alive, self.holds_lease, self.epoch = alive, holds, epoch

    def fence(self, epoch: int | None) -> Callable[[], None]:
        """A row's ``StepContext.fence``: raises LeaseLostError once the lease the row was
        claimed under (``epoch``; None: one node, no lease) may have run out."""
        if epoch is None:
            return unfenced

        def fence() -> None:
            if not self.holds_lease(epoch):
                raise LeaseLostError(
                    "this node's lease may have run out (it was frozen, or cut off from the "
                    "journal): another node may deliver the file now"
                )

        return fence

    def may_start(self) -> bool:
        """New work starts only while not paused and while the journal takes writes: a
        delivery the journal cannot record is one it would repeat after a restart."""
        return self.running.is_set() and self.journal.writable.is_set() and self.node_alive.is_set()

    def semaphore(self, step: Step) -> asyncio.Semaphore | None:
        """The bound of a step's ``concurrency`` (None: unbounded), shared by equal steps."""
        if step.concurrency is None:
            return None
        key = f"{step.identity()}\0{step.concurrency}"
        sem = self._semaphores.get(key)
        if sem is None:
            sem = self._semaphores[key] = asyncio.Semaphore(step.concurrency)
        return sem

    def scrub(self, text: str) -> str:
        """``text`` with every secret of the configuration replaced."""
        return scrub(text, self.secrets)

    def follows(self, version: FileVersion) -> bool:
        """Whether the version's source follows symbolic links."""
        source = self.sources.get(version.source)
        return source is not None and source.follow_symlinks

    def source_stops(self, source: SourceConfig) -> bool:
        """Whether ``source`` stops dispatching now (``stop_on_error`` after a failure);
        True only the first time."""
        if not source.stop_on_error or source.key in self.stopped_sources:
            return False
        self.stopped_sources.add(source.key)
        return True

    def changed(self) -> None:
        """Tell the service's listener (the progress bar) that counts moved."""
        if self._on_change is not None:
            self._on_change()


def marked(status: Status | str, attempts: int) -> bool:
    """A SUCCEEDED row no attempt made: ``mark-existing`` recorded it without sending."""
    return status == Status.SUCCEEDED and attempts == 0


def unrun(status: Status | str, attempts: int) -> bool:
    """A FAILED row no attempt made: "not run" behind a step that failed. It is no verdict on
    its own step: once every step before it succeeds (a step fixed or removed), it runs."""
    return status == Status.FAILED and attempts == 0


def first_unrun(keys: Sequence[str], rows: dict[str, tuple[str, int]]) -> str | None:
    """The key of a chain's step that was never run although every step before it succeeded
    now (see ``unrun``), if there is one: it is to be queued again. ``rows``: step key ->
    (status, attempts)."""
    for key in keys:
        status, attempts = rows[key]
        if status != Status.SUCCEEDED:
            return key if unrun(status, attempts) else None
    return None
