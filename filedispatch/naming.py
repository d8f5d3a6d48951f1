"""Naming templates: turn ``{yyyy}/{mm}/{name}`` and a file version into a safe relative path.

Pure functions only; a rendered name that would leave the destination root is refused.
"""

from __future__ import annotations

import functools
import string
import time
from pathlib import PurePosixPath

from .errors import PermanentDeliveryError
from .models import FileVersion

PLACEHOLDERS = frozenset(
    {"name", "stem", "ext", "relpath", "reldir", "source", "yyyy", "mm", "dd", "HH", "MM", "SS"}
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
        t = time.localtime(version.mtime_ns / 1e9)
        values.update(
            yyyy=f"{t.tm_year:04d}",
            mm=f"{t.tm_mon:02d}",
            dd=f"{t.tm_mday:02d}",
            HH=f"{t.tm_hour:02d}",
            MM=f"{t.tm_min:02d}",
            SS=f"{t.tm_sec:02d}",
        )
    return values


def render(template: str, version: FileVersion, name: str | None = None) -> PurePosixPath:
    """The relative path a file gets at its destination; ``name`` overrides the file name."""
    return PurePosixPath(render_str(template, version, name))


def render_str(template: str, version: FileVersion, name: str | None = None) -> str:
    """``render`` as a plain "a/b/c" string (cheaper, for the per-file hot path)."""
    if name is None or name == version.name:
        if template == "{relpath}":  # the defaults: the watcher's relpath is already clean
            return _checked(version.relpath)
        if template == "{name}":
            return _checked(version.name)
    values = placeholders(version, _fields(template))
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
    """``rendered`` without empty or "." parts; refused if it would leave the destination."""
    parts = rendered.split("/")
    if "" in parts or "." in parts:
        parts = [p for p in parts if p not in ("", ".")]
    if rendered.startswith("/") or "\x00" in rendered or not parts or ".." in parts:
        raise PermanentDeliveryError(
            f"the name template gives {rendered!r}, outside the destination"
        )
    return "/".join(parts)


def with_suffix_number(path: PurePosixPath, n: int) -> PurePosixPath:
    """``a/report.pdf`` -> ``a/report-2.pdf`` (for on_conflict: rename)."""
    name = path.name
    dot = name.rfind(".")
    stem, ext = (name[:dot], name[dot:]) if dot > 0 else (name, "")
    return path.with_name(f"{stem}-{n}{ext}")
