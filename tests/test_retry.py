"""Retries against a real full disk (a small tmpfs), and stop_on_error."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ServiceProcess, journal_rows, run_cli, wait_until, write_config


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "small"
    folder.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(folder)], capture_output=True
        ).returncode
        != 0
    ):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def config(tmp_path: Path, dest: dict[str, Any], **source: Any) -> Path:
    return write_config(
        tmp_path / "c.yml",
        {
            "database": str(tmp_path / "j.db"),
            "sources": [{"path": str(tmp_path / "inbox"), "settle": 0, **source}],
            "rules": [{"name": "all", "glob": "*", "to": dest}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def test_full_disk_is_retried_until_space_is_freed(
    tmp_path: Path, small_disk: Path, service_factory: Any
) -> None:
    blocker = small_disk / "blocker"
    blocker.write_bytes(b"\0" * 200 * 1024)
    (tmp_path / "inbox").mkdir()
    cfg = config(
        tmp_path,
        {
            "url": str(small_disk / "out"),
            "retry": {"attempts": 50, "delay": 0.1, "backoff": 1.5, "max_delay": 0.5},
        },
    )
    svc: ServiceProcess = service_factory(cfg).start()
    payload = os.urandom(120 * 1024)
    (tmp_path / "inbox" / "big.bin").write_bytes(payload)
    wait_until(lambda: any(r["attempts"] >= 2 for r in journal_rows(tmp_path / "j.db")), 20)
    row = journal_rows(tmp_path / "j.db")[0]
    assert row["status"] == "PENDING" and "No space left" in row["reason"]
    blocker.unlink()
    wait_until(lambda: journal_rows(tmp_path / "j.db", "status='SUCCEEDED'"), 20)
    assert svc.stop() == 0
    assert (small_disk / "out" / "big.bin").read_bytes() == payload
    (row,) = journal_rows(tmp_path / "j.db")
    assert row["attempts"] >= 2
    assert not [p for p in (small_disk / "out").iterdir() if p.name.startswith(".")]


def test_retries_run_out_then_failed_with_the_count(tmp_path: Path, small_disk: Path) -> None:
    (small_disk / "blocker").write_bytes(b"\0" * 250 * 1024)
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "big.bin").write_bytes(os.urandom(100 * 1024))
    cfg = config(
        tmp_path, {"url": str(small_disk / "out"), "retry": {"attempts": 3, "delay": 0.05}}
    )
    t0 = time.monotonic()
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    (row,) = journal_rows(tmp_path / "j.db")
    assert row["status"] == "FAILED" and row["attempts"] == 3
    assert "gave up after 3 attempts" in row["reason"]
    assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("mode", ["copy", "move"])
def test_stop_on_error_stops_the_source(tmp_path: Path, mode: str) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    past = time.time() - 100
    for i, name in enumerate(["a-first.txt", "b-second.txt", "c-third.txt"]):
        (inbox / name).write_text(name)
        os.utime(inbox / name, (past + i, past + i))
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(tmp_path / "j.db"),
            "workers": 1,
            "sources": [{"path": str(inbox), "settle": 0, "stop_on_error": True}],
            "rules": [
                {
                    "name": "bad",
                    "glob": "b-*",
                    "to": {"url": "/proc/not-here", "retry": {"attempts": 1}},
                },
                {"name": "good", "glob": "*", "to": {"url": str(tmp_path / "out"), "mode": mode}},
            ],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a-first.txt"]
    statuses = {r["filename"]: r["status"] for r in journal_rows(tmp_path / "j.db")}
    assert statuses == {
        "a-first.txt": "SUCCEEDED",
        "b-second.txt": "FAILED",
        "c-third.txt": "PENDING",
    }
