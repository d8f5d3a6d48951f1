"""Helpers for the operations tests: configs, the daemon through the CLI, a telnet client."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import telnetlib3

from .conftest import delivered, free_port, write_config
from .conftest import old as old_file

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROMPT = "monitor >>>"


def ops_config(
    root: Path,
    *,
    rules: list[dict[str, Any]] | None = None,
    monitor: dict[str, Any] | None = None,
    name: str = "config.yml",
    **top: Any,
) -> Path:
    """inbox/ -> outbox/ by default; the console off unless ``monitor`` is given."""
    (root / "inbox").mkdir(exist_ok=True)
    data: dict[str, Any] = {
        "database": str(root / "journal.db"),
        "sources": [{"path": str(root / "inbox"), "name": "inbox", "settle": 0.2}],
        "rules": rules or [{"name": "all", "glob": "*", "to": str(root / "outbox")}],
        "api": {"enabled": False},
        "monitor": monitor or {"enabled": False},
        **top,
    }
    return write_config(root / name, data)


def read_pid(pidfile: Path) -> int:
    return int(pidfile.read_text().strip())


def console(port: int, *commands: str, timeout: float = 15) -> list[str]:
    """Run commands in one telnet session (telnetlib3's client); each command's answer."""
    return asyncio.run(_session(port, commands, timeout))


async def _session(port: int, commands: tuple[str, ...], timeout: float) -> list[str]:
    reader, writer = await telnetlib3.open_connection(
        "127.0.0.1", port, connect_minwait=0.05, connect_maxwait=0.5
    )
    buf = ""

    async def until(done: Any) -> Any:
        nonlocal buf
        deadline = time.monotonic() + timeout
        while (found := done(buf)) is None:
            chunk = await asyncio.wait_for(reader.read(4096), deadline - time.monotonic())
            if not chunk:
                raise AssertionError(f"the console closed the connection: {buf!r}")
            buf += chunk
        return found

    def answer_to(command: str) -> Any:
        def find(b: str) -> str | None:
            text = ANSI.sub("", b).replace("\r", "")
            echo = text.find(command + "\n")  # the line as echoed back
            if echo < 0:
                return None
            rest = text[echo + len(command) + 1 :]
            end = rest.find(PROMPT)  # the answer ends at the next prompt
            return rest[:end].strip() if end >= 0 else None

        return find

    answers = []
    try:
        await until(lambda b: True if PROMPT in b else None)
        for command in commands:
            buf = ""
            writer.write(command + "\r")  # CR alone: a CR LF would repeat the command
            answers.append(await until(answer_to(command)))
        writer.write("exit\r")
    finally:
        writer.close()
    return answers


__all__ = ["console", "delivered", "free_port", "old_file", "ops_config"]
