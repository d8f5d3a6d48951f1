"""Glob patterns compiled once to regular expressions (``**`` spans folders, ``*`` does not).

A pattern without a ``/`` matches a file's name at any depth; one with a ``/`` matches the
whole path relative to the source, as in .gitignore.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass


def glob_to_regex(pattern: str) -> str:
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if pattern.startswith("**", i):
                i += 2
                if pattern.startswith("/", i):
                    i += 1
                    out.append("(?:.*/)?")
                else:
                    out.append(".*")
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = pattern.find("]", i + 2 if pattern.startswith(("[!", "[^"), i) else i + 1)
            if j < 0:
                out.append(re.escape(c))
            else:
                body = pattern[i + 1 : j]
                if body[:1] in ("!", "^"):
                    body = "^" + body[1:]
                out.append("[" + body.replace("\\", "\\\\") + "]")
                i = j
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


@dataclass(frozen=True, slots=True)
class GlobSet:
    """Several globs tested with two compiled regexes: one on names, one on paths."""

    on_name: re.Pattern[str] | None
    on_path: re.Pattern[str] | None

    @classmethod
    def compile(cls, patterns: Iterable[str]) -> GlobSet:
        names = [glob_to_regex(p) for p in patterns if "/" not in p]
        paths = [glob_to_regex(p.lstrip("/")) for p in patterns if "/" in p]
        return cls(
            re.compile("(?:" + "|".join(names) + r")\Z", re.DOTALL) if names else None,
            re.compile("(?:" + "|".join(paths) + r")\Z", re.DOTALL) if paths else None,
        )

    def __bool__(self) -> bool:
        return self.on_name is not None or self.on_path is not None

    def match(self, relpath: str) -> bool:
        if self.on_name is not None and self.on_name.match(relpath.rpartition("/")[2]):
            return True
        return self.on_path is not None and self.on_path.match(relpath) is not None
