"""A local destination inside a hostile inbox is never written through a link (lead, session 10).

A non-recursive source ``in`` may deliver into ``in/sorted``: the watcher does not see that
folder. Whoever may write the inbox (an SFTP user, a browser download) may replace
``in/sorted``, or a subfolder a ``name:`` template makes there, with a symbolic link to a
folder of their choosing (on a host /etc/cron.d or a home's .ssh); the next delivery, whose
bytes they chose, must not be written where the link points. It is refused (permanent, the
reason names the link), the file stays in its source, the log says why. Swapped while the
service runs (after a first delivery made the folder) and while it is stopped; a copy by the
batch lane, a copy by a worker, a move by one rename. Real files, the real CLI.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from types import SimpleNamespace
from typing import Any

import pytest

from filedispatch import sourcefile
from filedispatch.errors import PermanentDeliveryError
from filedispatch.processors.local import Inside

from .conftest import ServiceProcess, journal_rows, old, run_cli, wait_until, write_config

#: what the log and the row's reason say of a destination folder refused for a link
_REFUSED = "symbolic link"

_EVIL = b"* * * * * root id > /tmp/owned\n"


def _config(tmp_path: Path, mode: str, name: str | None = None, worker: bool = False) -> Path:
    """A non-recursive source ``in`` whose *.txt go to ``in/sorted`` (``mode``; ``name``:
    its template). ``worker``: a second destination outside the inbox too, so that no lane
    takes the files: a worker copies each."""
    dest: dict[str, Any] = {"url": str(tmp_path / "in" / "sorted"), "mode": mode}
    if name is not None:
        dest["name"] = name
    to = [dest]
    if worker:
        to.append({"url": str(tmp_path / "copies")})
    settings = {
        "database": str(tmp_path / "journal.db"),
        "sources": [{"path": str(tmp_path / "in"), "name": "in", "settle": 0.05}],
        "rules": [{"name": "txt", "glob": "*.txt", "to": to}],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    return write_config(tmp_path / "config.yml", settings)


def _ended(db: Path, name: str) -> list[dict[str, Any]]:
    """The row of ``name``'s delivery to ``in/sorted`` once it ended (delivered or failed)."""
    where = "filename = ? AND status IN ('SUCCEEDED', 'FAILED') AND destination LIKE ?"
    return journal_rows(db, where, (name, "%sorted%"))


def _swap(folder: Path, outside: Path) -> None:
    """The inbox writer's swap: ``folder`` (with what it holds) moved away, a link put there."""
    folder.rename(folder.with_name(folder.name + "-was"))
    folder.symlink_to(outside, target_is_directory=True)


@pytest.mark.parametrize(
    ("mode", "name", "worker"),
    [
        ("copy", None, False),  # the batch lane
        ("copy", None, True),  # a worker's copy
        ("move", None, False),  # move_now's rename
        ("copy", "{yyyy}/{name}", False),  # a subfolder the template made
        ("move", "{yyyy}/{name}", False),
    ],
    ids=["copy-batch", "copy-worker", "move", "copy-template", "move-template"],
)
def test_a_destination_in_the_inbox_swapped_for_a_link_while_the_service_runs_gets_nothing(
    tmp_path: Path, mode: str, name: str | None, worker: bool
) -> None:
    """A first file is delivered (the folder made, and remembered by the processor); then the
    folder it landed in is swapped for a link to ``outside`` and the inbox writer drops their
    file. It is not written into ``outside``, stays in the inbox, its row failed naming the
    link; a later file is still refused (nothing remembered lets it through)."""
    inbox, outside = tmp_path / "in", tmp_path / "outside"
    for folder in (inbox, outside):
        folder.mkdir()
    db = tmp_path / "journal.db"
    svc = ServiceProcess(_config(tmp_path, mode, name, worker))
    try:
        svc.start()
        old(inbox / "first.txt", b"first\n")
        landed = wait_until(lambda: next((inbox / "sorted").rglob("first.txt"), None), 60)
        _swap(landed.parent, outside)
        for n in range(3):
            old(inbox / f"evil{n}.txt", _EVIL)
        wait_until(lambda: all(_ended(db, f"evil{n}.txt") for n in range(3)), 60)
        log = svc.log()
    finally:
        svc.stop(60)
    assert sorted(p.name for p in outside.iterdir()) == [], log[-3000:]
    for n in range(3):
        assert (inbox / f"evil{n}.txt").read_bytes() == _EVIL, log[-3000:]
        [row] = _ended(db, f"evil{n}.txt")
        assert row["status"] == "FAILED" and _REFUSED in (row["reason"] or ""), row
    assert _REFUSED in log, log[-3000:]


