"""HTTP destinations against a real aiohttp receiver on loopback, through the real CLI."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from aiohttp import web

from filedispatch.errors import SourceVanishedError
from filedispatch.processors.http import FileBody
from filedispatch.processors.inputs import WHOLE_MAX, read_checked
from filedispatch.processors.remote import HASH_AWAY, copy_to

from .conftest import cli_env, delivery_name, journal_rows, run_cli
from .servers import (
    FAST_RETRY,
    EarlyAnswer,
    FtpServer,
    HttpReceiver,
    fails_at_once,
    keep_idempotency_keys,
    old_file,
    remote_config,
    self_signed,
    sha256_of,
)


@pytest.fixture
def receiver() -> Iterator[HttpReceiver]:
    r = HttpReceiver()
    yield r
    r.close()


def once(cfg: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli("-c", cfg, "--once", *args, timeout=90)


def test_raw_post_put_chunked_and_multipart_arrive_intact(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    ws, url = workspace, receiver.url
    a = old_file(ws["inbox"] / "a.bin", 300_000)
    b = old_file(ws["inbox"] / "b c.txt", b"hello world\n")
    cfg = remote_config(
        ws,
        {"url": f"{url}/raw"},
        {"url": f"{url}/dav/{{yyyy}}/{{name}}", "method": "PUT"},
        {"url": f"{url}/chunked", "chunked": True},
        {"url": f"{url}/form", "fieldname": "upload", "fields": {"kind": "report"}},
    )
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    rows = journal_rows(ws["db"])
    assert len(rows) == 8 and {r["status"] for r in rows} == {"SUCCEEDED"}
    assert {r["attempts"] for r in rows} == {1}, result.stderr
    rows_of = {(r["filename"], r["step"]): r for r in rows}
    year = time.strftime("%Y", time.localtime(a.stat().st_mtime))
    got = {(r.path, r.method): r for r in receiver.received}
    assert len(got) == 5  # /raw, /chunked and /form got both files
    for src in (a, b):
        digest, size = sha256_of(src), src.stat().st_size
        put = got[(f"/dav/{year}/{src.name}", "PUT")]
        assert (put.sha256, put.size) == (digest, size)
        assert put.headers["Content-Length"] == str(size)
        # the journal's token, the row id and when it was planned: unique across journals
        # and across a journal's past (a restored backup gives row ids again)
        assert put.headers["Idempotency-Key"] == delivery_name(ws["db"], rows_of[(src.name, 1)])
    raws = [r for r in receiver.received if r.path == "/raw"]
    assert {(r.sha256, r.headers["Content-Length"]) for r in raws} == {
        (sha256_of(a), str(a.stat().st_size)),
        (sha256_of(b), str(b.stat().st_size)),
    }
    chunked = [r for r in receiver.received if r.path == "/chunked"]
    assert {r.headers.get("Transfer-Encoding") for r in chunked} == {"chunked"}
    assert {r.sha256 for r in chunked} == {sha256_of(a), sha256_of(b)}
    forms = [r for r in receiver.received if r.path == "/form"]
    assert {(r.filename, r.sha256) for r in forms} == {
        ("a.bin", sha256_of(a)),
        ("b c.txt", sha256_of(b)),
    }
    assert all(r.fields == {"kind": "report"} for r in forms)
    assert all("Content-Length" in r.headers for r in forms)
    locations = {r["location"] for r in rows}
    assert f"{url}/dav/{year}/b%20c.txt" in locations


def test_500_twice_then_201_is_delivered_on_the_third_attempt(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    async def flaky(request: web.Request, hit: int) -> web.Response | None:
        if hit > 2:
            return None  # the receiver records it
        await request.read()
        return web.Response(status=500, text="try later")

    receiver.behave["/flaky"] = flaky
    src = old_file(workspace["inbox"] / "f.dat", 70_000)
    cfg = remote_config(workspace, {"url": f"{receiver.url}/flaky", "retry": FAST_RETRY})
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("SUCCEEDED", 3)
    assert receiver.hits["/flaky"] == 3
    assert [r.sha256 for r in receiver.received] == [sha256_of(src)]


def test_429_waits_as_long_as_retry_after_says(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    seen: list[float] = []

    async def busy(request: web.Request, hit: int) -> web.Response | None:
        seen.append(time.monotonic())
        if hit > 1:
            return None
        await request.read()
        return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")

    receiver.behave["/busy"] = busy
    old_file(workspace["inbox"] / "f.dat", b"x" * 1000)
    cfg = remote_config(workspace, {"url": f"{receiver.url}/busy", "retry": FAST_RETRY})
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("SUCCEEDED", 2)
    assert seen[1] - seen[0] >= 0.9  # not the 0.05 s of the retry policy


def test_403_fails_at_once_with_the_status_and_the_answer(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    async def forbidden(request: web.Request, hit: int) -> web.Response:
        await request.read()
        return web.Response(status=403, text="quota exceeded for this account " + "x" * 500)

    receiver.behave["/no"] = forbidden
    old_file(workspace["inbox"] / "f.dat", b"data")
    row, _ = fails_at_once(workspace, {"url": f"{receiver.url}/no"})
    assert "403" in row["reason"] and "quota exceeded for this account" in row["reason"]
    assert len(row["reason"]) < 400
    assert receiver.hits["/no"] == 1


def test_a_200_whose_body_says_no_is_a_failure(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    async def liar(request: web.Request, hit: int) -> web.Response:
        await request.read()
        return web.json_response({"result": {"ok": False}, "error": "disk full"})

    receiver.behave["/api"] = liar
    old_file(workspace["inbox"] / "f.dat", b"data")
    expect = {"json_field": "result.ok", "json_value": True}
    cfg = remote_config(workspace, {"url": f"{receiver.url}/api", "expect": expect})
    assert once(cfg).returncode == 1
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "FAILED" and "result.ok" in row["reason"]
    assert "disk full" in row["reason"]


def test_a_connection_closed_mid_upload_is_retried(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    async def hangup(request: web.Request, hit: int) -> web.Response | None:
        if hit == 1:
            await request.content.readexactly(256 * 1024)
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        return None

    receiver.behave["/up"] = hangup
    src = old_file(workspace["inbox"] / "big.dat", 8 * 1024 * 1024)
    cfg = remote_config(workspace, {"url": f"{receiver.url}/up", "retry": FAST_RETRY})
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("SUCCEEDED", 2)
    assert [(r.sha256, r.size) for r in receiver.received] == [(sha256_of(src), 8 << 20)]


def test_a_server_that_never_answers_times_out(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    release = asyncio.Event()

    async def silent(request: web.Request, hit: int) -> web.Response:
        await request.read()
        await release.wait()
        return web.Response(status=201)

    receiver.behave["/silent"] = silent
    old_file(workspace["inbox"] / "f.dat", b"data")
    dest = {
        "url": f"{receiver.url}/silent",
        "retry": {"attempts": 2, "delay": 0.05},
        "http_timeout": {"connect": 2, "read": 0.3},
    }
    t0 = time.monotonic()
    result = once(remote_config(workspace, dest))
    assert time.monotonic() - t0 < 20
    receiver.lt.loop.call_soon_threadsafe(release.set)
    assert result.returncode == 1
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("FAILED", 2)
    assert "timed out" in row["reason"] and "gave up after 2 attempts" in row["reason"]


def test_a_50_mb_upload_keeps_memory_flat(workspace: dict[str, Path]) -> None:
    receiver = HttpReceiver(read_delay=0.01)  # about 1 MiB per 10 ms: time to sample
    try:
        size = 50 * 1024 * 1024
        src = old_file(workspace["inbox"] / "big.bin", size)
        cfg = remote_config(workspace, {"url": f"{receiver.url}/big", "method": "PUT"})
        proc = subprocess.Popen(
            [sys.executable, "-m", "filedispatch", "-c", str(cfg), "--once"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=cli_env(),
        )
        ps = psutil.Process(proc.pid)
        assert receiver.first_byte.wait(30)
        start = ps.memory_info().rss
        peak = start
        while proc.poll() is None:
            try:
                peak = max(peak, ps.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)
        assert proc.wait(60) == 0, proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        assert [(r.size, r.sha256) for r in receiver.received] == [(size, sha256_of(src))]
        grew = (peak - start) / 2**20
        assert grew < 16, f"RSS grew by {grew:.1f} MiB while streaming 50 MiB"
    finally:
        receiver.close()


def test_no_secret_reaches_logs_journal_or_check(
    workspace: dict[str, Path], receiver: HttpReceiver, tmp_path: Path
) -> None:
    http_pw, token, ftp_pw = "Http-Pa55-w0rd", "tok-SECRET-9f8e7d", "Ftp-Pa55-w0rd"

    async def echo(request: web.Request, hit: int) -> web.Response:
        await request.read()  # a server that echoes the credentials back in its error
        return web.Response(status=500, text=f"bad auth {request.headers.get('Authorization')}")

    receiver.behave["/echo"] = echo
    receiver.behave["/echo2"] = echo
    ftp = FtpServer(tmp_path / "ftproot", password=ftp_pw)
    try:
        old_file(workspace["inbox"] / "f.dat", b"data")
        base = receiver.url.replace("http://", f"http://user:{http_pw}@")
        retry = {"attempts": 2, "delay": 0.05}
        cfg = remote_config(
            workspace,
            {"url": f"{base}/echo", "retry": retry},
            {"url": f"{receiver.url}/echo2", "token": token, "retry": retry},
            {"url": ftp.url("/in/", password="wrong-" + ftp_pw), "retry": retry},
        )
        # a failed step stops its chain: the second and third also run on their own
        result = once(cfg, "--log-level", "DEBUG")
        cfg2 = remote_config(
            workspace,
            {"url": f"{receiver.url}/echo2", "token": token, "retry": retry},
            database=str(workspace["root"] / "j2.db"),
            file="c2.yml",
        )
        result2 = once(cfg2, "--log-level", "DEBUG")
        cfg3 = remote_config(
            workspace,
            {"url": ftp.url("/in/", password="wrong-" + ftp_pw), "retry": retry},
            database=str(workspace["root"] / "j3.db"),
            file="c3.yml",
        )
        result3 = once(cfg3, "--log-level", "DEBUG")
        check = run_cli("check", "-c", cfg)
        assert check.returncode == 0, check.stderr
        assert "user:***@" in check.stdout
        texts = [
            result.stdout,
            result.stderr,
            result2.stderr,
            result3.stderr,
            check.stdout,
            check.stderr,
        ]
        rows = (
            journal_rows(workspace["db"])
            + journal_rows(workspace["root"] / "j2.db")
            + journal_rows(workspace["root"] / "j3.db")
        )
        assert len(rows) == 5 and {r["status"] for r in rows} == {"FAILED"}
        texts += [json.dumps(r, default=str) for r in rows]
        blob = "\n".join(texts)
        assert "bad auth" in blob and "login refused" in blob  # the errors are there...
        for secret in (http_pw, token, ftp_pw, "Basic dXNlcjpIdHRwLVBhNTUtdzByZA=="):
            assert secret not in blob  # ... but never the secrets
    finally:
        ftp.stop()


def test_config_refuses_two_authorizations(workspace: dict[str, Path]) -> None:
    dest: dict[str, Any] = {"url": "https://u:pw-Secret@example.org/x", "token": "t0ken"}
    result = run_cli("check", "-c", remote_config(workspace, dest))
    assert result.returncode == 2
    assert "one of" in result.stderr and "pw-Secret" not in result.stderr


def test_the_documented_examples_are_valid_configs() -> None:
    import re

    import yaml

    from filedispatch.config import parse_config

    doc = (Path(__file__).parent.parent / "docs" / "destinations-remote.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", doc, re.S)
    assert len(blocks) >= 6
    for block in blocks:
        config = parse_config(yaml.safe_load(block), "docs")
        assert config.rules


def test_a_redirect_is_not_followed(workspace: dict[str, Path], receiver: HttpReceiver) -> None:
    async def moved(request: web.Request, hit: int) -> web.Response:
        await request.read()
        return web.Response(status=302, headers={"Location": "/elsewhere"})

    receiver.behave["/old"] = moved
    old_file(workspace["inbox"] / "f.dat", b"data")
    row, _ = fails_at_once(workspace, {"url": f"{receiver.url}/old"})
    assert "redirected to /elsewhere" in row["reason"]
    assert receiver.hits == {"/old": 1}  # no GET to /elsewhere


def test_https_checks_the_certificate_unless_told_otherwise(
    workspace: dict[str, Path], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path / "tls")
    receiver = HttpReceiver(tls=(cert, key))
    try:
        src = old_file(workspace["inbox"] / "f.dat", 10_000)
        cfg = remote_config(
            workspace,
            {"url": f"{receiver.url}/ca", "ca_file": str(cert)},
            {"url": f"{receiver.url}/noverify", "verify": False},
        )
        result = once(cfg)
        assert result.returncode == 0, result.stderr
        assert sorted((r.path, r.sha256) for r in receiver.received) == [
            ("/ca", sha256_of(src)),
            ("/noverify", sha256_of(src)),
        ]
        assert "TLS certificate checking is OFF" in result.stderr
        (workspace["db"]).unlink()
        row, _ = fails_at_once(workspace, {"url": f"{receiver.url}/default"})
        assert "certificate is not trusted" in row["reason"] and "ca_file" in row["reason"]
    finally:
        receiver.close()


def test_nobody_listening_is_retried_then_fails(workspace: dict[str, Path]) -> None:
    from .conftest import free_port

    old_file(workspace["inbox"] / "f.dat", b"data")
    dest = {"url": f"http://127.0.0.1:{free_port()}/x", "retry": FAST_RETRY}
    assert once(remote_config(workspace, dest)).returncode == 1
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("FAILED", 3)
    assert "Cannot connect" in row["reason"] and "gave up after 3 attempts" in row["reason"]


def test_a_file_not_in_the_page_cache_is_read_off_the_loop_and_arrives_intact(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    """Cached data is read inline (RWF_NOWAIT); evicted data through the executor."""
    src = old_file(workspace["inbox"] / "cold.bin", 6 * 1024 * 1024 + 123)
    fd = os.open(src, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # evict: reads must go to disk
    finally:
        os.close(fd)
    result = once(remote_config(workspace, {"url": f"{receiver.url}/cold"}))
    assert result.returncode == 0, result.stderr
    (got,) = receiver.received
    assert (got.sha256, got.size) == (sha256_of(src), src.stat().st_size)


@pytest.mark.parametrize(
    ("status", "abort", "outcome", "attempts"),
    [
        (413, False, "FAILED", 1),
        (401, True, "FAILED", 1),
        (403, False, "FAILED", 1),
        (503, True, "FAILED", 3),
        (429, False, "FAILED", 3),
    ],
)
def test_an_answer_sent_before_the_body_was_read_is_classified_by_its_status(
    workspace: dict[str, Path], status: int, abort: bool, outcome: str, attempts: int
) -> None:
    server = EarlyAnswer(status, abort=abort)
    try:
        old_file(workspace["inbox"] / "big.dat", 30 * 1024 * 1024)
        dest = {"url": f"{server.url}/up", "retry": FAST_RETRY}
        result = once(remote_config(workspace, dest))
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == (outcome, attempts), row
    assert f"HTTP {status}" in row["reason"] and f"refused with {status}" in row["reason"]
    assert "Can not write request body" not in row["reason"]
    # each request asked before sending its body, so the answer came before any of it
    assert server.requests == server.continued == attempts


def test_a_success_answered_before_the_body_was_read_is_no_delivery(
    workspace: dict[str, Path],
) -> None:
    server = EarlyAnswer(201)  # "201" from the headers alone, then the connection closes
    try:
        old_file(workspace["inbox"] / "big.dat", 3 * 1024 * 1024)
        result = once(remote_config(workspace, {"url": f"{server.url}/up", "retry": FAST_RETRY}))
    finally:
        server.close()
    assert result.returncode == 1, result.stderr
    (row,) = journal_rows(workspace["db"])
    assert (row["status"], row["attempts"]) == ("FAILED", 3)
    assert "HTTP 201 came before the whole file was sent" in row["reason"]
    assert row["sha256"] is None


# ------------------------------------------------------------ names, Expect, verify

ODD_NAMES = ["two\nlines.txt", 'é "q";50%.txt', "tab\there\\.txt"]


def _sent_name(rec: Any) -> str | None:
    from aiohttp.multipart import content_disposition_filename, parse_content_disposition

    _, params = parse_content_disposition(rec.headers.get("Content-Disposition"))
    return content_disposition_filename(params, "filename")


@pytest.mark.parametrize("how", ["raw", "template", "form"])
def test_any_name_arrives_as_it_is(
    workspace: dict[str, Path], receiver: HttpReceiver, how: str
) -> None:
    for name in ODD_NAMES:
        old_file(workspace["inbox"] / name, name.encode())
    dest: dict[str, Any] = {"url": f"{receiver.url}/up", "retry": FAST_RETRY}
    if how == "template":
        dest.update(url=f"{receiver.url}/dav/{{name}}", method="PUT")
    elif how == "form":
        dest.update(fieldname="file")
    result = once(remote_config(workspace, dest))
    assert result.returncode == 0, result.stderr
    rows = journal_rows(workspace["db"])
    assert {(r["status"], r["attempts"]) for r in rows} == {("SUCCEEDED", 1)}
    if how == "raw":
        assert sorted(_sent_name(r) or "" for r in receiver.received) == sorted(ODD_NAMES)
        for r in receiver.received:  # the fallback: printable ASCII, no quote or percent
            fallback = r.headers["Content-Disposition"].split('filename="')[1].split('"')[0]
            assert fallback.isascii() and fallback.isprintable() and "%" not in fallback
    elif how == "template":
        assert sorted(r.path for r in receiver.received) == sorted(f"/dav/{n}" for n in ODD_NAMES)
    else:
        assert sorted(r.filename or "" for r in receiver.received) == sorted(ODD_NAMES)
    assert sorted(r.sha256 for r in receiver.received) == sorted(
        hashlib.sha256(n.encode()).hexdigest() for n in ODD_NAMES
    )


def test_a_large_file_reaches_a_server_that_ignores_expect(workspace: dict[str, Path]) -> None:
    import http.server
    import threading

    got: list[bytes] = []

    class Old(http.server.BaseHTTPRequestHandler):  # HTTP/1.0: never sends 100 Continue
        def do_POST(self) -> None:
            got.append(self.rfile.read(int(self.headers["Content-Length"])))
            self.send_response(201)
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Old)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        src = old_file(workspace["inbox"] / "big.bin", 3 * 1024 * 1024)
        url = f"http://127.0.0.1:{server.server_address[1]}/up"
        result = once(remote_config(workspace, {"url": url, "retry": FAST_RETRY}))
    finally:
        server.shutdown()
        server.server_close()
    assert result.returncode == 0, result.stderr
    assert [hashlib.sha256(b).hexdigest() for b in got] == [sha256_of(src)]
    (row,) = journal_rows(workspace["db"])
    assert (row["attempts"], row["sha256"]) == (1, sha256_of(src))


def _echo(digest: str | None = None, field: dict[str, Any] | None = None) -> Any:
    """A receiver that reads the body and echoes its SHA-256 (or ``digest``) as Repr-Digest,
    or the JSON ``field`` (its values may be "size" and "sha256": what arrived)."""

    async def handler(request: web.Request, hit: int) -> web.Response:
        body = await request.read()
        real = hashlib.sha256(body).hexdigest()
        if field is not None:
            values = {"size": len(body), "sha256": real}
            echoed = {k: values.get(v, v) for k, v in field.items()}
            return web.json_response({"file": echoed}, status=201)
        sent = bytes.fromhex(digest or real)
        value = "sha-256=:" + base64.b64encode(sent).decode() + ":"
        return web.Response(status=201, headers={"Repr-Digest": value})

    return handler


def test_verify_against_an_echoed_digest(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    receiver.behave["/good"] = _echo()
    receiver.behave["/liar"] = _echo(digest="00" * 32)
    receiver.behave["/mute"] = _echo(field={})
    src = old_file(workspace["inbox"] / "a.bin", 200_000)
    steps = [
        {"url": f"{receiver.url}/good", "verify": "sha256", "retry": FAST_RETRY},
        {"url": f"{receiver.url}/liar", "retry": FAST_RETRY},  # verify: size checks it too
        {"url": f"{receiver.url}/mute", "verify": "sha256", "retry": FAST_RETRY},
    ]
    for step in steps:
        workspace["db"].unlink(missing_ok=True)
        once(remote_config(workspace, step))
        (row,) = journal_rows(workspace["db"])
        path = step["url"].rsplit("/", 1)[1]
        if path == "good":
            assert (row["status"], row["sha256"]) == ("SUCCEEDED", sha256_of(src))
        elif path == "liar":
            assert (row["status"], row["attempts"]) == ("FAILED", 3)
            assert "verify: the server received SHA-256 0000" in row["reason"]
        else:
            assert (row["status"], row["attempts"]) == ("FAILED", 1)
            assert "needs the server to echo the digest" in row["reason"]


def test_verify_against_echoed_json_fields(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    receiver.behave["/short"] = _echo(field={"n": 7, "sum": "sha256"})
    receiver.behave["/ok"] = _echo(field={"n": "size", "sum": "sha256"})
    src = old_file(workspace["inbox"] / "a.bin", 50_000)
    expect = {"size_field": "file.n", "sha256_field": "file.sum"}
    for path, status in (("short", "FAILED"), ("ok", "SUCCEEDED")):
        workspace["db"].unlink(missing_ok=True)
        dest = {"url": f"{receiver.url}/{path}", "expect": expect, "retry": FAST_RETRY}
        once(remote_config(workspace, dest))
        (row,) = journal_rows(workspace["db"])
        assert row["status"] == status, row
        if status == "FAILED":
            assert row["attempts"] == 3 and "received 7 bytes of 50000" in row["reason"]
        else:
            assert row["sha256"] == sha256_of(src)


def test_the_sha256_sent_is_shown_by_history_and_the_api(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    import urllib.request

    from .conftest import ServiceProcess, free_port, wait_until

    src = old_file(workspace["inbox"] / "a.bin", 10_000)
    port = free_port()
    cfg = remote_config(workspace, {"url": f"{receiver.url}/up"})
    data = yaml.safe_load(cfg.read_text())
    data["api"] = {"enabled": True, "host": "127.0.0.1", "port": port}
    cfg.write_text(yaml.safe_dump(data))
    svc = ServiceProcess(cfg).start()
    try:
        (row,) = wait_until(lambda: journal_rows(workspace["db"], "status='SUCCEEDED'"))
        base = f"http://127.0.0.1:{port}/api/v1/logs"
        with urllib.request.urlopen(base) as answer:
            listed = json.load(answer)["results"]
        with urllib.request.urlopen(f"{base}/{row['id']}") as answer:
            detail = json.load(answer)
    finally:
        svc.stop()
    assert [e["sha256"] for e in listed] == [sha256_of(src)] == [detail["sha256"]]
    shown = run_cli("history", "show", str(row["id"]), "--db", workspace["db"])
    assert f"sha256:       {sha256_of(src)}" in shown.stdout


# ------------------------------------------------------------ small files: one read


def test_small_files_are_sent_from_one_read_and_arrive_intact(
    workspace: dict[str, Path], receiver: HttpReceiver
) -> None:
    """Files up to WHOLE_MAX go out from one read (inline when cached, else in a thread),
    raw and in a form alike; one byte more is streamed. Each arrives whole, with its
    Content-Length, and the journal keeps the SHA-256 of what was sent."""
    inbox = workspace["inbox"]
    files = [
        old_file(inbox / "empty.txt", b""),
        old_file(inbox / "small.bin", 4096),
        old_file(inbox / "edge.bin", WHOLE_MAX),
        old_file(inbox / "streamed.bin", WHOLE_MAX + 1),
        old_file(inbox / "cold.bin", 5000),
    ]
    fd = os.open(files[-1], os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # not cached: read in a thread
    finally:
        os.close(fd)
    url = receiver.url
    cfg = remote_config(workspace, {"url": f"{url}/raw"}, {"url": f"{url}/f", "fieldname": "f"})
    result = once(cfg)
    assert result.returncode == 0, result.stderr
    rows = journal_rows(workspace["db"])
    assert len(rows) == 10 and {r["status"] for r in rows} == {"SUCCEEDED"}
    assert {(r["filename"], r["sha256"]) for r in rows} == {(f.name, sha256_of(f)) for f in files}
    for path in ("/raw", "/f"):
        got = sorted(
            (r.sha256, r.size, r.headers["Content-Length"] if path == "/raw" else "")
            for r in receiver.received
            if r.path == path
        )
        want = sorted(
            (sha256_of(f), f.stat().st_size, str(f.stat().st_size) if path == "/raw" else "")
            for f in files
        )
        assert got == want


async def test_a_small_file_changed_after_it_was_opened_is_not_sent(tmp_path: Path) -> None:
    """The one read checks the file's identity after it, as streaming does before the last
    chunk: a writer that came back makes a new version, and this one is not sent."""
    src = tmp_path / "a.txt"
    src.write_bytes(b"first")
    fd = os.open(src, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        assert read_checked(fd, st) == b"first"
        with src.open("ab") as f:
            f.write(b" and more")
        with pytest.raises(SourceVanishedError, match="changed while it was sent"):
            read_checked(fd, st)
    finally:
        os.close(fd)


async def test_a_streamed_bodys_digest_is_whole_when_its_writer_is_cancelled_twice(
    tmp_path: Path,
) -> None:
    """aiohttp cancels a request's writer from more than one place once the answer is in
    (the response's release, its end). A second cancellation came while the writer waited
    for the last chunk's hash, still running in a thread: the writer ended, and the digest
    read then missed the last chunk, so a delivery the server confirmed whole was recorded
    with a wrong SHA-256 (seen once in a loaded CI run of
    test_a_large_file_reaches_a_server_that_ignores_expect). The hash must end first.
    The last chunk is 64 MiB so its hash takes a while, here about 100 ms."""
    chunk = 64 << 20
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20) * (2 * chunk // (1 << 20)))
    fd = os.open(src, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        body = FileBody(fd, st, chunk, lambda: None, "application/octet-stream")

        class SlowDrain:  # takes the bytes, then waits in the drain the answer cuts short
            taken = 0

            async def write(self, data: bytes) -> None:
                self.taken += len(data)
                if self.taken == st.st_size:
                    await asyncio.Event().wait()

        writer = SlowDrain()
        task = asyncio.ensure_future(body.write_with_length(writer, None))
        while writer.taken < st.st_size:
            await asyncio.sleep(0)
        task.cancel()  # the answer is in
        await asyncio.sleep(0)  # the writer is now waiting for the last chunk's hash
        task.cancel()  # and the response is released
        with pytest.raises(asyncio.CancelledError):
            await task
        assert body.complete
        assert body.digest.hexdigest() == sha256_of(src)
    finally:
        os.close(fd)


async def test_an_upload_cancelled_while_its_last_chunk_is_hashed_waits_for_that_hash(
    tmp_path: Path,
) -> None:
    """The answer can come once the last chunk is handed over and drained, while its hash
    still runs in a thread. A bare ``await`` of that thread's future, when the writer is
    cancelled, cancelled the future and returned at once: the digest was read without the
    last chunk and the journal recorded a SHA-256 the server never got (seen in a loaded run
    of test_a_large_file_reaches_a_server_that_ignores_expect: right bytes at the server, a
    wrong digest in the row). Here the last chunk's hash waits until the test has looked."""
    chunk = HASH_AWAY
    data = os.urandom(3 * chunk)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    gate = threading.Event()

    class LastChunkWaits:  # a real SHA-256 whose last update waits for the gate
        def __init__(self) -> None:
            self.real, self.fed = hashlib.sha256(), 0

        def update(self, part: bytes) -> None:
            self.fed += len(part)
            if self.fed == len(data):
                gate.wait()
            self.real.update(part)

    digest = LastChunkWaits()
    sent = bytearray()
    all_sent = asyncio.Event()

    async def write(part: bytes) -> None:
        sent.extend(part)
        if len(sent) == len(data):
            all_sent.set()

    fd = os.open(src, os.O_RDONLY)
    try:
        task = asyncio.ensure_future(copy_to(fd, os.fstat(fd), write, chunk, digest))
        await all_sent.wait()  # every byte handed over; the last hash is held at the gate
        task.cancel()  # the answer is in
        await asyncio.sleep(0)  # one turn of the loop: the task takes its cancellation
        ended_before_its_hash = task.done()
        gate.set()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        gate.set()
        os.close(fd)
    assert not ended_before_its_hash
    assert (bytes(sent), digest.real.hexdigest()) == (data, hashlib.sha256(data).hexdigest())


async def test_a_small_body_handed_whole_counts_as_sent_when_its_drain_is_cancelled(
    tmp_path: Path,
) -> None:
    """aiohttp cancels the body's writer once the answer is complete; a small file handed to
    the connection in its one write counts as sent whole even if that write's drain was
    still awaited (else a success would be taken for an answer before the body)."""
    src = tmp_path / "a.bin"
    src.write_bytes(b"x" * 5000)
    fd = os.open(src, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        data = read_checked(fd, st)
        body = FileBody(fd, st, 1 << 20, lambda: None, "application/octet-stream", None, data)

        class SlowDrain:  # the lowest seam: aiohttp's StreamWriter takes the bytes, then drains
            taken = b""

            async def write(self, chunk: bytes) -> None:
                self.taken += bytes(chunk)
                await asyncio.Event().wait()  # the drain, which the answer cuts short

        writer = SlowDrain()
        task = asyncio.ensure_future(body.write_with_length(writer, None))
        while not writer.taken:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert writer.taken == src.read_bytes() and body.complete
        assert body.digest.hexdigest() == sha256_of(src)
    finally:
        os.close(fd)


def test_two_journals_posting_to_one_idempotent_receiver_each_deliver_their_own_file(
    tmp_path: Path, receiver: HttpReceiver
) -> None:
    """Two hosts, each with its own SQLite journal (row ids start at 1 in each), post a file
    of their own to one receiver that drops a request whose ``Idempotency-Key`` it has seen,
    as the docs invite a receiver to. Both files are stored: the key names the journal as
    well as the row. With the bare row id as key, host B's row 1 carried A's key: the
    receiver dropped B's file as a repeat, B recorded SUCCEEDED and deleted its source."""
    dropped = keep_idempotency_keys(receiver, "/upload")
    sent = set()
    for host, data in (("a", b"host a's readings\n"), ("b", b"host b's other readings\n")):
        ws = {"root": tmp_path / host, "inbox": tmp_path / host / "inbox"}
        ws["db"] = ws["root"] / "journal.db"
        old_file(ws["inbox"] / f"{host}.csv", data)
        cfg = remote_config(ws, {"url": f"{receiver.url}/upload"}, source={"after": "delete"})
        result = once(cfg)
        assert result.returncode == 0, result.stderr
        ((row),) = journal_rows(ws["db"])
        assert row["status"] == "SUCCEEDED", row
        assert not (ws["inbox"] / f"{host}.csv").exists()  # consumed
        sent.add(hashlib.sha256(data).hexdigest())
    stored = {r.sha256 for r in receiver.received if r.path == "/upload"}
    assert sent <= stored, f"the receiver dropped a file as a repeat (keys {dropped})"
    assert dropped == []
