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
import contextvars
import logging
import shlex
import socket
import time
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TextIO

import click
import janus
from aiomonitor.monitor import (
    Monitor,
    command_done,
    current_monitor,
    current_stdout,
    monitor_cli,
)
from prompt_toolkit.application.current import create_app_session, get_app
from prompt_toolkit.contrib.telnet.protocol import IAC, TelnetProtocolParser
from prompt_toolkit.contrib.telnet.server import TelnetConnection, TelnetServer
from prompt_toolkit.data_structures import Size
from prompt_toolkit.input import DummyInput, create_pipe_input
from prompt_toolkit.output.plain_text import PlainTextOutput
from prompt_toolkit.output.vt100 import Vt100_Output

from .cluster import describe_node
from .config import MonitorConfig, is_loopback
from .errors import JournalError, ServiceError
from .history import as_dict, format_rows, shown
from .journal import Journal
from .link import ServiceLink
from .textsafe import escape, escape_lines

log = logging.getLogger(__name__)

#: The help's width for a line client, which tells no terminal size
HELP_WIDTH = 100
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


def _check_port(host: str, port: int) -> int:
    """The port to give aiomonitor: ``port``, or for 0 one the kernel has free now (told in
    the log, so a client can find it). Raises ServiceError when it cannot be bound: aiomonitor
    binds in its own thread and only loses the error there, so it is found out here."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            raise ServiceError(
                f"the console cannot listen on {host}:{port}: {exc.strerror or exc} "
                "(--monitor-port to choose another, --no-monitor to go without)"
            ) from None
        return int(s.getsockname()[1])


class FileDispatchMonitor(Monitor):  # type: ignore[misc]
    """aiomonitor's Monitor with the journal and the service link its commands use."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, journal: Journal, link: ServiceLink, **kw: Any
    ) -> None:
        super().__init__(loop, **kw)
        self.journal = journal
        self.link = link
        self.service_loop = loop
        self.jobs: set[asyncio.Task[None]] = set()  # running fd-* commands (console thread)

    async def _ui_main_async(self) -> None:
        # aiomonitor's own, with ConsoleServer in place of prompt_toolkit's TelnetServer
        loop = asyncio.get_running_loop()
        self._termination_info_queue: janus.Queue[Any] = janus.Queue()
        self._cancellation_chain_queue: janus.Queue[Any] = janus.Queue()
        self._ui_loop = loop
        self._ui_forever_future = loop.create_future()
        self._ui_termination_handler_task = asyncio.create_task(
            self._ui_handle_termination_updates()
        )
        self._ui_cancellation_handler_task = asyncio.create_task(
            self._ui_handle_cancellation_updates()
        )
        server = ConsoleServer(self, interact=self._interact, host=self._host, port=self._port)
        server.start()
        await asyncio.sleep(0)
        self._ui_started.set()
        try:
            await self._ui_forever_future
        except asyncio.CancelledError:
            pass
        finally:
            console_tasks = {*self._console_tasks}
            for console_task in console_tasks:
                console_task.cancel()
            await asyncio.gather(*console_tasks, return_exceptions=True)
            self._ui_termination_handler_task.cancel()
            self._ui_cancellation_handler_task.cancel()
            await self._ui_termination_handler_task
            await self._ui_cancellation_handler_task
            await server.stop()

    async def line_session(self, connection: ConsoleConnection) -> None:
        """The console for a plain line client: a line in, the command's answer out, no
        terminal escapes. An empty line repeats the last command, as over telnet."""
        stdout = connection.stdout
        stdout.write(BLANK_LINE)
        tasks = len(asyncio.all_tasks(self.service_loop))
        stdout.write(self.intro.format(tasknum=tasks, s="" if tasks == 1 else "s") + "\n")
        monitor_token = current_monitor.set(self)
        stdout_token = current_stdout.set(stdout)
        lastcmd = "noop"
        try:
            with create_app_session(input=DummyInput(), output=PlainTextOutput(stdout)):
                while True:
                    stdout.write(self.prompt)
                    raw = await connection.lines.readline()
                    if not raw:
                        return
                    line = raw.decode(connection.encoding, "replace").strip() or lastcmd
                    try:
                        args = shlex.split(line)
                    except ValueError as exc:
                        self.print_fail(str(exc))
                        continue
                    if args and args[0] == "console" and self._console_enabled:
                        self.print_fail("the Python REPL needs a telnet client")
                        continue
                    done = asyncio.Event()
                    done_token = command_done.set(done)
                    try:
                        contextvars.copy_context().run(
                            monitor_cli.main,
                            args,
                            prog_name="",
                            obj=self,
                            standalone_mode=False,
                            max_content_width=HELP_WIDTH,
                        )
                        await done.wait()
                        lastcmd = line
                    except click.ClickException as exc:
                        self.print_fail(exc.format_message())
                    except asyncio.CancelledError:  # "exit"
                        return
                    except Exception:
                        self.print_fail(traceback.format_exc())
                    finally:
                        command_done.reset(done_token)
        finally:
            current_stdout.reset(stdout_token)
            current_monitor.reset(monitor_token)


