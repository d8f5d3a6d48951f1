"""Example Python steps for docs/programmable.md: a plain function, an async one, a class.

Put this folder on PYTHONPATH (or copy the file next to your config) and name them in a rule,
e.g. ``python: hooks:log_arrival``.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from pathlib import Path
from typing import Any


def log_arrival(path: str, logfile: str, context: Any = None) -> None:
    """Append one line per file to ``logfile``; shows the context a callable may ask for."""
    rule = context.rule if context is not None else "-"
    with open(logfile, "a", encoding="utf-8") as fh:
        fh.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {rule} {path}\n")


async def sha256(path: str) -> str:
    """An async step: its return value (the digest) is recorded in the journal's detail."""

    def digest() -> str:
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        return h.hexdigest()

    return await asyncio.to_thread(digest)  # keep the service's loop free while hashing


class Stamp:
    """A transform class: instantiated once; each call writes a stamped copy and returns it.

    Later steps of the chain deliver the returned file instead of the original; it is written
    in ``context.workdir``, which filedispatch removes when the chain ends.
    """

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, path: str, header: str, *, context: Any) -> Path:
        self.count += 1
        source = Path(path)
        out: Path = context.workdir / f"{source.stem}.stamped{source.suffix}"  # it exists
        out.write_bytes(header.encode() + b"\n" + source.read_bytes())
        return out
