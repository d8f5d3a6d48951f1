"""What every journal backend shares: the ``Journal`` and ``JournalReader`` protocols, the typed
rows they return, the health they report and the planning types the dispatcher hands them.

No SQL here: each backend module writes its own. Nothing here touches a file or a processor.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from ..errors import JournalError
from ..models import Dispatch, FileVersion, Status

if TYPE_CHECKING:
    from ..reporting import Period
    from ..router import Chain
    from .retention import KeptKey, OldRow
    from .uploads import OpenUpload

#: one logger for the whole package: its lines read "filedispatch.journal" whatever the backend
log = logging.getLogger("filedispatch.journal")

#: a held write is tried again after this many seconds, doubling up to RETRY_MAX_S
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 30.0


class JournalState(StrEnum):
    """Whether the journal can take writes now."""

    #: writes are committed
    OK = "ok"
    #: writes are refused (disk full, I/O error, read-only, locked too long, server gone): held
    #: and retried
    FAILING = "failing"
    #: the journal's path now names another file: writes are held until the old one is back
    REPLACED = "replaced"
    #: the journal's path names no file any more: writes are held until it is back
    REMOVED = "removed"


@dataclass(frozen=True, slots=True)
class JournalHealth:
    """The journal's state for the status API, /health and the console.

    ``error`` is one line saying what is wrong and what to do; ``since`` (epoch seconds) is
    when writes began to be held; ``retries`` counts the attempts since then.
    """

    state: JournalState = JournalState.OK
    error: str | None = None
    since: float | None = None  #: Unix time, seconds
    retries: int = 0

    @property
    def ok(self) -> bool:
        return self.state == JournalState.OK

    def as_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "error": self.error,
            "since": self.since,
            "retries": self.retries,
        }


def next_health(
    before: JournalHealth, state: JournalState, error: str | None, where: str, quiet: bool
) -> JournalHealth:
    """The health after an attempt to write: a change is logged once (a failure not when
    ``quiet``: a stopping service), the retries counted, ``since`` kept while it lasts."""
    if state == JournalState.OK:
        waited = time.time() - (before.since or time.time())
        log.warning(
            "the journal %s takes writes again after %.0fs: intake and delivery resume",
            where,
            waited,
        )
        return JournalHealth()
    if (before.state, before.error) != (state, error) and not quiet:
        log.error(
            "%s; intake and delivery are paused until the journal takes writes again "
            "(retried every %g s at most)",
            error,
            RETRY_MAX_S,
        )
    return JournalHealth(
        state,
        error,
        before.since if not before.ok else time.time(),
        before.retries + (0 if before.ok else 1),
    )


class HealthReport:
    """A journal's health as the event loop sees it, and who is told when it changes."""

    def __init__(self) -> None:
        #: the journal's state, for status and /health
        self.health = JournalHealth()
        #: set while writes are committed; cleared while they are held
        self.writable = asyncio.Event()
        self.writable.set()
        self._listeners: list[Callable[[JournalHealth], None]] = []

    def _set_health(self, health: JournalHealth) -> None:
        """On the loop: take the new health and tell the listeners."""
        self.health = health
        if health.ok:
            self.writable.set()
        else:
            self.writable.clear()
        for listener in self._listeners:
            listener(health)

    def on_health(self, listener: Callable[[JournalHealth], None]) -> None:
        """Call ``listener(health)`` on the loop whenever the journal's health changes."""
        self._listeners.append(listener)

    def _require_writable(self) -> None:
        """An operator's request is answered now, not held until the journal is back."""
        if not self.health.ok:
            raise JournalError(f"the journal cannot be written now: {self.health.error}")


def resolve(futures: Sequence[asyncio.Future[Any]], results: Sequence[Any]) -> None:
    """On the loop: hand each caller of a batch its result (an exception is raised to it)."""
    for fut, res in zip(futures, results, strict=True):
        if fut.done():
            continue
        if isinstance(res, BaseException):
            fut.set_exception(res)
        else:
            fut.set_result(res)


