"""The journal: one row per (file version, destination step); the plan, backlog and history.

``base`` holds the ``Journal`` protocol and its typed rows, ``sqlite`` the embedded backend,
``place`` where the journal file lives and its lock. Every SQL statement of filedispatch is in
this package; nothing in it touches a source file or calls a processor.
"""

from .backends import connect, open_reader
from .base import (
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
    OutcomeGroup,
    PageQuery,
    PlannedStep,
    RecordedPath,
    RetryWaiting,
    SortKey,
    StatsGroup,
    StepResult,
    default_path,
    number,
    planned_steps,
)
from .place import journal_lock, journal_path

__all__ = [
    "RETRY_FIRST_S",
    "RETRY_MAX_S",
    "Column",
    "Condition",
    "DayTally",
    "DestinationCount",
    "Detail",
    "Entry",
    "Journal",
    "JournalHealth",
    "JournalReader",
    "JournalState",
    "OutcomeGroup",
    "PageQuery",
    "PlannedStep",
    "RecordedPath",
    "RetryWaiting",
    "SortKey",
    "StatsGroup",
    "StepResult",
    "connect",
    "default_path",
    "journal_lock",
    "journal_path",
    "number",
    "open_reader",
    "planned_steps",
]
