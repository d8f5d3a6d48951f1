"""The telnet console (aiomonitor-ng) started with the service, and its fd-* commands.

aiomonitor runs its telnet server in its own thread and event loop; every fd-* command hands
its work to the service's loop (``run_coroutine_threadsafe``) and never touches the service
from the console thread. It installs no signal handler. Its Python REPL stays off unless
``monitor.console: true``, and a non-loopback host needs ``monitor.allow_remote: true``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import TYPE_CHECKING, Any, TextIO

import click
from aiomonitor.monitor import Monitor, command_done, current_stdout, monitor_cli

from .config import MonitorConfig, is_loopback, secrets_of
from .errors import JournalError, ServiceError
from .history import format_rows, shown
from .journal import COLUMNS
from .textsafe import escape, escape_lines

if TYPE_CHECKING:
    from .service import Service

log = logging.getLogger(__name__)

COMMANDS = "fd-status, fd-pause, fd-resume, fd-retry ID, fd-history [N]"


def check_host(cfg: MonitorConfig) -> None:
    """Refuse a console reachable from other machines unless ``allow_remote`` says so."""
    if is_loopback(cfg.host):
        return
    if not cfg.allow_remote:
        raise ServiceError(
            f"monitor.host {cfg.host!r} is not a loopback address: the console controls the "
            "process (pause, retry, signals). Set monitor.allow_remote: true to listen there "
            "anyway, or use 127.0.0.1 and an SSH tunnel"
        )
    log.warning(
        "the console listens on %s:%d, beyond loopback (allow_remote: true): anyone who can "
        "reach that port controls this process",
        cfg.host,
        cfg.port,
    )


def _check_port(host: str, port: int) -> None:
    # aiomonitor binds in its own thread and only loses the error there: find out here
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(
                f"the console cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(--monitor-port to choose another, --no-monitor to go without)"
            ) from None


class FileDispatchMonitor(Monitor):  # type: ignore[misc]
    """aiomonitor's Monitor with the service it controls."""

    def __init__(self, loop: asyncio.AbstractEventLoop, service: Service, **kw: Any) -> None:
        super().__init__(loop, **kw)
        self.service = service
        self.service_loop = loop
        self.jobs: set[asyncio.Task[None]] = set()  # running fd-* commands (console thread)


@contextlib.asynccontextmanager
async def console(service: Service) -> AsyncIterator[FileDispatchMonitor | None]:
    """Run the console for the life of the block (nothing when ``monitor.enabled`` is off)."""
    cfg = service.config.monitor
    if not cfg.enabled:
        yield None
        return
    check_host(cfg)
    _check_port(cfg.host, cfg.port)
    monitor = FileDispatchMonitor(
        asyncio.get_running_loop(),
        service,
        host=cfg.host,
        port=cfg.port,
        console_port=cfg.console_port,
        console_enabled=cfg.console,
    )
    monitor.start()
    log.info(
        "console: telnet %s %d (%s; Python REPL %s)",
        cfg.host,
        cfg.port,
        COMMANDS,
        "on" if cfg.console else "off",
    )
    try:
        yield monitor
    finally:
        await asyncio.to_thread(monitor.close)


# ---------------------------------------------------------------------------- fd-* commands

Job = Callable[..., Coroutine[Any, Any, str]]


def _submit(ctx: click.Context, job: Job, *args: Any) -> None:
    """Run ``job(service, *args)`` on the service's loop; print its answer in this session."""
    monitor: FileDispatchMonitor = ctx.obj
    done = command_done.get()
    stdout: TextIO = current_stdout.get()

    async def relay() -> None:
        try:
            fut: concurrent.futures.Future[str] = asyncio.run_coroutine_threadsafe(
                job(monitor.service, *args), monitor.service_loop
            )
            text = await asyncio.wrap_future(fut)
            # each answer builds its lines from escaped values; this keeps a slip from
            # reaching the operator's terminal as an escape sequence
            stdout.write(escape_lines(text.rstrip("\n")) + "\n")
            stdout.flush()
        except Exception as exc:
            monitor.print_fail(escape(f"{type(exc).__name__}: {exc}"))
        finally:
            done.set()

    task = asyncio.create_task(relay(), name=f"console:{ctx.info_name}")
    monitor.jobs.add(task)
    task.add_done_callback(monitor.jobs.discard)


