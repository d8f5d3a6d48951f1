"""Routing: rules compiled once; a file version in, the chains of steps it must go through out.

Pure and synchronous: no I/O, no clock. Facts that need I/O (a MIME type, a classifier's
verdict) are found by the caller and passed in.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config, LocalDestination, RuleConfig, Step
from .errors import PermanentDeliveryError
from .models import FileVersion
from .naming import render
from .patterns import GlobSet

if TYPE_CHECKING:
    from .learn.model import Prediction


@dataclass(frozen=True, slots=True)
class Chain:
    """The ordered steps one rule sends a file through; ``keys`` identify each step's row."""

    rule: str
    steps: tuple[Step, ...]
    keys: tuple[str, ...]
    label: str | None = None  #: the label a learned rule gave the file (``{label}``)


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
    #: a learned model's answer, keyed by the learned rule's name (None: no model yet)
    learned: dict[str, Prediction | None] = field(default_factory=dict)


def step_keys(steps: Sequence[Step]) -> tuple[str, ...]:
    """A key per step that names the step and every step before it (transforms change input)."""
    keys, acc = [], hashlib.sha1()
    for step in steps:
        acc.update(step.identity().encode("utf-8", "surrogateescape") + b"\0")
        keys.append(acc.copy().hexdigest()[:20])
    return tuple(keys)


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
        self.classifiers = {
            r.name: r.config.classify for r in self.rules if isinstance(r.config.classify, str)
        }
        #: learned rules: name -> settings (its examples folder, its min_confidence)
        self.learners = {r.name: r.config.learned for r in self.rules if r.config.learned}

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
            if why is None and rule.name in self.learners:
                why, chain = self._learned(rule, facts)
            if why is not None:
                out.append((None, RuleCheck(rule.name, False, why)))
                continue
            assert chain is not None
            out.append((chain, RuleCheck(rule.name, True, "matched")))
            if not rule.config.continue_:
                stopped_by = rule.name
        return out

    def _learned(self, rule: CompiledRule, facts: Facts) -> tuple[str | None, Chain | None]:
        """(why not, the chain with its label) for a learned rule."""
        least = self.learners[rule.name].min_confidence
        answer = facts.learned.get(rule.name)
        if answer is None:
            return "the learned model is not ready", None
        if answer.probability < least:
            return (
                f"learned label {answer.label!r} at {answer.probability:.2f}, "
                f"below min_confidence {least:g}",
                None,
            )
        return None, Chain(rule.name, rule.chain.steps, rule.chain.keys, answer.label)


def describe_target(step: Step, version: FileVersion, label: str | None = None) -> str:
    """Where a step would put this file, for ``explain`` and ``--dry-run`` (credentials hidden)."""
    template = getattr(step, "name", None)
    if template is None:
        return step.display
    try:
        rel = render(template, version, label=label)
    except PermanentDeliveryError as exc:
        return f"{step.display} (refused: {exc})"
    if isinstance(step, LocalDestination):
        return str(step.folder / rel)
    return f"{step.display.rstrip('/')}/{rel}"
