"""Logging set-up: a timestamped default format, --log-file, --log-level, --log-config (YAML).

Secrets are scrubbed from every record by a filter on the handlers, so no password or token
reaches a log file even when a library logs a URL.
"""

from __future__ import annotations

import logging
import logging.config
import logging.handlers
import sys
from collections.abc import Iterable
from pathlib import Path

import yaml

from .errors import ConfigError

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"


class RedactFilter(logging.Filter):
    """Replaces known secrets in a record's final message with ``***``."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted(set(secrets), key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        scrubbed = message
        for secret in self.secrets:
            scrubbed = scrubbed.replace(secret, "***")
        if scrubbed != message:
            record.msg, record.args = scrubbed, None
        if record.exc_info and record.exc_info[1] is not None:
            text = logging.Formatter().formatException(record.exc_info)
            for secret in self.secrets:
                text = text.replace(secret, "***")
            record.exc_text, record.exc_info = text, None
        return True


_redact = RedactFilter()


def set_secrets(secrets: Iterable[str]) -> None:
    """Tell the filter which strings must never be written (called on load and reload)."""
    _redact.secrets = sorted(set(secrets), key=len, reverse=True)


def setup(
    level: str | None = None, log_file: Path | None = None, log_config: Path | None = None
) -> None:
    """Configure the root logger once, at start-up.

    ``level`` (``--log-level``) overrides the root level of ``log_config``; without either the
    level is INFO.
    """
    if log_config is not None:
        try:
            data = yaml.safe_load(Path(log_config).read_text(encoding="utf-8"))
            # dictConfig's default would silence every filedispatch logger already imported
            data.setdefault("disable_existing_loggers", False)
            logging.config.dictConfig(data)
        except (OSError, yaml.YAMLError, ValueError, TypeError, AttributeError) as exc:
            problem = f"not a usable logging configuration: {exc}"
            raise ConfigError(str(log_config), [problem]) from exc
        if level:
            logging.getLogger().setLevel(level.upper())
    else:
        handler: logging.Handler
        if log_file is not None:
            Path(log_file).parent.mkdir(parents=True, exist_ok=True)
            handler = logging.handlers.WatchedFileHandler(log_file, encoding="utf-8")
        else:
            handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        root = logging.getLogger()
        root.handlers[:] = [handler]
        root.setLevel((level or "INFO").upper())
    for handler in logging.getLogger().handlers:
        if _redact not in handler.filters:
            handler.addFilter(_redact)
    for noisy in ("watchfiles", "aiosqlite", "asyncio", "aioftp", "asyncssh", "prompt_toolkit"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def reopen_log_files() -> None:
    """After logrotate moved the file (SIGHUP): reopen every file handler."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.acquire()
            try:
                handler.close()
                handler.stream = handler._open()
            finally:
                handler.release()
