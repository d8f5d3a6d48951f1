"""Routing: rules compiled once; a file version in, the chains of steps it must go through out.

Pure and synchronous: no I/O, no clock. Facts that need I/O (a MIME type, a classifier's
verdict) are found by the caller and passed in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from .config import Config, LocalDestination, RuleConfig, Step
from .errors import PermanentDeliveryError
from .models import FileVersion
from .naming import render
from .patterns import GlobSet


@dataclass(frozen=True, slots=True)
class Chain:
    """The ordered steps one rule sends a file through; ``keys`` identify each step's row."""

    rule: str
    steps: tuple[Step, ...]
    keys: tuple[str, ...]

    def position(self, key: str) -> int | None:
        """The index of the step whose key is ``key``, None if no step of the chain has it."""
        try:
            return self.keys.index(key)
        except ValueError:
            return None


@dataclass(frozen=True, slots=True)
class RuleCheck:
    """Why a rule did or did not take a file (for ``filedispatch explain``)."""

    rule: str
    matched: bool
    why: str


@dataclass(frozen=True, slots=True)
class Facts:
    """What the caller learned about a file beyond its name and size."""

    mime: str | None = None
    #: the rule name a ``classify`` hook chose, keyed by the classifying rule's name
    classified: dict[str, str | None] = field(default_factory=dict)


def step_keys(steps: Sequence[Step]) -> tuple[str, ...]:
    """A key per step, naming the step and the earlier steps that change what it receives.

    Only a transform (``step.transforms``: compress, a Python step, which may return a file)
    changes the input of the steps after it, so only transforms are folded into the keys of
    later steps: adding, removing or reordering other destinations leaves a step's key, and
    so its journal rows ("already sent there"), as they were. A step that repeats with the
    same transforms before it gets ``#2``, ``#3``... so each step still has its own key.
    The first step's key (and any step's behind transforms only) is what ``legacy_step_keys``
    gives, so journals written before keep those rows' keys.
    """
    keys: list[str] = []
    seen: dict[str, int] = {}
    prefix = hashlib.sha1()
    for step in steps:
        acc = prefix.copy()
        acc.update(_identity_bytes(step))
        key = acc.hexdigest()[:20]
        seen[key] = seen.get(key, 0) + 1
        keys.append(key if seen[key] == 1 else f"{key}#{seen[key]}")
        if step.transforms:
            prefix.update(_identity_bytes(step))
    return tuple(keys)


def legacy_step_keys(steps: Sequence[Step]) -> tuple[str, ...]:
    """The keys journals had before: each named every step before it, of any kind.
    Kept only to re-key such rows once (``recovery.upgrade_step_keys``)."""
    keys, acc = [], hashlib.sha1()
    for step in steps:
        acc.update(_identity_bytes(step))
        keys.append(acc.copy().hexdigest()[:20])
    return tuple(keys)


def _identity_bytes(step: Step) -> bytes:
    return step.identity().encode("utf-8", "surrogateescape") + b"\0"


def _mime_matcher(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    parts = [re.escape(p.lower()).replace(r"\*", "[^;]*") for p in patterns]
    return re.compile("(?:" + "|".join(parts) + r")\Z")


class CompiledRule:
    def __init__(self, name: str, rule: RuleConfig, source_keys: set[str] | None) -> None:
        self.name = name
        self.config = rule
        self.sources = source_keys
        self.extensions = frozenset(rule.extensions)
        self.glob = GlobSet.compile(rule.glob)
        self.exclude = GlobSet.compile(rule.exclude)
        self.regex = re.compile(rule.regex) if rule.regex else None
        self.mime = _mime_matcher(rule.mime)
        self.chain = Chain(name, tuple(rule.to), step_keys(rule.to))

    def check(self, version: FileVersion, facts: Facts) -> str | None:
        """None when the rule takes the file, else the reason it does not."""
        if self.sources is not None and version.source not in self.sources:
            return f"only for sources {sorted(self.sources)}"
        if self.extensions and version.extension not in self.extensions:
            return f"extension {version.extension or '(none)'!r} not in {sorted(self.extensions)}"
        if self.glob and not self.glob.match(version.relpath):
            return f"path does not match glob {self.config.glob}"
        if self.regex is not None and not self.regex.search(version.relpath):
            return f"path does not match regex {self.config.regex!r}"
        if self.exclude and self.exclude.match(version.relpath):
            return f"path matches exclude {self.config.exclude}"
        if self.config.min_size is not None and version.size < self.config.min_size:
            return f"size {version.size} below min_size {self.config.min_size}"
        if self.config.max_size is not None and version.size > self.config.max_size:
            return f"size {version.size} above max_size {self.config.max_size}"
        if self.mime is not None and (
            facts.mime is None or not self.mime.match(facts.mime.lower())
        ):
            return f"type {facts.mime or 'unknown'} not in {self.config.mime}"
        return None


class Router:
    """Every rule of a config, compiled; ``route`` is called once per file version."""

    def __init__(self, config: Config) -> None:
        paths = {str(s.path): s.key for s in config.sources}
        self.rules: list[CompiledRule] = []
        for i, rule in enumerate(config.rules):
            keys = {paths.get(s, s) for s in rule.sources} if rule.sources else None
            self.rules.append(CompiledRule(config.rule_name(i), rule, keys))
        self.by_name = {r.name: r for r in self.rules}
        self.needs_mime = any(r.mime is not None for r in self.rules)
        self.classifiers = {r.name: r.config.classify for r in self.rules if r.config.classify}

    def route(self, version: FileVersion, facts: Facts = Facts()) -> list[Chain]:
        """The chains this file version goes through, in rule order."""
        return [c for c, _ in self._walk(version, facts, explain=False) if c is not None]

    def explain(self, version: FileVersion, facts: Facts = Facts()) -> list[RuleCheck]:
        return [check for _, check in self._walk(version, facts, explain=True)]

    def _walk(
        self, version: FileVersion, facts: Facts, explain: bool
    ) -> list[tuple[Chain | None, RuleCheck]]:
        out: list[tuple[Chain | None, RuleCheck]] = []
        stopped_by: str | None = None
        for rule in self.rules:
            if stopped_by is not None:
                if not explain:
                    break
                out.append(
                    (None, RuleCheck(rule.name, False, f"not tried: {stopped_by} matched first"))
                )
                continue
            why = rule.check(version, facts)
            chain: Chain | None = rule.chain
            if why is None and rule.name in self.classifiers:
                chosen = facts.classified.get(rule.name)
                target = self.by_name.get(chosen) if chosen else None
                if target is None:
                    why = f"classifier {self.classifiers[rule.name]} chose {chosen or 'nothing'}"
                else:
                    chain = Chain(target.name, target.chain.steps, target.chain.keys)
            if why is not None:
                out.append((None, RuleCheck(rule.name, False, why)))
                continue
            assert chain is not None
            out.append((chain, RuleCheck(rule.name, True, "matched")))
            if not rule.config.continue_:
                stopped_by = rule.name
        return out


def describe_target(step: Step, version: FileVersion) -> str:
    """Where a step would put this file, for ``explain`` and ``--dry-run`` (credentials hidden)."""
    template = getattr(step, "name", None)
    if template is None:
        return step.display
    try:
        rel = render(template, version)
    except PermanentDeliveryError as exc:
        return f"{step.display} (refused: {exc})"
    if isinstance(step, LocalDestination):
        return str(step.folder / rel)
    return f"{step.display.rstrip('/')}/{rel}"
