"""A faithful simulation for ``explain``, ``--dry-run`` and ``--max-items``: what the service
would do with a file, by the service's own decisions, and why a file is not taken.

The watcher's gates (ignores, ``recursive``, links, kept-out folders, readiness), the router
(rules, ages) and the journal ("already done", and for ``dedupe: content`` "duplicate of"),
each asked as the service asks it. Reads only: it never writes the journal, never creates a
file or folder, and never sends anything; it reads a file's bytes only for a deduped step,
and only a file the watcher would take (inside a source, through ``sourcefile``).
"""

from __future__ import annotations

import itertools
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .config import Config, SourceConfig, real
from .content import facts_for
from .errors import DeliveryError
from .journal import (
    DUPLICATE_OF,
    Database,
    PlannedStep,
    StepState,
    planned_steps,
    read_digests,
    read_states,
)
from .models import FileVersion, Status
from .naming import content_sha256
from .router import Chain, Facts, Router, RuleCheck
from .watcher import SourceWatcher
from .watcher.listing import Listing

if TYPE_CHECKING:
    from .config import Step
    from .learn import Learned


@dataclass(frozen=True, slots=True)
class Decision:
    """What the service would do with one file now."""

    shown: str  #: the file as printed: ``source/relpath``, or the path given
    source: SourceConfig | None = None
    version: FileVersion | None = None
    chains: tuple[Chain, ...] = ()  #: what it goes through (also when already done)
    checks: tuple[RuleCheck, ...] = ()  #: each rule's verdict (routed files only)
    facts: Facts = field(default_factory=Facts)
    #: None: it would be sent now; else why not (not in a source, ignored, not complete yet,
    #: no rule, waiting for min_age, already done ...)
    why_not: str | None = None
    #: the rules matched but the journal has every step: nothing new to do
    done: bool = False
    #: step key -> why that step would not send (``dedupe: content``: "duplicate of dispatch
    #: #N ..."); a file all of whose new steps are here is recorded but sends nothing
    duplicates: dict[str, str] = field(default_factory=dict)

    @property
    def sends_nothing(self) -> bool:
        """Taken, but every step it would plan is a duplicate: recorded, nothing sent."""
        keys = [key for chain in self.chains for key in chain.keys]
        return self.taken and bool(keys) and all(k in self.duplicates for k in keys)

    @property
    def taken(self) -> bool:
        return self.why_not is None


async def _never(*_: object) -> None:
    return None


