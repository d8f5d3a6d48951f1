"""Logging set-up: a timestamped default format, --log-file, --log-level, --log-config (YAML).

One filter sits on every handler (those of ``--log-config`` included): it replaces each known
secret by ``***`` and escapes control and bidi characters, so a file name can neither forge a
log line nor leak a password, whichever logger wrote it and whichever handler writes it out.
"""

from __future__ import annotations

import logging
import sys
import traceback
from collections.abc import Iterable, Iterator
from pathlib import Path
from types import TracebackType

import yaml

from .config import scrub
from .errors import ConfigError
from .textsafe import escape, escape_lines

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]


class ScrubFilter(logging.Filter):
    """Makes each record safe to write: secrets become ``***``, the message is one line.

    A traceback keeps its own line breaks, but the exception's message and notes are escaped
    like the record's message, so they cannot add a line of their own. The record is changed in
    place (every handler after the first sees it done; doing it again changes nothing).
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets: list[str] = []
        self.set_secrets(secrets)

    def set_secrets(self, secrets: Iterable[str]) -> None:
        # the longest first: a secret that contains another is replaced whole
        self.secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    def scrub(self, text: str) -> str:
        return scrub(text, self.secrets)

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        safe = escape(self.scrub(message))
        if safe != message or record.args:
            record.msg, record.args = safe, None
        if record.exc_info and record.exc_info[1] is not None:
            exc_info: ExcInfo = record.exc_info
            record.exc_text, record.exc_info = self.scrub(format_exception(exc_info)), None
        elif record.exc_text:
            record.exc_text = escape_lines(self.scrub(record.exc_text))
        if record.stack_info:
            record.stack_info = escape_lines(self.scrub(record.stack_info))
        return True


def format_exception(exc_info: ExcInfo) -> str:
    """A traceback whose every line is a line of the traceback (messages escaped)."""
    te = traceback.TracebackException(*exc_info)
    for one in _chain(te):
        # the message is the one part of a traceback that the outside world writes; the
        # stdlib offers no public way to change it before formatting
        one._str = escape(str(getattr(one, "_str", "")))  # type: ignore[attr-defined]
        notes = getattr(one, "__notes__", None)
        if notes:
            one.__notes__ = [escape(str(n)) for n in notes]
    return escape_lines("".join(te.format()).rstrip("\n"))


def _chain(te: traceback.TracebackException) -> Iterator[traceback.TracebackException]:
    seen: set[int] = set()
    todo = [te]
    while todo:
        one = todo.pop()
        if id(one) in seen:
            continue
        seen.add(id(one))
        yield one
        todo += [e for e in (one.__cause__, one.__context__) if e is not None]
        todo += getattr(one, "exceptions", None) or []


_scrub = ScrubFilter()


def set_secrets(secrets: Iterable[str]) -> None:
    """Tell the filter which strings must never be written (called on start and reload)."""
    _scrub.set_secrets(secrets)


def setup(
    level: str | None = None, log_file: Path | None = None, log_config: Path | None = None
) -> None:
    """Configure the root logger once, at start-up.

    ``level`` (``--log-level``) overrides the root level of ``log_config``; without either the
    level is INFO.
    """
    if log_config is not None:
        from logging.config import dictConfig  # a dozen modules only --log-config needs

        try:
            data = yaml.safe_load(Path(log_config).read_text(encoding="utf-8"))
            # dictConfig's default would silence every filedispatch logger already imported
            data.setdefault("disable_existing_loggers", False)
            dictConfig(data)
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
            problem = f"not a usable logging configuration: {exc}"
            raise ConfigError(str(log_config), [problem]) from exc
        if level:
            logging.getLogger().setLevel(level.upper())
    else:
        handler: logging.Handler
        if log_file is not None:
            from logging.handlers import WatchedFileHandler

            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = WatchedFileHandler(log_file, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel((level or "INFO").upper())
    install_filter()
    for noisy in ("watchfiles", "aiosqlite", "asyncio", "aioftp", "asyncssh", "prompt_toolkit"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def _handlers() -> Iterator[logging.Handler]:
    """Every handler of every logger (``--log-config`` may attach them anywhere)."""
    loggers = [logging.getLogger()]
    loggers += [
        x for x in logging.root.manager.loggerDict.values() if isinstance(x, logging.Logger)
    ]
    for logger in loggers:
        yield from logger.handlers


def install_filter() -> None:
    """Put the scrubbing filter on every handler there is now (idempotent)."""
    for handler in _handlers():
        if _scrub not in handler.filters:
            handler.addFilter(_scrub)


def reopen_log_files() -> None:
    """After logrotate moved the file (SIGHUP): reopen every file handler."""
    for handler in _handlers():
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
