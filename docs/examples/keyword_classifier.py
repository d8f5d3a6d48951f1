"""An example ``classify:`` hook: route text files by the words they contain.

Use it from a rule (with docs/examples on PYTHONPATH, or copy this file next to your config)::

    rules:
      - name: by-keyword
        mime: text/*
        classify: keyword_classifier:classify
        to: /srv/out/unsorted        # used only if the hook answers "by-keyword"
      - name: unsorted               # text no keyword matched, and everything else
        to: /srv/out/unsorted
      - name: invoices               # reached only through the hook (the rule above takes
        to: /srv/out/invoices        # every file first)
      - name: reports
        to: /srv/out/reports

The hook is called with the file's path and its detected MIME type, in a worker thread, for
every file routing considers; it returns the name of the rule the file belongs to, or None.
"""

from __future__ import annotations

import re
from pathlib import Path

#: rule name -> words that send a file there; the first rule with a match wins
KEYWORDS: dict[str, tuple[str, ...]] = {
    "invoices": ("invoice", "receipt", "amount due", "bill to"),
    "reports": ("report", "summary", "quarterly"),
}
READ_BYTES = 64 * 1024  #: only the start of a file is read: enough to classify, cheap to do

_PATTERNS = {
    rule: re.compile(r"\b(?:" + "|".join(map(re.escape, words)) + r")\b", re.IGNORECASE)
    for rule, words in KEYWORDS.items()
}


def classify(path: Path, mime: str | None) -> str | None:
    """The rule for a text file whose start contains one of its keywords; None otherwise."""
    if mime is None or not mime.startswith("text/"):
        return None
    try:
        with open(path, "rb") as fh:
            text = fh.read(READ_BYTES).decode("utf-8", "replace")
    except OSError:
        return None
    for rule, pattern in _PATTERNS.items():
        if pattern.search(text):
            return rule
    return None
