"""When does the source go? One function answers it, for every place that acts on a source.

Pure: a source's config, the steps its version goes through and (once known) their outcomes
in, a ``Fate`` out. No I/O, no clock. The dispatcher's inline lanes, its workers, the
after-actions and the settling of files seen again all ask here, so they cannot disagree.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from .models import Status

if TYPE_CHECKING:
    from .config import SourceConfig, Step


class Fate(enum.StrEnum):
    """What happens to a source file."""

    #: it stays where it is
    KEEP = "keep"
    #: it is removed (``after: delete``, or a ``mode: move`` destination consumed it)
    DELETE = "delete"
    #: it is moved to the source's ``done_dir`` (``after: move``)
    DONE_DIR = "done_dir"
    #: a destination failed for good: it is moved to the source's ``failed_dir``
    FAILED_DIR = "failed_dir"
    #: a destination is still to do: nothing happens yet
    WAIT = "wait"


def _moves(steps: Iterable[Step | None]) -> bool:
    return any(getattr(step, "mode", None) == "move" for step in steps)


def fate(
    source: SourceConfig,
    steps: Sequence[Step | None],
    statuses: Sequence[Status] | None = None,
    *,
    marked: bool = False,
) -> Fate:
    """The fate of a source file whose version goes through ``steps`` (every chain's).

    ``statuses``: the outcomes of those steps' rows; None asks what happens once every step
    succeeds (for choosing how to deliver). ``marked``: a step's row was recorded by
    ``mark-existing`` rather than delivered: a marked file was never proven delivered, so it
    is kept (the caller passes False when the operator said ``--consume-marked``).

    ``after: move`` wins over a ``mode: move`` destination: the file goes to ``done_dir``.
    """
    if statuses is not None:
        if any(s not in (Status.SUCCEEDED, Status.FAILED) for s in statuses):
            return Fate.WAIT
        if any(s == Status.FAILED for s in statuses):
            return Fate.FAILED_DIR if source.failed_dir is not None else Fate.KEEP
        if marked:
            return Fate.KEEP
    if source.after == "delete":
        return Fate.DELETE
    if source.after == "move":
        return Fate.DONE_DIR
    return Fate.DELETE if _moves(steps) else Fate.KEEP


def renamed_by_delivery(source: SourceConfig, steps: Sequence[Step | None]) -> bool:
    """Whether the delivery itself may consume the source by renaming it into place: the
    version has one step and the source is deleted once that step succeeds. Anything else
    (a second destination, ``done_dir``) needs the source after the delivery: it is copied.
    """
    return len(steps) == 1 and fate(source, steps) is Fate.DELETE
