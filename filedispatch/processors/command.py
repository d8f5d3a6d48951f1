"""Shell command steps: ``/bin/sh -c`` with the file's names passed as quoted variables.

Each run gets its own process group, so a timeout or a shutdown kills the whole pipeline it
started. Exit 0 is success; anything else raises our delivery errors with the exit code and the
tail of stderr. This module never reads or moves the file itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from asyncio.subprocess import DEVNULL, PIPE

from .. import sourcefile
from ..asyncutil import in_daemon_thread
from ..config import CommandStep, scrub, secrets_of
from ..errors import PermanentDeliveryError, TransientDeliveryError
from ..models import Outcome
from ..shell import compile_command, placeholder_values
from . import Resources, StepContext, inputs
from .common import translate_os_error
from .compress import ensure_workdir

log = logging.getLogger(__name__)

SHELL = "/bin/sh"
TAIL_BYTES = 4096  #: bytes of stdout and stderr kept (the rest streams past)
REASON_CHARS = 500  #: characters of stderr quoted in the journal
DETAIL_CHARS = 200  #: characters of the last line of stdout recorded on success
KILL_GRACE = 1.0  #: seconds between SIGTERM and SIGKILL of a timed-out command's group
PIPE_GRACE = 1.0  #: seconds to wait for output after exit (a background child may hold a pipe)
POLL = 0.1  #: seconds between checks for the shell's exit while its output is still open
#: the shell's own codes for "cannot execute" and "not found": a retry cannot help
PERMANENT_CODES = frozenset({126, 127})


def create(step: CommandStep, resources: Resources) -> CommandProcessor:
    del resources
    return CommandProcessor(step)


class CommandProcessor:
    """Runs one configured command per file."""

    def __init__(self, step: CommandStep) -> None:
        self.step = step
        self.script = compile_command(step.command)
        #: its env values (and any other secret of the step) never leave in its output
        self.secrets = secrets_of(step)

    async def aclose(self) -> None:
        return None

    def _environment(self, ctx: StepContext) -> dict[str, str]:
        env = {**os.environ, **self.step.env}
        env.update(
            placeholder_values(str(ctx.input), ctx.relpath, str(ctx.version.root)),
            FILEDISPATCH_RULE=ctx.rule,
            FILEDISPATCH_DISPATCH_ID=str(ctx.dispatch_id),
            FILEDISPATCH_JOURNAL=ctx.journal,
            FILEDISPATCH_DELIVERY_ID=ctx.delivery_id,
            FILEDISPATCH_ATTEMPT=str(ctx.attempt),
        )
        return env

    async def deliver(self, ctx: StepContext) -> Outcome:
        # The planned version, checked and held open: the command gets its path, and also the
        # descriptor (FILEDISPATCH_FD: /dev/fd/N reads exactly the checked file, whatever is
        # put at the name meanwhile). Afterwards the name must not lead to a link, a special
        # file or out of the source (the command may have read that instead).
        async with inputs.opened(ctx) as (fd, _, _):
            outcome = await self._run(ctx, fd)
            await in_daemon_thread(sourcefile.recheck, ctx.version, ctx.input, "the command")
        return outcome

    async def _run(self, ctx: StepContext, fd: int) -> Outcome:
        cwd = self.step.cwd or ensure_workdir(ctx.workdir)
        try:
            proc = await asyncio.create_subprocess_exec(
                SHELL,
                "-c",
                self.script,
                stdin=DEVNULL,
                stdout=PIPE,
                stderr=PIPE,
                cwd=cwd,
                env={**self._environment(ctx), "FILEDISPATCH_FD": str(fd)},
                pass_fds=(fd,),
                start_new_session=True,  # its own process group, killed as a whole
            )
        except OSError as exc:
            raise translate_os_error(exc, f"cannot start the command in {cwd}") from exc
        assert proc.stdout is not None and proc.stderr is not None
        out, err = bytearray(), bytearray()
        readers = [asyncio.ensure_future(_tail(proc.stdout, out))]
        readers.append(asyncio.ensure_future(_tail(proc.stderr, err)))
        try:
            code = await _exit_status(proc, readers, self.step.command)
        except BaseException:  # a timeout or a shutdown cancelled us: stop what we started
            await _terminate(proc)
            raise
        finally:
            for reader in readers:
                reader.cancel()
        if code == 0:  # scrubbed before it is cut: a cut secret could not be found
            last = scrub(_text(out), self.secrets).rpartition("\n")[2][:DETAIL_CHARS]
            return Outcome(self.step.display, detail=f"exit 0: {last}" if last else "exit 0")
        raise _failure(code, scrub(_text(err), self.secrets))


async def _tail(stream: asyncio.StreamReader, kept: bytearray) -> None:
    while chunk := await stream.read(65536):
        kept += chunk
        del kept[:-TAIL_BYTES]


async def _exit_status(
    proc: asyncio.subprocess.Process, readers: list[asyncio.Task[None]], command: str
) -> int:
    """Wait for the shell to exit and its output to end.

    ``proc.wait()`` also waits for the pipes to close, which a background child started with
    ``&`` may hold open for as long as it lives; so while output is still open, the shell's exit
    is polled. Once it has exited, the output gets PIPE_GRACE seconds to end; a child still
    holding it then is stopped with the process group (it could only die of SIGPIPE later).
    """
    pending: set[asyncio.Task[None]] = set(readers)
    while pending and proc.returncode is None:
        _, pending = await asyncio.wait(pending, timeout=POLL)
    if pending:
        _, pending = await asyncio.wait(pending, timeout=PIPE_GRACE)
    if pending:  # a child the shell left behind holds the output nobody would read any more
        log.warning("a process left by %r still holds its output: stopping it", command)
        await _terminate(proc)
    if proc.returncode is None:  # both pipes are closed: only the exit is left to wait for
        return await proc.wait()
    return proc.returncode


def _killpg(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _terminate(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the command's process group, then SIGKILL whatever is left of it."""
    _killpg(proc.pid, signal.SIGTERM)  # with start_new_session the group id is the pid
    try:
        await asyncio.wait_for(proc.wait(), KILL_GRACE)
    except TimeoutError:
        pass
    finally:
        _killpg(proc.pid, signal.SIGKILL)


def _text(data: bytes | bytearray) -> str:
    return data.decode("utf-8", "replace").strip()


def _failure(code: int, stderr: str) -> Exception:
    if code < 0:
        try:
            what = f"killed by {signal.Signals(-code).name}"
        except ValueError:
            what = f"killed by signal {-code}"
    else:
        what = f"exit {code}"
    tail = " | ".join(line.strip() for line in stderr.splitlines() if line.strip())
    if len(tail) > REASON_CHARS:
        tail = "..." + tail[-REASON_CHARS:]
    message = f"{what}: {tail}" if tail else what
    if code in PERMANENT_CODES:
        return PermanentDeliveryError(message)
    return TransientDeliveryError(message)
