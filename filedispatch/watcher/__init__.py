"""Watching sources: a start-up scan, watchfiles events, periodic reconcile scans, readiness gates.

Events are only hints; the folder is the truth. A file is handed on (as a ``FileVersion``)
only once it is complete: settled, unlocked, or marked done, and open for writing by nobody.
Links follow one rule in the scan and the watch. The watcher never sends, moves or deletes a
file (except the ``.done`` marker it consumed); it stats files in threads, off the event loop.

``SourceWatcher`` (``source.py``) runs one source's scans, events and timers; its parts, each
in its module: ``entries`` (which entries are candidates: names, folders, links; the walk),
``gates`` (complete or not: settle, markers, open writers, ``min_age``; the timers),
``batches`` (handing on, one batch in flight); ``mounts`` tells the filesystem. A shared
source's watcher (run only while this node holds its lease) is ``cluster.SharedWatcher``.
"""

from .batches import Emit, Reject
from .entries import SKIP_REASONS, no_skips, total_skips, valid_name
from .gates import AgeDue
from .mounts import describe_writer_check, is_network_fs, mount_fstype
from .source import Baselines, SourceWatcher

__all__ = [
    "SKIP_REASONS",
    "AgeDue",
    "Baselines",
    "Emit",
    "Reject",
    "SourceWatcher",
    "describe_writer_check",
    "is_network_fs",
    "mount_fstype",
    "no_skips",
    "total_skips",
    "valid_name",
]
