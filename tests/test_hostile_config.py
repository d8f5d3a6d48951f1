"""Issue 11.4 and 11.6: configurations that make no sense are refused at load, cleanly.

Each case runs the real CLI on a config written to disk (tests/hostile_cases.py): exit 2, one
line on stderr naming the file and the field, no traceback, no password echoed.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from filedispatch import retry
from filedispatch.config import RetryPolicy, load_config

from .conftest import old, run_cli, write_config
from .hostile_cases import CASES, Case, prepare, refused_cleanly, run


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_refused_at_load_with_one_line(case: Case, tmp_path: Path) -> None:
    result = run(case, tmp_path)
    assert refused_cleanly(case, tmp_path, result) == "", result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "state").exists()


def test_the_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    bomb = next(c for c in CASES if c.name == "alias-bomb")
    assert len(bomb.yaml.encode()) < 600
    started = time.monotonic()
    result = run(bomb, tmp_path)
    assert result.returncode == 2
    assert time.monotonic() - started < 30  # it ran for over 60 s before (a generous bound)


def test_aliases_and_merge_keys_within_the_budget_still_work(tmp_path: Path) -> None:
    prepare(tmp_path)
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        "sources: [{path: ./in}]\n"
        "rules:\n"
        "  - to:\n"
        "      - {url: ./a, retry: &patient {attempts: 3, delay: 2}}\n"
        "      - {url: ./c, retry: *patient}\n"
        "      - {<<: {url: ./b, on_conflict: skip}, on_conflict: overwrite}\n",
        encoding="utf-8",
    )
    config = load_config(cfg)
    steps = config.rules[0].to
    assert steps[1].retry.attempts == 3 and steps[1].retry.delay == 2
    assert getattr(steps[2], "on_conflict", None) == "overwrite"  # a merge key may be overridden


def test_the_longest_waits_are_finite() -> None:
    policy = RetryPolicy(attempts=1000, delay=604800, backoff=100, max_delay=604800)
    assert (
        retry.backoff_s(policy, 1000) == 604800
    )  # 100 ** 999 overflows a float: the cap still applies


def test_a_destination_through_a_link_is_refused_before_a_single_copy(tmp_path: Path) -> None:
    """The loop the issue saw (126 copies of one file in 12 s) cannot start."""
    prepare(tmp_path)
    old(tmp_path / "in" / "a.txt", b"a")
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(tmp_path / "state" / "j.db"),
            "sources": [{"path": "./in", "recursive": True, "settle": 0}],
            "rules": [{"to": "./link/../link/sub"}],
        },
    )
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 2, result.stderr
    assert "rules[0].to[0].url" in result.stderr and "loop" in result.stderr
    assert sorted(p.name for p in (tmp_path / "in").iterdir()) == ["a.txt"]
