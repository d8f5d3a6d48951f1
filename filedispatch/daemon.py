"""Running as a daemon: detach, hold a locked pidfile for the daemon's whole life, stop by pidfile.

This module owns the pidfile and the launcher's wait for readiness; it never installs a signal
handler while the service runs (service.py owns the signals).

The `daemons` package (1.3) does the double fork here, and only that, because of what its
source does with the rest:

- Its pidfile check reads the pid and probes it with ``kill(pid, 0)``, then writes the file,
  with no lock: two daemons started together both run, and a reused pid reads as running. We
  take an ``fcntl.flock`` on the pidfile *before* the fork and the daemon inherits it, so the
  lock is held without a gap until the daemon exits; the lock, not the pid, says "running".
  Our ``pid`` setter (called by its ``daemonize()``) writes into that locked file.
- It sets ``umask(0)``, which would make the journal, pidfile and delivered copies
  world-writable: we set ``umask(0o077)`` right after it returns (delivered files have an
  explicit ``file_mode`` option for that reason).
- Its SignalManager calls ``sys.exit`` from plain signal handlers (an exit in the middle of a
  journal commit) and its ``stop()`` re-sends SIGTERM every 0.1 s without limit (cutting any
  drain short): we use neither. The service routes SIGTERM into its asyncio loop; a SIGTERM
  that arrives before the loop is up is remembered and handed over. ``stop_daemon`` sends one
  SIGTERM and waits, bounded, for the lock to be released.
- It leaves stdin/stdout/stderr open, so a caller capturing the launcher's output would wait
  for the daemon to exit: we point them at /dev/null.

The launcher returns only once the service is up: the daemon writes ``ready`` (from
``Options.on_ready``) or ``error <text>`` into a pipe, and the launcher exits 0 or 1.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import fcntl
import logging
import os
import signal
import stat
import sys
import time
from pathlib import Path

from daemons.daemonize.simple import SimpleDaemonizeManager

from . import logs
from .config import Config, secrets_of
from .errors import FileDispatchError, ServiceError
from .service import Options, Service

log = logging.getLogger(__name__)

#: how long ``-x`` waits for the daemon to finish its in-flight deliveries and exit
STOP_TIMEOUT = 90.0


def state_dir() -> Path:
    return Path(os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"))


def default_pidfile() -> Path:
    """``$XDG_RUNTIME_DIR/filedispatch.pid``, else in the per-user state folder."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return Path(runtime) / "filedispatch.pid"
    return state_dir() / "filedispatch" / "filedispatch.pid"