@contextlib.asynccontextmanager
async def console(
    cfg: MonitorConfig, journal: Journal, link: ServiceLink
) -> AsyncIterator[FileDispatchMonitor | None]:
    """Run the console for the life of the block (nothing when ``monitor.enabled`` is off).
    Its commands see the service only through ``link`` and read ``journal``."""
    if not cfg.enabled:
        yield None
        return
    check_host(cfg)
    port = _check_port(cfg.host, cfg.port)
    repl_port = _check_port(cfg.host, cfg.console_port) if cfg.console else cfg.console_port
    monitor = FileDispatchMonitor(
        asyncio.get_running_loop(),
        journal,
        link,
        host=cfg.host,
        port=port,
        console_port=repl_port,
        console_enabled=cfg.console,
    )
    monitor.start()
    log.info(
        "console: telnet %s %d (%s; Python REPL %s)",
        cfg.host,
        port,
        COMMANDS,
        f"on, port {repl_port}" if cfg.console else "off",
    )
    try:
        yield monitor
    finally:
        await asyncio.to_thread(monitor.close)


# ------------------------------------------------------------------ the console's server

#: How long a new client has to answer the telnet options before it is taken for a plain
#: line client (nc, socat): a telnet client answers within a round trip.
TELNET_WAIT_S = 1.0
#: How long a client that speaks telnet has to tell its terminal type before "vt100" is
#: assumed (a client may refuse TTYPE; prompt_toolkit's own server then waits for ever).
TTYPE_WAIT_S = 3.0
#: Blanks out, on a line client's terminal, the option bytes it was sent before it was known
#: not to speak telnet (they show as a few replacement characters).
BLANK_LINE = "\r" + " " * 40 + "\r"


class ConsoleConnection(TelnetConnection):
    """One console client: a telnet client gets aiomonitor's prompt_toolkit session, a plain
    line client (``nc``) a line-at-a-time session without terminal escapes.

    Telnet's end of line is CR LF (or CR NUL); prompt_toolkit takes the CR for Enter and the
    LF for a second, empty line, which aiomonitor runs as the last command again: the
    connection hands on the CR alone.
    """

    def __init__(self, *args: Any, monitor: FileDispatchMonitor, **kw: Any) -> None:
        super().__init__(*args, **kw)  # sends the telnet options; OSError if already gone
        self.monitor = monitor
        self.mode: str | None = None  # "telnet" or "line" once known
        self.saw_telnet = False
        self.decided = asyncio.Event()
        self.lines = asyncio.StreamReader()
        self._after_cr = False
        self.parser = TelnetProtocolParser(self._data, self._size, self._ttype)

    # TelnetProtocolParser's callbacks
    def _data(self, data: bytes) -> None:
        if self.mode is None and not self.saw_telnet:
            self._decide("line")
        if self.mode == "line":
            self.lines.feed_data(data)
            return
        out = bytearray()
        for byte in data:
            if self._after_cr and byte in (0x0A, 0x00):  # the LF or NUL of a CR LF / CR NUL
                self._after_cr = False
                continue
            self._after_cr = byte == 0x0D
            out.append(byte)
        if out:
            self.vt100_input.send_bytes(bytes(out))

    def _size(self, rows: int, columns: int) -> None:
        self.size = Size(rows=rows, columns=columns)
        if self.vt100_output is not None and self.context:
            self.context.run(lambda: get_app()._on_resize())

    def _ttype(self, ttype: str) -> None:
        if self.vt100_output is None:
            self.vt100_output = Vt100_Output(self.stdout, lambda: self.size, term=ttype)
        self._decide("telnet")

    def _decide(self, mode: str) -> None:
        if self.mode is None:
            self.mode = mode
            self.decided.set()

    def feed(self, data: bytes) -> None:
        if self.mode is None and IAC in data:
            self.saw_telnet = True
        self.parser.feed(data)

    def _readable(self) -> None:
        try:
            data = self.conn.recv(4096)
        except OSError:  # reset by the client: the same as a close
            data = b""
        if data:
            self.feed(data)
        else:
            self.close()

    def close(self) -> None:
        if not self._closed:
            self.lines.feed_eof()
            self.decided.set()
        super().close()

    async def run_application(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.conn, self._readable)
        try:
            await _wait(self.decided, TELNET_WAIT_S)
            if self.mode is None and self.saw_telnet:
                await _wait(self.decided, TTYPE_WAIT_S)
                if self.vt100_output is None:
                    self._ttype("vt100")
            self._decide("line")
            if self._closed:
                return
            if self.mode == "telnet":
                with create_app_session(input=self.vt100_input, output=self.vt100_output):
                    self.context = contextvars.copy_context()
                    await self.interact(self)
            else:
                await self.monitor.line_session(self)
        finally:
            self.close()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)


