"""The retry policy (retry.py): what is retried, how often, until when; and network errors
retried through an ordinary outage (issue 15) against real servers that are down, then up.

The servers' outages are states the tests wait for, never durations: the service runs with
``FILEDISPATCH_RETRY_TESTING=1`` (no waits between tries), and a server comes up only once
the journal shows more tries than the old limit of 5.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from filedispatch import retry
from filedispatch.config import RetryPolicy
from filedispatch.errors import NetworkError, PermanentDeliveryError, TransientDeliveryError

from .conftest import ServiceProcess, cli_env, free_port, journal_rows, run_cli, wait_until
from .servers import FtpServer, HttpReceiver, files_under, old_file, remote_config, sha256_of

NO_WAITS = cli_env(FILEDISPATCH_RETRY_TESTING="1")
#: a row still being retried, past the 5 attempts that used to be the end
RETRYING = "status IN ('PENDING', 'IN_PROGRESS') AND attempts >= 7"


@pytest.fixture
def no_waits() -> Iterator[None]:
    retry.set_testing(True)
    yield
    retry.set_testing(False)


def tries(policy: RetryPolicy, exc: Exception) -> tuple[int, float]:
    """How many tries ``policy`` makes for an error that keeps coming, and the seconds from
    the first to the last (each try taking no time, jitter off)."""
    assert isinstance(exc, (TransientDeliveryError, PermanentDeliveryError))
    now, attempt = 0.0, 1
    while True:
        decision = decide(policy, exc, attempt, now)
        if not decision.retry:
            return attempt, now
        now += decision.wait_s
        attempt += 1


def decide(policy: RetryPolicy, exc: Exception, attempt: int = 1, now: float = 0.0) -> Any:
    assert isinstance(exc, (TransientDeliveryError, PermanentDeliveryError))
    return retry.decide(policy, exc, attempt, None, first_try_s=0.0, now_s=now)


# ----------------------------------------------------------------------------- the policy


def test_a_network_error_is_retried_for_an_hour_by_default() -> None:
    n, last = tries(RetryPolicy(jitter=False), NetworkError("refused"))
    # 1, 2, 4 ... 256 s apart, then 300 s (max_delay) until an hour has passed
    assert n == 21 and 3600 <= last < 3600 + 300


def test_other_transient_errors_still_give_up_after_five_attempts() -> None:
    assert tries(RetryPolicy(jitter=False), TransientDeliveryError("HTTP 503")) == (5, 15.0)


def test_for_bounds_the_time_and_attempts_bound_every_error() -> None:
    _, last = tries(RetryPolicy.model_validate({"for": "10m", "jitter": False}), NetworkError(""))
    assert 600 <= last < 600 + 300
    assert tries(RetryPolicy(attempts=2, jitter=False), NetworkError("")) == (2, 1.0)
    assert tries(RetryPolicy(attempts=1), NetworkError("")) == (1, 0.0)


def test_a_permanent_error_is_never_retried() -> None:
    assert tries(RetryPolicy(attempts=50), PermanentDeliveryError("HTTP 403")) == (1, 0.0)


def test_same_error_stops_when_the_kind_of_error_changes() -> None:
    policy = RetryPolicy(same_error=True)
    exc = TransientDeliveryError("busy")
    times = {"first_try_s": 0.0, "now_s": 0.0}
    assert retry.decide(policy, exc, 1, "TransientDeliveryError", **times).retry
    decision = retry.decide(policy, exc, 2, "ConnectionResetError", **times)
    assert not decision.retry and "a different error than before" in decision.note


def test_jitter_spreads_a_wait_but_never_past_max_delay() -> None:
    policy = RetryPolicy(delay=10, backoff=1, max_delay=10)
    waits = {decide(policy, NetworkError("")).wait_s for _ in range(200)}
    assert max(waits) <= 10 and min(waits) >= 8 and len(waits) > 1


def test_a_server_asking_for_a_longer_wait_gets_it_up_to_max_delay() -> None:
    policy = RetryPolicy(jitter=False, max_delay=60)
    assert decide(policy, TransientDeliveryError("", retry_after=30)).wait_s == 30
    assert decide(policy, TransientDeliveryError("", retry_after=900)).wait_s == 60


def test_the_testing_switch_turns_the_waits_off(no_waits: None) -> None:
    decision = decide(RetryPolicy(delay=600), NetworkError(""))
    assert decision.retry and decision.wait_s == 0.0
    assert tries(RetryPolicy(jitter=False), TransientDeliveryError("")) == (5, 0.0)


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("90s", 90), ("30m", 1800), ("1h", 3600)]
)
def test_for_takes_seconds_or_a_unit(text: str, seconds: float) -> None:
    assert RetryPolicy.model_validate({"for": text}).for_ == seconds


def test_a_bad_for_names_the_file_and_the_field(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(
        f"sources: [{{path: {tmp_path}}}]\n"
        "rules: [{to: [{url: 'ftp://u:s3cret@h/x', retry: {for: soon}}]}]\n",
        encoding="utf-8",
    )
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert str(cfg) in result.stderr and "rules[0].to[0].retry.for" in result.stderr
    assert "Traceback" not in result.stderr and "s3cret" not in result.stderr


# ----------------------------------------------------------------------------- real servers


def _retry_lines(log: str) -> list[tuple[str, str]]:
    """(level, line) of each retry announcement in a service log."""
    return [
        (m.group(1), m.group(0))
        for m in re.finditer(
            r"^\S+ \S+ (\w+)\s+filedispatch\.dispatcher: .*retrying in.*$", log, re.M
        )
    ]


def test_an_http_server_down_then_up_gets_the_file_with_the_default_policy(
    workspace: dict[str, Path],
) -> None:
    """Connection refused, again and again, past the 5 attempts that used to end in FAILED;
    the server comes up; the file arrives. The first retry is a WARNING, the later ones INFO,
    each line naming the URL once."""
    port = free_port()
    src = old_file(workspace["inbox"] / "a.bin", 50_000)
    url = f"http://127.0.0.1:{port}/up"
    cfg = remote_config(workspace, {"url": url})
    svc = ServiceProcess(cfg, "--once", env=NO_WAITS).start(wait_ready=False)
    receiver: HttpReceiver | None = None
    try:
        wait_until(
            lambda: journal_rows(workspace["db"], RETRYING),
            60,
        )
        receiver = HttpReceiver(port=port)
        assert svc.proc is not None
        assert svc.proc.wait(60) == 0, svc.log()
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
        if receiver is not None:
            receiver.close()
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "SUCCEEDED" and row["attempts"] > 5
    assert [(r.size, r.sha256) for r in receiver.received] == [(50_000, sha256_of(src))]
    lines = _retry_lines(svc.log())
    assert len(lines) >= 6
    assert lines[0][0] == "WARNING" and {level for level, _ in lines[1:]} == {"INFO"}
    assert all(line.count(f"127.0.0.1:{port}") == 1 for _, line in lines), lines[:2]


def test_an_ftp_server_down_then_up_gets_the_file_with_the_default_policy(
    workspace: dict[str, Path], ftp: FtpServer
) -> None:
    src = old_file(workspace["inbox"] / "a.bin", 20_000)
    ftp.stop()
    cfg = remote_config(workspace, {"url": ftp.url("/x/"), "connect_timeout": 2})
    svc = ServiceProcess(cfg, "--once", env=NO_WAITS).start(wait_ready=False)
    try:
        wait_until(
            lambda: journal_rows(workspace["db"], RETRYING),
            60,
        )
        ftp.start()
        assert svc.proc is not None
        assert svc.proc.wait(60) == 0, svc.log()
    finally:
        if svc.proc is not None and svc.proc.poll() is None:
            svc.kill()
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "SUCCEEDED" and row["attempts"] > 5
    assert files_under(ftp.root) == {"x/a.bin": sha256_of(src)}
    assert "alice-Pw-1" not in svc.log()


def test_a_name_that_does_not_resolve_keeps_being_retried(workspace: dict[str, Path]) -> None:
    old_file(workspace["inbox"] / "a.bin", 100)
    cfg = remote_config(workspace, {"url": "http://filedispatch-test.invalid/up"})
    svc = ServiceProcess(cfg, env=NO_WAITS).start()
    try:
        rows = wait_until(
            lambda: journal_rows(workspace["db"], RETRYING),
            60,
        )
    finally:
        assert svc.stop() == 0, svc.log()
    assert "filedispatch-test.invalid/up: Cannot connect: the name does not resolve" in str(
        rows[0]["reason"]
    )
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "PENDING"  # given back at the stop, still to be retried


def test_a_refusal_still_fails_at_once_with_the_default_policy(workspace: dict[str, Path]) -> None:
    receiver = HttpReceiver()

    async def forbid(request: object, n: int) -> object:
        from aiohttp import web

        return web.Response(status=403, text="no")

    receiver.behave["/no"] = forbid  # type: ignore[assignment]
    try:
        old_file(workspace["inbox"] / "a.bin", 100)
        cfg = remote_config(workspace, {"url": f"{receiver.url}/no"})
        result = run_cli("-c", cfg, "--once", env=NO_WAITS)
    finally:
        receiver.close()
    assert result.returncode == 1
    (row,) = journal_rows(workspace["db"])
    assert row["status"] == "FAILED" and row["attempts"] == 1 and "403" in row["reason"]