def default_log_file() -> Path:
    return state_dir() / "filedispatch" / "filedispatch.log"


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class PidFile:
    """A pidfile whose ``flock`` is held for as long as the daemon lives."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd: int | None = None

    def acquire(self) -> None:
        """Lock the pidfile or raise ServiceError if a live daemon holds it (stale ones are
        taken over: nobody holds their lock, whatever pid they name)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ServiceError(
                f"cannot create the folder of the pidfile {self.path}: {exc}"
            ) from exc
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                raise ServiceError(f"cannot open the pidfile {self.path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                os.close(fd)
                raise ServiceError(
                    f"already running (pid {pid or '?'}, pidfile {self.path}); "
                    f"stop it with: filedispatch -x -p {self.path}"
                ) from None
            # a daemon that was exiting may have removed the file we opened: lock the new one
            if _same_file(fd, self.path):
                break
            os.close(fd)
        os.ftruncate(fd, 0)  # until the daemon writes its pid, a stale one must not show
        self.fd = fd

    def write(self, pid: int) -> None:
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{pid}\n".encode(), 0)

    def forget(self) -> None:
        """The launcher's copy: close it without unlocking (the daemon's copy keeps the lock)."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def release(self) -> None:
        """Remove the pidfile and drop the lock (the daemon, at exit)."""
        if self.fd is None:
            return
        if _same_file(self.fd, self.path):
            try:
                self.path.unlink()
            except OSError as exc:
                log.warning("cannot remove the pidfile %s: %s", self.path, exc.strerror)
        os.close(self.fd)
        self.fd = None


class _Detacher(SimpleDaemonizeManager):  # type: ignore[misc]
    """daemons' double fork, with its ``pid`` property pointed at our locked pidfile."""

    def __init__(self, pidfile: PidFile) -> None:
        self._locked = pidfile

    @property
    def pid(self) -> int | None:
        return None if self._locked.fd is None else _read_pid(self._locked.fd)

    @pid.setter
    def pid(self, value: int) -> None:
        self._locked.write(value)


def _detach(pidfile: PidFile) -> bool:
    """Double-fork; True in the daemon, False in the launcher (the middle process exits)."""
    launcher = os.getpid()
    try:
        _Detacher(pidfile).daemonize()
    except SystemExit as exc:  # daemons ends both parents with sys.exit
        if os.getpid() == launcher:
            if exc.code not in (0, None):
                raise ServiceError("cannot fork the daemon (see the message above)") from None
            return False
        os._exit(0)
    return True


def _to_devnull() -> None:
    fd = os.open(os.devnull, os.O_RDWR)
    for std in (0, 1, 2):
        os.dup2(fd, std)
    if fd > 2:
        os.close(fd)


def _absolute(path: Path | None) -> Path | None:
    return None if path is None else path.expanduser().absolute()


def run_daemon(config: Config, options: Options, args: argparse.Namespace) -> int:
    """``-d``: detach and run the service; the launcher's status says whether it came up."""
    # the daemon runs in "/", so every path from the command line is made absolute first
    # (and the import path too: a "" entry would no longer find a source checkout)
    sys.path[:] = [os.path.abspath(p) for p in sys.path]
    pidfile = PidFile(_absolute(args.pidfile) or default_pidfile())
    log_config = _absolute(args.log_config)
    log_file = _absolute(args.log_file) or (None if log_config else default_log_file())
    options.db = _absolute(options.db)
    if options.config_path is not None:
        options.config_path = options.config_path.absolute()
    pidfile.acquire()
    ready_r, ready_w = os.pipe()
    if not _detach(pidfile):
        os.close(ready_w)
        pidfile.forget()
        return _await_ready(ready_r, pidfile.path, log_file)
    os.close(ready_r)
    return _daemon_main(config, options, args, pidfile, ready_w, log_file, log_config)


def _await_ready(fd: int, pidfile: Path, log_file: Path | None) -> int:
    chunks = []
    while chunk := os.read(fd, 4096):
        chunks.append(chunk)
    os.close(fd)
    answer = b"".join(chunks).decode("utf-8", "replace").strip()
    where = f"; log: {log_file}" if log_file else ""
    if answer.startswith("ready"):
        pid = answer.split()[1] if len(answer.split()) > 1 else "?"
        print(f"filedispatch started (pid {pid}, pidfile {pidfile}{where})")
        return 0
    if answer.startswith("error "):
        print(f"filedispatch: the daemon did not start: {answer[6:]}", file=sys.stderr)
    else:
        print(f"filedispatch: the daemon exited before it was ready{where}", file=sys.stderr)
    return 1


def _daemon_main(
    config: Config,
    options: Options,
    args: argparse.Namespace,
    pidfile: PidFile,
    ready_w: int,
    log_file: Path | None,
    log_config: Path | None,
) -> int:
    os.umask(0o077)  # daemons left it at 0
    _to_devnull()
    early: list[int] = []  # signals that came before the service's loop handlers
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: early.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # nothing to reload yet
    pipe: list[int] = [ready_w]

    def report(text: str) -> None:
        if pipe:
            fd = pipe.pop()
            try:
                os.write(fd, f"{text}\n".encode())
            except OSError:
                pass
            os.close(fd)

    code = 1
    try:
        logs.setup(args.log_level, log_file, log_config)
        logs.set_secrets(secrets_of(config))
        log.info("daemon started: pid %d, pidfile %s", os.getpid(), pidfile.path)
        options.on_ready = lambda: report(f"ready {os.getpid()}")
        code = asyncio.run(_serve(Service(config, options), early))
        if pipe:
            report("error the service stopped before it was ready (see the log)")
    except FileDispatchError as exc:
        log.error("%s", exc)
        report(f"error {exc}")
    except BaseException as exc:
        log.exception("the daemon failed")
        report(f"error {type(exc).__name__}: {exc}")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)  # the service is stopped: finish tidying up
        log.info("daemon exits with status %d", code)
        logging.shutdown()
        pidfile.release()  # last: -x takes the released lock as "it has exited"
    return code


