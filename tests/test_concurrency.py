"""The worker pool and a destination's ``concurrency`` limit, through the real service."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .conftest import ROOT, cli_env, run_cli, write_config


def most_at_once(log: Path) -> int:
    running = peak = 0
    for line in log.read_text().splitlines():
        running += 1 if json.loads(line)["event"] == "start" else -1
        peak = max(peak, running)
    return peak


def run(tmp_path: Path, workers: int, concurrency: int | None) -> int:
    inbox, log = tmp_path / "inbox", tmp_path / "calls.log"
    inbox.mkdir()
    past = time.time() - 60
    for i in range(12):
        (inbox / f"f{i:02d}.txt").write_text("x")
        os.utime(inbox / f"f{i:02d}.txt", (past, past))
    step: dict[str, object] = {
        "python": "tests.helpers_programmable:overlap",
        "kwargs": {"log": str(log)},
    }
    if concurrency is not None:
        step["concurrency"] = concurrency
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(tmp_path / "j.db"),
            "workers": workers,
            "sources": [{"path": str(inbox), "settle": 0}],
            "rules": [{"name": "slow", "glob": "*", "to": [step]}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    env = cli_env(PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = run_cli("-c", cfg, "--once", env=env)
    assert result.returncode == 0, result.stderr
    assert sum(json.loads(x)["event"] == "end" for x in log.read_text().splitlines()) == 12
    return most_at_once(log)


def test_workers_bound_the_deliveries_in_flight(tmp_path: Path) -> None:
    assert run(tmp_path, workers=3, concurrency=None) == 3


def test_a_destination_concurrency_limit_holds_below_the_pool(tmp_path: Path) -> None:
    assert run(tmp_path, workers=8, concurrency=2) == 2
