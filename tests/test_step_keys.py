"""Step keys: a journal row belongs to its step and the transforms before it, not to a position.

Kept files (``after: keep``) are the test: a row that no longer counts sends the file again,
which shows as a second copy (``a-1.txt``) in the destination. Real files, the real CLI, a
real journal.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import pytest

from filedispatch.config import load_config, parse_config
from filedispatch.router import legacy_step_keys, step_keys

from .conftest import delivered, journal_rows, old, run_cli, write_config


def config(root: Path, to: list[Any]) -> Path:
    (root / "inbox").mkdir(exist_ok=True)
    return write_config(
        root / "c.yml",
        {
            "database": str(root / "j.db"),
            "sources": [{"path": str(root / "inbox"), "settle": 0, "rescan": 0}],
            "rules": [{"name": "all", "glob": "*", "to": to}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


def once(root: Path, to: list[Any]) -> None:
    done = run_cli("-c", config(root, to), "--once")
    assert done.returncode == 0, done.stderr


def steps(*to: Any) -> list[Any]:
    raw = {"sources": [{"path": "/in"}], "rules": [{"to": list(to)}]}
    return list(parse_config(raw).rules[0].to)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (["out1", "out2"], ["out2", "out1"]),  # reordered
        (["out2"], ["out1", "out2"]),  # a destination put in front
        (["out1", "out2"], ["out2"]),  # one removed
        (["out1", "out2"], ["out1", {"command": "true"}, "out2"]),  # a command in between
    ],
    ids=["reordered", "inserted-before", "removed", "command-between"],
)
def test_changing_other_destinations_sends_no_kept_file_again(
    tmp_path: Path, before: list[Any], after: list[Any]
) -> None:
    def to(names: list[Any]) -> list[Any]:
        return [str(tmp_path / n) if isinstance(n, str) else n for n in names]

    old(tmp_path / "inbox" / "a.txt", b"kept")
    once(tmp_path, to(before))
    once(tmp_path, to(after))
    for name in {n for n in before + after if isinstance(n, str)}:
        assert delivered(tmp_path / name) == {"a.txt": b"kept"}, f"{name}: sent twice"
    rows = journal_rows(tmp_path / "j.db")
    assert all(r["status"] == "SUCCEEDED" for r in rows), rows


def test_a_transform_put_in_front_sends_its_output_to_the_later_steps(tmp_path: Path) -> None:
    """A transform changes what the steps after it receive: those are new deliveries (the
    compressed file), as docs/integrity.md says."""
    out = tmp_path / "out"
    old(tmp_path / "inbox" / "a.txt", b"kept")
    once(tmp_path, [str(out)])
    once(tmp_path, [{"compress": "gzip"}, str(out)])
    assert set(delivered(out)) == {"a.txt", "a.txt.gz"}


def test_the_later_steps_of_a_transform_keep_their_rows_when_a_destination_goes_in_front(
    tmp_path: Path,
) -> None:
    out, first = tmp_path / "out", tmp_path / "first"
    old(tmp_path / "inbox" / "a.txt", b"kept")
    once(tmp_path, [{"compress": "gzip"}, str(out)])
    once(tmp_path, [str(first), {"compress": "gzip"}, str(out)])
    assert set(delivered(out)) == {"a.txt.gz"}
    assert delivered(first) == {"a.txt": b"kept"}


def test_a_repeated_step_has_a_key_of_its_own() -> None:
    keys = step_keys(steps({"command": "true"}, {"command": "true"}, "/out"))
    assert len(set(keys)) == 3


def test_keys_name_only_the_transforms_before_a_step() -> None:
    alone = step_keys(steps("/b"))
    behind = step_keys(steps("/a", "/b"))
    assert behind[1] == alone[0]
    transformed = step_keys(steps({"compress": "gzip"}, "/b"))
    assert transformed[1] != alone[0]
    # a step behind transforms only keeps the key it had before this change
    assert transformed == legacy_step_keys(steps({"compress": "gzip"}, "/b"))


def test_a_journal_with_the_old_step_keys_is_upgraded_once_and_sends_nothing_again(
    tmp_path: Path,
) -> None:
    """A journal of the release before (schema 4, each key naming every earlier step): the
    first start re-keys its rows, so the kept file is not sent again to out2, and records the
    upgrade done; a later start does not redo it."""
    db = tmp_path / "j.db"
    to = [str(tmp_path / "out1"), str(tmp_path / "out2")]
    old(tmp_path / "inbox" / "a.txt", b"kept")
    once(tmp_path, to)
    chain = load_config(config(tmp_path, to)).rules[0].to
    new, legacy = step_keys(chain), legacy_step_keys(chain)
    assert new[1] != legacy[1]
    conn = sqlite3.connect(db)
    with conn:  # as the release before left it
        for n, o in zip(new, legacy, strict=True):
            conn.execute("UPDATE dispatches SET step_key=? WHERE step_key=?", (o, n))
        conn.execute("DROP TABLE upgrades")
        conn.execute("DROP INDEX IF EXISTS dispatches_sha256")  # schema 4 had neither
        conn.execute("ALTER TABLE dispatches DROP COLUMN node")  # schema 6's
        conn.execute("ALTER TABLE dispatches DROP COLUMN label")  # and the label column
        triggers = conn.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")
        for (trigger,) in triggers.fetchall():  # schema 9's and 12's rollup and kept keys
            conn.execute(f"DROP TRIGGER {trigger}")
        # and schema 14's to 16's, the identity token, the id mark and the earlier tokens
        tables = (
            *("stats_days", "stats_months", "kept", "uploads"),
            *("journal_identity", "id_mark", "journal_tokens"),
        )
        for table in tables:
            conn.execute(f"DROP TABLE {table}")
        conn.execute("ALTER TABLE dispatches DROP COLUMN btime_ns")  # and the birth time
        conn.execute("PRAGMA user_version = 4")
    conn.close()

    once(tmp_path, to)
    for out in to:
        assert delivered(Path(out)) == {"a.txt": b"kept"}, f"{out}: sent twice"
    assert sorted(r["step_key"] for r in journal_rows(db)) == sorted(new)
    conn = sqlite3.connect(db)
    ((done,),) = conn.execute("SELECT done FROM upgrades WHERE name='step-keys'").fetchall()
    conn.close()
    assert done > 0

    once(tmp_path, to)  # done once: nothing changes
    assert len(journal_rows(db)) == 2
    for out in to:
        assert delivered(Path(out)) == {"a.txt": b"kept"}


def test_a_new_journal_has_no_upgrade_to_do(tmp_path: Path) -> None:
    old(tmp_path / "inbox" / "a.txt", b"kept")
    once(tmp_path, [str(tmp_path / "out")])
    conn = sqlite3.connect(tmp_path / "j.db")
    rows = conn.execute("SELECT name, done FROM upgrades").fetchall()
    conn.close()
    assert rows == [("step-keys", 0)]
