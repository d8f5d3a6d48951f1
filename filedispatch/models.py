"""Small immutable values passed between the stages: a file version, a dispatch row, an outcome.

Nothing here does I/O; these are the nouns the watcher, journal, dispatcher and API share.
"""

from __future__ import annotations

import enum
import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path


class Status(enum.StrEnum):
    """Where one (file version, destination) dispatch stands."""

    #: planned, waiting for a worker (also: waiting for a retry, see ``next_attempt``)
    PENDING = "PENDING"
    #: claimed by a worker; after a crash such rows are resumed at start-up
    IN_PROGRESS = "IN_PROGRESS"
    #: the destination confirmed the file; it is never sent there again
    SUCCEEDED = "SUCCEEDED"
    #: gave up: a permanent error, or the retries ran out; ``reason`` says why
    FAILED = "FAILED"


@dataclass(frozen=True, slots=True)
class FileVersion:
    """One version of a file in a source: a new size or mtime makes a new version."""

    source: str  #: the source's name (its configured path unless named)
    root: Path  #: the source folder
    relpath: str  #: path relative to ``root``, with "/" separators
    size: int  #: bytes
    mtime_ns: int  #: nanoseconds since the epoch
    #: the inode and its change time (nanoseconds): a new file at the same name, size and mtime
    #: (a fresh upload, a file recreated after the last one was consumed) is a new version
    ino: int = 0
    ctime_ns: int = 0
    dev: int = 0  #: the device the file was seen on (not part of the key: it differs per host)
    #: its birth time, nanoseconds since the epoch, where the filesystem keeps one (``birth``;
    #: looked up only for a file about to be planned; None otherwise). Not part of the key.
    btime_ns: int | None = field(default=None, compare=False)
    # worked out on first use and kept: a rescan makes a version of every file it lists, and
    # most of those are only looked up in the journal
    _path: Path | None = field(default=None, init=False, repr=False, compare=False)
    _key: str | None = field(default=None, init=False, repr=False, compare=False)

    def note_birth(self, btime_ns: int | None) -> None:
        """Fill in ``btime_ns``, looked up when the file is about to be planned (``birth``)."""
        object.__setattr__(self, "btime_ns", btime_ns)

    @property
    def path(self) -> Path:
        """root / relpath (the same object each time)."""
        path = self._path
        if path is None:
            path = self.root / self.relpath
            object.__setattr__(self, "_path", path)
        return path

    @property
    def key(self) -> str:
        """The version's identity in the journal: a hash of source, relpath, size, mtime, inode
        and ctime (all as the kernel reported them when the file was seen)."""
        key = self._key
        if key is None:
            raw = (
                f"{self.source}\0{self.relpath}\0{self.size}\0{self.mtime_ns}"
                f"\0{self.ino}\0{self.ctime_ns}"
            )
            key = hashlib.blake2b(
                raw.encode("utf-8", "surrogateescape"), digest_size=12
            ).hexdigest()
            object.__setattr__(self, "_key", key)
        return key

    @property
    def name(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]

    @property
    def extension(self) -> str:
        """The lower-case extension without its dot ("" when there is none)."""
        name = self.name
        dot = name.rfind(".")
        return name[dot + 1 :].lower() if dot > 0 else ""

    @classmethod
    def from_stat(cls, source: str, root: Path, relpath: str, st: os.stat_result) -> FileVersion:
        return cls(
            source, root, relpath, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, st.st_dev
        )

    def same_file(self, st: os.stat_result, renamed: bool = False) -> bool:
        """Whether ``st`` (an lstat, a stat or an fstat) is still this very version: the same
        device, inode, size, mtime and ctime. Identity fields left 0 (a version made from an
        old journal row, or by hand) are not compared. ``renamed``: ``st`` is of a file we
        have just renamed, which moved its ctime (Linux: ext4, xfs, tmpfs...): not compared."""
        if (st.st_size, st.st_mtime_ns) != (self.size, self.mtime_ns):
            return False
        if self.ino and st.st_ino != self.ino:
            return False
        if self.dev and st.st_dev != self.dev:
            return False
        return renamed or not (self.ctime_ns and st.st_ctime_ns != self.ctime_ns)


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a processor reports after a successful step (``detail`` NAME_TAKEN: nothing was
    written, ``on_conflict: skip`` found the name taken)."""

    location: str  #: where the file now is, already redacted (shown in the journal and API)
    #: a file that later steps of the chain deliver instead of the input (transforms)
    produced: Path | None = None
    detail: str | None = None  #: a short note recorded with the row (a return value, a status)
    sha256: str | None = None  #: hex digest of the bytes delivered, where the step computed it


#: the detail of an Outcome for which nothing was written (on_conflict: skip): its bytes did
#: not reach the destination, so content dedupe must not count them as delivered there
NAME_TAKEN = "skipped: the name is taken"


@dataclass(slots=True)
class Dispatch:
    """One journal row: a file version bound for one destination step. Times are Unix
    times in seconds (float) unless the name says ``_ns`` or ``_ms``; sizes are bytes."""

    id: int
    source: str
    root: str
    relpath: str
    size: int  #: bytes, as seen in the source
    mtime_ns: int  #: the source's mtime, nanoseconds since the epoch
    rule: str
    step: int  #: the step's position in its chain (a worker sets today's; see step_key)
    destination: str
    protocol: str
    status: Status
    attempts: int
    reason: str | None
    location: str | None
    created: float  #: Unix time, seconds: when the row was planned
    started: float | None  #: Unix time, seconds: when its first try began (None: not yet)
    finished: float | None  #: Unix time, seconds: when its latest try ended
    duration_ms: int | None  #: milliseconds the latest try took
    next_attempt: float  #: Unix time, seconds: not claimed before then (a retry's backoff)
    error_type: str | None = None
    detail: str | None = None
    output: str | None = None  #: the file a transform step produced (for the later steps)
    dev: int | None = None  #: the source's identity when it was seen (None: an old row)
    ino: int | None = None
    ctime_ns: int | None = None
    sha256: str | None = None  #: hex digest of the bytes delivered, where the step computed it
    label: str | None = None  #: the label a learned rule gave the file (``{label}``)
    btime_ns: int | None = None  #: the source's birth time, ns since the epoch (None: unknown)
    #: the step and the transforms before it (``router.step_keys``; set by a claim, None
    #: elsewhere)
    step_key: str | None = None
    #: the fencing token (the node's epoch) of the claim that handed this row out: its outcome
    #: is recorded only while the row still carries it (None: SQLite, or not claimed)
    epoch: int | None = None

    @property
    def marked(self) -> bool:
        """Recorded by ``mark-existing`` as already there, never delivered (no attempt)."""
        return self.status == Status.SUCCEEDED and self.attempts == 0

    @property
    def version(self) -> FileVersion:
        return FileVersion(
            self.source,
            Path(self.root),
            self.relpath,
            self.size,
            self.mtime_ns,
            self.ino or 0,
            self.ctime_ns or 0,
            self.dev or 0,
        )

    @property
    def filename(self) -> str:
        return self.relpath.rsplit("/", 1)[-1]
