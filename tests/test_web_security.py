"""The web app attacked as a browser page or a raw client would (issue 11, item 8), against the
real service on loopback with no token: cross-origin writes, DNS rebinding (a foreign Host),
requests aiohttp's own parser refuses, odd static paths, and short tokens refused at load.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from .apiutil import Api, api_config, env_without_token, running_api
from .conftest import ServiceProcess, free_port, run_cli, wait_until, write_config

MISSING_ID = 987654321  # a request that passes every guard answers 404 for it, changing nothing


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        return json.loads(self.body)


def raw(port: int, data: bytes) -> Answer:
    """Send bytes as they are; read the answer until the server closes the connection."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(data)
        while chunk := s.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    first, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return Answer(int(first.split()[1]), headers, body)


def request(
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    host: str | None = None,
) -> Answer:
    """A well-formed HTTP/1.1 request with exactly these headers (Host given or the bound one)."""
    host = f"127.0.0.1:{port}" if host is None else host
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return raw(port, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


def port_of(api: Api) -> int:
    return int(api.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    # no token on loopback: the set-up a page in the operator's browser can reach
    with running_api(tmp_path_factory.mktemp("websec"), token=None) as running:
        yield running


def failed_row(api: Api) -> dict[str, Any]:
    return api.rows("filename = 'd.bin'")[0]


# --------------------------------------------------------------------------- cross-origin writes

JSON = {"Content-Type": "application/json"}


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        # fetch(url, {method: "POST", mode: "no-cors", body: "x"}) from another site
        (
            {
                "Content-Type": "text/plain;charset=UTF-8",
                "Origin": "http://evil.example",
                "Sec-Fetch-Site": "cross-site",
                "Sec-Fetch-Mode": "no-cors",
            },
            403,
        ),
        ({"Content-Type": "text/plain"}, 415),  # an older browser: no Origin, no Sec-Fetch-*
        ({"Content-Type": "application/x-www-form-urlencoded"}, 415),  # a <form>
        ({"Content-Type": "multipart/form-data; boundary=x"}, 415),
        ({}, 415),  # no type at all
        ({**JSON, "Origin": "http://evil.example"}, 403),
        ({**JSON, "Origin": "http://127.0.0.1:1"}, 403),  # same site, another port
        ({**JSON, "Origin": "null"}, 403),  # a sandboxed frame
        ({**JSON, "Sec-Fetch-Site": "cross-site"}, 403),
        ({**JSON, "Sec-Fetch-Site": "same-site"}, 403),
    ],
)
def test_a_foreign_or_untyped_change_is_refused_and_changes_nothing(
    api: Api, headers: dict[str, str], status: int
) -> None:
    before = failed_row(api)
    assert before["status"] == "FAILED"
    port = port_of(api)
    retry = request(port, "POST", f"/api/v1/logs/{before['id']}/retry", headers, b"x")
    assert retry.status == status, retry
    assert retry.json()["error"] in ("cross-origin request", "unsupported media type")
    forget = request(port, "DELETE", f"/api/v1/logs/{before['id']}", headers)
    assert forget.status == status, forget
    assert failed_row(api) == before  # still FAILED, not re-queued, not forgotten


def test_a_change_from_the_service_s_own_page_or_a_program_passes_the_guards(api: Api) -> None:
    port = port_of(api)
    for headers in (
        JSON,  # curl, a script: no Origin
        {**JSON, "Origin": f"http://127.0.0.1:{port}", "Sec-Fetch-Site": "same-origin"},
        {"Content-Type": "application/json; charset=utf-8"},
    ):
        answer = request(port, "DELETE", f"/api/v1/logs/{MISSING_ID}", headers)
        assert answer.status == 404 and answer.json()["error"] == "not found", answer
    answer = request(
        port, "POST", f"/api/v1/logs/{MISSING_ID}/retry", {**JSON, "Origin": "http://localhost:1"}
    )
    assert answer.status == 403


# --------------------------------------------------------------------------- DNS rebinding


