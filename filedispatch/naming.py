"""Naming templates: turn ``{yyyy}/{mm}/{name}`` and a file version into a safe relative path.

Pure functions only; a rendered name that would leave the destination root is refused, and a
name part longer than a filesystem allows is shortened here, by one rule (``shorten``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import string
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, tzinfo
from pathlib import Path, PurePosixPath
from typing import Any

from .errors import PermanentDeliveryError
from .models import FileVersion

#: how every name filedispatch gives a file of its own work begins (a copy in progress, a
#: source being removed or moved): never taken from a source, whatever its ignore patterns
OWN_PREFIX = ".filedispatch-"

PLACEHOLDERS = frozenset(
    {"name", "stem", "ext", "relpath", "reldir", "source", "yyyy", "mm", "dd", "HH", "MM", "SS"}
    | {"parent", "now", "mtime", "counter", "sha256"}
    | {"label"}  # a learned rule's label (see docs/learned-routing.md)
)
#: placeholders that take a strftime format after a colon: ``{now:%Y-%m-%d}``
TIME_PLACEHOLDERS = frozenset({"now", "mtime"})
#: what ``{now}`` and ``{mtime}`` give without a format
DEFAULT_TIME_FORMAT = "%Y%m%dT%H%M%S"
#: the value ``{counter}`` shows where no dispatch exists yet (explain, --dry-run)
COUNTER_UNKNOWN = "{counter}"


@dataclass(frozen=True, slots=True)
class NameOptions:
    """What a destination adds to its name template: its rule's regex (whose named groups are
    placeholders) and the time zone of the time placeholders (None: local time)."""

    regex: re.Pattern[str] | None = None
    tz: tzinfo | None = None


NO_OPTIONS = NameOptions()


def template_fields(template: str) -> list[tuple[str, str]]:
    """(field, format spec) of each placeholder of ``template``; ValueError if malformed."""
    try:
        return [
            (f, spec or "") for _, f, spec, _ in string.Formatter().parse(template) if f is not None
        ]
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None


def check_template(template: str, groups: Iterable[str] | None = ()) -> str:
    """Validate a template at config load; returns it unchanged or raises ValueError.

    ``groups``: the named groups of the rule's regex, also usable as placeholders; None when
    they are not known yet (any plain name passes, and the rule checks it later).
    """
    known = PLACEHOLDERS | set(groups or ())
    for field, spec in template_fields(template):
        if not field.isidentifier():  # {name.attr} or {name[0]} would reach into objects
            raise ValueError(f"{{{field}}} is not a placeholder (a plain name is)")
        if field not in known and groups is not None:
            hint = f" or named groups of the rule's regex ({', '.join(sorted(groups))})"
            raise ValueError(
                f"unknown placeholder {{{field}}}; known: "
                + ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
                + (hint if groups else " (and no named group of the rule's regex)")
            )
        if field == "sha256" and spec and not (spec.isdigit() and 1 <= int(spec) <= 64):
            raise ValueError("{sha256:N} takes N from 1 to 64 (hex digits kept)")
        if spec and field not in TIME_PLACEHOLDERS and field != "sha256":
            raise ValueError(f"{{{field}}} takes no format (only now, mtime and sha256 do)")
    return template


@functools.lru_cache(maxsize=256)
def _fields(template: str) -> frozenset[str]:
    return frozenset(f for _, f, _, _ in string.Formatter().parse(template) if f)


def by_content(*templates: str | None) -> bool:
    """Whether any of ``templates`` names a file by its bytes (``{sha256}``): the file must
    then be read whole before its name is known."""
    return any(t is not None and "sha256" in _fields(t) for t in templates)


_TIME_FIELDS = frozenset({"yyyy", "mm", "dd", "HH", "MM", "SS", "mtime"})

#: bytes in one name (path component) on Linux filesystems: ext4, xfs, btrfs, tmpfs
NAME_MAX = 255
#: an extension longer than this (dot included) is not kept apart when a name is shortened
_EXT_MAX = 32
#: "~" and 8 hex digits of the full name's sha256, put where a shortened name was cut
_MARK_BYTES = 9


class _Digest(str):
    """A hex digest; its format spec is how many leading digits to keep."""

    __slots__ = ()

    def __format__(self, spec: str) -> str:
        return str(self)[: int(spec)] if spec else str(self)


class _Time(datetime):
    """A datetime whose empty format spec is DEFAULT_TIME_FORMAT."""

    def __format__(self, spec: str) -> str:
        return self.strftime(spec or DEFAULT_TIME_FORMAT)


def _as_time(timestamp: float, tz: tzinfo | None, what: str = "the time") -> _Time:
    try:
        return _Time.fromtimestamp(timestamp, tz)
    except (OverflowError, OSError, ValueError):
        # tmpfs keeps mtimes up to 2**63 s, beyond what the C library can turn into a date
        raise PermanentDeliveryError(
            f"{what} ({timestamp:.0f} s since 1970) has no calendar date on this system, so "
            "the name template's date fields cannot be filled"
        ) from None


def placeholders(
    version: FileVersion,
    needed: frozenset[str] = PLACEHOLDERS,
    options: NameOptions = NO_OPTIONS,
    *,
    counter: int | None = None,
    content: Path | None = None,
    now: float | None = None,
    label: str | None = None,
    sha256: str | None = None,
) -> dict[str, object]:
    """The placeholder values for a file (only the ``needed`` ones are worked out).

    ``counter``: the dispatch's id in the journal (None: shown as ``{counter}``); ``content``:
    the file whose bytes ``{sha256}`` hashes (default the version's own); ``now``: seconds
    since 1970 for ``{now}`` (default the clock); ``label``: a learned rule's label for
    ``{label}`` (PermanentDeliveryError when the template needs it and it is None);
    ``sha256``: the content's hex SHA-256 when known already (else read here, blocking).
    """
    name = version.name
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot + 1 :]) if dot > 0 else (name, "")
    reldir = version.relpath.rpartition("/")[0]
    values: dict[str, object] = {
        "name": name,
        "stem": stem,
        "ext": ext,
        "relpath": version.relpath,
        "reldir": reldir,
        "source": version.source.strip("/").replace("/", "_"),
    }
    if "parent" in needed:
        values["parent"] = reldir.rpartition("/")[2] if reldir else version.root.name
    if needed & _TIME_FIELDS:
        t = _as_time(version.mtime_ns / 1e9, options.tz, "the file's modification time")
        values.update(
            yyyy=f"{t.year:04d}",
            mm=f"{t.month:02d}",
            dd=f"{t.day:02d}",
            HH=f"{t.hour:02d}",
            MM=f"{t.minute:02d}",
            SS=f"{t.second:02d}",
            mtime=t,
        )
    if "now" in needed:
        values["now"] = _as_time(time.time() if now is None else now, options.tz)
    if "counter" in needed:
        values["counter"] = COUNTER_UNKNOWN if counter is None else str(counter)
    if "sha256" in needed:
        values["sha256"] = _Digest(sha256 or content_sha256(version, content))
    if "label" in needed:
        if label is None:
            raise PermanentDeliveryError(
                "the name template uses {label}, but no learned rule gave this file a label"
            )
        values["label"] = label
    if options.regex is not None and needed - PLACEHOLDERS:
        match = options.regex.search(version.relpath)
        groups = match.groupdict() if match else {}
        for group in needed - PLACEHOLDERS:
            values[group] = groups.get(group) or ""
    return values


def content_sha256(version: FileVersion, content: Path | None = None) -> str:
    """The hex SHA-256 of the version's bytes (or of ``content``, a transform's output); read
    through ``sourcefile``, so never through a link out of the source. PermanentDeliveryError
    when it cannot be read."""
    from . import sourcefile

    try:
        fd, _ = sourcefile.open_input(version, content or version.path)
    except OSError as exc:
        raise PermanentDeliveryError(f"{{sha256}} cannot be worked out: {exc}") from None
    with os.fdopen(fd, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def render(
    template: str,
    version: FileVersion,
    name: str | None = None,
    options: NameOptions = NO_OPTIONS,
    **more: Any,
) -> PurePosixPath:
    """The relative path a file gets at its destination; ``name`` overrides the file name;
    ``options`` and ``more`` as for ``render_str``."""
    return PurePosixPath(render_str(template, version, name, options, **more))


def render_str(
    template: str,
    version: FileVersion,
    name: str | None = None,
    options: NameOptions = NO_OPTIONS,
    **more: Any,
) -> str:
    """``render`` as a plain "a/b/c" string (cheaper, for the per-file hot path). ``options``
    are the destination's; ``more`` (counter, content, now, label) as for ``placeholders``.

    Raises PermanentDeliveryError when the name would leave the destination.
    """
    if name is None or name == version.name:
        if template == "{relpath}":  # the defaults: the watcher's relpath is already clean
            return _checked(version.relpath)
        if template == "{name}":
            return _checked(version.name)
    values = placeholders(version, _fields(template), options, **more)
    if name is not None and name != version.name:
        dot = name.rfind(".")
        reldir = version.relpath.rpartition("/")[0]
        values.update(
            name=name,
            stem=name[:dot] if dot > 0 else name,
            ext=name[dot + 1 :] if dot > 0 else "",
            relpath=f"{reldir}/{name}" if reldir else name,
        )
    return _checked(template.format_map(values))


def _checked(rendered: str) -> str:
    """``rendered`` without empty or "." parts, each part shortened to NAME_MAX bytes; refused
    if it would leave the destination."""
    parts = rendered.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p not in ("", ".")]
    if rendered.startswith("/") or "\x00" in rendered or not parts or ".." in parts:
        raise PermanentDeliveryError(
            f"the name template gives {rendered!r}, outside the destination"
        )
    if len(rendered) > NAME_MAX // 4:  # cheap test first: a character is at most 4 bytes
        parts = [shorten(p) for p in parts]
    return "/".join(parts)


def with_suffix_number(path: PurePosixPath, n: int) -> PurePosixPath:
    """``a/report.pdf`` -> ``a/report-2.pdf`` (for on_conflict: rename and the after-actions'
    free names); the stem is shortened when the number would push the name past NAME_MAX."""
    stem, ext = split_ext(path.name)
    suffix = f"-{n}"
    if _size(stem) + len(suffix) + _size(ext) > NAME_MAX:
        stem, ext = _fit(stem, ext, len(suffix), path.name)
    return path.with_name(f"{stem}{suffix}{ext}")


def split_ext(name: str) -> tuple[str, str]:
    """``report.final.pdf`` -> (``report.final``, ``.pdf``); a leading dot is no extension."""
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 else (name, "")


def shorten(name: str, reserve: int = 0) -> str:
    """``name`` as it may be written, with ``reserve`` more bytes to come, in NAME_MAX bytes.

    A name that fits is returned unchanged. Otherwise its stem is cut at a character boundary
    (a UTF-8 character is never split) and ``~`` plus 8 hex digits of the sha256 of the whole
    name go where it was cut, before the extension, which is kept (when at most 32 bytes):
    names that differ only past the cut stay apart, and the same name is always shortened the
    same way (so a retry or a resumed delivery finds its earlier file).
    """
    if _size(name) + reserve <= NAME_MAX:
        return name
    stem, ext = split_ext(name)
    return "".join(_fit(stem, ext, reserve, name))


def _fit(stem: str, ext: str, reserve: int, whole: str) -> tuple[str, str]:
    """(cut stem + mark, extension) of NAME_MAX - ``reserve`` bytes at most (see shorten)."""
    if _size(ext) > _EXT_MAX:
        stem, ext = stem + ext, ""
    digest = hashlib.sha256(whole.encode("utf-8", "surrogateescape")).hexdigest()[:8]
    room = NAME_MAX - reserve - _size(ext) - _MARK_BYTES
    return f"{cut_utf8(stem, room)}~{digest}", ext


def cut_utf8(text: str, room: int) -> str:
    """The longest start of ``text`` that is at most ``room`` bytes in UTF-8, never ending
    inside a character (bytes of a name that is not UTF-8 count one each)."""
    raw = text.encode("utf-8", "surrogateescape")
    if len(raw) <= room:
        return text
    end = max(room, 0)
    while end > 0 and raw[end] & 0xC0 == 0x80:  # a continuation byte: back to the start
        end -= 1
    return raw[:end].decode("utf-8", "surrogateescape")


def _size(text: str) -> int:
    return len(text.encode("utf-8", "surrogateescape")) if not text.isascii() else len(text)
