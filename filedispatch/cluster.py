"""This service as a node of several sharing one journal: it joins under its name, renews its
lease every third of it, stops delivering once the lease may have run out, and lists a shared
source only while it holds that source's listing lease.

No SQL here (the journal's ``join``, ``renew``, ``take_listing`` and ``leave`` hold it) and no
delivery. With SQLite there is one implicit node whose lease never runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .asyncutil import first_completed
from .config import Config, SourceConfig
from .errors import JournalError, NodeConflictError, ServiceError
from .journal import Journal, NameLock, NodeInfo, when_ready
from .watcher import SourceWatcher

log = logging.getLogger("filedispatch.cluster")

#: seconds between two looks for dead nodes to forget, at most
FORGET_EVERY_S = 3600.0
#: why a rejoin waits (the reason said once, see ``Membership._tick``)
_WAITING_OUT = "waiting for another lease of this name to run out"


def node_name(config: Config) -> str:
    """The node's name: ``node:`` in the config, else the host name."""
    return config.node or socket.gethostname() or "filedispatch"


def describe_node(node: NodeInfo) -> str:
    """One line for people (``fd-status``, ``filedispatch nodes``): whether its lease holds,
    when it was renewed, its work in flight and the work only it may run."""
    if node.alive:
        state = "alive"
    else:
        state = f"lease ran out {max(0.0, node.lease_age_s - node.lease_s):.0f}s ago"
    listed = f", lists {', '.join(node.listing)}" if node.listing else ""
    return (
        f"{node.name}: {state}, lease renewed {node.lease_age_s:.1f}s ago (of "
        f"{node.lease_s:g}s), {node.in_flight} in flight, {node.waiting} waiting{listed}"
    )


def membership(
    journal: Journal, config: Config, hold: NameLock | None, give_up: Callable[[str], None]
) -> Membership:
    """The service's ``Membership`` as its config says (name, lease, shared sources, when
    dead nodes are forgotten)."""
    shared = [s.key for s in config.sources if s.shared]
    return Membership(
        journal,
        node_name(config),
        config.lease,
        shared,
        hold,
        give_up,
        forget_after=config.forget_nodes_after or None,
    )