def default_path() -> Path:
    """The journal's place when neither --db nor ``database:`` names one."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(state) / "filedispatch" / "journal.db"


# --------------------------------------------------------------------------- planning


@dataclass(frozen=True, slots=True)
class PlannedStep:
    """One row to plan: a step of a chain for a file version."""

    version: FileVersion
    rule: str
    step: int
    step_key: str
    destination: str
    protocol: str
    label: str | None = None  #: the label a learned rule gave the file


@dataclass(frozen=True, slots=True)
class StepResult:
    """What the dispatcher reports for one row after an attempt."""

    id: int
    status: Status
    attempts: int
    reason: str | None = None
    error_type: str | None = None
    location: str | None = None
    detail: str | None = None
    started: float | None = None  #: Unix time, seconds: when this attempt began
    next_attempt: float = 0.0  #: Unix time, seconds: not claimed again before then
    output: str | None = None
    sha256: str | None = None  #: hex digest of what was delivered (SUCCEEDED rows)
    #: the fencing token of the claim the row came from (``Dispatch.epoch``): the outcome is
    #: refused unless the row still carries it. None: the node's current epoch (SQLite: unused)
    epoch: int | None = None


def finish_params(results: Sequence[StepResult], now: float) -> list[tuple[Any, ...]]:
    """The values of an outcome update, one tuple per result: status, attempts, reason,
    error_type, location, detail, finished, duration_ms, next_attempt, output, sha256, id."""
    return [
        (
            r.status.value,
            r.attempts,
            stored_opt_text(r.reason),
            r.error_type,
            stored_opt_text(r.location),
            stored_opt_text(r.detail),
            now if r.status in (Status.SUCCEEDED, Status.FAILED) else None,
            int((now - r.started) * 1000) if r.started is not None else None,
            r.next_attempt,
            stored_opt_text(r.output),
            r.sha256,
            r.id,
        )
        for r in results
    ]


@dataclass(frozen=True, slots=True)
class StepState:
    """Where one planned step of a file version stands in the journal."""

    id: int  #: the dispatch row
    step_key: str
    status: Status
    attempts: int  #: 0 on a SUCCEEDED row: recorded by mark-existing, never sent

    @property
    def marked(self) -> bool:
        return self.status == Status.SUCCEEDED and self.attempts == 0


#: how the detail of a dispatch recorded as a duplicate (``dedupe: content``) begins
DUPLICATE_OF = "duplicate of dispatch #"


@dataclass(frozen=True, slots=True)
class Waiting:
    """Rows of one destination that wait (PENDING, due later)."""

    destination: str  #: as the rows show it (redacted)
    count: int
    until: float  #: when the first of them is due, seconds since 1970


def planned_labels(steps: Iterable[PlannedStep]) -> list[tuple[str, str, str]]:
    """(label, version key, step key) of the planned rows a learned rule labelled, the label as
    the journal keeps names (a label is an examples sub-folder's name, which may not be UTF-8:
    one such must not fail the commit of every file planned with it)."""
    return [(stored_text(s.label), s.version.key, s.step_key) for s in steps if s.label is not None]


def planned_steps(version: FileVersion, chains: Iterable[Chain]) -> list[PlannedStep]:
    """The rows that plan a routed file version: one per step of each chain."""
    return [
        PlannedStep(version, chain.rule, i, key, step.display, step.kind, chain.label)
        for chain in chains
        for i, (step, key) in enumerate(zip(chain.steps, chain.keys, strict=True))
    ]


def number(value: int | float | bytes | None) -> int | None:
    """A stored stat number as the int it was (SQLite keeps one past 2**63 as decimal digits
    in a BLOB, see ``sqlite._int64``)."""
    return int(value) if value is not None else None


def stored_text(value: str) -> str:
    """A name as the journal keeps it: one that is not valid UTF-8 has its odd bytes escaped."""
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def stored_opt_text(value: str | None) -> str | None:
    """Outcome text may hold a name's undecodable bytes (a callable's answer, a path): one such
    string must not fail the whole group commit it is part of."""
    return None if value is None else stored_text(value)


# --------------------------------------------------------------------------- history queries

#: the columns a history filter or sort may name; a backend refuses any other
Column = Literal[
    "id",
    "status",
    "destination",
    "protocol",
    "extension",
    "filename",
    "source",
    "rule",
    "size",
    "created",
    "finished",
    "duration_ms",
    "attempts",
]
#: ``contains``: the column holds the value as a substring (case-insensitive for ASCII)
Op = Literal["=", ">=", "<", "<=", "contains"]
#: columns that may be NULL; they sort (and page) as -1 so a cursor stays exact
NULLABLE: frozenset[str] = frozenset({"finished", "duration_ms"})


@dataclass(frozen=True, slots=True)
class Condition:
    """One filter of a history query: ``column op value``."""

    column: Column
    op: Op
    value: Any


@dataclass(frozen=True, slots=True)
class SortKey:
    """One sort column of a history page (NULLs of ``NULLABLE`` columns sort as -1)."""

    column: Column
    desc: bool


@dataclass(frozen=True, slots=True)
class PageQuery:
    """A page of history: the rows matching ``conditions`` in ``keys`` order, at most ``limit``
    of them after skipping ``offset``, or after the row whose sort values are ``after``."""

    conditions: Sequence[Condition]
    keys: Sequence[SortKey]
    limit: int
    offset: int = 0
    after: Sequence[Any] | None = None


@dataclass(frozen=True, slots=True)
class Entry:
    """A row as the history list shows it (times in epoch seconds, sizes in bytes)."""

    id: int
    created: float
    finished: float | None
    filename: str
    source: str
    destination: str
    extension: str
    protocol: str
    rule: str
    status: str
    attempts: int
    size: int
    duration_ms: int | None
    reason: str | None
    sha256: str | None
    mtime_ns: int
    label: str | None  #: the label a learned rule gave the file
    btime_ns: int | None  #: the file's birth time (ns since the epoch) where it was known

    def sort_values(self, keys: Sequence[SortKey]) -> list[Any]:
        """This row's values of ``keys`` as the page order sees them (a cursor)."""
        out = []
        for k in keys:
            value = getattr(self, k.column)
            out.append(-1 if value is None and k.column in NULLABLE else value)
        return out