#: console sessions open at once; a client beyond them is disconnected at once
MAX_CONSOLES = 16


class ConsoleServer(TelnetServer):
    """prompt_toolkit's telnet server with :class:`ConsoleConnection`; a client that leaves
    early (a port probe, ``nc -z``, a reset) is logged at DEBUG, not as a traceback."""

    def __init__(self, monitor: FileDispatchMonitor, **kw: Any) -> None:
        super().__init__(**kw)
        self.monitor = monitor
        self._full = False  #: MAX_CONSOLES reached (a warning was logged)

    def _accept(self, listen_socket: socket.socket) -> None:
        try:
            conn, addr = listen_socket.accept()
        except OSError as exc:  # the client left between the poll and the accept
            log.debug("console: a connection was lost before it was accepted: %s", exc)
            return
        if len(self._application_tasks) >= MAX_CONSOLES:
            # each session holds descriptors and a task: a flood of idle clients must not take
            # what the deliveries and the journal need (the web app has the same cap)
            if not self._full:
                log.warning("console: %d sessions open; refusing more until one ends", MAX_CONSOLES)
            self._full = True
            with contextlib.suppress(OSError):
                conn.close()
            return
        self._full = False

        async def run() -> None:
            try:
                with create_pipe_input() as vt100_input:
                    connection = ConsoleConnection(
                        conn,
                        addr,
                        self.interact,
                        self,
                        encoding=self.encoding,
                        style=self.style,
                        vt100_input=vt100_input,
                        enable_cpr=self.enable_cpr,
                        monitor=self.monitor,
                    )
                    self.connections.add(connection)
                    try:
                        await connection.run_application()
                    finally:
                        self.connections.discard(connection)
            except (OSError, EOFError, KeyboardInterrupt) as exc:
                log.debug("console: client %s:%d left: %r", *addr[:2], exc)
                with contextlib.suppress(OSError):
                    conn.close()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("console: the session with %s:%d failed", *addr[:2])
            finally:
                self._application_tasks.remove(task)

        task = asyncio.get_running_loop().create_task(run())
        self._application_tasks.append(task)


# ---------------------------------------------------------------------------- fd-* commands

Job = Callable[..., Coroutine[Any, Any, str]]