def _seen(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


class Lease:
    """Two events kept opposite: ``held`` while a lease is ours, ``free`` while it is not."""

    def __init__(self) -> None:
        self.held = asyncio.Event()
        self.free = asyncio.Event()
        self.free.set()

    def set(self, held: bool) -> bool:
        """Hold or drop; whether that changed anything."""
        if held == self.held.is_set():
            return False
        (self.held.set if held else self.held.clear)()
        (self.free.clear if held else self.free.set)()
        return True


class Membership:
    """This node's lease and its listing leases.

    ``alive`` is held from a renewal until ``lease_s`` seconds after that renewal was *sent*,
    measured on this host's monotonic clock: the database dates the lease from a later moment,
    so the node stops before any other node may take its work.
    """

    def __init__(
        self,
        journal: Journal,
        name: str,
        lease_s: float,
        shared: Sequence[str] = (),
        hold: NameLock | None = None,
        give_up: Callable[[str], None] | None = None,
        forget_after: float | None = None,
    ) -> None:
        """``hold``: the service's lock on its name, kept at each renewal; ``give_up(why)`` is
        called when the name is no longer this node's (another live node took it): the
        service must stop, and ``name_lost`` says why. ``forget_after``: seconds after the end
        of its lease that a dead node holding no work is forgotten (None: never); asked after
        a renewal, at most once per that many seconds and at least once an hour."""
        self.forget_after = forget_after
        self._keeping: asyncio.Future[None] | None = None  #: the name lock's check under way
        self._forget_at = 0.0  #: the loop's clock when dead nodes are next looked for
        self.hold = hold
        self.give_up = give_up
        self.name_lost: str | None = None
        self.journal = journal
        self.name = name
        self.lease_s = lease_s
        self.shared = frozenset(shared)
        self.alive = Lease()
        self.listing = {key: Lease() for key in sorted(self.shared)}
        self.epoch: int | None = None
        self.lost = 0  #: times the lease ran out while the service ran
        self._expiry: asyncio.TimerHandle | None = None
        self._until = 0.0  #: the loop's clock (monotonic seconds) when the lease may run out
        #: why the last renewal failed, None if it did not (told once per reason)
        self._unreached: str | None = None
        #: the name lock's checks run here, never behind the deliveries and hashes that fill
        #: the loop's default executor (slow local copies held every thread of it, and the
        #: lease was lost with the database answering at once)
        self._lock_thread: ThreadPoolExecutor | None = None

    async def end(self, stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        """After the drain: stop renewing (``task``, told by ``stop``) and end the leases, so
        other nodes take over now."""
        stop.set()
        with contextlib.suppress(Exception):
            await task
        await self.leave()

    async def alone(self) -> bool:
        """Whether no other node holds a lease on the journal (always, with SQLite): only then
        is every temporary name in a local destination a crash's leftover. A journal that
        cannot answer counts as not alone."""
        try:
            return not any(n.alive and n.name != self.name for n in await self.journal.nodes())
        except JournalError:
            return False

    async def join(self) -> int:
        """Register; the node's epoch (its fencing token). Raises NodeConflictError while a
        live lease of this name is on record that is not this service's own, JournalError
        when the journal cannot be reached."""
        sent = asyncio.get_running_loop().time()
        self.epoch = await self.journal.join(self.name, self.lease_s, self.shared)
        self._held_from(sent)
        return self.epoch

    async def start(self, stop: asyncio.Event) -> bool:
        """Join at the service's start. The name's lock is held (journal_lock), yet a live
        lease of this name may be on record: a service of this name killed less than a lease
        ago, or one whose lock's session was cut (a proxy, an idle timeout) while it runs on.
        That lease is waited out, never taken over: the other service may be mid-delivery,
        and it stops at its next renewal, which finds the lock taken. A journal that cannot be
        reached (it can go away again between its opening and this) is waited for as
        ``when_ready`` says; False when ``stop`` is set meanwhile."""
        said = False
        while True:
            try:
                joined = await when_ready(
                    self.join, stop, what=f"node {self.name} cannot join the journal: "
                )
                return joined is not None
            except NodeConflictError as exc:
                left = exc.left_s if exc.left_s is not None else self.lease_s
                if not said:
                    said = True
                    log.warning(
                        "node %s: a lease of this name is still live on the journal for %.0fs "
                        "(a service of this name was killed, or lost its connection and is "
                        "about to stop): joining once it has run out",
                        self.name,
                        left,
                    )
                # once more right after it ends; never longer than a third of a lease, so a
                # lease renewed meanwhile (a twin still running) is seen and waited out again
                wait = min(max(left, 0.0) + 0.1, max(self.lease_s / 3, 1.0))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), wait)
                    return False

    def _held_from(self, sent: float) -> None:
        loop = asyncio.get_running_loop()
        if self._expiry is not None:
            self._expiry.cancel()
        self._until = sent + self.lease_s
        self._expiry = loop.call_at(self._until, self._expired)
        self.alive.set(True)

    def holds(self, epoch: int | None = None) -> bool:
        """Whether the lease is surely still ours, read from the clock itself: after a freeze
        (SIGSTOP, a suspended VM) work may resume before the expiry timer has run, and no
        delivery may start on the strength of a lease that ran out meanwhile. With ``epoch``
        (the token a row was claimed under): whether that very lease is, not a later one this
        node joined under since (the rows of a lost lease are requeued for any node to take).
        Safe to ask from a worker thread."""
        if epoch is not None and epoch != self.epoch:
            return False
        # the loop's own clock (time.monotonic), read directly so a worker thread may ask too
        return self.alive.held.is_set() and time.monotonic() < self._until

    def _expired(self) -> None:
        """The lease may have run out: no new delivery starts and no shared source is listed
        until it is renewed or the node has joined again."""
        if self.alive.set(False):
            self.lost += 1
            log.error(
                "node %s: its lease (%gs) was not renewed in time (the journal did not answer): "
                "it stops delivering and listing; unless a late answer shows the journal "
                "renewed it, its work goes back to the queue for the other nodes, and its late "
                "outcomes will be refused",
                self.name,
                self.lease_s,
            )
        for key, lease in self.listing.items():
            if lease.set(False):
                log.info("source %s: this node no longer lists it", key)

    async def run(self, stop: asyncio.Event) -> None:
        """Renew every third of the lease until ``stop``; then give the leases up. The next
        renewal is sent a third of a lease after the last was *sent*, however long its answer
        took: the lease runs from the sending, so a late answer must not push the next
        renewal past the lease's end."""
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                sent = loop.time()
                await self._tick(loop)
                wait = max(0.0, sent + self.lease_s / 3 - loop.time())
                await first_completed(stop.wait(), timeout=wait)
        finally:
            if self._expiry is not None:
                self._expiry.cancel()

    def _take_up(self, sent: float, now: float) -> None:
        """A renewal sent at ``sent`` (the loop's clock) was answered at ``now``: the lease is
        held until a lease after the sending."""
        if now >= sent + self.lease_s:
            return  # the next renewal is sent at once, and decides
        if not self.alive.held.is_set():
            log.info(
                "node %s: the journal took its renewal in time after all (its answer was "
                "late): it delivers again, under the same epoch",
                self.name,
            )
        self._held_from(sent)
        self._forget(sent)

    def _lose_name(self, why: str) -> None:
        if self.name_lost is None:
            self.name_lost = why
            log.error("node %s stops: %s", self.name, why)
            self._expired()
            if self.give_up is not None:
                self.give_up(f"the node name {self.name!r} is no longer this node's")

    async def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        sent = loop.time()
        try:
            if self.hold is not None:  # its connection can be lost, and the lock with it
                await self._keep_hold(self.hold)
            renewed = await self.journal.renew()
            if renewed:
                # taken up even when the answer came after the lease had run out here: the
                # database renews only a lease nobody found dead (journal ``gone``), so no
                # work or upload of this epoch was taken over meanwhile. The lease is dated
                # from the sending; an answer later than a whole lease holds nothing
                self._take_up(sent, loop.time())
            else:
                self._expired()
                if self._unreached != _WAITING_OUT:  # else said when the wait began
                    log.warning("node %s: its lease had run out; joining again", self.name)
                # a live entry of this name that is not this service's own lost join: another
                # service of the name whose lock's session was cut. The lock was just found
                # ours, so it stops at its next renewal: its lease is waited out (below)
                await self.join()
            for key, lease in self.listing.items():
                held = self.alive.held.is_set() and await self.journal.take_listing(key)
                if lease.set(held):
                    log.info(
                        "source %s: %s",
                        key,
                        "this node lists it now" if held else "another node lists it now",
                    )
        except NodeConflictError as exc:
            if self.hold is None:  # no lock of the name to tell whose it is: it is theirs
                self._lose_name(str(exc))
            else:  # said once, whatever the seconds left (they change at every renewal)
                self._say_unreached(_WAITING_OUT, f"{_WAITING_OUT}: {exc}")
        except ServiceError as exc:  # the name is another node's now (its lock is theirs)
            self._lose_name(str(exc))
        except JournalError as exc:
            # a renewal fails fast (it has a connection of its own): tried again every third
            # of the lease, told once per reason (a failed join again says why, too)
            self._say_unreached(f"the lease could not be renewed: {exc}")
        else:
            if self._unreached is not None:
                log.info("node %s: the lease is renewed again", self.name)
            self._unreached = None

    def _say_unreached(self, why: str, text: str | None = None) -> None:
        """Log ``text`` (``why`` itself by default) unless ``why`` was the last reason said."""
        if self._unreached != why:
            log.warning("node %s: %s", self.name, text or why)
        self._unreached = why

    async def _keep_hold(self, hold: NameLock) -> None:
        """Check the name's lock (taken again if its connection was lost) in a thread, for at
        most a third of the lease. A lock connection that went silent (a network path that
        drops packets and sends no reset, a database host frozen) would hold the check, and
        with it every renewal, for as long as the kernel keeps the connection: past that
        time it is shut down, which ends the check, and the next renewal connects again.
        One check at a time: a late one is waited for, never run beside another. Raises
        JournalError on the time limit, and what ``NameLock.keep`` raises."""
        if self._keeping is None or self._keeping.done():
            if self._lock_thread is None:
                self._lock_thread = ThreadPoolExecutor(1, thread_name_prefix="name lock")
            loop = asyncio.get_running_loop()
            self._keeping = asyncio.ensure_future(
                loop.run_in_executor(self._lock_thread, hold.keep)
            )
            # one that ends after its time limit passed is read by nobody: its error is
            # marked as seen here (the next check meets the cause again anyway)
            self._keeping.add_done_callback(_seen)
        limit = max(self.lease_s / 3, 1.0)
        try:
            await asyncio.wait_for(asyncio.shield(self._keeping), limit)
        except TimeoutError:
            hold.interrupt()
            raise JournalError(
                f"the connection holding the node name's lock did not answer in {limit:g}s; "
                "it is closed and made again"
            ) from None

    def _forget(self, now: float) -> None:
        """Once in a while (not at every renewal: it reads the rows), queue the forgetting of
        nodes dead for longer than ``forget_after`` that hold no work."""
        if self.forget_after is None or now < self._forget_at:
            return
        self._forget_at = now + min(self.forget_after, FORGET_EVERY_S)
        with contextlib.suppress(JournalError):  # closed: the next renewal asks again
            self.journal.forget_nodes(self.forget_after)

    async def leave(self) -> None:
        """At a clean stop: end the leases now so another node lists and works at once."""
        self.alive.set(False)
        if self._lock_thread is not None:  # a check under way ends with its connection
            self._lock_thread.shutdown(wait=False)
            self._lock_thread = None
        with contextlib.suppress(JournalError):
            await self.journal.leave()