@pytest.mark.parametrize("count", [1, 40], ids=["one", "batch"])
@pytest.mark.parametrize("mode", ["copy", "move"])
def test_a_destination_in_the_inbox_swapped_for_a_link_while_the_service_is_stopped_gets_nothing(
    tmp_path: Path, mode: str, count: int
) -> None:
    """The swap made while no service runs: ``in/sorted`` is a link to ``outside`` at the
    start. ``--once`` delivers nothing through it (the start must not resolve the link and
    take its target for the destination), every file stays in the inbox, exit 1. Nor does
    the start's sweep of stale temporary files reach through it: a file there named like one
    of ours stays (before: removed)."""
    inbox, outside = tmp_path / "in", tmp_path / "outside"
    for folder in (inbox, outside):
        folder.mkdir()
    (outside / ".filedispatch-tmp-5-theirs.txt").write_bytes(b"not ours to remove\n")
    (inbox / "sorted").symlink_to(outside, target_is_directory=True)
    for n in range(count):
        old(inbox / f"evil{n}.txt", _EVIL)
    result = run_cli("-c", _config(tmp_path, mode), "--once", timeout=120)
    assert sorted(p.name for p in outside.iterdir()) == [".filedispatch-tmp-5-theirs.txt"], (
        result.stderr[-3000:]
    )
    assert sorted(p.name for p in inbox.iterdir() if p.name != "sorted") == sorted(
        f"evil{n}.txt" for n in range(count)
    ), result.stderr[-3000:]
    assert result.returncode == 1, result.stdout + result.stderr[-3000:]
    assert _REFUSED in result.stderr, result.stderr[-3000:]
    rows = journal_rows(tmp_path / "journal.db")
    assert len(rows) == count, rows
    assert all(r["status"] == "FAILED" and _REFUSED in (r["reason"] or "") for r in rows), rows


def test_a_destination_in_the_inbox_is_still_delivered_into_and_one_outside_takes_links(
    tmp_path: Path,
) -> None:
    """Controls: ``in/sorted`` without a link gets its files (copied, in a template's
    subfolder); a destination outside every source reached through a link the operator made
    (``/srv/out`` -> elsewhere) is still followed."""
    inbox, real_out = tmp_path / "in", tmp_path / "real-out"
    for folder in (inbox, real_out):
        folder.mkdir()
    (tmp_path / "linked-out").symlink_to(real_out, target_is_directory=True)
    settings = {
        "database": str(tmp_path / "journal.db"),
        "sources": [{"path": str(inbox), "name": "in", "settle": 0.05}],
        "rules": [
            {
                "name": "txt",
                "glob": "*.txt",
                "to": [
                    {"url": str(inbox / "sorted"), "name": "{yyyy}/{name}"},
                    {"url": str(tmp_path / "linked-out")},
                ],
            }
        ],
        "api": {"enabled": False},
        "monitor": {"enabled": False},
    }
    old(inbox / "a.txt", b"a\n")
    result = run_cli("-c", write_config(tmp_path / "config.yml", settings), "--once", timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert [p.read_bytes() for p in (inbox / "sorted").rglob("a.txt")] == [b"a\n"]
    assert (real_out / "a.txt").read_bytes() == b"a\n"


@pytest.mark.parametrize("way", ["openat2", "walk"])
def test_the_folders_of_a_destination_inside_a_source_are_held_without_a_link_either_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, way: str
) -> None:
    """``Inside`` itself, with openat2 and with the O_NOFOLLOW walk kept for kernels without
    it (which the service's subprocess cannot be made to take): missing folders are made and
    held; a template's subfolder swapped for a link is refused naming it, and nothing is
    made where it points; a destination outside the sources is not held at all."""
    if way == "walk":
        monkeypatch.setattr(sourcefile, "openat2", None)
    elif sourcefile.openat2 is None:
        pytest.skip("this kernel has no openat2")
    inbox, outside = tmp_path / "in", tmp_path / "outside"
    for folder in (inbox, outside):
        folder.mkdir()
    sources = [SimpleNamespace(path=inbox)]
    inside = Inside(inbox / "sorted", lambda: sources)  # type: ignore[arg-type, return-value]
    with inside.holding() as held:
        assert held is not None
        assert held(PurePosixPath("2026")).is_dir()
    assert (inbox / "sorted" / "2026").is_dir()
    (inbox / "sorted" / "2026").rmdir()
    (inbox / "sorted" / "2026").symlink_to(outside, target_is_directory=True)
    with inside.holding() as held:
        assert held is not None
        for rel in ("2026", "2026/07"):
            with pytest.raises(PermanentDeliveryError, match="2026 is a symbolic link"):
                held(PurePosixPath(rel))
    assert list(outside.iterdir()) == []
    outer = Inside(tmp_path / "out", lambda: sources)  # type: ignore[arg-type, return-value]
    with outer.holding() as held:
        assert held is None
