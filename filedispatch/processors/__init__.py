"""Processors: one module per destination kind, all behind the small ``Processor`` protocol.

A processor delivers one file for one step and reports an ``Outcome``, or raises
``TransientDeliveryError`` (retry) or ``PermanentDeliveryError`` (fail now). It never touches the
journal and never removes the source: the dispatcher owns both.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib
import json
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from pydantic import SecretStr

from ..errors import TransientDeliveryError
from ..models import FileVersion, Outcome

if TYPE_CHECKING:
    from ..config import Step
    from ..controls import Throttle


def unfenced() -> None:
    """The fence of a row no lease can be lost for (one node): always passes."""


@dataclass(frozen=True, slots=True)
class StepContext:
    """What a processor knows about the step it runs; also handed to Python callables."""

    #: the journal row: unique within its journal only (every journal counts from 1); what
    #: names the delivery outside the journal is ``delivery_id``
    dispatch_id: int
    version: FileVersion  #: the source file this chain started from
    input: Path  #: the file to deliver: the source, or the output of an earlier transform
    rule: str
    step: int  #: 0-based position in the rule's ``to`` list
    attempt: int  #: 1 for the first try
    workdir: Path  #: a private folder for this chain's intermediate files
    #: an earlier attempt of this row may have completed before a crash: check before sending
    resuming: bool = False
    #: this is the source's only destination and the source is consumed once it is delivered:
    #: a local folder on the same filesystem may rename the source into place
    may_move: bool = False
    label: str | None = None  #: the label a learned rule gave the file (``{label}``)
    #: the hex SHA-256 of ``input``, when worked out before the step (``inputs.content_sha256``,
    #: off the event loop) for a name by content (``{sha256}``); None: worked out if needed
    sha256: str | None = None
    #: the destination's ``bandwidth``, to pay per chunk as the bytes are sent (None: no
    #: limit); set only for a processor whose class says ``paces = True``
    throttle: Throttle | None = None
    #: raises LeaseLostError once the lease the row was claimed under may have run out (a
    #: node of several, frozen or cut off: another node may deliver the file now). A
    #: processor calls it right before each step that makes its delivery visible or complete
    #: (a rename into place, the next chunk of a body, a multipart completion); safe from a
    #: worker thread. A no-op with one node
    fence: Callable[[], None] = unfenced
    #: the fencing token of the claim this step runs under (the node's epoch, with a
    #: PostgreSQL journal; None or 0 with SQLite's one node). It goes into the temporary name
    #: a delivery is written under, so that two nodes that hold the row in turn (one frozen
    #: past its lease, one that took the row over) never write, rename or remove one file
    epoch: int | None = None
    #: the identity token of the journal the row is in (``Journal.token``: 8 hex characters,
    #: made once per journal; "" for a caller with no journal). It goes into the temporary
    #: name too, so that two journals (two hosts or services, each with its own journal, whose
    #: row ids all start at 1) delivering a file of the same name into one folder never write,
    #: rename or remove one another's temporary file
    journal: str = ""
    #: when the row was planned (``Dispatch.created``, Unix time): part of the delivery's
    #: name, so that a row id given again (a journal restored from a backup, a PostgreSQL
    #: cluster cloned) names another delivery. 0.0 (a caller with no journal; a row planned
    #: before names carried it, ``Journal.named``): left out of the name
    planned: float = 0.0
    #: the journal token the row was planned under, when the journal took a new token since
    #: (``Journal.named``; "": ``journal``): the row keeps its name across the rebind
    named_under: str = ""

    @property
    def delivery_id(self) -> str:
        """What names this delivery outside the journal, unique across journals and across
        a journal's past: ``<journal token>-<row id>-<planned, integer microseconds>``
        (``"0a1b2c3d-42-1767225600123456"``; the bare row id for a caller with no journal).
        Sent as HTTP's ``Idempotency-Key``, stored as an S3 object's ``filedispatch-id``,
        given to commands as ``FILEDISPATCH_DELIVERY_ID``."""
        token = self.named_under or self.journal
        if not token:
            return str(self.dispatch_id)
        if not self.planned:  # a row planned before names carried the time keeps its name
            return f"{token}-{self.dispatch_id}"
        return f"{token}-{self.dispatch_id}-{round(self.planned * 1_000_000)}"

    @property
    def path(self) -> Path:
        return self.version.path

    @property
    def relpath(self) -> str:
        return self.version.relpath

    @property
    def source(self) -> str:
        return self.version.source


def called_off(ctx: StepContext, off: threading.Event) -> StepContext:
    """``ctx`` whose fence also raises TransientDeliveryError once ``off`` is set: a delivery
    that runs in a worker thread, whose caller was cancelled (a step's timeout, the stop) and
    waits for it to end (``asyncutil.thread_to_its_end``). The copy then stops at its next
    chunk, or short of its rename, and removes its temporary file."""
    fence = ctx.fence

    def fence_or_off() -> None:
        fence()  # first: it may wait (a test holds a delivery there)
        if off.is_set():
            raise TransientDeliveryError("called off: the step timed out, or the service stops")

    return dataclasses.replace(ctx, fence=fence_or_off)


class Processor(Protocol):
    """Delivers files for one configured step.

    A processor that streams the bytes itself and pays ``ctx.throttle`` per chunk as it sends
    them says so with a class attribute ``paces = True``; for any other, a destination's
    ``bandwidth`` is paid for the whole file before ``deliver`` is called.
    """

    async def deliver(self, ctx: StepContext) -> Outcome: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Mover(Protocol):
    """Optional, for a processor whose delivery can be one rename of the source file.

    When a new file's only step is such a processor and the source is consumed anyway, the
    dispatcher moves it inline as soon as it is planned, instead of queueing it for a worker.
    ``move_now`` must be quick and never block: it runs on the event loop.
    """

    def can_move_from(self, folder: Path) -> bool: ...

    def move_now(self, ctx: StepContext) -> Outcome: ...


@runtime_checkable
class BatchCopier(Protocol):
    """Optional, for a processor that can copy many small files in one go, in one thread.

    New small files whose only step is such a processor are copied in chunks this way
    instead of one worker and one thread hop per file. ``copy_batch`` runs them in a thread
    (called off and waited for when it is cancelled: ``threads.CopyThreads``); it returns,
    per context, an Outcome or the exception that file met.
    """

    async def copy_batch(self, ctxs: list[StepContext]) -> list[Outcome | Exception]: ...


class MoveUnavailable(Exception):
    """``move_now`` cannot rename here after all (another filesystem under the destination, a
    filesystem without RENAME_NOREPLACE): deliver this file the ordinary way.
    ``this_file``: only this file cannot be renamed (a link: its target is copied)."""

    def __init__(self, reason: str, *, this_file: bool = False) -> None:
        super().__init__(reason)
        self.this_file = this_file


#: ``Resources.items`` key: a callable giving the sources of the configuration in force (a
#: local destination inside one refuses links there: ``processors.local.Inside``)
SOURCES = "sources"


@dataclass
class Resources:
    """Things processors share across the service (one HTTP session, FTP/SFTP pools)."""

    items: dict[str, Any] = field(default_factory=dict)
    closers: list[Any] = field(default_factory=list)

    async def aclose(self) -> None:
        while self.closers:
            await self.closers.pop()()


def create(step: Step, resources: Resources) -> Processor:
    """Build the processor for one configured step (its kind's module, imported on first use)."""
    module = importlib.import_module(f"{__name__}.{step.processor}")
    processor: Processor = module.create(step, resources)
    return processor


def config_key(step: Step) -> str:
    """A stable digest of a step's whole configuration, secrets included (never shown).

    Two steps with the same key behave the same; ``Step.identity()`` is coarser on purpose
    (it says which destination already has a file, whatever its options).
    """
    dump = step.model_dump(mode="python", round_trip=True)
    raw = json.dumps([type(step).__name__, dump], sort_keys=True, default=_plain)
    return hashlib.sha256(raw.encode("utf-8", "surrogateescape")).hexdigest()


def _plain(value: object) -> object:
    if isinstance(value, SecretStr):
        return ["secret", value.get_secret_value()]
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    return repr(value) if not isinstance(value, Path) else str(value)


class Registry:
    """One processor per distinct step configuration, created on first use.

    A reload retires the processors no step of the new configuration uses: they finish what
    they are delivering and are closed once idle. Shared connections (an HTTP session, FTP and
    SFTP pools) live in ``resources``, so two processors for one server still share them.
    """

    def __init__(self, wrap: Callable[[Step, Processor], Processor] | None = None) -> None:
        self.resources = Resources()
        #: puts a new processor behind its destination's controls (see controls.py)
        self._wrap = wrap
        self._processors: dict[str, Processor] = {}
        self._busy: dict[int, int] = {}  #: id(processor) -> deliveries running
        self._retired: dict[int, Processor] = {}
        self._closing: set[asyncio.Task[None]] = set()
        #: id(step) -> (the step, its config_key): the digest once per step object, not per
        #: file (the step is held, so its id cannot be reused while it is here)
        self._keys: dict[int, tuple[Step, str]] = {}

    def _key(self, step: Step) -> str:
        known = self._keys.get(id(step))
        if known is None:
            known = self._keys[id(step)] = (step, config_key(step))
        return known[1]

    def get(self, step: Step) -> Processor:
        key = self._key(step)
        proc = self._processors.get(key)
        if proc is None:
            proc = create(step, self.resources)
            if self._wrap is not None:
                proc = self._wrap(step, proc)
            self._processors[key] = proc
        return proc

    def acquire(self, step: Step) -> Processor:
        """``get``, counting a delivery in progress until ``release``."""
        proc = self.get(step)
        self._busy[id(proc)] = self._busy.get(id(proc), 0) + 1
        return proc

    def release(self, proc: Processor) -> None:
        n = self._busy.pop(id(proc), 1) - 1
        if n > 0:
            self._busy[id(proc)] = n
        elif id(proc) in self._retired:
            self._close(self._retired.pop(id(proc)))

    def retire_unused(self, steps: Iterable[Step]) -> int:
        """After a reload: processors none of ``steps`` uses are closed once idle; returns how
        many were retired. New deliveries get processors built from the new configuration."""
        steps = list(steps)
        ids = {id(step) for step in steps}
        self._keys = {i: known for i, known in self._keys.items() if i in ids}
        keep = {self._key(step) for step in steps}
        old = [key for key in self._processors if key not in keep]
        for key in old:
            proc = self._processors.pop(key)
            if self._busy.get(id(proc)):
                self._retired[id(proc)] = proc
            else:
                self._close(proc)
        return len(old)

    def _close(self, proc: Processor) -> None:
        task = asyncio.get_running_loop().create_task(proc.aclose())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        procs, self._processors = list(self._processors.values()), {}
        procs += self._retired.values()
        self._retired.clear()
        for proc in reversed(procs):
            await proc.aclose()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.resources.aclose()