async def status_text(service: Service) -> str:
    """fd-status: the service's state, the queue and per-destination counts."""
    st = service.status()
    try:
        counts = await service.journal.counts()
        per_dest = await service.journal.read(
            "SELECT destination, status, COUNT(*) FROM dispatches GROUP BY destination, status"
        )
    except JournalError:  # a removed journal may not even be read: the state still shows
        counts, per_dest = {}, []
    journal: dict[str, dict[str, int]] = {}
    for dest, status, n in per_dest:
        journal.setdefault(dest, {})[status] = n
    secrets = secrets_of(service.config)
    journal_state: dict[str, Any] = st["journal"]  # type: ignore[assignment]
    if journal_state["state"] != "ok":
        state = f"PAUSED: journal {journal_state['state']}, resumes by itself once it is writable"
    elif st["paused"]:
        state = "PAUSED (fd-resume to continue)"
    else:
        state = "running"
    lines = [f"filedispatch {st['version']}, up {st['uptime_s']}s, {state}"]
    if journal_state["state"] != "ok":
        lines.append(
            f"journal {shown(journal_state['path'])}: {shown(journal_state['error'], secrets)} "
            f"(since {time.strftime('%H:%M:%S', time.localtime(journal_state['since']))}, "
            f"{journal_state['retries']} retries)"
        )
    lines.append("sources:")
    for s in st["sources"]:  # type: ignore[attr-defined]
        how = "polling" if s["polling"] else "inotify"
        state = "ready" if s["ready"] else "scanning"
        err = f"; last error: {shown(s['last_error'], secrets)}" if s["last_error"] else ""
        lines.append(f"  {shown(s['name'])}: {shown(s['path'])} ({how}, {state}{err})")
    lines.append(
        f"queue: {counts.get('PENDING', 0)} pending, {counts.get('IN_PROGRESS', 0)} claimed; "
        f"in flight: {st['in_flight']}"
    )
    if st["stopped_sources"]:
        stopped = ", ".join(st["stopped_sources"])  # type: ignore[arg-type]
        lines.append(f"stopped after a failure: {shown(stopped)}")
    lines.append("destinations (this run | journal):")
    run_stats: dict[str, dict[str, Any]] = st["destinations"]  # type: ignore[assignment]
    for dest in sorted(set(run_stats) | set(journal)):
        r = run_stats.get(dest, {})
        j = journal.get(dest, {})
        line = (
            f"  {shown(dest, secrets)}: {r.get('succeeded', 0)} ok, {r.get('failed', 0)} failed, "
            f"{r.get('retried', 0)} retried | {j.get('SUCCEEDED', 0)} succeeded, "
            f"{j.get('FAILED', 0)} failed, {j.get('PENDING', 0) + j.get('IN_PROGRESS', 0)} waiting"
        )
        if r.get("last_error"):
            line += f"; last error: {shown(r['last_error'], secrets)}"
        lines.append(line)
    return "\n".join(lines)


async def pause_text(service: Service) -> str:
    service.dispatcher.pause()
    log.info("paused from the console")
    return (
        f"paused: no new work is taken ({service.dispatcher.running} in flight "
        "finish); the watchers keep recording. fd-resume to continue."
    )


async def resume_text(service: Service) -> str:
    service.dispatcher.resume()
    log.info("resumed from the console")
    return "resumed: taking new work again"


async def retry_text(service: Service, dispatch_id: int) -> str:
    answer = await service.retry(dispatch_id)
    if answer.ok:
        log.info("console: %s", answer.message)
    return answer.message


async def history_text(service: Service, limit: int) -> str:
    names = [c.strip() for c in COLUMNS.split(",")]
    rows = await service.journal.read(
        f"SELECT {COLUMNS} FROM dispatches ORDER BY id DESC LIMIT ?", (limit,)
    )
    lines = format_rows(
        (dict(zip(names, r, strict=True)) for r in rows), secrets_of(service.config)
    )
    return "\n".join(lines) if lines else "no dispatches yet"


# aiomonitor is untyped: give its decorator the type it has
Command = Callable[..., None]
command: Callable[..., Callable[[Command], Command]] = monitor_cli.command


def help_option(f: Command) -> Command:
    """``--help``; unlike aiomonitor's, it ends the command only when it is given (its own
    ends every command at once, so an answer computed on the service's loop would be printed
    after the next prompt)."""

    def show(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
        if value:
            click.echo(ctx.get_help())
            command_done.get().set()
            ctx.exit()

    return click.option(
        "--help", is_flag=True, expose_value=False, is_eager=True, callback=show, help="Show this"
    )(f)


@command(name="fd-status")
@help_option
def fd_status(ctx: click.Context) -> None:
    """Sources, queue depth, in-flight deliveries, per-destination counts"""
    _submit(ctx, status_text)


@command(name="fd-pause")
@help_option
def fd_pause(ctx: click.Context) -> None:
    """Stop taking new work (in-flight work finishes; watchers keep recording)"""
    _submit(ctx, pause_text)


@command(name="fd-resume")
@help_option
def fd_resume(ctx: click.Context) -> None:
    """Take new work again after fd-pause"""
    _submit(ctx, resume_text)


@command(name="fd-retry")
@click.argument("dispatch_id", type=int)
@help_option
def fd_retry(ctx: click.Context, dispatch_id: int) -> None:
    """Queue a FAILED dispatch (and the later steps of its chain) again"""
    _submit(ctx, retry_text, dispatch_id)


@command(name="fd-history")
@click.argument("limit", type=click.IntRange(1, 10_000), default=10)
@help_option
def fd_history(ctx: click.Context, limit: int) -> None:
    """The last N dispatches (default 10), credentials hidden"""
    _submit(ctx, history_text, limit)
