"""Helpers for the operations tests: configs, the daemon through the CLI, a telnet client."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from pathlib import Path
from typing import Any

import telnetlib3

from .conftest import arrived, delivered, free_port, write_config
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


def console(port: int, *commands: str, timeout: float = 15, eol: str = "\r") -> list[str]:
    """Run commands in one telnet session (telnetlib3's client); each command's answer.
    ``eol`` ends each line as typed (telnet's own is CR LF)."""
    return asyncio.run(_session(port, commands, timeout, eol))


async def _session(port: int, commands: tuple[str, ...], timeout: float, eol: str) -> list[str]:
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
            writer.write(command + eol)
            answers.append(await until(answer_to(command)))
        writer.write("exit" + eol)
    finally:
        writer.close()
    return answers


def line_console(port: int, *commands: str, timeout: float = 15) -> tuple[str, list[str]]:
    """Run commands the way ``nc`` does: plain lines ending in LF, no telnet at all.
    Returns the text before the first prompt and each command's answer; the session ends
    with ``exit`` and the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        buf = b""

        def until_prompt() -> str:
            nonlocal buf
            deadline = time.monotonic() + timeout
            while PROMPT.encode() not in buf:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                chunk = s.recv(4096)
                if not chunk:
                    raise AssertionError(f"the console closed the connection: {buf!r}")
                buf += chunk
            text, _, buf = buf.partition(PROMPT.encode())
            return text.decode("utf-8", "replace")

        intro = until_prompt()
        answers = []
        for command in commands:
            s.sendall(command.encode() + b"\n")
            answers.append(until_prompt().strip())
        s.sendall(b"exit\n")
        s.settimeout(timeout)
        while s.recv(4096):  # the server ends the session
            pass
    return intro, answers


__all__ = ["arrived", "console", "delivered", "free_port", "line_console", "old_file", "ops_config"]