@dataclass(frozen=True, slots=True)
class Detail(Entry):
    """A row as the detail view shows it: the entry and where, which step, when, why."""

    relpath: str
    step: int
    location: str | None
    detail: str | None
    error_type: str | None
    started: float | None
    next_attempt: float
    #: the node that claimed the row last (the one that delivered it, once it is final)
    node: str | None = None


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One node of the journal's cluster, for ``/api/v1/nodes`` and the console.

    ``lease_age_s``: seconds since it last renewed its lease (on the database's clock);
    ``alive``: its lease has not run out; ``listing``: the shared sources it lists;
    ``in_flight``: its rows IN_PROGRESS; ``waiting``: its rows PENDING that no other node may
    run (those of its unshared sources): a dead node's wait for it, or for a hand-over.
    """

    name: str
    alive: bool
    lease_s: float
    lease_age_s: float
    started: float  #: Unix time, seconds: when it joined
    listing: tuple[str, ...]
    in_flight: int
    waiting: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "alive": self.alive,
            "lease_s": self.lease_s,
            "lease_age_s": round(self.lease_age_s, 3),
            "started": self.started,
            "sources_listed": list(self.listing),
            "in_flight": self.in_flight,
            "waiting": self.waiting,
        }


@dataclass(frozen=True, slots=True)
class StatsGroup:
    """Rows of one UTC day (``day``: a day number, whole days since 1970-01-01), status,
    destination and extension: how many, and their bytes."""

    day: int
    status: str
    destination: str
    extension: str
    count: int
    bytes: int


@dataclass(frozen=True, slots=True)
class OutcomeGroup:
    """Rows of one destination and status finished in a time window, for /metrics:
    ``timed`` of them have a duration, ``total_ms`` is their sum, ``within[i]`` how many took
    at most the i-th bucket bound (milliseconds)."""

    destination: str
    status: str
    count: int
    bytes: int
    timed: int
    total_ms: float
    within: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class DayTally:
    """One local day (a day number) of the command line's stats, by when a row finished (or
    was recorded, while it waits); ``bytes`` are the bytes sent."""

    day: int
    succeeded: int
    failed: int
    waiting: int
    bytes: int


@dataclass(frozen=True, slots=True)
class DestinationCount:
    """How many rows of one destination are in one status."""

    destination: str
    status: str
    count: int


@dataclass(frozen=True, slots=True)
class RetryWaiting:
    """Rows that failed at least once and wait: how many, and when the first is due (epoch
    seconds; None when none waits)."""

    count: int
    first: float | None


@dataclass(frozen=True, slots=True)
class RecordedPath:
    """A file the journal knows: its source and its path relative to that source."""

    source: str
    relpath: str


class JournalReader(Protocol):
    """The history reads (API, command line, console). Each raises ``JournalError`` when the
    journal cannot be read."""

    async def counts(self) -> dict[str, int]:
        """Rows by status (only statuses that have rows)."""

    async def count_entries(self, conditions: Sequence[Condition]) -> int:
        """How many rows match every condition."""

    async def page(self, query: PageQuery) -> list[Entry]:
        """The rows of one page (ask for ``limit + 1`` to learn whether another follows)."""

    async def get(self, dispatch_id: int) -> Dispatch | None:
        """One row by id with every column, or None."""

    async def detail(self, dispatch_id: int) -> Detail | None:
        """One row by id as the detail view shows it, or None."""

    async def stats(
        self, conditions: Sequence[Condition], period: Period = "day"
    ) -> list[StatsGroup]:
        """Rows matching ``conditions`` grouped by the UTC day they were created on (the
        caller folds days into ``period``, a week or a month: ``reporting.period_start``).
        Groups may come already summed per week (under its Monday) or, for a window of whole
        months, per month (under its first day): the folding gives the same answer."""

    async def outcomes(
        self, after: float, upto: float, buckets_ms: Sequence[int]
    ) -> list[OutcomeGroup]:
        """Rows finished in ``(after, upto]`` (epoch seconds), by destination and status."""

    async def retry_waiting(self) -> RetryWaiting:
        """PENDING rows with at least one attempt behind them."""

    async def by_destination(self) -> list[DestinationCount]:
        """Rows by destination and status."""

    async def recent(self, limit: int, status: Status | None = None) -> list[Dispatch]:
        """The newest ``limit`` rows (of one status), newest first."""

    async def day_tallies(self) -> list[DayTally]:
        """Per local day of this process's time zone, oldest first."""

    async def recorded_paths(self, relpath: str, absolute: str) -> list[RecordedPath]:
        """The files recorded under ``relpath`` in any source, or at the ``absolute`` path."""

    async def first_failures(
        self, relpath: str | None = None, absolute: str | None = None
    ) -> list[int]:
        """Per version and rule with a FAILED row, the id of its first FAILED step (of one
        file given by ``relpath`` or ``absolute`` path, or of all), oldest first."""

    async def delivered_digest(self, destination: str, sha256: str) -> tuple[int, str] | None:
        """(id, location) of the first dispatch that sent bytes with this SHA-256 (hex) to
        ``destination``, duplicates passed over; None if there is none."""

    async def waiting_by_destination(self, now: float) -> list[Waiting]:
        """Per destination: the PENDING rows not due before ``now`` (Unix seconds)."""

    async def ping(self) -> None:
        """Raise ``JournalError`` unless the journal answers a read now."""


