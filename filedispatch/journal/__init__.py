"""The journal: one row per (file version, destination step); the plan, backlog and history.

``base`` holds the ``Journal`` protocol and its typed rows, ``sqlite`` the embedded backend,
``place`` where the journal file lives and its lock. Every SQL statement of filedispatch is in
this package; nothing in it touches a source file or calls a processor.
"""

from .backends import (
    open_journal,
    open_reader,
    open_when_ready,
    read_digests,
    read_states,
    when_ready,
)
from .base import (
    DUPLICATE_OF,
    RETRY_FIRST_S,
    RETRY_MAX_S,
    Column,
    Condition,
    DayTally,
    DestinationCount,
    Detail,
    Entry,
    Journal,
    JournalHealth,
    JournalReader,
    JournalState,
    NodeInfo,
    OutcomeGroup,
    PageQuery,
    PlannedStep,
    RecordedPath,
    RetryWaiting,
    SortKey,
    StatsGroup,
    StepResult,
    StepState,
    Waiting,
    default_path,
    number,
    planned_steps,
)
from .place import (
    NameLock,
    journal_lock,
    journal_lock_when_ready,
    journal_path,
    state_folder,
    state_tag,
)
from .probe import Probe, probe
from .sqlite import SqliteJournal
from .sqlite_schema import MIGRATIONS
from .target import Database, PostgresTarget
from .uploads import OpenUpload

#: older callers open a journal with ``Journal.open(path)``
Journal.open = open_journal  # type: ignore[attr-defined]

__all__ = [
    "DUPLICATE_OF",
    "MIGRATIONS",
    "RETRY_FIRST_S",
    "RETRY_MAX_S",
    "Column",
    "Condition",
    "Database",
    "DayTally",
    "DestinationCount",
    "Detail",
    "Entry",
    "Journal",
    "JournalHealth",
    "JournalReader",
    "JournalState",
    "NameLock",
    "NodeInfo",
    "OpenUpload",
    "OutcomeGroup",
    "PageQuery",
    "PlannedStep",
    "PostgresTarget",
    "Probe",
    "RecordedPath",
    "RetryWaiting",
    "SortKey",
    "SqliteJournal",
    "StatsGroup",
    "StepResult",
    "StepState",
    "Waiting",
    "default_path",
    "journal_lock",
    "journal_lock_when_ready",
    "journal_path",
    "number",
    "open_journal",
    "open_reader",
    "open_when_ready",
    "planned_steps",
    "probe",
    "read_digests",
    "read_states",
    "state_folder",
    "state_tag",
    "when_ready",
]