class Simulation:
    """The service's decisions for files, without running it.

    ``db``: the journal to consult for "already done" (read-only; a missing one means nothing
    was done yet). ``clock``: seconds since 1970, for readiness and ages. ``learned``: the
    learned rules' models (None: those rules take no file, as in a service without them).
    """

    def __init__(
        self,
        config: Config,
        db: Database | None,
        clock: Callable[[], float] = time.time,
        learned: Learned | None = None,
    ) -> None:
        self.config = config
        self.db = db
        self.clock = clock
        self.learned = learned
        self.router = Router(config, clock)
        #: (destination, sha256) -> the file shown first in this simulation that would send
        #: those bytes there (the real run sends it, then finds the later ones duplicates)
        self._sending: dict[tuple[str, str], str] = {}
        exclude = [folder for _, folder in config.iter_local_roots()]  # as the service does
        self.watchers = {s.key: SourceWatcher(s, _never, _never, exclude) for s in config.sources}

    # ------------------------------------------------------------------ whole sources

    def scan(self, *, starting: bool = True) -> Iterator[Decision]:
        """Every file in the sources, in the order a start-up scan offers them (oldest first).
        ``starting``: as at a start (``process_existing: false`` leaves them all alone)."""
        for source in self.config.sources:
            watcher = self.watchers[source.key]
            rows = iter(Listing(watcher.entries.walk()))  # held packed, as the service does
            while page := list(itertools.islice(rows, 500)):
                versions = [
                    FileVersion(source.key, source.path, rel, size, mtime, ino, ctime, dev)
                    for mtime, rel, size, ino, ctime, dev in page
                ]
                if starting and not source.process_existing:
                    for v in versions:
                        yield Decision(f"{source.key}/{v.relpath}", source, v, why_not=_LEFT_ALONE)
                    continue
                yield from self._decide(source, versions, check_name=True)

    # ------------------------------------------------------------------ one path

    def look(self, path: Path) -> Decision:
        """What the service would do with the file at ``path`` (any path: it need not be in
        a source, or exist)."""
        absolute = real(path)  # compared resolved, as the sources are
        source = next(
            (s for s in self.config.sources if absolute.is_relative_to(real(s.path))), None
        )
        if source is None:
            where = ", ".join(str(s.path) for s in self.config.sources)
            return Decision(str(path), why_not=f"not inside any source ({where})")
        rel = absolute.relative_to(real(source.path)).as_posix()
        shown = f"{source.key}/{rel}"
        if rel == ".":
            return Decision(shown, source, why_not="the source folder itself, not a file")
        if not os.path.lexists(source.path / rel):
            # a name that is not there yet: the rules, for an empty file of that name
            version = FileVersion(source.key, source.path, rel, 0, int(self.clock() * 1e9))
            return self._rules_only(
                shown,
                source,
                version,
                "does not exist (the rules are shown for an empty file of that name, modified now)",
            )
        why = self.watchers[source.key].entries.why_not(rel)
        if why is not None:
            return Decision(shown, source, why_not=why)
        st = (source.path / rel).stat()
        version = FileVersion.from_stat(source.key, source.path, rel, st)
        return next(iter(self._decide(source, [version], check_name=False)))

    def look_outside(self, path: Path) -> Decision | None:
        """The rules' verdicts for a regular file outside every source, as if it were in the
        first one (routed by its name, its content read where it is): how a learned rule
        would take a sample file. None when no rule learns or ``path`` is no regular file.
        The decision still says the file is not taken."""
        if not self.router.learners or not self.config.sources:
            return None
        absolute = real(path)
        try:
            st = absolute.stat()
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        source = self.config.sources[0]
        version = FileVersion.from_stat(source.key, absolute.parent, absolute.name, st)
        return self._rules_only(str(path), source, version, "not inside any source")

    def _rules_only(
        self, shown: str, source: SourceConfig, version: FileVersion, why_not: str
    ) -> Decision:
        """The rules' verdicts for a file the service would not take anyway (``why_not``)."""
        facts = facts_for(self.router, version, learned=self.learned)
        route = tuple(self.router.route(version, facts))
        return Decision(
            shown,
            source,
            version,
            route,
            tuple(self.router.explain(version, facts)),
            facts,
            why_not,
        )

    # ------------------------------------------------------------------ the decisions

    def _decide(
        self, source: SourceConfig, versions: Sequence[FileVersion], check_name: bool
    ) -> Iterator[Decision]:
        watcher = self.watchers[source.key]
        now = self.clock()
        routed: list[tuple[FileVersion, Facts, list[Chain], list[RuleCheck]]] = []
        out: dict[str, Decision] = {}
        for v in versions:
            shown = f"{source.key}/{v.relpath}"
            why = watcher.entries.why_not(v.relpath) if check_name else None
            why = why or watcher.gates.not_ready(v, now)
            if why is not None:
                out[v.key] = Decision(shown, source, v, why_not=why)
                continue
            facts = facts_for(self.router, v, learned=self.learned)
            checks = self.router.explain(v, facts)
            due = self.router.waiting(v, facts)
            if due is not None:
                young = next((c.why for c in checks if c.why.startswith("too young")), "")
                out[v.key] = Decision(shown, source, v, (), tuple(checks), facts, f"waits: {young}")
                continue
            chains = self.router.route(v, facts)
            if not chains:
                out[v.key] = Decision(
                    shown, source, v, (), tuple(checks), facts, "no rule takes it"
                )
                continue
            routed.append((v, facts, chains, checks))
        states = read_states(self.db, [v.key for v, *_ in routed]) if self.db and routed else {}
        whys = {
            v.key: _journal_says(planned_steps(v, chains), states.get(v.key, []))
            for v, _, chains, _ in routed
        }
        new = [(v, chains, states.get(v.key, [])) for v, _, chains, _ in routed if not whys[v.key]]
        duplicates = self._duplicates(new)
        for v, facts, chains, checks in routed:
            why = whys[v.key]
            out[v.key] = Decision(
                f"{source.key}/{v.relpath}",
                source,
                v,
                tuple(chains),
                tuple(checks),
                facts,
                why,
                done=why is not None and why.startswith("already done"),
                duplicates=duplicates.get(v.key, {}),
            )
        for v in versions:
            yield out[v.key]

    def _duplicates(
        self, new: Sequence[tuple[FileVersion, list[Chain], list[StepState]]]
    ) -> dict[str, dict[str, str]]:
        """For files with new work: per version key, the deduped steps (by step key) whose
        bytes their destination already has, as the dispatcher would find them (the journal,
        or a file earlier in this simulation that would send them first)."""
        wanted: list[tuple[FileVersion, str, str, str]] = []  # version, step key, dest, sha
        for v, chains, rows in new:
            known = {r.step_key for r in rows}
            steps = [
                (step, key)
                for chain in chains
                for step, key in _on_source_bytes(chain)
                if step.deduped and key not in known
            ]
            if not steps:
                continue
            try:
                digest = content_sha256(v)
            except DeliveryError:  # unreadable: the delivery would say so itself
                continue
            wanted += [(v, key, step.display, digest) for step, key in steps]
        if not wanted:
            return {}
        pairs = list(dict.fromkeys((dest, sha) for _, _, dest, sha in wanted))
        earlier = read_digests(self.db, pairs) if self.db is not None else {}
        out: dict[str, dict[str, str]] = {}
        for v, key, dest, sha in wanted:
            found = earlier.get((dest, sha))
            shown = f"{v.source}/{v.relpath}"
            if found is not None:
                why = (
                    f"{DUPLICATE_OF}{found[0]}: the same bytes (sha256 {sha[:12]}...) were "
                    f"delivered to {dest} ({found[1]}); not sent again"
                )
            elif (first := self._sending.setdefault((dest, sha), shown)) != shown:
                why = (
                    f"duplicate of {first}: the same bytes (sha256 {sha[:12]}...) go to {dest} "
                    "with it; not sent again"
                )
            else:
                continue
            out.setdefault(v.key, {})[key] = why
        return out


