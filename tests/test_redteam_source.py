"""Red-team findings on source files, tried on real files with the real CLI (``--once``).

A command step is handed the path of the file planned. With ``follow_symlinks: true`` that
path may be a link inside the source, planned as such: the check after the command must accept
it (it leads, inside the source, to the very file planned), and must still refuse a link that
leads elsewhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .conftest import journal_rows, run_cli, write_config


def _config(ws: dict[str, Path], command: str) -> Path:
    data: dict[str, Any] = {
        "database": str(ws["db"]),
        "sources": [
            {"path": str(ws["inbox"]), "settle": 0, "recursive": True, "follow_symlinks": True}
        ],
        "rules": [{"name": "links", "glob": "*.txt", "to": [{"command": command}]}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    return write_config(ws["root"] / "c.yml", data)


def _statuses(db: Path, relpath: str) -> list[tuple[str, str | None]]:
    return [(r["status"], r["reason"]) for r in journal_rows(db, "relpath = ?", (relpath,))]


def test_a_command_on_a_followed_link_inside_the_source_succeeds(
    workspace: dict[str, Path],
) -> None:
    inbox, got = workspace["inbox"], workspace["root"] / "got"
    (inbox / "real").mkdir()
    (inbox / "real" / "t.dat").write_bytes(b"the target\n")
    (inbox / "l.txt").symlink_to("real/t.dat")
    cfg = _config(workspace, f'cat /dev/fd/$FILEDISPATCH_FD > "{got}"')

    proc = run_cli("-c", cfg, "--once")

    assert _statuses(workspace["db"], "l.txt") == [("SUCCEEDED", None)], proc.stderr
    assert got.read_bytes() == b"the target\n"
    assert proc.returncode == 0, proc.stderr


def test_a_command_that_leaves_a_link_to_another_file_fails(
    workspace: dict[str, Path],
) -> None:
    inbox = workspace["inbox"]
    (inbox / "real").mkdir()
    (inbox / "real" / "t.dat").write_bytes(b"the target\n")
    (inbox / "real" / "other.dat").write_bytes(b"another one\n")
    (inbox / "l.txt").symlink_to("real/t.dat")
    outside = workspace["root"] / "secret"
    outside.write_bytes(b"outside\n")
    # the link is pointed elsewhere while the command runs (here: by the command itself)
    swap = f'ln -s real/other.dat "{inbox}/.l" && mv -T "{inbox}/.l" "{inbox}/l.txt"'
    cfg = _config(workspace, swap)

    proc = run_cli("-c", cfg, "--once")

    rows = _statuses(workspace["db"], "l.txt")
    assert rows and rows[0][0] == "FAILED", (rows, proc.stderr)
    assert "while the command ran" in (rows[0][1] or "")
