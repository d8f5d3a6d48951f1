"""``filedispatch history ...`` and ``mark-existing`` against real journals, one of them being
written by a running service; and the progress reporter on a terminal and off it."""

from __future__ import annotations

import hashlib
import json
import os
import pty
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .conftest import cli_env, journal_rows, run_cli, wait_until
from .ops import arrived, delivered, old_file, ops_config
from .servers import HttpReceiver, consumed_once, keep_idempotency_keys, remote_config


def test_history_commands_while_the_service_writes(tmp_path: Path, service_factory: Any) -> None:
    outbox, db = tmp_path / "outbox", tmp_path / "journal.db"
    cfg = ops_config(
        tmp_path,
        sources=[{"path": str(tmp_path / "inbox"), "name": "inbox", "settle": 0.2, "rescan": 1}],
    )
    svc = service_factory(cfg).start()
    for i in range(3):
        old_file(tmp_path / "inbox" / f"doc-{i}.txt", b"%d" % i)
    wait_until(lambda: len(arrived(outbox)) == 3)

    # a burst keeps the service writing while we read
    for i in range(300):
        old_file(tmp_path / "inbox" / f"burst-{i:03d}.bin")
    listed = run_cli("history", "list", "--db", db, "--limit", "2")
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == 2
    as_json = run_cli(
        "-c", cfg, "history", "list", "--json", "--status", "succeeded", "--limit", "500"
    )
    assert as_json.returncode == 0, as_json.stderr
    rows = json.loads(as_json.stdout)
    assert rows and {r["status"] for r in rows} == {"SUCCEEDED"}
    assert {"doc-0.txt", "doc-1.txt", "doc-2.txt"} <= {r["relpath"] for r in rows}
    wait_until(lambda: len(journal_rows(db, "status='SUCCEEDED'")) == 303, 60)

    doc0 = next(r for r in journal_rows(db) if r["relpath"] == "doc-0.txt")
    shown = run_cli("history", "show", str(doc0["id"]), "--db", db)
    assert shown.returncode == 0
    assert "relpath:      doc-0.txt" in shown.stdout and "status:       SUCCEEDED" in shown.stdout
    missing = run_cli("history", "show", "999999", "--db", db)
    assert missing.returncode == 1 and "no dispatch with id 999999" in missing.stderr
    bad = run_cli("history", "show", "abc", "--db", db)
    assert bad.returncode == 2 and "is not a whole number" in bad.stderr
    nodb = run_cli("history", "list", "--db", tmp_path / "nope.db")
    assert nodb.returncode == 1 and "no journal at" in nodb.stderr

    for period in ("day", "week", "month"):
        stats = run_cli("history", "stats", "--period", period, "-c", cfg)
        assert stats.returncode == 0, stats.stderr
        header, line = stats.stdout.splitlines()
        assert header.split() == ["period", "succeeded", "failed", "waiting", "sent"]
        assert line.split()[1:4] == ["303", "0", "0"]

    # forget: the file is sent again at the next rescan (the service is still running)
    forgot = run_cli("history", "forget", str(doc0["id"]), "--db", db)
    assert forgot.returncode == 0, forgot.stderr
    assert "forgot dispatch" in forgot.stdout
    wait_until(lambda: "doc-0-1.txt" in delivered(outbox), 30)
    by_path = run_cli(
        "history", "forget", "--path", str(tmp_path / "inbox" / "doc-1.txt"), "-c", cfg
    )
    assert by_path.returncode == 0, by_path.stderr
    wait_until(lambda: "doc-1-1.txt" in delivered(outbox), 30)
    nothing = run_cli("history", "forget", "--path", "never-seen.txt", "--db", db)
    assert nothing.returncode == 1 and "nothing is recorded" in nothing.stderr
    assert run_cli("history", "forget", "--db", db).returncode == 2  # an id or --path
    assert svc.stop() == 0