class SharedWatcher:
    """A shared source's watcher: it runs (polling) only while this node holds the source's
    listing lease, and stops when the lease is lost. Reads like a ``SourceWatcher``."""

    def __init__(
        self,
        config: SourceConfig,
        make: Callable[[SourceConfig], SourceWatcher],
        lease: Lease,
    ) -> None:
        # inotify sees only this host's writes: a shared folder is polled (the config refuses
        # shared: true with poll: false)
        self.config = config.model_copy(update={"poll": True})
        self.root = config.path
        self._make = make
        self._lease = lease
        self.inner = make(self.config)
        self.ready = asyncio.Event()  #: listed once by this node, or listed by another

    @property
    def last_error(self) -> str | None:
        return self.inner.last_error

    @property
    def polling(self) -> bool:
        """Whether the folder is listed by polling, whichever node lists it: what the config
        this watcher runs with says (``poll`` forced on above), so no status read between two
        listings of it says otherwise."""
        return bool(self.config.poll)

    @property
    def unsettled(self) -> int:
        return self.inner.unsettled if self._lease.held.is_set() else 0

    @property
    def listing(self) -> bool:
        return self._lease.held.is_set()

    @property
    def skipped(self) -> dict[str, int]:
        """Entries passed over by this node's last full listing, per reason."""
        return self.inner.skipped

    @property
    def ageing(self) -> int:
        """Files a rule waits for until they are old enough (``min_age``)."""
        return self.inner.ageing

    def request_rescan(self) -> None:
        self.inner.request_rescan()

    async def run(self, stop: asyncio.Event) -> None:
        """List while the lease is held, until ``stop``."""
        while not stop.is_set():
            if not self._lease.held.is_set():
                self.ready.set()  # another node lists it: nothing to wait for here
                await first_completed(stop.wait(), self._lease.held.wait())
                continue
            inner = self.inner = self._make(self.config)
            inner_stop = asyncio.Event()
            task = asyncio.create_task(inner.run(inner_stop), name=f"shared:{self.config.key}")
            try:
                await first_completed(stop.wait(), self._lease.free.wait(), inner.ready.wait())
                if inner.ready.is_set():
                    self.ready.set()
                await first_completed(stop.wait(), self._lease.free.wait(), task)
            finally:
                inner_stop.set()
                await task
