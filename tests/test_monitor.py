"""The telnet console of a real service, driven by a real telnet client (telnetlib3)."""

from __future__ import annotations

import re
import socket
import struct
import time
from pathlib import Path
from typing import Any

from filedispatch.monitor import fd_history, fd_retry, fd_status

from .conftest import free_port, journal_rows, run_cli, wait_until
from .ops import console, delivered, line_console, old_file, ops_config

SECRET = "s3cretpw"


def test_console_status_pause_resume_retry_history(tmp_path: Path, service_factory: Any) -> None:
    port, repl_port = free_port(), free_port()
    outbox = tmp_path / "outbox"
    cfg = ops_config(
        tmp_path,
        monitor={"port": port, "console_port": repl_port},
        rules=[
            {
                "name": "secret",
                "glob": "*.secret",
                # nothing listens there: the one attempt fails, and the password must not show
                "to": {
                    "url": f"ftp://user:{SECRET}@127.0.0.1:{free_port()}/in",
                    "retry": {"attempts": 1},
                },
            },
            {"name": "all", "glob": "*", "to": str(outbox)},
        ],
    )
    svc = service_factory(cfg).start()
    old_file(tmp_path / "inbox" / "first.txt", b"one")
    wait_until(lambda: "first.txt" in delivered(outbox))

    status, history = console(port, "fd-status", "fd-history 5")
    assert "running" in status and str(tmp_path / "inbox") in status
    assert f"{outbox}: 1 ok, 0 failed" in status
    assert "first.txt" in history and "SUCCEEDED" in history

    (answer,) = console(port, "fd-pause")
    assert answer.startswith("paused")
    old_file(tmp_path / "inbox" / "second.txt", b"two")
    db = tmp_path / "journal.db"
    wait_until(lambda: journal_rows(db, "filename='second.txt'"))
    time.sleep(1.0)
    assert "second.txt" not in delivered(outbox), "a paused service took new work"
    (status,) = console(port, "fd-status")
    assert "PAUSED" in status and "queue: 1 pending" in status
    (answer,) = console(port, "fd-resume")
    assert answer.startswith("resumed")
    wait_until(lambda: "second.txt" in delivered(outbox))

    old_file(tmp_path / "inbox" / "doc.secret", b"s")
    wait_until(lambda: journal_rows(db, "filename='doc.secret' AND status='FAILED'"), 30)
    failed_id = journal_rows(db, "filename='doc.secret'")[0]["id"]
    history, retry, unknown, bad, repl = console(
        port, "fd-history", f"fd-retry {failed_id}", "fd-retry 99999", "fd-retry x", "console"
    )
    assert "doc.secret" in history and "FAILED" in history
    assert SECRET not in history and "user:***@" in history
    assert retry == f"dispatch {failed_id} is queued again"
    assert unknown == "no dispatch with id 99999"
    assert "not a valid integer" in bad
    assert "disabled" in repl  # the Python REPL is off unless monitor.console is true
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", repl_port)) != 0
    wait_until(
        lambda: journal_rows(
            db,
            "filename='doc.secret' AND attempts=1 AND status='FAILED' "
            "AND detail IS NOT 'retry requested'",
        ),
        30,
    )
    assert SECRET not in svc.log()
    assert svc.stop() == 0


def test_a_non_loopback_console_is_refused_unless_allowed(
    tmp_path: Path, service_factory: Any
) -> None:
    cfg = ops_config(tmp_path, monitor={"host": "0.0.0.0", "port": free_port()})
    result = run_cli("-c", cfg)
    assert result.returncode == 1
    assert "not a loopback address" in result.stderr and "allow_remote" in result.stderr

    port = free_port()
    allowed = ops_config(
        tmp_path,
        name="allowed.yml",
        monitor={"host": "0.0.0.0", "port": port, "allow_remote": True},
    )
    svc = service_factory(allowed).start()
    assert "beyond loopback" in svc.log()
    (status,) = console(port, "fd-status")
    assert "running" in status
    assert svc.stop() == 0


def test_no_monitor_and_monitor_port_flags(tmp_path: Path, service_factory: Any) -> None:
    cfg = ops_config(tmp_path, monitor={"port": free_port()})
    port = free_port()
    svc = service_factory(cfg, "--monitor-port", str(port)).start()
    (status,) = console(port, "fd-status")
    assert "running" in status
    assert svc.stop() == 0
    again = ops_config(tmp_path, name="again.yml", monitor={"port": free_port()})  # a new log
    svc = service_factory(again, "--monitor-port", str(port), "--no-monitor").start()
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0
    assert svc.stop() == 0


