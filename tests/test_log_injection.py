"""File names that try to forge log lines or reorder what a reader sees (issue 11, item 9):
dispatched by the real CLI and the real service, then read where an operator reads them: the
log (stderr, --log-file, a --log-config handler), the console, and the CLI's tables.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import delivered, free_port, journal_rows, old, run_cli, wait_until, write_config
from .ops import console

#: a second record, as the default format writes one
FORGED = "x\n2026-01-01 00:00:00,000 INFO    filedispatch.dispatcher: forged.txt"
BIDI = "invoice\u202etxt.exe"  # shows as "invoiceexe.txt"
NAMES = {  # the name on disk -> how every output must show it
    FORGED: "x\\n2026-01-01 00:00:00,000 INFO    filedispatch.dispatcher: forged.txt",
    BIDI: "invoice\\u202etxt.exe",
    "esc\x1b[2J\x07.txt": "esc\\x1b[2J\\x07.txt",
    "sep\u2028\u2066x\u200f.txt": "sep\\u2028\\u2066x\\u200f.txt",
    "c1\x85\x9b.txt": "c1\\x85\\x9b.txt",
}
#: what none of the outputs may hold raw
RAW = re.compile(
    "[\x00-\x09\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]"
)
TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) ")


def inbox_with_hostile_names(root: Path) -> Path:
    for name in NAMES:
        old(root / "inbox" / name, b"data")
    # undecodable bytes: a strict UTF-8 log file would fail on them
    old(Path(os.fsdecode(bytes(root / "inbox") + b"/latin1-\xe9.txt")), b"data")
    return write_config(
        root / "config.yml",
        {
            "database": str(root / "journal.db"),
            "sources": [{"path": str(root / "inbox"), "name": "inbox", "settle": 0.1}],
            "rules": [{"name": "all\u202e", "to": str(root / "outbox")}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )


SHOWN = tuple(NAMES.values())


def assert_escaped(text: str, names: Any = SHOWN) -> None:
    assert not RAW.search(text), RAW.search(text)
    for shown in names:
        assert shown in text, (shown, text)


def assert_one_line_per_record(text: str) -> None:
    lines = text.splitlines()
    assert lines, "no log"
    for line in lines:
        assert TIMESTAMP.match(line), f"not a record of its own: {line!r}"
        assert not line.startswith("2026-01-01 00:00:00,000"), f"a forged record: {line!r}"
    assert_escaped(text)
    assert "Logging error" not in text


def test_the_log_has_one_line_per_record_with_names_escaped(tmp_path: Path) -> None:
    cfg = inbox_with_hostile_names(tmp_path)
    log = tmp_path / "service.log"
    # each file's own line is at DEBUG (at INFO a batch has one line naming the first few)
    result = run_cli("-c", cfg, "--once", "--log-file", log, "--log-level", "DEBUG")
    # the undecodable name fails alone, with its reason; the others arrive as they are named
    assert result.returncode == 1, result.stderr
    assert set(delivered(tmp_path / "outbox")) == set(NAMES)
    assert "Logging error" not in result.stderr and "Traceback" not in result.stderr
    text = log.read_text(encoding="utf-8")
    assert_one_line_per_record(text)
    assert "latin1-\\udce9.txt" in text
    assert result.stdout.startswith("processed: 5") and not RAW.search(result.stdout)


def test_the_log_on_stderr_too(tmp_path: Path) -> None:
    cfg = inbox_with_hostile_names(tmp_path)
    result = run_cli("-c", cfg, "--once", "--log-level", "DEBUG")
    assert result.returncode == 1
    assert_one_line_per_record(result.stderr)


def test_a_handler_of_a_log_config_is_filtered_too(tmp_path: Path) -> None:
    cfg = inbox_with_hostile_names(tmp_path)
    own = tmp_path / "dispatcher.log"
    log_config = tmp_path / "logging.yml"
    log_config.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(message)s"}},
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(own),
                        "formatter": "plain",
                        "encoding": "utf-8",
                    }
                },
                # on a logger of its own, not the root: the filter must still be on it
                "loggers": {
                    "filedispatch.dispatcher": {
                        "handlers": ["file"],
                        "propagate": False,
                        "level": "DEBUG",  # each file's own line
                    }
                },
                "root": {"level": "INFO", "handlers": []},
            }
        )
    )
    result = run_cli("-c", cfg, "--once", "--log-config", log_config)
    assert result.returncode == 1, result.stderr
    assert "Logging error" not in result.stderr
    assert_one_line_per_record(own.read_text(encoding="utf-8"))


def test_the_cli_tables_escape_names(tmp_path: Path) -> None:
    cfg = inbox_with_hostile_names(tmp_path)
    dry = run_cli("-c", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert len(dry.stdout.splitlines()) == len(NAMES) + 1  # one line per file
    assert_escaped(dry.stdout, [*NAMES.values(), "[all\\u202e]"])

    explain = run_cli("explain", "-c", cfg, *(tmp_path / "inbox" / n for n in NAMES))
    assert explain.returncode == 0, explain.stderr
    assert_escaped(explain.stdout)

    check = run_cli("check", "-c", cfg)
    assert check.returncode == 0 and "all\\u202e" in check.stdout
    assert not RAW.search(check.stdout)

    assert run_cli("-c", cfg, "--once").returncode == 1
    listed = run_cli("history", "list", "-c", cfg)
    assert listed.returncode == 0, listed.stderr
    assert len(listed.stdout.splitlines()) == len(NAMES) + 1  # one line per dispatch
    assert_escaped(listed.stdout)

    row = journal_rows(tmp_path / "journal.db", "filename = ?", (BIDI,))[0]
    show = run_cli("history", "show", str(row["id"]), "-c", cfg)
    assert show.returncode == 0 and "relpath:      invoice\\u202etxt.exe" in show.stdout
    assert not RAW.search(show.stdout)

    forget = run_cli("history", "forget", "--path", FORGED, "-c", cfg)
    assert forget.returncode == 0, forget.stderr
    assert f"forgot {NAMES[FORGED]} (1 row(s))" in forget.stdout
    assert len(forget.stdout.splitlines()) == 1


def test_the_console_escapes_names(tmp_path: Path, service_factory: Any) -> None:
    port = free_port()
    cfg = inbox_with_hostile_names(tmp_path)
    data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
    data["monitor"] = {"port": port, "console_port": free_port()}
    data["sources"][0]["name"] = "in\u202ebox"
    write_config(cfg, data)
    svc = service_factory(cfg, "--log-level", "DEBUG").start()
    db = tmp_path / "journal.db"
    wait_until(lambda: len(journal_rows(db, "status IN ('SUCCEEDED', 'FAILED')")) == 6, 30)
    history, status = console(port, "fd-history 10", "fd-status")
    assert len(history.splitlines()) == 6, history  # one line per dispatch
    assert_escaped(history, [*NAMES.values(), "in\\u202ebox/"])
    assert "in\\u202ebox:" in status and not RAW.search(status)
    assert_one_line_per_record(svc.log())
    assert svc.stop() == 0


@pytest.mark.parametrize("attack", ["\r", "\x1b]0;pwned\x07", "\u2029", "\u061c", "\x00"])
def test_escape_leaves_one_line(attack: str) -> None:
    from filedispatch.textsafe import escape

    out = escape(f"a{attack}b")
    assert len(out.splitlines()) == 1 and not RAW.search(out) and escape(out) == out
