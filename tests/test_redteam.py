"""Attacks on the defences of issue 11 (items 4-9) that got through, each against the real CLI
or a real service on loopback: misshapen configurations, numbers the journal cannot hold,
secrets cut in half by a shortened message, ``$VAR`` in a command, an unknown ``Expect:``
answered in text, and idle connections that took every file descriptor the deliveries needed.
"""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from filedispatch.api import MAX_CONNECTIONS
from filedispatch.config import load_config

from .conftest import (
    ServiceProcess,
    cli_env,
    free_port,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .servers import HttpReceiver

SRC = "sources: [{path: ./in}]\n"

MISSHAPEN = {
    "nested-list": SRC + "rules: [{to: ./out}]\nx: " + "[" * 5000 + "]" * 5000,
    "nested-map": SRC + "rules: [{to: ./out}]\nx: " + "{a: " * 3000 + "1" + "}" * 3000,
    "nested-block": SRC
    + "rules: [{to: ./out}]\n"
    + "".join(" " * i + f"a{i}:\n" for i in range(2000))
    + " " * 2000
    + "b: 1\n",
    "rules-a-number": SRC + "rules: 7\n",
    "sources-a-number": "sources: 5\nrules: [{to: ./out}]\n",
    "seed-folders-a-number": "source: ./in\nfolders: 5\n",
}


@pytest.mark.parametrize("name", sorted(MISSHAPEN))
def test_a_misshapen_config_is_refused_with_one_line(tmp_path: Path, name: str) -> None:
    (tmp_path / "in").mkdir()
    cfg = tmp_path / "c.yml"
    cfg.write_text(MISSHAPEN[name], encoding="utf-8")
    r = run_cli("check", "-c", cfg)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"filedispatch: invalid configuration {cfg}")


