"""Files the service passes over leave a trace: a DEBUG line each, and counts per reason in the
``--once`` summary and in ``/api/v1/status`` (the real CLI and the real service)."""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .conftest import ServiceProcess, free_port, old, run_cli, wait_until, write_config

EXPECTED = {
    "hidden": 2,  # .hidden and the hidden folder .git (one entry, not one per file in it)
    "ignored": 1,  # upload.part
    "unmatched": 1,  # notes.bin: no rule takes it
    "subfolder": 1,  # sub/ (the source is not recursive)
    "not_regular": 1,  # a FIFO
    "link": 1,  # a link (follow_symlinks: false)
}


def hostile_inbox(inbox: Path) -> None:
    """One file to send and one entry per reason to pass over."""
    old(inbox / "report.txt", b"sent")
    old(inbox / ".hidden", b"hidden")
    old(inbox / ".git" / "config", b"a hidden folder")
    old(inbox / "upload.part", b"half")
    old(inbox / "notes.bin", b"no rule")
    old(inbox / "sub" / "deep.txt", b"below a folder")
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "link.txt").symlink_to(inbox / "report.txt")


def config(root: Path, **top: Any) -> Path:
    (root / "inbox").mkdir(exist_ok=True)
    return write_config(
        root / "config.yml",
        {
            "database": str(root / "journal.db"),
            "sources": [{"path": str(root / "inbox"), "name": "inbox", "settle": 0}],
            "rules": [{"name": "text", "extensions": ["txt"], "to": str(root / "outbox")}],
            "monitor": {"enabled": False},
            **top,
        },
    )


def test_once_counts_each_reason_and_logs_each_entry(tmp_path: Path) -> None:
    cfg = config(tmp_path, api={"enabled": False})
    hostile_inbox(tmp_path / "inbox")
    old(tmp_path / "inbox" / ".odd\nname", b"a newline in a hidden name")
    result = run_cli("-c", cfg, "--once", "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "outbox" / "report.txt").read_bytes() == b"sent"
    assert sorted(p.name for p in (tmp_path / "outbox").iterdir()) == ["report.txt"]
    summary = result.stdout.splitlines()
    assert summary[0] == "processed: 1  already done: 0  failed: 0", result.stdout
    counts = dict(EXPECTED, hidden=3)
    assert summary[1] == "skipped: " + "  ".join(f"{k}: {v}" for k, v in counts.items())
    log = result.stderr
    for line in (
        "skipping .hidden in inbox: a hidden name",
        "skipping .git in inbox: a hidden name",
        "skipping upload.part in inbox: an ignore pattern matches it",
        "skipping notes.bin in inbox: no rule takes it",
        "skipping sub in inbox: a folder, and the source is not recursive",
        "skipping pipe.txt in inbox: not a regular file",
        "skipping link.txt in inbox: a symbolic link not followed",
        "skipping .odd\\nname in inbox: a hidden name",  # escaped: it cannot forge a record
    ):
        assert line in log, (line, log)
    assert "\nname in inbox" not in log


def test_without_debug_the_skipped_entries_are_only_counted(tmp_path: Path) -> None:
    cfg = config(tmp_path, api={"enabled": False})
    hostile_inbox(tmp_path / "inbox")
    result = run_cli("-c", cfg, "--once", "--log-level", "INFO")
    assert result.returncode == 0, result.stderr
    assert "skipping" not in result.stderr
    assert "skipped: hidden: 2  ignored: 1  unmatched: 1" in result.stdout


def status(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=10) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


def test_status_gives_each_source_its_skipped_counts(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    cfg = config(tmp_path, api={"host": "127.0.0.1", "port": port})
    hostile_inbox(tmp_path / "inbox")
    service_factory(cfg).start()
    wait_until(lambda: (tmp_path / "outbox" / "report.txt").exists())
    source = wait_until(
        lambda: next(s for s in status(port)["sources"] if s["name"] == "inbox")["skipped"]
    )
    assert source == EXPECTED
