"""The exception tree of filedispatch; foreign errors are translated into it at the boundary.

FileDispatchError
├── ConfigError                 bad configuration (the CLI exits 2, no traceback)
├── JournalError                the journal cannot be opened or written
│   ├── JournalUnavailableError the journal cannot be opened now (disk full, locked): wait
│   ├── NotFound                a history command named what the journal does not hold
│   └── FencedError             an outcome from a node whose claim was taken over: refused
├── ServiceError                the service cannot start (port taken, pidfile held, ...)
│   └── NodeConflictError       a live node of the same name shares the journal
└── DeliveryError               one delivery step did not succeed
    ├── OutsideWindowError      the destination's window is shut: wait until it opens
    ├── LeaseLostError          this node's lease may be lost: called off, not an attempt
    ├── TransientDeliveryError  worth retrying (5xx, busy, a full disk)
    │   ├── NetworkError        the remote cannot be reached (DNS, refused, reset, timeout)
    │   ├── SourceUnreadableError  the source may not be read yet (EACCES, EPERM)
    │   └── TempNameTakenError  something we may not remove holds our temporary name
    └── PermanentDeliveryError  retrying cannot help (403, bad name, read-only target)
        └── SourceVanishedError the source file disappeared before it could be sent

A few exceptions signal a fallback, not an error, and are caught by the code that asked, so
they are not part of this tree: ``fastpath.RenameUnavailable`` (no rename can do it: copy),
``processors.MoveUnavailable`` (the source cannot be renamed into place: it is copied),
``sourcefile.NotRegularFile`` and ``NewVersionError`` (``OSError``s: a source no longer the
file delivered stays), the API's ``BadParameter`` (a 400 answer) and the SQLite journal's
``_Held`` (a batch kept for later). ``tests/test_house.py`` checks that
this drawing matches the classes, branch signs included.
"""

from __future__ import annotations

import os
import socket
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


class FencedError(JournalError):
    """Outcomes refused because the rows are no longer this node's: its lease ran out and its
    work went back to the queue (another node may have taken it). Nothing is to be done to the
    source on their account."""


class ServiceError(FileDispatchError):
    """The service cannot start or be reached."""


class NodeConflictError(ServiceError):
    """Another live node shares the journal under this node's name; ``left_s``: seconds its
    lease has left on the database's clock, where known."""

    def __init__(self, message: str, left_s: float | None = None) -> None:
        super().__init__(message)
        self.left_s = left_s


class DeliveryError(FileDispatchError):
    """One delivery step did not succeed; the message is recorded in the journal."""


class OutsideWindowError(DeliveryError):
    """The destination's ``window`` is shut: the row waits, PENDING, until ``until`` (seconds
    since 1970), without counting an attempt."""

    def __init__(self, message: str, until: float) -> None:
        super().__init__(message)
        self.until = until


class LeaseLostError(DeliveryError):
    """The lease this node claimed the row under may have run out (the node was frozen, or
    cut off from the journal): another node may deliver the file now, so this delivery stops
    before its result becomes visible (the temporary file is removed, the upload cut short).
    Not an attempt: the row goes back to the queue as it was, unless another node holds it
    already (then the journal refuses that, harmlessly)."""


class TransientDeliveryError(DeliveryError):
    """A failure a later attempt may not meet; ``retry_after`` is a server hint (seconds)."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NetworkError(TransientDeliveryError):
    """The remote could not be reached, or the connection broke: a name that does not resolve,
    a connection refused or reset, a timeout. Retried for as long as an ordinary outage lasts
    (``retry.NETWORK_FOR_S``), not a number of attempts (see retry.py)."""

    @classmethod
    def from_os_error(cls, where: str, exc: OSError, what: str = "") -> NetworkError:
        """``where: [what: ]reason``, the reason being the system's words for the error
        number ("Connection refused"), which do not repeat the address as the exception's
        text does; the caller raises it ``from exc``."""
        reason = os.strerror(exc.errno) if exc.errno else str(exc) or type(exc).__name__
        if isinstance(exc, socket.gaierror):
            reason = f"the name does not resolve ({exc.strerror})"
        return cls(f"{where}: {what}: {reason}" if what else f"{where}: {reason}")


class TempNameTakenError(TransientDeliveryError):
    """Our temporary name is held by something we may not remove (a folder someone made
    there: the name can be known in advance). An upload that meets it takes a salted name
    instead (``processors.remote``); raised on, it fails that attempt."""


class SourceUnreadableError(TransientDeliveryError):
    """The source exists but may not be read (EACCES, EPERM): often an uploader that creates
    a file 0600 and fixes its mode a moment later. Retried within the step's retry policy."""


class PermanentDeliveryError(DeliveryError):
    """A failure that repeating the same delivery cannot fix."""


class SourceVanishedError(PermanentDeliveryError):
    """The source file was removed or replaced before it could be delivered."""


class NewVersionError(OSError):
    """A source about to be moved or removed after its delivery is no longer the file
    delivered (a new version was written or renamed over it): it stays, and is dispatched on
    its own. A signal for the after-actions, not an error (not in the tree)."""
