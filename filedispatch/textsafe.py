"""Text that came from outside (file names, reasons, URLs) made safe to show on one line.

Everything a source's writer names reaches the log, the console and the CLI's tables. A newline
there forges a log record; an escape sequence drives the terminal; a bidi override reverses
what a reader sees (``invoice\\u202etxt.exe``). ``escape`` writes each such character as a
readable escape instead. It never raises and never changes other text.
"""

from __future__ import annotations

import re

__all__ = ["escape", "escape_lines"]

_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
#: C0 controls, DEL, C1 controls, the line and paragraph separators, bidi embeddings,
#: overrides, isolates and marks, and lone surrogates (undecodable bytes of a file name:
#: a strict UTF-8 log file would refuse them)
_UNSAFE = re.compile(
    "[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)


def _one(match: re.Match[str]) -> str:
    char = match.group()
    if char in _NAMED:
        return _NAMED[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape(text: str) -> str:
    """``text`` on one line: ``a\\nb`` for a newline, ``\\x1b``, ``\\u202e`` and so on.

    Backslashes are left alone, so escaping twice changes nothing (a record that passes two
    log handlers is escaped once).
    """
    return _UNSAFE.sub(_one, text)


def escape_lines(text: str) -> str:
    """Each line of ``text`` escaped, the line breaks kept (for text that is several lines by
    design, such as a traceback or a console answer built line by line)."""
    return "\n".join(escape(line) for line in text.split("\n"))
