"""The delivery log (issue 16, goal 1): each file at DEBUG, one INFO line per destination and
batch, and a file delivered alone keeps its own INFO line. Run through the real CLI."""

from __future__ import annotations

import re
from pathlib import Path

from .conftest import delivered, old, run_cli, write_config

BATCH = re.compile(r"INFO    filedispatch\.dispatcher: (\d+) files -> (\S+): (.*)$")
SINGLE = re.compile(r"INFO    filedispatch\.dispatcher: (\S+) -> (\S+)$")


def _config(root: Path) -> Path:
    return write_config(
        root / "config.yml",
        {
            "database": str(root / "journal.db"),
            "sources": [{"path": str(root / "inbox"), "settle": 0}],
            "rules": [{"name": "all", "glob": "*", "to": {"url": str(root / "out")}}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def test_a_burst_is_summed_up_per_batch_at_info_and_listed_file_by_file_at_debug(
    tmp_path: Path,
) -> None:
    names = {f"f{i:03d}.txt" for i in range(300)}
    for name in names:
        old(tmp_path / "inbox" / name, name.encode())
    config = _config(tmp_path)

    info = run_cli("-c", config, "--once")
    assert info.returncode == 0, info.stderr
    assert delivered(tmp_path / "out") == {n: n.encode() for n in names}
    counted = 0
    lines = info.stderr.splitlines()
    for line in lines:
        if m := BATCH.search(line):
            counted += int(m.group(1))
            assert m.group(2) == str(tmp_path / "out")
            listed = m.group(3)
            shown = listed.split(" and ")[0].split(", ")
            assert len(shown) == 3 and all(s in names for s in shown), line
            more = int(m.group(1)) - 3
            assert listed.endswith(f" and {more} more") if more else " and " not in listed
        elif m := SINGLE.search(line):
            counted += 1
            assert m.group(1) in names and m.group(2) == str(tmp_path / "out" / m.group(1))
    assert counted == len(names), info.stderr  # every delivery is in some INFO line, once
    assert any(BATCH.search(line) for line in lines), "a burst of 300 had no batch line"
    assert len([ln for ln in lines if " -> " in ln]) < len(names) / 2

    # at DEBUG every file has its own line
    for name in names:
        old(tmp_path / "inbox" / f"second-{name}", b"2")
    debug = run_cli("-c", config, "--once", "--log-level", "DEBUG")
    assert debug.returncode == 0, debug.stderr
    for name in names:
        assert f"DEBUG   filedispatch.dispatcher: second-{name} -> {tmp_path / 'out'}" in (
            debug.stderr
        )


def test_a_file_delivered_alone_keeps_its_own_info_line(tmp_path: Path) -> None:
    old(tmp_path / "inbox" / "report.csv", b"a,b\n")
    result = run_cli("-c", _config(tmp_path), "--once")
    assert result.returncode == 0, result.stderr
    expected = f"INFO    filedispatch.dispatcher: report.csv -> {tmp_path / 'out' / 'report.csv'}"
    assert expected in result.stderr
    assert " files -> " not in result.stderr
