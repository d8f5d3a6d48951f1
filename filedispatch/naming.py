"""Naming templates: turn ``{yyyy}/{mm}/{name}`` and a file version into a safe relative path.

Pure functions only; a rendered name that would leave the destination root is refused, and a
name part longer than a filesystem allows is shortened here, by one rule (``shorten``).
"""

from __future__ import annotations

import functools
import hashlib
import string
import time
from pathlib import PurePosixPath

from .errors import PermanentDeliveryError
from .models import FileVersion

PLACEHOLDERS = frozenset(
    {"name", "stem", "ext", "relpath", "reldir", "source", "yyyy", "mm", "dd", "HH", "MM", "SS"}
    | {"label"}  # a learned rule's label (see docs/learned-routing.md)
)


def check_template(template: str) -> str:
    """Validate a template at config load; returns it unchanged or raises ValueError."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise ValueError(f"bad template {template!r}: {exc}") from None
    unknown = sorted({f for f in fields if f not in PLACEHOLDERS})
    if unknown:
        raise ValueError(
            f"unknown placeholder {{{unknown[0]}}}; known: "
            + ", ".join("{" + p + "}" for p in sorted(PLACEHOLDERS))
        )
    return template


@functools.lru_cache(maxsize=256)
def _fields(template: str) -> frozenset[str]:
    return frozenset(f for _, f, _, _ in string.Formatter().parse(template) if f)


_TIME_FIELDS = frozenset({"yyyy", "mm", "dd", "HH", "MM", "SS"})

#: bytes in one name (path component) on Linux filesystems: ext4, xfs, btrfs, tmpfs
NAME_MAX = 255
#: an extension longer than this (dot included) is not kept apart when a name is shortened
_EXT_MAX = 32
#: "~" and 8 hex digits of the full name's sha256, put where a shortened name was cut
_MARK_BYTES = 9


def placeholders(version: FileVersion, needed: frozenset[str] = PLACEHOLDERS) -> dict[str, str]:
    """The placeholder values for a file (only the ``needed`` ones are worked out)."""
    name = version.name
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot + 1 :]) if dot > 0 else (name, "")
    values = {
        "name": name,
        "stem": stem,
        "ext": ext,
        "relpath": version.relpath,
        "reldir": version.relpath.rpartition("/")[0],
        "source": version.source.strip("/").replace("/", "_"),
    }
    if needed & _TIME_FIELDS:
        try:
            t = time.localtime(version.mtime_ns / 1e9)
        except (OverflowError, OSError, ValueError):
            # tmpfs keeps mtimes up to 2**63 s, beyond what the C library can turn into a date
            raise PermanentDeliveryError(
                f"the file's modification time ({version.mtime_ns} ns since 1970) has no "
                "calendar date on this system, so the name template's date fields cannot be "
                "filled"
            ) from None
        values.update(
            yyyy=f"{t.tm_year:04d}",
            mm=f"{t.tm_mon:02d}",
            dd=f"{t.tm_mday:02d}",
            HH=f"{t.tm_hour:02d}",
            MM=f"{t.tm_min:02d}",
            SS=f"{t.tm_sec:02d}",
        )
    return values


def render(
    template: str, version: FileVersion, name: str | None = None, label: str | None = None
) -> PurePosixPath:
    """The relative path a file gets at its destination; ``name`` overrides the file name,
    ``label`` is a learned rule's label (``{label}``; PermanentDeliveryError when needed and
    None)."""
    return PurePosixPath(render_str(template, version, name, label))


def render_str(
    template: str, version: FileVersion, name: str | None = None, label: str | None = None
) -> str:
    """``render`` as a plain "a/b/c" string (cheaper, for the per-file hot path)."""
    if name is None or name == version.name:
        if template == "{relpath}":  # the defaults: the watcher's relpath is already clean
            return _checked(version.relpath)
        if template == "{name}":
            return _checked(version.name)
    fields = _fields(template)
    values = placeholders(version, fields)
    if "label" in fields:
        if label is None:
            raise PermanentDeliveryError(
                "the name template uses {label}, but no learned rule gave this file a label"
            )
        values["label"] = label
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
