"""A big backlog at start: the scan's listing is held packed and read back in pages, and
every file still goes exactly once, oldest first (docs/integrity.md)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from filedispatch.config import load_config
from filedispatch.watcher import listing
from filedispatch.watcher.entries import Entries

from .conftest import journal_rows, run_cli, write_config

#: more files than one packed run holds, so the runs are merged
BACKLOG = listing.RUN + 1_000


def test_a_backlog_of_several_runs_goes_exactly_once_and_oldest_first(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    rng = random.Random(16)
    ages = list(range(BACKLOG))
    rng.shuffle(ages)  # the walk's order says nothing of the files' ages
    base = 1_700_000_000 * 10**9
    for i, age in enumerate(ages):
        path = ws["inbox"] / f"f{i:05d}.dat"
        path.write_bytes(b"%d" % i)
        os.utime(path, ns=(base - age * 10**6, base - age * 10**6))  # 1 ms apart
    cfg = write_config(
        ws["root"] / "c.yml",
        {
            "database": str(ws["db"]),
            "sources": [{"path": str(ws["inbox"])}],
            "rules": [
                {"name": "all", "glob": "*", "to": {"url": str(ws["outbox"]), "mode": "move"}}
            ],
        },
    )
    done = run_cli("-c", cfg, "--once", timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"processed: {BACKLOG}" in done.stdout, done.stdout
    assert os.listdir(ws["inbox"]) == []
    names = sorted(os.listdir(ws["outbox"]))
    assert names == [f"f{i:05d}.dat" for i in range(BACKLOG)]
    assert all((ws["outbox"] / f"f{i:05d}.dat").read_bytes() == b"%d" % i for i in (0, BACKLOG - 1))
    rows = journal_rows(ws["db"])  # in the order they were planned
    assert [r["status"] for r in rows] == ["SUCCEEDED"] * BACKLOG
    planned = [int(r["relpath"][1:6]) for r in rows]
    oldest_first = sorted(range(BACKLOG), key=lambda i: -ages[i])
    assert planned == oldest_first


def test_the_packed_listing_gives_back_the_walk_sorted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Odd names (not UTF-8, a newline, sub-folders), equal times and a time past 64 bits
    come back as the walk gave them, ordered by time then name, across many runs."""
    monkeypatch.setattr(listing, "RUN", 3)
    inbox = tmp_path / "inbox"
    (inbox / "sub" / "deeper").mkdir(parents=True)
    names = [b"a.txt", b"line\nbreak", b"caf\xe9.bin", b"sub/x", b"sub/deeper/y", b"z", b"\xff"]
    names += [b"same%d" % i for i in range(7)] + [b"year2446"]
    for i, name in enumerate(names):
        path = os.path.join(os.fsencode(inbox), name)
        with open(path, "wb") as f:
            f.write(b"x" * i)
        t = 10**18 if name.startswith(b"same") else 10**18 - i * 1000
        if name == b"year2446":  # past 2**63 ns: ext4 keeps it, an int64 does not
            t = 15_000_000_000 * 10**9
        os.utime(path, ns=(t, t))
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "sources": [{"path": str(inbox), "recursive": True}],
            "rules": [{"name": "a", "glob": "*", "to": str(tmp_path / "out")}],
        },
    )
    entries = Entries(load_config(cfg).sources[0])
    walked = list(entries.walk())
    packed = list(listing.Listing(entries.walk()))
    assert len(packed) == len(names)
    assert packed == sorted(
        (st.st_mtime_ns, rel, st.st_size, st.st_ino, st.st_ctime_ns, st.st_dev)
        for rel, st in walked
    )