def _on_source_bytes(chain: Chain) -> Iterator[tuple[Step, str]]:
    """The steps of a chain (with their step keys) that get the source's own bytes: those up
    to and including the first transform (the later ones get its output)."""
    for step, key in zip(chain.steps, chain.keys, strict=True):
        yield step, key
        if step.transforms:
            return


_LEFT_ALONE = (
    "left alone: present at start, and the source has process_existing: false (only files "
    "that arrive later are taken)"
)


def _journal_says(steps: Sequence[PlannedStep], rows: list[StepState]) -> str | None:
    """Why the journal makes a routed file no new work (None: some step is new)."""
    by_key = {r.step_key: r for r in rows}
    keys = [s.step_key for s in steps]
    if not keys or any(k not in by_key for k in keys):
        return None
    mine = [by_key[k] for k in keys]
    ids = ", ".join(f"#{r.id}" for r in mine)
    if all(r.status == Status.SUCCEEDED for r in mine):
        how = " (recorded by mark-existing)" if any(r.marked for r in mine) else ""
        return f"already done: dispatch {ids}{how}"
    if any(r.status == Status.FAILED for r in mine):
        return f"failed before: dispatch {ids} (`filedispatch history retry` sends it again)"
    return f"already planned: dispatch {ids} waits in the journal"
