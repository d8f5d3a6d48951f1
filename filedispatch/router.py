"""Routing: rules compiled once; a file version in, the chains of steps it must go through out.

Pure and synchronous: no I/O. Facts that need I/O (a MIME type, a classifier's verdict) are
found by the caller and passed in; the time (for ``min_age``/``max_age``) comes from the clock
the router was given, read once per file.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .config import Config, LocalDestination, RuleConfig, Step
from .errors import PermanentDeliveryError
from .models import FileVersion
from .naming import NO_OPTIONS, render
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
    #: a learned model's answer, keyed by the learned rule's name (None: no model yet)
    learned: dict[str, Prediction | None] = field(default_factory=dict)


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


def age_text(seconds: float) -> str:
    """``90`` -> ``1m30s``, ``7200`` -> ``2h``: an age or a wait for people."""
    seconds = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


class CompiledRule:
    def __init__(self, name: str, rule: RuleConfig, source_keys: set[str] | None) -> None:
        self.name = name
        self.config = rule
        self.sources = source_keys
        self.extensions = frozenset(rule.extensions)
        self.glob = GlobSet.compile([p for p in rule.glob if not p.startswith("/")])
        self.exclude = GlobSet.compile([p for p in rule.exclude if not p.startswith("/")])
        # a pattern starting with "/" is a path on this machine: tested on the file's full path
        self.glob_abs = GlobSet.compile([p for p in rule.glob if p.startswith("/")])
        self.exclude_abs = GlobSet.compile([p for p in rule.exclude if p.startswith("/")])
        self.regex = re.compile(rule.regex) if rule.regex else None
        self.mime = _mime_matcher(rule.mime)
        self.chain = Chain(name, tuple(rule.to), step_keys(rule.to))

    def check(self, version: FileVersion, facts: Facts | None) -> str | None:
        """None when the rule takes the file (its age aside: see ``check_age``), else the
        reason it does not. ``facts`` None: the content conditions (mime) are not tested."""
        if self.sources is not None and version.source not in self.sources:
            return f"only for sources {sorted(self.sources)}"
        if self.extensions and version.extension not in self.extensions:
            return f"extension {version.extension or '(none)'!r} not in {sorted(self.extensions)}"
        if (self.glob or self.glob_abs) and not (
            (self.glob and self.glob.match(version.relpath))
            or (self.glob_abs and self.glob_abs.match(str(version.path).lstrip("/")))
        ):
            return f"path does not match glob {self.config.glob}"
        if self.regex is not None and not self.regex.search(version.relpath):
            return f"path does not match regex {self.config.regex!r}"
        if (self.exclude and self.exclude.match(version.relpath)) or (
            self.exclude_abs and self.exclude_abs.match(str(version.path).lstrip("/"))
        ):
            return f"path matches exclude {self.config.exclude}"
        if self.config.min_size is not None and version.size < self.config.min_size:
            return f"size {version.size} below min_size {self.config.min_size}"
        if self.config.max_size is not None and version.size > self.config.max_size:
            return f"size {version.size} above max_size {self.config.max_size}"
        if (
            facts is not None
            and self.mime is not None
            and (facts.mime is None or not self.mime.match(facts.mime.lower()))
        ):
            return f"type {facts.mime or 'unknown'} not in {self.config.mime}"
        return None

    def check_age(self, version: FileVersion, now: float) -> tuple[str | None, float | None]:
        """(why not, when it will be old enough): (None, None) when the age suits the rule;
        (reason, None) when the file is too old; (reason, due) when it is too young, ``due``
        in seconds since 1970."""
        cfg = self.config
        if cfg.min_age is None and cfg.max_age is None:
            return None, None
        mtime = version.mtime_ns / 1e9
        age = now - mtime
        if cfg.min_age is not None and now < (due := mtime + cfg.min_age):
            return (
                f"too young: modified {age_text(age)} ago, min_age {age_text(cfg.min_age)}; "
                f"taken at {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(due))}",
                due,
            )
        if cfg.max_age is not None and age > cfg.max_age:
            return f"too old: modified {age_text(age)} ago, max_age {age_text(cfg.max_age)}", None
        return None, None


class Router:
    """Every rule of a config, compiled; ``route`` is called once per file version.

    ``clock``: seconds since 1970 (``time.time``), read once per file for the age conditions.
    """

    def __init__(self, config: Config, clock: Callable[[], float] = time.time) -> None:
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
        self.clock = clock
        self.ages = any(r.config.min_age is not None for r in self.rules)
        self.timed = self.ages or any(r.config.max_age is not None for r in self.rules)

    def route(self, version: FileVersion, facts: Facts = Facts()) -> list[Chain]:
        """The chains this file version goes through, in rule order; none while some rule
        waits for the file to be old enough (``waiting``)."""
        walked, due = self._walk(version, facts, explain=False)
        return [] if due is not None else [c for c, _ in walked if c is not None]

    def explain(self, version: FileVersion, facts: Facts = Facts()) -> list[RuleCheck]:
        return [check for _, check in self._walk(version, facts, explain=True)[0]]

    def waiting(self, version: FileVersion, facts: Facts | None = None) -> float | None:
        """When the file will be old enough for the rule that waits for it (seconds since
        1970), or None if no rule waits. A rule waits for a file that it would take but for
        ``min_age``: the file is not routed at all until then (no rule after it takes it
        meanwhile, and no after-action runs early). ``facts`` None: content conditions are
        taken as met (the caller looks again then, and routes with the facts)."""
        if not self.ages:
            return None
        return self._walk(version, facts, explain=False)[1]

    def _walk(
        self, version: FileVersion, facts: Facts | None, explain: bool
    ) -> tuple[list[tuple[Chain | None, RuleCheck]], float | None]:
        out: list[tuple[Chain | None, RuleCheck]] = []
        stopped_by: str | None = None
        due: float | None = None
        now = self.clock() if self.timed else 0.0
        for rule in self.rules:
            if stopped_by is not None:
                if not explain:
                    break
                out.append((None, RuleCheck(rule.name, False, f"not tried: {stopped_by}")))
                continue
            why = rule.check(version, facts)
            chain: Chain | None = rule.chain
            if why is None and rule.name in self.classifiers and facts is not None:
                chosen = facts.classified.get(rule.name)
                target = self.by_name.get(chosen) if chosen else None
                if target is None:
                    why = f"classifier {self.classifiers[rule.name]} chose {chosen or 'nothing'}"
                else:
                    chain = Chain(target.name, target.chain.steps, target.chain.keys)
            if why is None and rule.name in self.learners and facts is not None:
                why, chain = self._learned(rule, facts)
            if why is None:
                why, young = rule.check_age(version, now)
                if young is not None:
                    due = young if due is None else min(due, young)
                    out.append((None, RuleCheck(rule.name, False, why or "")))
                    if not rule.config.continue_:
                        stopped_by = f"the file waits for {rule.name}"
                    continue
            if why is not None:
                out.append((None, RuleCheck(rule.name, False, why)))
                continue
            assert chain is not None
            out.append((chain, RuleCheck(rule.name, True, "matched")))
            if not rule.config.continue_:
                stopped_by = f"{rule.name} matched first"
        return out, due

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
    """Where a step would put this file, for ``explain`` and ``--dry-run`` (credentials hidden;
    ``{counter}`` is shown as it is: the journal gives the number when the file is planned;
    ``label``: a learned rule's label for ``{label}``)."""
    template = getattr(step, "name", None)
    if template is None:
        return step.display
    try:
        rel = render(template, version, None, getattr(step, "naming", NO_OPTIONS), label=label)
    except PermanentDeliveryError as exc:
        return f"{step.display} (refused: {exc})"
    if isinstance(step, LocalDestination):
        return str(step.folder / rel)
    return f"{step.display.rstrip('/')}/{rel}"