def test_mark_existing_records_without_sending(tmp_path: Path, service_factory: Any) -> None:
    outbox, db = tmp_path / "outbox", tmp_path / "journal.db"
    cfg = ops_config(
        tmp_path,
        rules=[
            {"name": "txt", "extensions": ["txt"], "to": [str(outbox), str(tmp_path / "copy")]},
        ],
    )
    for i in range(40):
        old_file(tmp_path / "inbox" / f"old-{i:02d}.txt")
    old_file(tmp_path / "inbox" / "skip.bin")

    preview = run_cli("mark-existing", "-c", cfg, "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert "would mark 40 file(s) (80 destination step(s))" in preview.stdout
    assert "inbox/old-00.txt -> " in preview.stdout
    assert not db.exists(), "a dry run writes nothing"

    marked = run_cli("mark-existing", "-c", cfg)
    assert marked.returncode == 0, marked.stderr
    assert (
        "marked 40 file(s) as already dispatched: 80 destination step(s) recorded" in marked.stdout
    )
    assert "1 file(s) match no rule" in marked.stdout
    rows = journal_rows(db)
    assert len(rows) == 80 and {r["status"] for r in rows} == {"SUCCEEDED"}
    again = run_cli("mark-existing", "-c", cfg)
    assert "0 destination step(s) recorded, 80 were recorded before" in again.stdout

    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert "processed: 0" in result.stdout and "already done: 40" in result.stdout
    assert delivered(outbox) == {}

    svc = service_factory(cfg).start()
    busy = run_cli("mark-existing", "-c", cfg)
    assert busy.returncode == 1 and "already running" in busy.stderr
    old_file(tmp_path / "inbox" / "new.txt", b"new")
    wait_until(lambda: delivered(outbox) == {"new.txt": b"new"})
    assert svc.stop() == 0


def test_progress_lines_off_a_terminal(tmp_path: Path) -> None:
    for i in range(1500):
        old_file(tmp_path / "inbox" / f"f-{i:04d}.dat")
    cfg = ops_config(tmp_path)
    env = cli_env(FILEDISPATCH_PROGRESS_EVERY="0.05")
    marked = run_cli("mark-existing", "-c", cfg, "--dry-run", env=env)
    assert marked.returncode == 0
    (tmp_path / "journal.db").unlink(missing_ok=True)
    result = run_cli("-c", cfg, "--once", env=env)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "filedispatch.progress" in line]
    assert any("dispatching: " in line and " deliveries" in line for line in lines), lines
    # while the scan still plans, the total is unknown: no fraction that shrinks as it grows
    scanning = [line.split("scanning and dispatching: ")[1] for line in lines if "scanning" in line]
    assert not any(re.match(r"\d+/\d+", rest) for rest in scanning), scanning
    assert "\r" not in result.stderr
    mark = run_cli("mark-existing", "-c", cfg, env=env)
    assert "mark-existing: 500/1500 files" in mark.stderr


def test_progress_bar_on_a_terminal(tmp_path: Path) -> None:
    for i in range(1200):
        old_file(tmp_path / "inbox" / f"f-{i:04d}.dat")
    cfg = ops_config(tmp_path)
    main, child = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "filedispatch", "mark-existing", "-c", str(cfg)],
        stdin=child,
        stdout=child,
        stderr=child,
        env=cli_env(),
        close_fds=True,
    )
    os.close(child)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            chunk = os.read(main, 4096)
        except OSError:  # the child side closed
            break
        if not chunk:
            break
        output += chunk
    os.close(main)
    assert proc.wait(30) == 0
    text = output.decode()
    assert "\rmark-existing [" in text.replace("\x1b[K", "") and "/1200" in text
    assert "#" in text and "marked 1200 file(s)" in text


def test_a_forgotten_rows_id_is_never_given_to_another_file(tmp_path: Path) -> None:
    """One SQLite journal, one receiver that drops a request whose ``Idempotency-Key`` it has
    seen. a.csv is delivered as row 1 and its source removed; ``history forget 1`` deletes
    that row, the journal's newest. The next file, b.csv, gets a new id (2), so its key is
    new and it is stored. Before, SQLite gave id 1 again (``INTEGER PRIMARY KEY`` hands out
    the largest id plus one): the receiver dropped b.csv as a repeat of a.csv."""
    receiver = HttpReceiver()
    try:
        dropped = keep_idempotency_keys(receiver, "/upload")
        ws = {"root": tmp_path, "inbox": tmp_path / "inbox", "db": tmp_path / "journal.db"}
        cfg = remote_config(ws, {"url": f"{receiver.url}/upload"}, source={"after": "delete"})
        sent = []
        for name, data in (("a.csv", b"monday\n"), ("b.csv", b"tuesday, other\n")):
            consumed_once(cfg, ws["inbox"], name, data)
            sent.append(data)
            if name == "a.csv":
                forgot = run_cli("-c", cfg, "history", "forget", "1", timeout=60)
                assert forgot.returncode == 0, forgot.stderr
                assert journal_rows(ws["db"]) == []
        ids = [r["id"] for r in journal_rows(ws["db"])]
        stored = {r.sha256 for r in receiver.received if r.path == "/upload"}
    finally:
        receiver.close()
    assert ids == [2], f"b.csv was given id {ids}"
    assert {hashlib.sha256(d).hexdigest() for d in sent} <= stored, f"dropped: {dropped}"
