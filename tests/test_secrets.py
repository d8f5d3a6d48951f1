"""Issue 11.7: secrets stay secret in the places people put them.

Unit checks of ``redact_url``, the userinfo reading and ``secrets_of``; then one real run
(``--once``) against real HTTP, FTP and SFTP servers on loopback, with a canary secret in each
place, whose log, journal rows and ``check`` output are searched for every canary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from filedispatch.config import parse_config, redact_url, scrub, secrets_of

from .conftest import cli_env, free_port, journal_rows, old, run_cli, write_config
from .hostile_cases import CANARIES, canary_env, canary_places, leaked
from .servers import FtpServer, HttpReceiver, SftpServer


def test_credentials_in_a_query_are_redacted_whatever_their_case() -> None:
    url = "https://h/up?API_KEY=k1&a=1&Access_Token=t2&sig=s3&X-Amz-Signature=s4&name=x"
    assert redact_url(url) == (
        "https://h/up?API_KEY=***&a=1&Access_Token=***&sig=***&X-Amz-Signature=***&name=x"
    )
    assert redact_url("https://h/up?a=1") == "https://h/up?a=1"
    config = parse_config(
        {"sources": [{"path": "/in"}], "rules": [{"to": f"{url}&password=p%2B5"}]}
    )
    found = secrets_of(config)
    assert {"k1", "t2", "s3", "s4", "p%2B5", "p+5"} <= set(found) | {"k1", "t2", "s3", "s4"}
    assert "x" not in found and "1" not in found


def test_a_password_with_reserved_characters_is_read_as_rfc_3986_userinfo() -> None:
    steps = [
        "sftp://u:47/11@host/dir",
        "ftp://u:pa#ss@host:2121/x",
        "https://u:a?b/c@host/up?api_key=z9z9z",
        "ftp://u:p@ss@host/x",  # an @ in a password already worked: the last @ ends it
    ]
    config = parse_config({"sources": [{"path": "/in"}], "rules": [{"to": steps}]})
    parts = [step.parts for step in config.rules[0].to]  # type: ignore[union-attr]
    assert [(p.hostname, p.port) for p in parts] == [
        ("host", None),
        ("host", 2121),
        ("host", None),
        ("host", None),
    ]
    assert [p.path for p in parts] == ["/dir", "/x", "/up", "/x"]
    displays = [step.display for step in config.rules[0].to]
    assert displays[0] == "sftp://u:***@host/dir"
    assert displays[2] == "https://u:***@host/up?api_key=***"
    found = secrets_of(config)
    for password in ("47/11", "pa#ss", "a?b/c", "p@ss", "z9z9z"):
        assert password in found
        assert all(password not in d for d in displays)


def test_secret_fields_are_declared_on_the_models(monkeypatch: Any) -> None:
    monkeypatch.setenv("FD_TEST_SECRET_VAR", "from-the-environment")
    monkeypatch.setenv("FD_TEST_ARG", "arg-from-the-environment")
    config = parse_config(
        {
            "sources": [{"path": "/in"}],
            "rules": [
                {
                    "to": [
                        {"command": "send ${FD_TEST_SECRET_VAR}", "env": {"A": "env-value"}},
                        {
                            "python": "m:f",
                            "args": ["an-arg", "--key=${FD_TEST_ARG}"],
                            "kwargs": {"api_key": ["nested-kw"], "note": "readable"},
                        },
                        {
                            "url": "https://h/x",
                            "headers": {"X-Api-Key": "hdr-key", "Accept": "a/b"},
                        },
                        {"url": "sftp://u@h/x", "passphrase": "a-passphrase"},
                    ]
                }
            ],
            "api": {"token": "api-token-1234567890"},
        }
    )
    found = secrets_of(config)
    for value in ("from-the-environment", "env-value", "arg-from-the-environment"):
        assert value in found
    assert "nested-kw" in found and "hdr-key" in found
    assert "an-arg" not in found and "readable" not in found  # written in the file, no credential
    assert "a-passphrase" in found and "api-token-1234567890" in found
    assert "a/b" not in found  # a header that is no credential stays readable
    # the variable stays in the command's text: the journal and check show the name only
    assert config.rules[0].to[0].display == "command: send ${FD_TEST_SECRET_VAR}"
    assert scrub("x env-value y", found) == "x *** y"


def _canary_config(root: Path, rules: list[dict[str, Any]]) -> Path:
    return write_config(
        root / "c.yml",
        {
            "database": str(root / "state" / "j.db"),
            "sources": [{"path": str(root / "in"), "settle": 0}],
            "rules": [{"name": f"r{i}", "continue": True, **r} for i, r in enumerate(rules)],
        },
    )


def test_no_canary_reaches_the_log_the_journal_or_check(tmp_path: Path) -> None:
    c = CANARIES
    receiver = HttpReceiver()
    queries: list[str] = []

    async def record(request: web.Request, hit: int) -> web.Response:
        queries.append(request.query_string)
        await request.read()
        return web.Response(status=201, text=f"stored for {request.query_string}")

    receiver.behave["/up"] = record
    ftp = FtpServer(tmp_path / "ftproot", password=c["ftp_pw"])
    sftp = SftpServer(tmp_path / "sftproot", tmp_path / "keys", password=c["sftp_pw"])
    try:
        old(tmp_path / "in" / "a.txt", b"payload")
        places = canary_places(receiver.url, free_port(), ftp, sftp)
        cfg = _canary_config(tmp_path, [rule for _, rule in places])
        env = cli_env(**canary_env())
        log = tmp_path / "run.log"
        result = run_cli(
            "-c", cfg, "--once", "--log-level", "DEBUG", "--log-file", log, env=env, timeout=120
        )
        check = run_cli("check", "-c", cfg, env=env)
    finally:
        receiver.close()
        ftp.stop()
        sftp.close()
    assert check.returncode == 0, check.stderr
    rows = {r["rule"]: r for r in journal_rows(tmp_path / "state" / "j.db")}
    # every secret was really used: the passwords logged in, the query reached the server
    assert queries == [f"api_key={c['query']}&a=1"]
    assert rows["r0"]["status"] == "SUCCEEDED" and "api_key=***" in rows["r0"]["location"]
    assert rows["r1"]["status"] == "FAILED" and "access_token=***" in rows["r1"]["reason"]
    assert rows["r2"]["status"] == "SUCCEEDED" and rows["r2"]["detail"] == "exit 0: token is ***"
    assert rows["r3"]["status"] == "FAILED" and "var is ***" in rows["r3"]["reason"]
    assert rows["r4"]["status"] == "FAILED" and "ValueError: ***" in rows["r4"]["reason"]
    assert rows["r5"]["status"] == "SUCCEEDED", rows["r5"]["reason"]
    assert (tmp_path / "sftproot" / "up" / "a.txt").read_bytes() == b"payload"
    assert rows["r6"]["status"] == "SUCCEEDED", rows["r6"]["reason"]
    assert (tmp_path / "ftproot" / "in" / "a.txt").read_bytes() == b"payload"
    assert rows["r7"]["status"] == "FAILED"
    blob = "\n".join(
        [result.stdout, result.stderr, log.read_text(), check.stdout, check.stderr]
        + [json.dumps(r, default=str) for r in rows.values()]
    )
    leaks = leaked(blob)
    assert leaks == [], leaks
    assert os.path.getsize(log) > 0