async def _serve(service: Service, early: list[int]) -> int:
    task = asyncio.create_task(service.run(), name="service")
    await asyncio.sleep(0)  # run() installs the loop's signal handlers before it first waits
    if early:
        service.request_stop(signal.Signals(early[0]).name)
    return await task


# ---------------------------------------------------------------------------- stop


def stop_daemon(pidfile: Path | None, timeout: float = STOP_TIMEOUT) -> int:
    """``-x``: SIGTERM the daemon named by the pidfile once, wait for it to exit, report.

    Needs only the pidfile. 0 when it stopped; 1 when nothing was running (a stale pidfile is
    removed) or it is still finishing in-flight deliveries after ``timeout`` seconds.
    """
    path = _absolute(pidfile) or default_pidfile()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        print(f"filedispatch: not running (no pidfile at {path})", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"filedispatch: cannot read the pidfile {path}: {exc.strerror}", file=sys.stderr)
        return 1
    if not stat.S_ISREG(os.fstat(fd).st_mode):  # a folder opens read-only, then cannot be read
        os.close(fd)
        print(f"filedispatch: the pidfile {path} is not a regular file", file=sys.stderr)
        return 1
    try:
        if _unlocked(fd):
            pid = _read_pid(fd)
            if _same_file(fd, path):
                path.unlink(missing_ok=True)
            print(
                f"filedispatch: not running (stale pidfile {path} named pid {pid or '?'}, "
                "which is not a running filedispatch; removed it)",
                file=sys.stderr,
            )
            return 1
        pid = _wait_for_pid(fd)
        if pid is None:
            print(f"filedispatch: the pidfile {path} is locked but names no pid", file=sys.stderr)
            return 1
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            print(f"filedispatch: pid {pid} from {path} is gone", file=sys.stderr)
            return 1
        except PermissionError:
            print(f"filedispatch: not allowed to signal pid {pid}", file=sys.stderr)
            return 1
        print(f"sent SIGTERM to filedispatch (pid {pid}); waiting for in-flight work to finish")
        t0 = time.monotonic()
        while not _unlocked(fd):
            if time.monotonic() - t0 > timeout:
                print(
                    f"filedispatch: pid {pid} is still stopping after {timeout:g}s (it finishes "
                    "its in-flight deliveries first). Run -x again to keep waiting, or kill -9 "
                    f"{pid}: unfinished deliveries resume at the next start.",
                    file=sys.stderr,
                )
                return 1
            time.sleep(0.1)
        # the lock goes when the daemon closes its descriptors, a moment before the process
        # itself is gone: "stopped" means gone (or a zombie its parent has yet to reap)
        while not _gone(pid) and time.monotonic() - t0 <= timeout:
            time.sleep(0.02)
        if _same_file(fd, path):
            path.unlink(missing_ok=True)  # normally the daemon removed it itself
        print(f"filedispatch (pid {pid}) stopped after {time.monotonic() - t0:.1f}s")
        return 0
    finally:
        os.close(fd)


def _gone(pid: int) -> bool:
    """True when ``pid`` no longer runs: no such process, or a zombie (state ``Z`` in
    ``/proc/PID/stat``, see proc(5)) that only waits to be reaped."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat_line = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False
    # the state follows the command name, which is in parentheses and may hold any byte
    return stat_line[stat_line.rfind(b")") + 2 : stat_line.rfind(b")") + 3] in (b"Z", b"X")


def _unlocked(fd: int) -> bool:
    """True when no process holds the pidfile's lock (and we briefly hold it shared)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _wait_for_pid(fd: int, timeout: float = 5.0) -> int | None:
    """A daemon that is just starting holds the lock before it has written its pid."""
    deadline = time.monotonic() + timeout
    while (pid := _read_pid(fd)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    return pid