@pytest.mark.parametrize(
    "host",
    ["evil.example:{port}", "evil.example", "127.0.0.1:1", "localhost.evil.example:{port}", ""],
)
def test_a_foreign_host_is_refused_for_reads_and_deletes(api: Api, host: str) -> None:
    port = port_of(api)
    before = failed_row(api)
    host = host.format(port=port)
    for method, path, headers in (
        ("GET", "/api/v1/logs", {}),
        ("GET", "/api/v1/status", {}),
        ("GET", "/health", {}),
        ("GET", "/", {}),
        ("GET", "/static/app.js", {}),
        ("DELETE", f"/api/v1/logs/{before['id']}", JSON),
        ("POST", f"/api/v1/logs/{before['id']}/retry", JSON),
    ):
        answer = request(port, method, path, headers, host=host)
        assert answer.status == 421, (method, path, answer)
        body = answer.json()
        assert body["error"] == "misdirected request" and "api.allowed_hosts" in body["detail"]
        assert b"d.bin" not in answer.body
    assert failed_row(api) == before


def test_no_host_header_is_refused(api: Api) -> None:
    answer = raw(port_of(api), b"GET /api/v1/logs HTTP/1.0\r\n\r\n")
    assert answer.status == 421 and answer.json()["error"] == "misdirected request"


@pytest.mark.parametrize("host", ["127.0.0.1:{port}", "localhost:{port}", "[::1]:{port}"])
def test_the_loopback_names_of_the_bound_port_are_answered(api: Api, host: str) -> None:
    answer = request(port_of(api), "GET", "/api/v1/logs", host=host.format(port=port_of(api)))
    assert answer.status == 200 and answer.json()["count"] == len(api.rows())


def test_allowed_hosts_lets_a_listed_name_in(tmp_path: Path) -> None:
    port = free_port()
    cfg = api_config(
        tmp_path, port, allowed_hosts=["Files.Example.org", "proxy.example:8443", "[fd00::1]"]
    )
    svc = ServiceProcess(cfg, env=env_without_token()).start()
    try:
        for host, status in (
            ("files.example.org", 200),  # a name without a port: any port
            (f"files.example.org:{port}", 200),
            ("FILES.EXAMPLE.ORG:443", 200),
            ("proxy.example:8443", 200),
            ("[fd00::1]:80", 200),
            (f"proxy.example:{port}", 421),  # listed with another port
            ("proxy.example", 421),
            (f"127.0.0.1:{port}", 200),
            (f"evil.example:{port}", 421),
        ):
            answer = request(port, "GET", "/api/v1/status", host=host)
            assert answer.status == status, (host, answer)
        # the page behind the proxy may change things: its Origin is its own Host
        for origin, status in (
            ("https://files.example.org", 404),
            ("https://proxy.example:8443", 403),
        ):
            answer = request(
                port,
                "DELETE",
                f"/api/v1/logs/{MISSING_ID}",
                {**JSON, "Origin": origin},
                host="files.example.org",
            )
            assert answer.status == status, (origin, answer)
    finally:
        assert svc.stop() == 0


def test_a_malformed_allowed_host_is_refused_at_load(tmp_path: Path) -> None:
    cfg = api_config(tmp_path, free_port(), allowed_hosts=["ok.example", "http://x.example/"])
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2, result.stderr
    assert "api.allowed_hosts: " in result.stderr and "entry 2" in result.stderr
    assert "Traceback" not in result.stderr


# --------------------------------------------------------------------------- errors are JSON


MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nNo colon here\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"POST /api/v1/logs/1/retry HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /api/v1/logs/1/retry HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,  # TLS on the HTTP port
]


def web_lines(api: Api, before: int) -> list[str] | None:
    """The log lines since line ``before`` that the web app wrote, or that are not a record
    (a traceback); None until there is one."""
    added = api.service.log().splitlines()[before:]
    return [x for x in added if "web app" in x or not TIMESTAMP.match(x)] or None


TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")


@pytest.mark.parametrize("data", MALFORMED, ids=range(len(MALFORMED)))
def test_a_malformed_request_gets_json_and_one_log_line(api: Api, data: bytes) -> None:
    before = len(api.service.log().splitlines())
    answer = raw(port_of(api), data)
    assert answer.status == 400, answer
    body = answer.json()
    assert body["error"] == "bad request" and body["detail"]
    added = wait_until(lambda: web_lines(api, before))
    assert len(added) == 1, added
    assert "WARNING" in added[0] and "web app: 400 for a request from 127.0.0.1" in added[0]
    assert "Traceback" not in api.service.log()


def test_a_body_that_cannot_be_decoded_logs_one_line(api: Api) -> None:
    before = len(api.service.log().splitlines())
    answer = request(
        port_of(api),
        "POST",
        f"/api/v1/logs/{MISSING_ID}/retry",
        {**JSON, "Content-Encoding": "gzip"},
        b"not gzip at all",
    )
    assert answer.status == 404 and answer.json()["error"] == "not found"
    added = wait_until(lambda: web_lines(api, before))
    assert len(added) == 1 and "could not be read" in added[0], added
    assert "Traceback" not in api.service.log()


