"""Facts about a file's content for routing: its MIME type from its first bytes, classifier hooks.

Runs in worker threads (it reads files, through ``sourcefile`` only); the router itself stays
pure and only sees the answers. A classifier hook is handed the path: it is user code.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from .config import Config, PythonStep
from .models import FileVersion
from .sourcefile import read_head

if TYPE_CHECKING:
    from .learn import Learned
    from .router import Facts, Router

log = logging.getLogger(__name__)
SNIFF_BYTES = 8192


def import_object(spec: str) -> Any:
    """``package.module:name`` -> the object (ImportError or AttributeError if missing)."""
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise AttributeError(f"module {module_name!r} has no attribute {attr!r}") from None
    return obj


def detect_mime(version: FileVersion) -> str | None:
    """The MIME type the version's first bytes show (None when unknown, unreadable, or no longer
    that version). Read through ``sourcefile``: never a link out of the source, never a FIFO."""
    import puremagic  # a config without mime: conditions never loads it

    from .learn.extract import looks_like_text

    head = read_head(version, SNIFF_BYTES)
    if not head:
        return None
    try:
        matches = puremagic.magic_string(head)
    except puremagic.PureError:
        matches = []
    for match in matches:
        if match.mime_type:
            return str(match.mime_type)
    if looks_like_text(head):
        return "text/plain"
    return "application/octet-stream"


def import_problems(config: Config) -> list[str]:
    """Every ``python:`` step and ``classify:`` hook that cannot be imported, as config errors."""
    problems = []
    for i, rule in enumerate(config.rules):
        hook = rule.classify if isinstance(rule.classify, str) else None
        specs = [(f"rules[{i}].classify", hook)] if hook else []
        specs += [
            (f"rules[{i}].to[{j}].python", step.python)
            for j, step in enumerate(rule.to)
            if isinstance(step, PythonStep)
        ]
        for where, spec in specs:
            try:
                obj = import_object(spec)
            except Exception as exc:  # ImportError, AttributeError, or the module's own error
                problems.append(f"{where}: cannot import {spec!r}: {type(exc).__name__}: {exc}")
                continue
            if not callable(obj):
                problems.append(f"{where}: {spec!r} is not callable")
            elif where.endswith(".python") and isinstance(obj, type) and not _calls(obj):
                problems.append(f"{where}: instances of {spec!r} are not callable (no __call__)")
    return problems


def _calls(cls: type) -> bool:
    return any("__call__" in vars(k) for k in cls.__mro__)


def facts_for(
    router: Router,
    version: FileVersion,
    cache: dict[str, Any] | None = None,
    learned: Learned | None = None,
) -> Facts:
    """What routing needs to know beyond name and size: nothing unless a rule asks for it.
    ``learned`` answers for the learned rules (without it they take no file)."""
    from .router import Facts

    if not needs_content(router):
        return Facts()
    mime = detect_mime(version) if router.needs_mime or router.classifiers else None
    answers = {  # a model reads the file only for a rule whose other conditions hold
        name: learned.predict(settings.learn, version)
        if learned is not None and router.by_name[name].check(version, Facts(mime)) is None
        else None
        for name, settings in router.learners.items()
    }
    return Facts(mime, classify_all(router, version, mime, cache), answers)


def needs_content(router: Router) -> bool:
    """Whether routing reads files (a MIME type, a classifier, a learned model)."""
    return router.needs_mime or bool(router.classifiers) or bool(router.learners)


def classify_all(
    router: Router, version: FileVersion, mime: str | None, cache: dict[str, Any] | None = None
) -> dict[str, str | None]:
    """Ask each rule's classifier hook which rule the file belongs to."""
    cache = {} if cache is None else cache
    answers: dict[str, str | None] = {}
    for rule_name, spec in router.classifiers.items():
        hook = cache.get(spec)
        if hook is None:
            hook = cache[spec] = import_object(spec)
        try:
            answer = hook(version.path, mime)
        except Exception as exc:  # a broken hook must not stop the routing of other files
            log.warning("classifier %s failed on %s: %s", spec, version.relpath, exc)
            answer = None
        answers[rule_name] = str(answer) if answer else None
    return answers
