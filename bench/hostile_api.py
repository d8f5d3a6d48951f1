"""Hostile requests against a running service (issue 11, item 8): the real CLI serves the web
app on loopback without a token (the set-up a DNS-rebinding or cross-site page attacks), and a
fixed set of raw requests goes to it over sockets: malformed request lines and headers, huge
headers, bad JSON, wrong methods, odd paths (``..``, NUL, bad escapes), bad query values,
foreign ``Host`` and ``Origin`` headers.

    python bench/hostile_api.py [--keep]   (--keep: leave the temporary folder and say where)

Prints one line per probe that was answered badly, then::

    API probes N / 5xx M / tracebacks in log K
    not JSON E / foreign requests answered F / journal rows changed C

"not JSON": an answer (any status >= 400) whose body is not a JSON object with ``error``.
"foreign requests answered": probes that a browser on another origin could send (a foreign
Host, a cross-site Origin, a form-like content type) answered 2xx. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Probe:
    name: str
    raw: bytes
    #: a request a foreign page could make: any 2xx answer to it is a failure of the defence
    foreign: bool = False


@dataclass
class Answer:
    status: int | None
    content_type: str
    body: bytes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def request(
    method: str,
    target: str,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", "Connection: close"]
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def probes(port: int, failed_id: int) -> list[Probe]:
    h = f"127.0.0.1:{port}"
    # a request a program may send (no Origin, JSON) is allowed to retry: those name no row;
    # the foreign ones name the failed row, which must stay as it is
    retry, row = "/api/v1/logs/987654/retry", "/api/v1/logs/987654"
    foreign_retry = f"/api/v1/logs/{failed_id}/retry"
    foreign_row = f"/api/v1/logs/{failed_id}"
    js = {"Content-Type": "application/json"}
    out = [
        # request lines and headers aiohttp's own parser refuses
        Probe("garbage line", b"GARBAGE\r\n\r\n"),
        Probe("method only", b"GET\r\n\r\n"),
        Probe("HTTP/9.9", f"GET / HTTP/9.9\r\nHost: {h}\r\n\r\n".encode()),
        Probe("NUL in target", f"GET /\x00 HTTP/1.1\r\nHost: {h}\r\n\r\n".encode()),
        Probe("TLS hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),
        Probe("header without colon", f"GET / HTTP/1.1\r\nHost: {h}\r\nBad\r\n\r\n".encode()),
        Probe(
            "control char in header", f"GET / HTTP/1.1\r\nHost: {h}\r\nX: a\x01b\r\n\r\n".encode()
        ),
        Probe("newline in header name", f"GET / HTTP/1.1\r\nHost: {h}\r\nX\nY: 1\r\n\r\n".encode()),
        Probe("huge header", request("GET", "/health", h, {"X-Big": "a" * 100_000})),
        Probe("huge request line", request("GET", "/" + "a" * 100_000, h)),
        Probe("many headers", request("GET", "/health", h, {f"X-{i}": "1" for i in range(2000)})),
        Probe(
            "negative length",
            f"POST {retry} HTTP/1.1\r\nHost: {h}\r\nContent-Length: -1\r\n\r\n".encode(),
        ),
        Probe(
            "length not a number",
            f"POST {retry} HTTP/1.1\r\nHost: {h}\r\nContent-Length: x\r\n\r\n".encode(),
        ),
        Probe(
            "chunked and length",
            f"POST {retry} HTTP/1.1\r\nHost: {h}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n".encode(),
        ),
        Probe(
            "bad chunk",
            f"POST {retry} HTTP/1.1\r\nHost: {h}\r\nContent-Type: application/json\r\n"
            "Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n".encode(),
        ),
        Probe(
            "latin-1 in target",
            f"GET /api/v1/logs?filename=\xe9 HTTP/1.1\r\nHost: {h}\r\n\r\n".encode("latin-1"),
        ),
        Probe("HTTP/1.0 without Host", b"GET /api/v1/logs HTTP/1.0\r\n\r\n"),
        # bad bodies
        Probe("bad JSON", request("POST", retry, h, js, b"{")),
        Probe("JSON null", request("POST", retry, h, js, b"null")),
        Probe("too big a body", request("POST", retry, h, js, b"[" + b"1," * 40_000 + b"1]")),
        Probe(
            "gzip bomb header", request("POST", retry, h, {**js, "Content-Encoding": "gzip"}, b"xx")
        ),
        # methods
        Probe("PUT", request("PUT", "/api/v1/logs", h, js)),
        Probe("PATCH", request("PATCH", row, h, js)),
        Probe("OPTIONS", request("OPTIONS", retry, h)),
        Probe("TRACE", request("TRACE", "/", h)),
        Probe("CONNECT", request("CONNECT", "127.0.0.1:22", h)),
        Probe("unknown method", request("FROB", "/", h)),
        Probe("POST on a GET route", request("POST", "/api/v1/status", h, js)),
        Probe("DELETE the list", request("DELETE", "/api/v1/logs", h, js)),
        # paths
        Probe("dotdot static", request("GET", "/static/../config.yml", h)),
        Probe("encoded dotdot", request("GET", "/static/%2e%2e/%2e%2e/etc/passwd", h)),
        Probe("encoded slash", request("GET", "/static/..%2f..%2fconfig.yml", h)),
        Probe("backslash", request("GET", "/static/..\\..\\config.yml", h)),
        Probe("missing static", request("GET", "/static/nothing.js", h)),
        Probe("static folder", request("GET", "/static/", h)),
        Probe("NUL escaped", request("GET", "/static/app.js%00.png", h)),
        Probe("NUL in id", request("GET", "/api/v1/logs/1%00", h)),
        Probe("bad escape", request("GET", "/api/v1/logs/%zz", h)),
        Probe("invalid UTF-8", request("GET", "/api/v1/logs/%ff%fe", h)),
        Probe("double slash", request("GET", "//etc/passwd", h)),
        Probe("dotdot to api", request("GET", "/static/../api/v1/status", h)),
        Probe("long path", request("GET", "/api/v1/logs/" + "9" * 5000, h)),
        Probe("absolute-form target", request("GET", "http://evil.example/api/v1/logs", h)),
        Probe("asterisk target", request("OPTIONS", "*", h)),
        # query values
        Probe("limit inf", request("GET", "/api/v1/logs?limit=1e309", h)),
        Probe("offset huge", request("GET", "/api/v1/logs?offset=" + "9" * 40, h)),
        Probe("NUL in filter", request("GET", "/api/v1/logs?filename=%00", h)),
        Probe("bad UTF-8 in filter", request("GET", "/api/v1/logs?filename=%ff", h)),
        Probe("long cursor", request("GET", "/api/v1/logs?cursor=" + "A" * 20_000, h)),
        Probe("ordering injection", request("GET", "/api/v1/logs?ordering=id;DROP%20TABLE%20x", h)),
        Probe("created far future", request("GET", "/api/v1/logs?created__gte=99999-01-01", h)),
        Probe("stats period bad", request("GET", "/api/v1/stats?period=%00", h)),
        Probe(
            "many parameters",
            request("GET", "/api/v1/logs?" + "&".join(f"p{i}=1" for i in range(3000)), h),
        ),
        Probe("repeated limit", request("GET", "/api/v1/logs?limit=1&limit=2", h)),
        # what a page on another origin can send
        Probe(
            "rebinding GET", request("GET", "/api/v1/logs", f"evil.example:{port}"), foreign=True
        ),
        Probe(
            "rebinding status",
            request("GET", "/api/v1/status", f"evil.example:{port}"),
            foreign=True,
        ),
        Probe(
            "rebinding DELETE",
            request("DELETE", foreign_row, f"evil.example:{port}", js),
            foreign=True,
        ),
        Probe(
            "rebinding retry",
            request("POST", foreign_retry, f"evil.example:{port}", js),
            foreign=True,
        ),
        Probe("other port in Host", request("GET", "/api/v1/logs", "127.0.0.1:1"), foreign=True),
        Probe(
            "no-cors text/plain retry",
            request(
                "POST",
                foreign_retry,
                h,
                {"Content-Type": "text/plain", "Origin": "http://evil.example"},
            ),
            foreign=True,
        ),
        Probe(
            "form retry",
            request(
                "POST",
                foreign_retry,
                h,
                {"Content-Type": "application/x-www-form-urlencoded"},
                b"a=1",
            ),
            foreign=True,
        ),
        Probe("retry without a type", request("POST", foreign_retry, h), foreign=True),
        Probe("DELETE without a type", request("DELETE", foreign_row, h), foreign=True),
        Probe(
            "foreign Origin with JSON",
            request("POST", foreign_retry, h, {**js, "Origin": "http://evil.example"}),
            foreign=True,
        ),
        Probe(
            "same-site other port",
            request("POST", foreign_retry, h, {**js, "Origin": "http://127.0.0.1:1"}),
            foreign=True,
        ),
        Probe(
            "cross-site fetch",
            request("DELETE", foreign_row, h, {**js, "Sec-Fetch-Site": "cross-site"}),
            foreign=True,
        ),
        Probe(
            "null Origin", request("DELETE", foreign_row, h, {**js, "Origin": "null"}), foreign=True
        ),
    ]
    # deletions last: the retry probes need the failed row still there
    return sorted(out, key=lambda probe: probe.raw.startswith(b"DELETE"))


def send(port: int, raw: bytes, timeout: float = 15.0) -> Answer:
    """Send raw bytes, read until the server closes; the status, type and body (if any)."""
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(raw)
        except OSError:
            pass  # the server may close on a bad request before reading it all
        try:
            while chunk := s.recv(65536):
                data += chunk
        except OSError:
            pass
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status = None
    if lines and lines[0].startswith(b"HTTP/"):
        parts = lines[0].split()
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    ctype = ""
    chunked = False
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        if k.strip().lower() == "content-type":
            ctype = v.strip()
        if k.strip().lower() == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        body = dechunk(body)
    return Answer(status, ctype, body)


def dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, body = body.partition(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError:
            return out
        if size == 0:
            return out
        out, body = out + body[:size], body[size + 2 :]
    return out


def json_error(answer: Answer) -> bool:
    if not answer.content_type.startswith("application/json"):
        return False
    try:
        body = json.loads(answer.body)
    except ValueError:
        return False
    return isinstance(body, dict) and "error" in body


def wait_for(predicate: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit("the service did not get ready")
        time.sleep(0.1)


def rows(db: Path) -> list[tuple[int, str, float]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        found = conn.execute("SELECT id, status, finished FROM dispatches")
        return [(int(i), str(s), float(f or 0)) for i, s, f in found]
    except sqlite3.Error:
        return []
    finally:
        conn.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="fd-hostile-"))
    port = free_port()
    inbox = root / "inbox"
    inbox.mkdir()
    (root / "blocked").mkdir()
    (root / "blocked" / "d.bin").write_text("in the way (on_conflict: fail)")
    for name in ("a.txt", "d.bin"):
        (inbox / name).write_bytes(b"x" * 10)
        os.utime(inbox / name, (time.time() - 3600,) * 2)
    config = root / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "database": str(root / "journal.db"),
                "sources": [{"path": str(inbox), "name": "inbox", "settle": 0.2}],
                "rules": [
                    {"name": "docs", "extensions": ["txt"], "to": str(root / "out")},
                    {
                        "name": "broken",
                        "extensions": ["bin"],
                        "to": {"url": str(root / "blocked"), "on_conflict": "fail"},
                    },
                ],
                "api": {"port": port},
                "monitor": {"enabled": False},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "FILEDISPATCH_API_TOKEN"}
    log_path = root / "service.log"
    db = root / "journal.db"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "filedispatch", "-c", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=ROOT,
        )
    try:
        wait_for(
            lambda: len(r := rows(db)) == 2 and {s for _, s, _ in r} == {"SUCCEEDED", "FAILED"}
        )
        wait_for(lambda: "web app on" in log_path.read_text(errors="replace"))
        before = sorted(rows(db))
        failed_id = next(i for i, s, _ in before if s == "FAILED")
        n = server_errors = not_json = foreign_answered = 0
        for probe in probes(port, failed_id):
            n += 1
            answer = send(port, probe.raw)
            problems = []
            if answer.status is not None and answer.status >= 500:
                server_errors += 1
                problems.append("5xx")
            if answer.status is not None and answer.status >= 400 and not json_error(answer):
                not_json += 1
                problems.append(f"not JSON ({answer.content_type or 'no type'})")
            if probe.foreign and answer.status is not None and 200 <= answer.status < 300:
                foreign_answered += 1
                problems.append("answered")
            if problems:
                print(f"  {probe.name}: {answer.status} {', '.join(problems)}")
        after = sorted(rows(db))
        changed = len(set(before) ^ set(after))
        if proc.poll() is not None:
            print(f"  the service exited with {proc.returncode}")
    finally:
        proc.terminate()
        proc.wait(60)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    tracebacks = text.count("Traceback (most recent call last)")
    print(f"API probes {n} / 5xx {server_errors} / tracebacks in log {tracebacks}")
    print(
        f"not JSON {not_json} / foreign requests answered {foreign_answered} / "
        f"journal rows changed {changed}"
    )
    if args.keep:
        print(f"kept {root}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