def test_a_plain_line_client_like_nc_gets_the_console(tmp_path: Path, service_factory: Any) -> None:
    port = free_port()
    outbox = tmp_path / "outbox"
    svc = service_factory(ops_config(tmp_path, monitor={"port": port})).start()
    old_file(tmp_path / "inbox" / "first.txt", b"one")
    wait_until(lambda: "first.txt" in delivered(outbox))

    intro, (status, history, helptext, bad) = line_console(
        port, "fd-status", "fd-history 5", "help", "fd-retry x"
    )
    assert "Type help for available commands" in intro
    assert "running" in status and f"{outbox}: 1 ok, 0 failed" in status
    assert "first.txt" in history and "SUCCEEDED" in history
    assert "not a valid integer" in bad
    for answer in (status, history, helptext, bad):
        assert "\x1b" not in answer, f"a terminal escape reached a line client: {answer!r}"
    # every fd-* command is listed with its whole description (wrapped, not cut with "...")
    assert "..." not in helptext.split("Commands:")[1], helptext
    packed = "".join(helptext.split())
    for name, doc in (
        ("fd-status", fd_status.__doc__),
        ("fd-retry", fd_retry.__doc__),
        ("fd-history", fd_history.__doc__),
    ):
        assert name + "".join((doc or "").split()) in packed, helptext
    assert svc.stop() == 0


def test_a_console_on_port_0_names_the_port_it_listens_on(
    tmp_path: Path, service_factory: Any
) -> None:
    """``port: 0`` takes a free port; the log line must name that port, not 0, or no client
    can find the console."""
    svc = service_factory(ops_config(tmp_path, monitor={"port": 0})).start()
    line = wait_until(lambda: re.search(r"console: telnet 127\.0\.0\.1 (\d+) ", svc.log()))
    port = int(line.group(1))
    assert port != 0
    _, (status,) = line_console(port, "fd-status")
    assert "running" in status
    assert svc.stop() == 0


def test_port_probes_and_dropped_clients_leave_no_traceback(
    tmp_path: Path, service_factory: Any
) -> None:
    port = free_port()
    svc = service_factory(ops_config(tmp_path, monitor={"port": port})).start()
    for _ in range(3):  # nc -z: connect and close at once
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    for _ in range(3):  # a client that resets the connection mid-session
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.recv(1)  # the server's first telnet option has been sent
        s.close()
    # the console still serves, and what came before went by quietly
    (status,) = console(port, "fd-status")
    assert "running" in status
    log_text = svc.log()
    assert "Traceback" not in log_text and "Got " not in log_text, log_text
    _, (status,) = line_console(port, "fd-status")
    assert "running" in status
    assert svc.stop() == 0


def test_a_telnet_client_ending_lines_with_cr_lf_runs_each_command_once(
    tmp_path: Path, service_factory: Any
) -> None:
    port = free_port()
    svc = service_factory(ops_config(tmp_path, monitor={"port": port})).start()
    paused, status = console(port, "fd-pause", "fd-status", eol="\r\n")
    assert paused.startswith("paused") and "PAUSED" in status
    assert svc.log().count("paused from the console") == 1, svc.log()
    assert svc.stop() == 0


def test_a_flood_of_idle_console_clients_is_capped_and_the_console_recovers(
    tmp_path: Path, service_factory: Any
) -> None:
    from filedispatch.monitor import MAX_CONSOLES

    port = free_port()
    svc = service_factory(ops_config(tmp_path, monitor={"port": port})).start()
    idle = []
    for _ in range(MAX_CONSOLES):  # clients that connect and then say nothing
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.recv(1)  # their session has started
        idle.append(s)
    extra = socket.create_connection(("127.0.0.1", port), timeout=10)
    assert extra.recv(1) == b""  # one too many: closed at once, nothing sent
    extra.close()
    wait_until(lambda: "sessions open; refusing more" in svc.log(), 30)
    for s in idle:
        s.close()
    # once the idle ones are gone (their sessions see the close), a client is served again

    def served() -> bool:
        try:
            return "running" in line_console(port, "fd-status")[1][0]
        except AssertionError:  # still refused: the idle sessions have not ended yet
            return False

    wait_until(served, 30)
    assert "Traceback" not in svc.log()
    assert svc.stop() == 0
