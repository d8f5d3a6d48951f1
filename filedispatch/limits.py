"""Limits on delivery: the ``--max-items`` budget of a run (counting only work not done yet).

Decides only: it reads the journal and counts, and never writes, sends or moves a file.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from .models import FileVersion

if TYPE_CHECKING:
    from .dispatcher import RunSummary
    from .journal import Journal
    from .router import Chain


class ItemBudget:
    """``--max-items N``: at most N files of new work in one run.

    A file counts only when some step its rules route it to is not in the journal yet: files
    already sent (or planned, or failed) and files no rule takes cost nothing, so a cron job
    with ``--max-items 10`` always gets through to the files still to do.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    async def admit(
        self,
        versions: Sequence[FileVersion],
        routes: Sequence[list[Chain]],
        journal: Journal,
        summary: RunSummary,
    ) -> tuple[list[FileVersion], list[list[Chain]]]:
        """The versions (with their routes) to plan now: all that are no new work, and new
        work while the budget lasts; the rest are counted in ``summary.skipped``."""
        routed = [v for v, chains in zip(versions, routes, strict=True) if chains]
        states = await journal.version_states(routed) if routed else {}
        kept_v: list[FileVersion] = []
        kept_r: list[list[Chain]] = []
        for version, chains in zip(versions, routes, strict=True):
            if chains:
                known = {key for key, _, _ in states.get(version.key, [])}
                new = any(key not in known for chain in chains for key in chain.keys)
                if new and self.used >= self.limit:
                    summary.skipped += 1
                    continue
                self.used += new
            kept_v.append(version)
            kept_r.append(chains)
        return kept_v, kept_r