@pytest.mark.parametrize(
    "path",
    [
        "/static/nothing.js",
        "/static/",
        "/static/../config.yml",
        "/static/%2e%2e/config.yml",
        "/static/..%2fconfig.yml",
        "/static/app.js%00.png",
        "/static/..\\config.yml",
        "/nothing",
    ],
)
def test_a_missing_static_file_or_odd_path_is_a_json_404(api: Api, path: str) -> None:
    answer = request(port_of(api), "GET", path)
    assert answer.status == 404, answer
    assert answer.json()["error"] == "not found"


def test_the_dashboard_files_are_still_served(api: Api) -> None:
    port = port_of(api)
    for path, media_type, text in (
        ("/", "text/html", b"<canvas"),
        ("/static/app.js", "text/javascript", b"fetch("),
        ("/static/style.css", "text/css", b"{"),
    ):
        answer = request(port, "GET", path)
        assert answer.status == 200 and answer.headers["content-type"].startswith(media_type)
        assert text in answer.body


def test_wrong_methods_are_json(api: Api) -> None:
    port = port_of(api)
    for method, path in (
        ("PUT", "/api/v1/logs"),
        ("PATCH", "/api/v1/logs/1"),
        ("POST", "/api/v1/status"),
        ("OPTIONS", "/api/v1/logs/1/retry"),
        ("POST", "/static/app.js"),
    ):
        answer = request(port, method, path, JSON)
        assert answer.status == 405 and answer.json()["error"] == "method not allowed", answer


# --------------------------------------------------------------------------- tokens


def _token_config(tmp_path: Path, **api: Any) -> Path:
    (tmp_path / "in").mkdir(exist_ok=True)
    return write_config(
        tmp_path / "config.yml",
        {
            "database": str(tmp_path / "j.db"),
            "sources": [{"path": str(tmp_path / "in")}],
            "rules": [{"to": str(tmp_path / "out")}],
            "api": {"port": free_port(), **api},
            "monitor": {"enabled": False},
        },
    )


def test_a_short_token_is_refused_at_load(tmp_path: Path) -> None:
    short = "fifteen-chars-1"
    assert len(short) == 15
    result = run_cli("-c", _token_config(tmp_path, token=short), env=env_without_token())
    assert result.returncode == 2, result.stderr
    assert "api.token: " in result.stderr and "at least 16 characters" in result.stderr
    assert short not in result.stderr + result.stdout and "Traceback" not in result.stderr

    env = env_without_token(FILEDISPATCH_API_TOKEN=short)
    result = run_cli("-c", _token_config(tmp_path), env=env)
    assert result.returncode == 2, result.stderr
    assert "api.token_env: " in result.stderr and "FILEDISPATCH_API_TOKEN" in result.stderr
    assert short not in result.stderr + result.stdout

    result = run_cli("check", "-c", _token_config(tmp_path, token=short + "6"))
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("where", ["config", "environment", "reload"])
def test_a_token_in_a_malformed_request_is_not_logged(tmp_path: Path, where: str) -> None:
    token = "a-long-enough-api-token"
    port = free_port()
    if where == "environment":
        cfg = api_config(tmp_path, port)
        env = env_without_token(FILEDISPATCH_API_TOKEN=token)
    else:
        cfg = api_config(
            tmp_path, port, token=token if where == "config" else "the-first-api-token"
        )
        env = env_without_token()
    svc = ServiceProcess(cfg, env=env).start()
    try:
        if where == "reload":  # the log learns the token of the config it reloads
            data = yaml.safe_load(cfg.read_text(encoding="utf-8"))
            data["api"]["token"] = token
            write_config(cfg, data)
            svc.signal(signal.SIGHUP)
            wait_until(lambda: "reloaded" in svc.log())
        # the parser quotes the header it refuses, and with it the token
        data = f"GET /api/v1/logs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n"
        answer = raw(port, data.encode())
        assert answer.status == 400 and token not in answer.body.decode()
        line = wait_until(lambda: [x for x in svc.log().splitlines() if "web app: 400" in x])
        assert "Bearer ***" in line[0] and token not in svc.log()
    finally:
        assert svc.stop() == 0