@pytest.mark.parametrize(
    "args",
    [
        ("history", "show", "99999999999999999999999"),
        ("history", "forget", "99999999999999999999999"),
        ("history", "list", "--limit", "99999999999999999999999"),
    ],
)
def test_a_number_the_journal_cannot_hold_is_a_usage_error(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    db = tmp_path / "j.db"
    (tmp_path / "in").mkdir()
    cfg = write_config(
        tmp_path / "c.yml", {"sources": [{"path": "in"}], "rules": [{"to": str(tmp_path / "o")}]}
    )
    assert run_cli("--db", db, "mark-existing", "-c", cfg).returncode == 0  # a journal exists
    r = run_cli("--db", db, *args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "must be 1 to" in r.stderr


def test_a_pidfile_that_is_a_folder_is_one_line(tmp_path: Path) -> None:
    r = run_cli("-p", tmp_path, "-x")
    assert r.returncode == 1
    assert r.stderr.strip() == f"filedispatch: the pidfile {tmp_path} is not a regular file"


# ----------------------------------------------------------------------------- secrets

TOKEN = "TOKEN-abcdefghijklmnopqrstuvwxyz0123456789"
KWARG_SECRET = "KWARG-SECRET-abcdefghijklmnopqrstuvwxyz"
SHELL_SECRET = "SHELL-SECRET-0123456789abcdef"

CALLABLE = """
def boom(path, **kwargs):
    # an exception long enough to be cut (at 1000 characters) inside the secret it quotes
    raise ValueError("x" * 975 + kwargs["api_key"])
"""


async def _echo_cut(request: web.Request, hits: int) -> web.Response:
    # an error answer quoting the request's Authorization header, cut at 200 characters
    # (what the journal keeps of an answer) in the middle of the token
    pad = "p" * (200 - len("Bearer ") - 20)
    return web.Response(status=400, text=pad + request.headers.get("Authorization", ""))


def test_a_secret_cut_short_or_named_as_dollar_var_is_not_recorded(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    (tmp_path / "rt_callable.py").write_text(CALLABLE)
    receiver = HttpReceiver()
    receiver.behave["/echo"] = _echo_cut
    once = {"retry": {"attempts": 1}}
    try:
        cfg = write_config(
            tmp_path / "c.yml",
            {
                "database": str(tmp_path / "j.db"),
                "sources": [{"path": str(inbox), "settle": 0}],
                "rules": [
                    {"glob": "a*", "to": {"url": f"{receiver.url}/echo", "token": TOKEN, **once}},
                    {
                        "glob": "b*",
                        "to": {"python": "rt_callable:boom", "kwargs": {"api_key": KWARG_SECRET}}
                        | once,
                    },
                    # $VAR is expanded by the shell as ${VAR} is
                    {"glob": "c*", "to": {"command": "echo using $RT_SHELL >&2; exit 1"} | once},
                ],
                "api": {"enabled": False},
                "monitor": {"enabled": False},
            },
        )
        for name in ("a.txt", "b.txt", "c.txt"):
            old(inbox / name, b"data")
        env = cli_env(RT_SHELL=SHELL_SECRET, PYTHONPATH=str(tmp_path))
        log = tmp_path / "service.log"
        r = run_cli("-c", cfg, "--once", "--log-file", log, env=env, timeout=120)
        rows = journal_rows(tmp_path / "j.db")
    finally:
        receiver.close()
    assert r.returncode == 1 and len(rows) == 3, r.stderr[-2000:]
    assert all(row["status"] == "FAILED" for row in rows)
    seen = json.dumps(rows) + log.read_text() + r.stdout + r.stderr
    for secret in (TOKEN, KWARG_SECRET, SHELL_SECRET):
        for piece in (secret[:8], secret[-8:]):  # no piece of one either
            assert piece not in seen, piece
    # what the reasons still say
    reasons = " ".join(row["reason"] for row in rows)
    assert "HTTP 400" in reasons and "ValueError" in reasons and "using ***" in reasons


# ----------------------------------------------------------------------------- the web app


def _service(tmp_path: Path, port: int) -> tuple[Path, Path]:
    inbox = tmp_path / "in"
    inbox.mkdir()
    cfg = write_config(
        tmp_path / "c.yml",
        {
            "database": str(tmp_path / "j.db"),
            "sources": [{"path": str(inbox), "settle": 0.1}],
            "rules": [{"to": str(tmp_path / "out")}],
            "api": {"port": port},
            "monitor": {"enabled": False},
        },
    )
    return cfg, inbox


def _env() -> dict[str, str]:
    env = cli_env()
    env.pop("FILEDISPATCH_API_TOKEN", None)
    return env


def _exchange(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_an_unknown_expectation_is_answered_in_json(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    port = free_port()
    cfg, _ = _service(tmp_path, port)
    service_factory(cfg, env=_env()).start()
    answer = _exchange(
        port,
        f"POST /api/v1/logs/1/retry HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nExpect: 200-ok\r\n"
        "Content-Type: application/json\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode(),
    )
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 417"), answer
    assert b"application/json" in head
    assert json.loads(body)["error"] == "expectation failed"


@contextlib.contextmanager
def _file_limit(limit: int) -> Iterator[None]:
    """Processes started inside inherit a soft limit of ``limit`` open files (a usual 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(limit, hard), hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def _closed_by_peer(socks: list[socket.socket]) -> int:
    return sum(1 for s in socks if _peer_closed(s))


def _peer_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1, socket.MSG_PEEK) == b""  # the sockets are non-blocking
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


@pytest.mark.skipif(sys.platform != "linux", reason="counts the service's descriptors in /proc")
def test_idle_connections_cannot_take_the_descriptors_deliveries_need(
    tmp_path: Path, service_factory: Callable[..., ServiceProcess]
) -> None:
    """Any local user may connect to the web app (no token is needed to connect): a thousand
    connections that never finish their headers took every descriptor the service had, and the
    next file failed for good with "Too many open files"."""
    port = free_port()
    cfg, inbox = _service(tmp_path, port)
    limit = 1024
    with _file_limit(limit):
        svc = service_factory(cfg, env=_env()).start()
    assert svc.proc is not None
    flood = limit + 100
    socks = []
    try:
        for _ in range(flood):
            s = socket.create_connection(("127.0.0.1", port), timeout=30)
            s.sendall(f"GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Slow: ".encode())
            s.setblocking(False)
            socks.append(s)
        pid = svc.proc.pid
        # every connection is either held by the service or was closed by it
        wait_until(
            lambda: _open_fds(pid) >= limit - 5 or _closed_by_peer(socks) >= flood - limit, 60
        )
        old(inbox / "after-the-flood.txt", b"must arrive")
        row = wait_until(
            lambda: (
                [r for r in journal_rows(tmp_path / "j.db") if r["status"] != "PENDING"]
                and [r for r in journal_rows(tmp_path / "j.db") if r["status"] != "IN_PROGRESS"]
            ),
            60,
        )[0]
        assert row["status"] == "SUCCEEDED", row["reason"]
        assert (tmp_path / "out" / "after-the-flood.txt").read_bytes() == b"must arrive"
    finally:
        for s in socks:
            s.close()
    assert svc.log().count("connections open; refusing more") >= 1
    assert svc.log().count("connections open; refusing more") < 10  # not one line per client
    assert limit - 100 > MAX_CONNECTIONS


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "1e9"])
def test_a_stop_timeout_that_is_not_a_finite_duration_is_a_usage_error(
    tmp_path: Path, value: str
) -> None:
    result = run_cli("-x", "-p", tmp_path / "fd.pid", "--stop-timeout", value)
    assert result.returncode == 2, result.stderr
    assert "--stop-timeout" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "headers",
    ['{"X-Trace": "a\\r\\nX-Injected: 1"}', '{"Bad Name": "v"}', '{"X-A": "nul\\u0000"}'],
)
def test_a_header_that_would_break_the_request_is_refused_at_load(
    tmp_path: Path, headers: str
) -> None:
    cfg = tmp_path / "config.yml"
    cfg.write_text(
        "sources: [{path: ./in}]\n"
        f"rules: [{{to: [{{url: 'http://127.0.0.1:9/up', headers: {headers}}}]}}]\n"
    )
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rules[0].to[0].headers" in result.stderr
    assert "Traceback" not in result.stderr


def test_tls_and_ssh_files_are_relative_to_the_config(tmp_path: Path) -> None:
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir()
    (conf_dir / "ca.pem").write_text("not used")
    cfg = conf_dir / "config.yml"
    cfg.write_text(
        "sources: [{path: ./in}]\n"
        "rules: [{to: [{url: 'https://127.0.0.1:9/up', ca_file: ca.pem}]}]\n"
    )
    config = load_config(cfg)
    step = config.rules[0].to[0]
    assert Path(step.ca_file) == conf_dir / "ca.pem"  # type: ignore[union-attr]
