"""Notifications: failures, source and journal troubles, successes and digests, sent through
Apprise URLs (email, Slack, Teams, Matrix, ntfy, webhooks, ...).

Events are gathered per target for its ``window`` and told in one message; sending happens in
a task and threads of its own, with retries, so a slow or dead notification server never holds
a delivery back. Nothing here touches the journal or a source; no message carries a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from . import retry
from .config import Config, NotifyTarget, scrub, secrets_of
from .errors import TransientDeliveryError
from .journal import JournalHealth, StepResult
from .models import FileVersion, Status
from .textsafe import escape

log = logging.getLogger(__name__)

#: how many names a message lists before "... and N more"
FIRST_NAMES = 10
#: seconds between two looks at the sources (a folder gone, a watch that failed)
SOURCE_POLL_S = 1.0
#: seconds the last messages may take to go out when the service stops
FLUSH_AT_STOP_S = 10.0

_TITLES = {
    "failed": "failed for good",
    "success": "delivered",
    "source_error": "source trouble",
    "journal": "journal trouble",
}


@dataclass(frozen=True, slots=True)
class Event:
    """One thing a target may be told about."""

    kind: str  #: failed, success, source_error or journal
    source: str | None  #: the source key, for failed/success/source_error
    rule: str | None  #: the rule, for failed/success
    line: str  #: one line saying what happened (escaped, scrubbed)


@dataclass
class _Target:
    """A configured target, the scope it was configured in, and what it has not been told."""

    config: NotifyTarget
    source: str | None = None  #: set for a source's ``notify``: only its events
    rule: str | None = None  #: set for a rule's ``notify``: only its deliveries
    pending: list[Event] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)  #: per kind, this window
    digest: Counter[str] = field(default_factory=Counter)  #: per kind, since the last digest
    due: float | None = None  #: monotonic time the gathered events are sent
    digest_due: float = 0.0

    def wants(self, event: Event) -> bool:
        if self.source is not None and event.source != self.source:
            return False
        if self.rule is not None and event.rule != self.rule:
            return False
        return self.rule is None or event.kind in ("failed", "success")


def targets_of(config: Config) -> list[_Target]:
    """Every configured target with its scope: top level, per source, per rule."""
    found = [_Target(t) for t in config.notify]
    found += [_Target(t, source=s.key) for s in config.sources for t in s.notify]
    found += [
        _Target(t, rule=config.rule_name(i)) for i, r in enumerate(config.rules) for t in r.notify
    ]
    return found


def _send_blocking(url: str, title: str, body: str) -> bool:
    """In a thread: one message through Apprise; False when it could not be sent."""
    import apprise

    sender = apprise.Apprise()
    if not sender.add(url):
        return False
    return bool(sender.notify(title=title, body=body))


def _load_apprise(urls: list[str]) -> None:
    """In a thread: import Apprise and load the plugins of ``urls`` (its first ``add`` of a
    kind loads them, half a second on an idle host); sends nothing."""
    import apprise

    sender = apprise.Apprise()
    for url in urls:
        sender.add(url)


class Notifier:
    """Takes events from the dispatcher, the journal and the sources; sends them gathered.

    ``event`` never blocks and never raises: it only counts and appends (at most
    FIRST_NAMES lines per target and window are kept; the rest are counted).
    """

    def __init__(
        self,
        config: Config,
        status: Callable[[], dict[str, object]] | None = None,
        send: Callable[[str, str, str], bool] = _send_blocking,
    ) -> None:
        self.targets: list[_Target] = []
        self._leaving: list[_Target] = []  #: removed by a reload, with events still to tell
        self._secrets: list[str] = []
        self._status = status
        self._send = send
        self._wake = asyncio.Event()
        self._sources_wanted = asyncio.Event()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="notify")
        #: per source, at the last look: was its folder gone, and the watcher's last error
        self._source_errors: dict[str, tuple[bool, str | None]] = {}
        self._journal_ok = True
        self.sent = 0  #: messages sent, for the tests and the console
        self.dropped = 0  #: messages given up after their retries
        self.reconfigure(config)

    def reconfigure(self, config: Config) -> None:
        """Take the targets of ``config`` (at start, and at each reload). A target configured
        as before, in the same place, keeps what it has gathered and its digest's clock; a
        target no longer configured still sends what it had gathered, at once."""
        now = time.monotonic()
        old = {_same(t): t for t in self.targets}
        targets = []
        for t in targets_of(config):
            kept = old.pop(_same(t), None)
            if kept is None:
                t.digest_due = now + t.config.every
            targets.append(kept or t)
        for gone in old.values():
            if gone.due is not None:
                gone.due = now
                self._leaving.append(gone)
        self.targets = targets
        self._secrets = secrets_of(config)
        if any(t.source is not None or "source_error" in t.config.on for t in targets):
            self._sources_wanted.set()
        else:
            self._sources_wanted.clear()
        self._wake.set()

    # ------------------------------------------------------------------ events in

    def event(self, event: Event) -> None:
        if not self.targets:
            return
        now = time.monotonic()
        for t in self.targets:
            if not t.wants(event):
                continue
            t.digest[event.kind] += 1
            if event.kind not in t.config.on:
                continue
            t.counts[event.kind] += 1
            if len(t.pending) < FIRST_NAMES:
                t.pending.append(event)
            if t.due is None:
                t.due = now + t.config.window
                self._wake.set()

    def on_result(
        self, rule: str, version: FileVersion, destination: str, result: StepResult
    ) -> None:
        """The dispatcher's hook: a row SUCCEEDED or FAILED for good."""
        if not self.targets:  # none configured (yet): no line to build for each file
            return
        if result.status == Status.FAILED:
            why = scrub(result.reason or "no reason given", self._secrets)
            line = f"{escape(version.relpath)} -> {destination}: {escape(why)}"
            self.event(Event("failed", version.source, rule, line))
        elif result.status == Status.SUCCEEDED:
            line = f"{escape(version.relpath)} -> {escape(result.location or destination)}"
            self.event(Event("success", version.source, rule, line))

    def on_journal_health(self, health: JournalHealth) -> None:
        """The journal's listener: told once when it starts failing, once when it is back."""
        if health.ok == self._journal_ok:
            return
        self._journal_ok = health.ok
        line = "the journal is writable again" if health.ok else (health.error or "failing")
        self.event(Event("journal", None, None, escape(scrub(line, self._secrets))))

    async def _watch_sources(self) -> None:
        """Look at the sources each SOURCE_POLL_S: a folder gone, or a new watch error."""
        if self._status is None:
            return
        while True:
            await self._sources_wanted.wait()
            try:
                await self._look_at_sources(self._status())
            except Exception as exc:  # the status is the service's; never end the notifier
                log.warning("notify: cannot look at the sources: %r", exc)
            await asyncio.sleep(SOURCE_POLL_S)

    async def _look_at_sources(self, status: dict[str, object]) -> None:
        sources = status.get("sources", [])
        assert isinstance(sources, list)
        for s in sources:
            name, path, error = s["name"], s["path"], s["last_error"]
            gone = not await asyncio.to_thread(os.path.isdir, path)
            was_gone, was_error = self._source_errors.get(name, (False, None))
            # a folder gone is told once; back, only an error new since the last look is
            # (not the one its absence left: the watch that could not begin meanwhile)
            told = f"the folder {path} is gone" if gone and not was_gone else None
            if not gone and error is not None and error != was_error:
                told = error
            if told is not None:
                line = f"source {escape(name)}: {escape(scrub(told, self._secrets))}"
                self.event(Event("source_error", name, None, line))
            self._source_errors[name] = (gone, error)

    # ------------------------------------------------------------------ messages out

    def _message(self, t: _Target) -> tuple[str, str]:
        counts = ", ".join(f"{n} {_TITLES[k]}" for k, n in sorted(t.counts.items()))
        lines = [e.line for e in t.pending]
        more = sum(t.counts.values()) - len(lines)
        if more > 0:
            lines.append(f"... and {more} more")
        t.pending, t.counts, t.due = [], Counter(), None
        return f"filedispatch: {counts}", "\n".join(lines)

    def _digest(self, t: _Target) -> tuple[str, str]:
        hours = t.config.every / 3600
        span = f"{hours:g} h" if hours >= 1 else f"{t.config.every:g} s"
        counts = t.digest or Counter()
        body = "\n".join(f"{_TITLES[k]}: {counts.get(k, 0)}" for k in _TITLES)
        t.digest = Counter()
        return f"filedispatch: digest of the last {span}", body

    async def run(self) -> None:
        """Send what is due, for ever (cancelled by ``running``'s exit)."""
        while True:
            now = time.monotonic()
            await self._send_due(now, at_stop=False)
            dues = [t.due for t in self.targets if t.due is not None]
            dues += [t.digest_due for t in self.targets if "digest" in t.config.on]
            wait = max(0.0, min(dues) - time.monotonic()) if dues else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), wait)

    async def _send_due(self, now: float, *, at_stop: bool) -> None:
        leaving, self._leaving = self._leaving, []
        for t in leaving:
            await self._deliver(t.config, *self._message(t))
        for t in self.targets:
            if t.due is not None and (at_stop or t.due <= now):
                await self._deliver(t.config, *self._message(t))
            if "digest" in t.config.on and not at_stop and t.digest_due <= now:
                t.digest_due = now + t.config.every
                await self._deliver(t.config, *self._digest(t))

    async def _deliver(self, target: NotifyTarget, title: str, body: str) -> None:
        loop = asyncio.get_running_loop()
        first = time.time()
        attempt = 0
        while True:
            attempt += 1
            try:
                ok = await loop.run_in_executor(self._pool, self._send, target.url, title, body)
            except Exception as exc:  # a plugin's bug must not end the notifier
                ok = False
                log.warning("notify %s: %s", target.display, scrub(repr(exc), self._secrets))
            if ok:
                self.sent += 1
                return
            # the steps' one retry policy decides (retry.py): tries, backoff, jitter, cap
            failure = TransientDeliveryError("the notification was not sent")
            decision = retry.decide(
                target.retry, failure, attempt, None, first_try_s=first, now_s=time.time()
            )
            if not decision.retry:
                break
            await asyncio.sleep(decision.wait_s)
        self.dropped += 1
        log.warning("notify %s: not sent after %d attempt(s)", target.display, attempt)

    async def aclose(self) -> None:
        """Send what was gathered (within FLUSH_AT_STOP_S), then let the threads go. Apprise
        is loaded first, outside that time: loading its plugins is work on this host (seconds
        on a busy one), and the limit is for servers that do not answer."""
        pending = [t.config.url for t in self._leaving]
        pending += [t.config.url for t in self.targets if t.due is not None]
        if pending and self._send is _send_blocking:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._pool, _load_apprise, pending)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._send_due(time.monotonic(), at_stop=True), FLUSH_AT_STOP_S)
        self._pool.shutdown(wait=False, cancel_futures=True)


@contextlib.asynccontextmanager
async def running(
    config: Config, status: Callable[[], dict[str, object]] | None = None
) -> AsyncIterator[Notifier]:
    """A Notifier with its sending task and its look at the sources, for the service's stack."""
    notifier = Notifier(config, status)
    tasks = [
        asyncio.create_task(notifier.run(), name="notify"),
        # idle until a target wants the sources' troubles (at start or after a reload)
        asyncio.create_task(notifier._watch_sources(), name="notify-sources"),
    ]
    try:
        yield notifier
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await notifier.aclose()


def _same(t: _Target) -> tuple[str, str | None, str | None]:
    """What makes a reloaded target the same target: its whole config and its place."""
    return (t.config.model_dump_json(), t.source, t.rule)


def describe(config: Config) -> Iterable[str]:
    """For ``check``: each target, where it is configured and what it is told."""
    for t in targets_of(config):
        where = f"source {t.source}" if t.source else f"rule {t.rule}" if t.rule else "all"
        extra = f", every {t.config.every:g} s" if "digest" in t.config.on else ""
        yield f"{t.config.display} ({where}): {', '.join(t.config.on)}{extra}"
