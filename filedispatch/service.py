"""The composition root: opens the parts in order, closes them in reverse, owns the signals.

journal -> processors -> dispatcher -> (web app, console) -> watchers. Shutdown stops the
watchers, lets in-flight deliveries finish within ``shutdown_grace`` seconds, cancels the rest
(they resume at the next start) and says what it did. No other module installs a signal handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel

from . import __version__, notify, recovery, retention
from .asyncutil import first_completed
from .cluster import Membership, SharedWatcher, membership, node_name
from .config import Config, LocalDestination, SourceConfig, load_config, secrets_of, watched_by
from .controls import Controls
from .dispatcher import Dispatcher, RunSummary
from .errors import ConfigError
from .journal import (
    Journal,
    JournalHealth,
    NameLock,
    journal_lock_when_ready,
    journal_path,
    open_when_ready,
    state_folder,
    state_tag,
)
from .learn import Learned, learn_folders, learn_problems, learning
from .link import ServiceLink, status_snapshot
from .processors import SOURCES, Registry
from .processors.s3uploads import LEDGER, UploadLedger
from .processors.threads import CALL_OFF_PATIENCE_S
from .watcher import Baselines, SourceWatcher

log = logging.getLogger(__name__)
#: seconds between looks for work other nodes planned, on a PostgreSQL journal
CLUSTER_IDLE_CHECK_S = 0.25
_M = TypeVar("_M", bound=BaseModel)


@dataclass
class Options:
    """What the command line adds to the config file."""

    config_path: Path | None = None
    db: Path | None = None
    once: bool = False
    max_items: int | None = None
    move: bool = False
    #: files recorded by mark-existing get their after-action (delete, move) like sent ones
    consume_marked: bool = False
    api_host: str | None = None
    api_port: int | None = None
    webapp: bool | None = None
    monitor_port: int | None = None
    monitor: bool | None = None
    #: called once the service is up (the daemon uses it to report readiness)
    on_ready: Callable[[], None] | None = None


def apply_options(config: Config, options: Options) -> Config:
    """The config as the command line amends it (``--move``, ``--host`` ...)."""
    if options.move:
        sources = [
            s if s.after != "keep" else s.model_copy(update={"after": "delete"})
            for s in config.sources
        ]
        config = config.model_copy(update={"sources": sources})
    api = _amend(config.api, host=options.api_host, port=options.api_port, enabled=options.webapp)
    monitor = _amend(config.monitor, port=options.monitor_port, enabled=options.monitor)
    return config.model_copy(update={"api": api, "monitor": monitor})


def _amend(model: _M, **changes: object) -> _M:
    """A copy of ``model`` with the options that were given (None means not given)."""
    given = {k: v for k, v in changes.items() if v is not None}
    return model.model_copy(update=given) if given else model


#: seconds a watcher's inline batch is given, once its copies have been called off and waited
#: for, to record their outcomes before the watcher is taken for stuck (``_watchers_end``)
RECORD_MARGIN_S = 5.0


async def _watchers_end(runs: list[asyncio.Task[None]], within_s: float) -> None:
    """Once told to stop, watchers end within ``shutdown_grace`` (an inline batch is called
    off then, as a worker's copy is), CALL_OFF_PATIENCE_S and RECORD_MARGIN_S; one still
    running after that waits in a look at its folder that does not return (a hung disk or
    mount: a daemon thread's ``open`` or ``stat``), and is cancelled, leaving that thread to
    end on its own. Nothing is lost: what it had not handed on is found again by the next
    scan."""
    _done, left = await asyncio.wait(runs, timeout=within_s)
    for task in left:
        log.error(
            "%s: still in a look at its folder %gs after the stop (a hung disk or mount?); "
            "left to end on its own",
            task.get_name(),
            within_s,
        )
        task.cancel()


class Service:
    """A running filedispatch: the parts, their order, and the stop story."""

    def __init__(self, config: Config, options: Options | None = None) -> None:
        self.options = options or Options()
        self.config = apply_options(config, self.options)
        self.db_path = journal_path(self.config, self.options.db)
        for i, source in enumerate(self.config.sources):
            if isinstance(self.db_path, Path) and watched_by(source, self.db_path):
                raise ConfigError(
                    str(self.options.config_path or "<config>"),
                    [
                        f"the journal {self.db_path} is inside the watched source sources[{i}]; "
                        "choose another --db or database:"
                    ],
                )
        self.workdir = (self.config.workdir or state_folder(self.db_path) / "work").absolute()
        self.started_at = time.time()
        self.stop_event = asyncio.Event()
        self.stopping_reason: str | None = None
        self.watchers: list[SourceWatcher | SharedWatcher] = []
        self.membership: Membership
        self.journal: Journal
        self.dispatcher: Dispatcher
        self.notifier: notify.Notifier
        self.summary = RunSummary()
        self.reloads = 0
        self.learned: Learned
        self._training: asyncio.Task[None] | None = None  #: a reload's models being trained

    # ------------------------------------------------------------------ control

    def request_stop(self, reason: str = "requested") -> None:
        journal = getattr(self, "journal", None)
        if journal is not None:  # writes held for a full disk must not hold up the stop
            journal.stop_retrying()
        if self.stop_event.is_set():
            log.info(
                "already stopping (%s); in-flight deliveries are still finishing",
                self.stopping_reason,
            )
            return
        self.stopping_reason = reason
        log.info("stopping (%s)", reason)
        self.stop_event.set()

    def reload(self) -> bool:
        """Re-read the config file (SIGHUP); on any error keep running on the old one."""
        path = self.options.config_path
        if path is None:
            log.warning("reload asked, but the service was not started from a config file")
            return False
        try:
            new = apply_options(load_config(path), self.options)
            problems = learn_problems(new)
            if problems:
                raise ConfigError(str(path), problems)
        except ConfigError as exc:
            log.error("reload refused, still running on the old config:\n%s", exc)
            return False
        untrained = [f for f in learn_folders(new).values() if self.learned.model(f) is None]
        if untrained:  # a learned rule takes files only once its model is there
            if self._training is not None and not self._training.done():
                log.error("reload refused: the models of the last reload are still training")
                return False
            log.info("reload: training the new learned rules first")
            self._training = asyncio.get_running_loop().create_task(
                self._train_then_apply(path, new, untrained), name="reload-training"
            )
            return True
        self._apply(path, new)
        return True

    async def _train_then_apply(self, path: Path, new: Config, folders: list[Path]) -> None:
        try:
            await asyncio.to_thread(self.learned.refresh, folders, True)
        except ValueError as exc:
            log.error("reload refused, still running on the old config: %s", exc)
            return
        self._apply(path, new)

    def _apply(self, path: Path, new: Config) -> None:
        if journal_path(new, self.options.db) != self.db_path:
            log.warning("reload: a new database path only takes effect after a restart")
        if new.sources != self.config.sources:
            log.info("reload: sources changed; watchers restart")
            self._restart_watchers.set()
        self.config = new
        self.dispatcher.reconfigure(new)
        self.notifier.reconfigure(new)
        self._publish_secrets()  # a new password must not reach the log either
        self.reloads += 1
        for w in self.watchers:
            w.request_rescan()
        log.info("reloaded %s", path)

    async def retry(self, dispatch_id: int) -> recovery.RetryAnswer:
        """Send a FAILED dispatch again, or say why not (API, console; see recovery.retry)."""
        answer = await recovery.retry(self.journal, self.dispatcher.sources, dispatch_id)
        if answer.ok:
            self.dispatcher.wake()
            for w in self.watchers:  # a file moved back from failed_dir is found at once
                w.request_rescan()
        return answer

    def _publish_secrets(self) -> None:
        """Tell the log filter every secret of the config in force (the API token from its
        environment variable included)."""
        from .logs import set_secrets

        set_secrets(secrets_of(self.config))

    def link(self) -> ServiceLink:
        """The narrow interface the web app, the console and the progress report get."""

        def pause() -> int:
            self.dispatcher.pause()
            return self.dispatcher.running

        def resume() -> int:
            self.dispatcher.resume()
            return self.dispatcher.running

        return ServiceLink(
            status=self.status,
            wake=self.dispatcher.wake,
            retry=self.retry,
            pause=pause,
            resume=resume,
            scanned=lambda: bool(self.watchers) and all(w.ready.is_set() for w in self.watchers),
            secrets=lambda: secrets_of(self.config),
        )

    def status(self) -> dict[str, object]:
        """A snapshot for the API and the console (see ``link.status_snapshot``)."""
        return status_snapshot(
            started_at=self.started_at,
            db_path=self.db_path,
            journal=self.journal,
            membership=self.membership,
            watchers=self.watchers,
            dispatcher=self.dispatcher,
            steps=[step for rule in self.config.rules for step in rule.to],
        )

    # ------------------------------------------------------------------ running

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> list[int]:
        installed: list[int] = []
        for sig, handler in (
            (signal.SIGTERM, lambda: self.request_stop("SIGTERM")),
            (signal.SIGINT, lambda: self.request_stop("SIGINT")),
            (signal.SIGHUP, self._on_sighup),
        ):
            try:
                loop.add_signal_handler(sig, handler)
                installed.append(sig)
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # not the main thread (tests embedding the service)
        # the open-writers gate's leases are broken by SIGIO, whose default ends the process;
        # ignored, the gate saves a call per file (see sourcefile.WriterCheck)
        with contextlib.suppress(ValueError):  # not the main thread: the gate sets SIGURG
            signal.signal(signal.SIGIO, signal.SIG_IGN)
            installed.append(signal.SIGIO)
        return installed

    def _on_sighup(self) -> None:
        from .logs import reopen_log_files

        reopen_log_files()
        self.reload()

    async def run(self) -> int:
        """Run until stopped (or, with ``once``, until the backlog is done); the exit status."""
        loop = asyncio.get_running_loop()
        previous = {
            int(s): signal.getsignal(s)
            for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGIO)
        }
        installed = self._install_signals(loop)
        self._restart_watchers = asyncio.Event()
        self._baselines: Baselines = {}  #: kept across watchers made again (SourceWatcher)
        try:
            # --once fails at once (a cron job tries again); a service waits for its database
            wait = None if self.options.once else self.stop_event
            node = node_name(self.config)
            async with (
                journal_lock_when_ready(self.db_path, node, wait) as held,
                contextlib.AsyncExitStack() as stack,
            ):
                return await self._run(stack, held) if held else 0
        finally:
            for sig in installed:
                if sig != signal.SIGIO:
                    loop.remove_signal_handler(sig)
                # asyncio leaves SIG_DFL: a late SIGTERM would kill the caller's clean-up
                signal.signal(sig, previous[sig] or signal.SIG_DFL)

    def _on_journal_health(self, health: JournalHealth) -> None:
        if health.ok:  # files that arrived meanwhile: look for them now
            for w in self.watchers:
                w.request_rescan()

    async def _run(self, stack: contextlib.AsyncExitStack, hold: NameLock) -> int:
        self._publish_secrets()
        journal = await open_when_ready(stack, self.db_path, self.stop_event)
        if journal is None:
            return 0
        self.journal = journal
        journal.on_health(self._on_journal_health)
        self.membership = membership(journal, self.config, hold, self.request_stop)
        # before the resume, so the work of live nodes stays theirs
        if not await self.membership.start(self.stop_event):
            return 0
        journal.resume_interrupted().add_done_callback(_report_resumed)
        # another live node's copies in progress stay: each is removed by the node resuming it
        alone = await self.membership.alone()
        await recovery.at_start(journal, self.config, self.workdir, alone=alone)
        registry = Registry(wrap=Controls(self.journal).wrap)
        # in the journal, closed after the processors, which end their uploads first
        registry.resources.items[LEDGER] = UploadLedger(journal)
        registry.resources.items[SOURCES] = lambda: self.config.sources
        stack.push_async_callback(registry.aclose)
        # a shared journal: a node may go at any time, so its uploads are looked for again
        every = None if isinstance(self.db_path, Path) else self.config.lease
        old_ledgers = state_folder(self.db_path) / "s3-uploads"
        sweep = await recovery.sweep_uploads(journal, lambda: self.config, old_ledgers, every)
        if sweep is not None:  # cancelled at the stop
            stack.push_async_callback(_cancel, sweep)
        if every is not None and any(s.shared for s in self.config.sources):
            removals = recovery.removals_task(journal, lambda: self.config, every)
            stack.push_async_callback(_cancel, removals)
        learned = await self._learning(stack)
        self.dispatcher = Dispatcher(
            self.config,
            self.journal,
            registry,
            workdir=self.workdir,
            max_items=self.options.max_items,
            consume_marked=self.options.consume_marked,
            learned=learned,
        )
        self.summary = self.dispatcher.summary
        m = self.membership
        self.dispatcher.state.follow_lease(m.alive.held, m.holds, lambda: m.epoch)
        if not isinstance(self.db_path, Path):  # a shared journal: other nodes plan work too
            self.dispatcher.state.idle_check_s = CLUSTER_IDLE_CHECK_S
        lease_stop = asyncio.Event()
        lease_task = asyncio.create_task(self.membership.run(lease_stop), name="node-lease")
        stack.push_async_callback(self.membership.end, lease_stop, lease_task)
        # always there, idle without targets, so a reload can add some; after the dispatcher:
        # closed before it
        self.notifier = await stack.enter_async_context(notify.running(self.config, self.status))
        self.dispatcher.on_result = self.notifier.on_result
        journal.on_health(self.notifier.on_journal_health)
        # the web app and the console are started here, between dispatcher and watchers
        link = self.link()
        if self.config.api.enabled:
            from . import api

            await stack.enter_async_context(api.serve(self.config.api, self.journal, link))
        if self.config.monitor.enabled:  # aiomonitor costs a tenth of a second to import
            from . import monitor

            await stack.enter_async_context(
                monitor.console(self.config.monitor, self.journal, link)
            )
        from . import progress

        await stack.enter_async_context(progress.backlog(self.journal, link.scanned))
        await stack.enter_async_context(  # an SQLite journal's sources are all on this host
            retention.running(
                self.journal, lambda: self.config.history, local=isinstance(self.db_path, Path)
            )
        )
        dispatch_stop = asyncio.Event()
        dispatch_task = asyncio.create_task(self.dispatcher.run(dispatch_stop), name="dispatcher")
        try:
            await self._watch(dispatch_task)
        finally:
            await self._shutdown(dispatch_stop, dispatch_task)
        lost = self.membership.name_lost is not None  # another live node took the name
        # --once: a delivered file not moved (its done_dir hangs) is one to look at too
        unfinished = self.summary.failed or self.summary.unmoved
        return 1 if lost or (self.options.once and unfinished) else 0

    async def _learning(self, stack: contextlib.AsyncExitStack) -> Learned:
        """The learned rules' models, trained (or loaded from beside the journal) before any
        file is routed, then kept current as their examples change (see learn.learning)."""

        def folders() -> list[Path]:
            return list(learn_folders(self.config).values())

        try:
            self.learned = await stack.enter_async_context(
                learning(folders, state_folder(self.db_path), state_tag(self.db_path))
            )
        except ValueError as exc:  # the examples changed since the config was checked
            where = str(self.options.config_path or "<config>")
            raise ConfigError(where, [f"classify.learn: {exc}"]) from None
        stack.push_async_callback(self._stop_training)
        return self.learned

    async def _stop_training(self) -> None:
        if self._training is not None:
            self._training.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._training

    async def _watch(self, dispatch_task: asyncio.Task[None]) -> None:
        """Run watchers (restarting them on a reload that changed sources) until stop."""
        ready_reported = False
        if self.options.once:  # said before the work, which starts with the scan
            log.info(
                "filedispatch %s: dispatching what is in %d source(s) now, then exiting "
                "(--once); journal %s",
                __version__,
                len(self.config.sources),
                self.db_path,
            )
        once = self.options.once
        while not self.stop_event.is_set():
            watch_stop = asyncio.Event()
            self._restart_watchers.clear()
            exclude = [
                s.folder for r in self.config.rules for s in r.to if isinstance(s, LocalDestination)
            ]
            self.watchers = [
                watcher_for(s, exclude, self.dispatcher, self.membership, self._baselines, once)
                for s in self.config.sources
            ]
            async with asyncio.TaskGroup() as tg:
                runs = [
                    tg.create_task(w.run(watch_stop), name=f"source:{w.config.key}")
                    for w in self.watchers
                ]
                for w in self.watchers:
                    await first_completed(w.ready.wait(), self.stop_event.wait(), dispatch_task)
                if not ready_reported:
                    ready_reported = True
                    if self.options.once:
                        log.info("the sources are listed; finishing the backlog (--once)")
                    else:
                        log.info(
                            "filedispatch %s watching %d source(s), journal %s",
                            __version__,
                            len(self.watchers),
                            self.db_path,
                        )
                    if self.options.on_ready:
                        self.options.on_ready()
                if self.options.once and not self.stop_event.is_set():
                    await first_completed(
                        self._backlog_done(), self.stop_event.wait(), dispatch_task
                    )
                    self.request_stop("the backlog is done (--once)")
                await first_completed(
                    self.stop_event.wait(), self._restart_watchers.wait(), dispatch_task
                )
                if dispatch_task.done():
                    self.request_stop("the dispatcher stopped")
                if self.stop_event.is_set():  # a watcher may be inside an inline batch
                    self.dispatcher.stopping(self.config.shutdown_grace)
                watch_stop.set()
                await _watchers_end(
                    runs, self.config.shutdown_grace + CALL_OFF_PATIENCE_S + RECORD_MARGIN_S
                )
            if dispatch_task.done() and dispatch_task.exception() is not None:
                raise dispatch_task.exception()  # type: ignore[misc]

    async def _backlog_done(self) -> None:
        """``--once``: files still settling count as backlog too."""
        while True:
            await self.dispatcher.wait_idle()
            if not any(w.unsettled for w in self.watchers):
                return
            await asyncio.sleep(0.1)

    async def _shutdown(self, dispatch_stop: asyncio.Event, task: asyncio.Task[None]) -> None:
        dispatch_stop.set()
        grace = self.config.shutdown_grace
        in_flight = len(self.dispatcher.in_flight)
        t0 = time.monotonic()
        done, _ = await asyncio.wait({task}, timeout=grace)
        cancelled = 0
        if not done:
            cancelled = len(self.dispatcher.in_flight)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        elif not task.cancelled() and task.exception() is not None:
            log.error("the dispatcher failed: %r", task.exception())
        log.info(
            "stopped after %.1fs: %d in flight at the stop, %d cancelled (resumed at next "
            "start), %d claimed but not started (back in the queue)",
            time.monotonic() - t0,
            in_flight,
            cancelled,
            self.dispatcher.released,
        )


def watcher_for(
    source: SourceConfig,
    exclude: list[Path],
    dispatcher: Dispatcher,
    membership: Membership,
    baselines: Baselines,
    short_run: bool,
) -> SourceWatcher | SharedWatcher:
    """The watcher of ``source``: a ``SharedWatcher`` while this node may hold its listing
    lease, else one of its own, handing its files to ``dispatcher``. ``baselines``: kept
    across watchers made again; ``short_run``: ``--once``."""

    def make(config: SourceConfig) -> SourceWatcher:
        d = dispatcher
        return SourceWatcher(
            config,
            d.offer,
            d.reject,
            exclude,
            lambda version: d.router.waiting(version),  # the rules in force, after a reload too
            baselines,
            short_run=short_run,
        )

    lease = membership.listing.get(source.key) if source.shared else None
    if lease is not None:
        return SharedWatcher(source, make, lease)
    if source.shared:  # made shared by a reload: the node's leases are taken at its start
        log.warning("source %s: shared: true takes effect at the next start", source.key)
    return make(source)


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _report_resumed(fut: asyncio.Future[int]) -> None:
    if fut.cancelled() or fut.exception() is not None:
        return  # the journal failing is reported by the journal itself
    if fut.result():
        log.info("resuming %d dispatch(es) interrupted by the last stop", fut.result())