def _submit(ctx: click.Context, job: Job, *args: Any) -> None:
    """Run ``job(journal, link, *args)`` on the service's loop; print its answer here."""
    monitor: FileDispatchMonitor = ctx.obj
    done = command_done.get()
    stdout: TextIO = current_stdout.get()

    async def relay() -> None:
        try:
            fut: concurrent.futures.Future[str] = asyncio.run_coroutine_threadsafe(
                job(monitor.journal, monitor.link, *args), monitor.service_loop
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


async def status_text(journal: Journal, link: ServiceLink) -> str:
    """fd-status: the service's state, the queue and per-destination counts."""
    st = link.status()
    try:
        counts = await journal.counts()
        per_dest = await journal.by_destination()
    except JournalError:  # a removed journal may not even be read: the state still shows
        counts, per_dest = {}, []
    recorded: dict[str, dict[str, int]] = {}
    for row in per_dest:
        recorded.setdefault(row.destination, {})[row.status] = row.count
    secrets = link.secrets()
    journal_state: dict[str, Any] = st["journal"]
    if journal_state["state"] != "ok":
        state = f"PAUSED: journal {journal_state['state']}, resumes by itself once it is writable"
    elif st["paused"]:
        state = "PAUSED (fd-resume to continue)"
    else:
        state = "running"
    lines = [f"filedispatch {st['version']}, up {st['uptime_s']}s, {state}"]
    try:
        nodes = await journal.nodes()
    except JournalError:
        nodes = []
    if nodes:
        lines.append("nodes:")
        lines += [f"  {shown(describe_node(n))}" for n in nodes]
    if journal_state["state"] != "ok":
        lines.append(
            f"journal {shown(journal_state['path'])}: {shown(journal_state['error'], secrets)} "
            f"(since {time.strftime('%H:%M:%S', time.localtime(journal_state['since']))}, "
            f"{journal_state['retries']} retries)"
        )
    lines.append("sources:")
    for s in st["sources"]:
        how = "polling" if s["polling"] else "inotify"
        state = "ready" if s["ready"] else "scanning"
        err = f"; last error: {shown(s['last_error'], secrets)}" if s["last_error"] else ""
        lines.append(f"  {shown(s['name'])}: {shown(s['path'])} ({how}, {state}{err})")
    lines.append(
        f"queue: {counts.get('PENDING', 0)} pending, {counts.get('IN_PROGRESS', 0)} claimed; "
        f"in flight: {st['in_flight']}"
    )
    if st["stopped_sources"]:
        stopped = ", ".join(st["stopped_sources"])
        lines.append(f"stopped after a failure: {shown(stopped)}")
    lines.append("destinations (this run | journal):")
    run_stats: dict[str, dict[str, Any]] = st["destinations"]
    for dest in sorted(set(run_stats) | set(recorded)):
        r = run_stats.get(dest, {})
        j = recorded.get(dest, {})
        line = (
            f"  {shown(dest, secrets)}: {r.get('succeeded', 0)} ok, {r.get('failed', 0)} failed, "
            f"{r.get('retried', 0)} retried | {j.get('SUCCEEDED', 0)} succeeded, "
            f"{j.get('FAILED', 0)} failed, {j.get('PENDING', 0) + j.get('IN_PROGRESS', 0)} waiting"
        )
        if r.get("last_error"):
            line += f"; last error: {shown(r['last_error'], secrets)}"
        lines.append(line)
    return "\n".join(lines)


async def pause_text(journal: Journal, link: ServiceLink) -> str:
    running = link.pause()
    log.info("paused from the console")
    return (
        f"paused: no new work is taken ({running} in flight "
        "finish); the watchers keep recording. fd-resume to continue."
    )


async def resume_text(journal: Journal, link: ServiceLink) -> str:
    link.resume()
    log.info("resumed from the console")
    return "resumed: taking new work again"


async def retry_text(journal: Journal, link: ServiceLink, dispatch_id: int) -> str:
    if link.retry is None:
        return "retry is not available here"
    answer = await link.retry(dispatch_id)
    if answer.ok:
        log.info("console: %s", answer.message)
    return answer.message


async def history_text(journal: Journal, link: ServiceLink, limit: int) -> str:
    rows = await journal.recent(limit)
    lines = format_rows((as_dict(r) for r in rows), link.secrets())
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


def _whole_short_help() -> None:
    # click cuts a command's description to fit "help"'s column at the server's own terminal
    # width (80 in a service) and ends it with "..."; a short_help is wrapped, never cut
    for cmd in monitor_cli.commands.values():
        if not cmd.short_help and cmd.help:
            cmd.short_help = cmd.help.strip().split("\n\n")[0].replace("\n", " ")


_whole_short_help()