class Journal(JournalReader, Protocol):
    """The journal: the plan (PENDING rows), claims, outcomes and history; one writer.

    Open one with ``open_journal(database)`` (a path: SQLite; a ``PostgresTarget``: PostgreSQL);
    ``Journal.open`` is the same function, for older callers.
    A write the journal cannot take now is held and retried (``health``, ``writable``), not
    raised, unless ``stop_retrying`` was called. Every time given or returned (``now``,
    ``since``, ``created``, ``next_attempt`` ...) is Unix time in seconds, a float, as
    ``time.time()`` gives it (None for ``now``: the journal's own clock); durations carry
    their unit in their name (``duration_ms``, ``lease_s``).
    """

    #: the journal's state for status and /health
    health: JournalHealth
    #: set while writes are committed; cleared while they are held
    writable: asyncio.Event

    @property
    def token(self) -> str:
        """The journal's identity: 8 lowercase hex characters, random, made once when the
        journal is created (or upgraded to it) and stored in it; read at open, the same for
        every node of a PostgreSQL journal and across restarts. Deliveries put it in their
        temporary names (``StepContext.journal``), so that two journals whose row ids
        coincide never share a temporary file."""

    def named(self, row_id: int, created: float) -> tuple[str, float]:
        """What the delivery name of row ``row_id``, planned at ``created``, carries
        (``StepContext.named_under`` and ``planned``): the token the row was planned under
        (``token`` unless the journal took a new one since, found elsewhere), and
        ``created``, or 0.0 for a row planned before names carried it."""

    @property
    def where(self) -> str:
        """Where the journal is, for people (a path, or a URL without its password)."""

    def reader(self, size: int = 2) -> AbstractAsyncContextManager[JournalReader]:
        """Reads of their own (a pool of ``size`` connections) for the web app."""

    def on_health(self, listener: Callable[[JournalHealth], None]) -> None:
        """Call ``listener(health)`` on the loop whenever the health changes."""

    def stop_retrying(self) -> None:
        """From now on a refused write fails at once instead of being held."""

    async def join(
        self,
        node: str,
        lease_s: float,
        shared: frozenset[str] = frozenset(),
    ) -> int:
        """Register this service as ``node`` with a lease of ``lease_s`` seconds (on the
        database's clock) and return its epoch, the fencing token its claims carry. Work of
        nodes whose lease ran out goes back to PENDING. Rows planned from a source not in
        ``shared`` belong to this node. Raises ``NodeConflictError`` while a live lease of the
        name is on record, unless this very journal object wrote it in a join whose answer was
        lost: holding the name's lock is no proof that the holder of that lease has stopped
        (its lock's session can be cut while it runs on). SQLite: one implicit node, always
        alive."""

    async def renew(self) -> bool:
        """Renew this node's lease (and its listing leases); requeue the work of nodes whose
        lease ran out. False when this node's lease had run out: it must stop delivering and
        ``join`` again."""

    async def take_listing(self, source: str) -> bool:
        """Take or keep the listing lease of the shared source ``source``; whether this node
        holds it now."""

    async def leave(self) -> None:
        """At a clean stop: give up the lease and the listing leases at once."""

    async def nodes(self) -> list[NodeInfo]:
        """The nodes known to the journal, by name."""

    def forget_nodes(self, after_s: float) -> asyncio.Future[list[str]]:
        """Queue the forgetting of the nodes whose lease ended more than ``after_s`` seconds
        ago and that hold no work: no row IN_PROGRESS under their epoch, none PENDING or
        IN_PROGRESS that only they may run. The future (which nobody needs to wait for) gives
        the names forgotten. Raises JournalError once the journal is closed. SQLite: none."""

    async def hand_over(self, old: str, new: str) -> int:
        """Give the rows only node ``old`` may run (PENDING or IN_PROGRESS, of its unshared
        sources) to node ``new`` as PENDING rows with no epoch, and forget ``old``; how many
        rows moved. Raises ``NodeConflictError`` while ``old``'s lease has not run out,
        ``NotFound`` when neither a node nor a row has that name, ``JournalError`` on SQLite
        (one implicit node: nothing to hand over)."""

    def record_uploads(
        self, uploads: Sequence[OpenUpload], *, orphaned: bool = False
    ) -> asyncio.Future[None]:
        """Queue the S3 multipart uploads this run began (``orphaned``: a run known to be gone
        began them) into the ledger; the future is done once they are committed. Raises
        JournalError once the journal is closed."""

    def end_uploads(self, uploads: Sequence[OpenUpload]) -> asyncio.Future[None]:
        """Queue the removal of ``uploads`` (completed or aborted) from the ledger; nobody
        needs to wait for the future. Raises JournalError once the journal is closed."""

    async def orphan_uploads(self) -> list[OpenUpload]:
        """The uploads of the ledger whose run is gone: SQLite, any other run's; PostgreSQL,
        those whose node's lease ran out or whose node joined again since."""

    async def plan(self, steps: Iterable[PlannedStep], now: float | None = None) -> int:
        """Insert PENDING rows for steps not planned before; how many are new."""

    def plan_started(
        self, steps: Sequence[PlannedStep], now: float
    ) -> asyncio.Future[list[int | None]]:
        """Insert rows already IN_PROGRESS; each step's new id, None where planned before."""

    async def record_failed_name(self, version: FileVersion, rule: str, reason: str) -> None:
        """A file that cannot even be planned: one FAILED row says why."""

    async def claim(
        self, limit: int, now: float, skip_sources: frozenset[str] = frozenset()
    ) -> list[list[Dispatch]]:
        """Take due PENDING work grouped by file version; its due rows become IN_PROGRESS."""

    async def next_due(self) -> float | None:
        """When the earliest waiting row is due (epoch seconds), None when nothing waits."""

    async def finish(self, results: Sequence[StepResult], now: float | None = None) -> None:
        """Record outcomes and return once they are durable; raises ``FencedError`` for
        outcomes of rows this node no longer holds (the others are recorded)."""

    def finish_soon(
        self, results: Sequence[StepResult], now: float | None = None
    ) -> asyncio.Future[None]:
        """Queue outcomes; the future is done once they (and every earlier write) are durable."""

    async def flush(self) -> None:
        """Return once every write queued before this call is durable."""

    def resume_interrupted(self) -> asyncio.Future[int]:
        """At start-up: rows left IN_PROGRESS become PENDING, due at once; how many."""

    async def active_version_keys(self) -> set[str]:
        """Keys of versions with PENDING or IN_PROGRESS rows."""

    async def version_states(
        self, versions: Sequence[FileVersion]
    ) -> dict[str, list[tuple[str, str, int]]]:
        """For each version key: (step_key, status, attempts) of its rows."""

    async def versions(self, vkeys: Sequence[str]) -> dict[str, FileVersion]:
        """The file version each key stands for (from one of its rows); keys without rows
        are left out."""

    async def retry(self, dispatch_id: int) -> bool:
        """Re-queue a FAILED row and the rest of its chain; False if it is not FAILED."""

    async def unkeyed(
        self, limit: int = 1000, after: str = ""
    ) -> list[tuple[str, str, str, str, int, int]]:
        """Versions recorded without an inode: (vkey, source, root, relpath, size, mtime_ns)."""

    async def rekey(
        self, found: Sequence[tuple[str, str, int, int, int]], missing: Sequence[str]
    ) -> int:
        """Give old rows the key their file has now; the rows re-keyed."""

    async def requeue_unrun(self, steps: Sequence[tuple[str, str]]) -> int:
        """Queue again FAILED rows no attempt was made for, given as (vkey, step_key); the rows
        queued."""

    async def upgrade_due(self, name: str) -> bool:
        """Whether the one-time upgrade ``name`` is still to be done."""

    async def rekey_steps(self, keys: Mapping[str, str], now: float) -> int:
        """Give rows today's step keys (old key -> new key) and record the ``step-keys`` upgrade
        done, in one transaction; the rows changed."""

    async def forget(
        self,
        dispatch_id: int | None = None,
        *,
        source: str | None = None,
        relpath: str | None = None,
    ) -> int:
        """Delete history (never an IN_PROGRESS row); the rows removed."""

    async def mark_done(self, steps: Iterable[PlannedStep]) -> int:
        """Record steps as SUCCEEDED without sending; how many were new."""

    async def unfinished(self) -> int:
        """How many rows are PENDING or IN_PROGRESS."""

    async def progress(self, since: float) -> tuple[int, int]:
        """(rows finished since ``since``, rows still to do)."""

    # history retention (``filedispatch.retention`` drives these; docs/operations.md)

    async def oldest(self, after_id: int, limit: int) -> list[OldRow]:
        """Up to ``limit`` rows with ids above ``after_id``, in id (arrival) order."""

    async def kept_keys(self, after: str, limit: int) -> list[KeptKey]:
        """Up to ``limit`` pruned versions whose compact key is kept, from above ``after``."""

    async def row_count(self) -> int:
        """How many rows the journal holds (from the stats rollup, without a scan)."""

    async def prune(
        self, vkeys: Sequence[str], keep: Sequence[str], before: float
    ) -> tuple[int, int]:
        """Delete, in one short transaction, the rows of those versions whose every row
        SUCCEEDED and finished before ``before`` (epoch seconds); the compact keys of those in
        ``keep`` stay, so the version is never planned again. A deleted row's id is never
        given again. Returns (rows deleted, versions whose key was kept)."""

    async def drop_kept(self, vkeys: Sequence[str]) -> int:
        """Forget these versions' kept keys (their source is gone); the keys removed."""

    async def vacuum_step(self, pages: int) -> int:
        """Give up to ``pages`` free pages back to the filesystem; the free pages left (0 when
        the backend has nothing to give back this way)."""
