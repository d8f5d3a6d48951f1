"""The exception tree of filedispatch; foreign errors are translated into it at the boundary.

FileDispatchError
├── ConfigError                 bad configuration (the CLI exits 2, no traceback)
├── JournalError                the journal cannot be opened or written
│   ├── JournalUnavailableError the journal cannot be opened now (disk full, locked): wait
│   └── NotFound                a history command named what the journal does not hold
├── ServiceError                the service cannot start (port taken, pidfile held, ...)
└── DeliveryError               one delivery step did not succeed
    ├── TransientDeliveryError  worth retrying (network down, 5xx, timeout, busy)
    │   └── SourceUnreadableError  the source may not be read yet (EACCES, EPERM)
    └── PermanentDeliveryError  retrying cannot help (403, bad name, read-only target)
        └── SourceVanishedError the source file disappeared before it could be sent

Exceptions that never leave the module raising them (``MoveUnavailable``,
``RenameUnavailable``, the API's ``BadParameter``) signal a fallback, not an error, and are not
part of this tree; ``tests/test_house.py`` checks that this drawing matches the classes.
"""

from __future__ import annotations

from collections.abc import Sequence


class FileDispatchError(Exception):
    """Base class of every error filedispatch raises on purpose."""


class ConfigError(FileDispatchError):
    """A configuration that cannot be used; ``problems`` holds one line per error."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        super().__init__("\n".join(f"{source}: {p}" for p in self.problems))


class JournalError(FileDispatchError):
    """The journal database cannot be opened, migrated or written."""


class JournalUnavailableError(JournalError):
    """The journal cannot be opened now, for a reason a wait can cure (a full disk, a lock)."""


class NotFound(JournalError):
    """A history command named a dispatch or a file the journal does not hold (exit 1)."""


class ServiceError(FileDispatchError):
    """The service cannot start or be reached."""


class DeliveryError(FileDispatchError):
    """One delivery step did not succeed; the message is recorded in the journal."""


class TransientDeliveryError(DeliveryError):
    """A failure a later attempt may not meet; ``retry_after`` is a server hint (seconds)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class SourceUnreadableError(TransientDeliveryError):
    """The source exists but may not be read (EACCES, EPERM): often an uploader that creates
    a file 0600 and fixes its mode a moment later. Retried within the step's retry policy."""


class PermanentDeliveryError(DeliveryError):
    """A failure that repeating the same delivery cannot fix."""


class SourceVanishedError(PermanentDeliveryError):
    """The source file was removed or replaced before it could be delivered."""
