"""Notifications through Apprise, received by a real aiohttp webhook and a real aiosmtpd SMTP
server on loopback, sent by the real service: bursts, scopes, digests, sources, secrets."""

from __future__ import annotations

import email
import shutil
import signal
from collections.abc import Iterator
from email.message import Message
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiosmtpd.controller import Controller

from .conftest import (
    ServiceProcess,
    free_port,
    inotify_limited,
    journal_rows,
    run_cli,
    wait_until,
    write_config,
)
from .servers import LoopThread, old_file

HOOK_TOKEN = "hook-token-5f3a9c2b7e"


class Webhook:
    """An aiohttp receiver keeping each JSON body posted to it, by path."""

    def __init__(self) -> None:
        self.got: list[tuple[str, dict[str, Any]]] = []
        self.port = free_port()
        self.loop = LoopThread()

        async def hook(request: web.Request) -> web.Response:
            self.got.append((request.path, await request.json()))
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/{name}", hook)
        self.runner = web.AppRunner(app)

        async def start() -> None:
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

        self.loop.call(start())

    def url(self, name: str) -> str:
        return f"json://127.0.0.1:{self.port}/{name}?token={HOOK_TOKEN}"

    def messages(self, name: str) -> list[dict[str, Any]]:
        return [body for path, body in self.got if path == f"/{name}"]

    def close(self) -> None:
        self.loop.call(self.runner.cleanup())
        self.loop.close()


class Mailbox:
    """aiosmtpd's SMTP server keeping each message it is handed."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        outer = self

        class Handler:
            async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
                outer.messages.append(email.message_from_bytes(envelope.content))
                return "250 OK"

        self.port = free_port()
        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()

    def url(self) -> str:
        return (
            f"mailto://example.com:{self.port}?smtp=127.0.0.1"
            "&from=filedispatch@example.com&to=ops@example.com"
        )

    def close(self) -> None:
        self.controller.stop()


@pytest.fixture
def webhook() -> Iterator[Webhook]:
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def mailbox() -> Iterator[Mailbox]:
    box = Mailbox()
    yield box
    box.close()


NO_WAIT = {"attempts": 2, "delay": 0, "jitter": False}


def config(ws: dict[str, Path], rules: list[dict[str, Any]], **top: Any) -> Path:
    source = {"path": str(ws["inbox"]), "name": "inbox", "settle": 0.05, **top.pop("source", {})}
    data = {
        "database": str(ws["db"]),
        "sources": [source],
        "rules": rules,
        "api": {"enabled": False},
        "monitor": {"enabled": False},
        **top,
    }
    return write_config(ws["root"] / "config.yml", data)


def to_outbox(ws: dict[str, Path], *notify: dict[str, Any]) -> Path:
    """Every file to ws["outbox"], with these top-level notification targets."""
    return config(
        ws, [{"name": "all", "glob": "*", "to": [str(ws["outbox"])]}], notify=list(notify)
    )


#: a destination that fails for good at once: a folder below a regular file
def broken(ws: dict[str, Path]) -> dict[str, Any]:
    blocker = ws["root"] / "not-a-folder"
    blocker.write_text("x")
    return {"url": str(blocker / "out"), "retry": {"attempts": 1}}


def test_a_burst_of_failures_is_one_message_with_counts_and_the_first_names(
    workspace: dict[str, Path], webhook: Webhook, mailbox: Mailbox
) -> None:
    ws = workspace
    for i in range(30):
        old_file(ws["inbox"] / f"bad-{i:02d}.txt", b"x")
    notify = [
        {"url": webhook.url("ops"), "on": ["failed"], "window": "1h", "retry": NO_WAIT},
        {"url": mailbox.url(), "on": "failed", "window": "1h", "retry": NO_WAIT},
    ]
    cfg = config(ws, [{"name": "all", "glob": "*", "to": [broken(ws)]}], notify=notify)
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1, result.stderr
    assert len(journal_rows(ws["db"])) == 30
    (message,) = webhook.messages("ops")  # gathered for the window, sent at the stop
    assert message["title"] == "filedispatch: 30 failed for good"
    lines = message["message"].splitlines()
    assert len(lines) == 11 and lines[-1] == "... and 20 more"
    assert all(line.startswith("bad-") for line in lines[:10])
    (mail,) = mailbox.messages
    assert "30 failed for good" in mail["Subject"]
    text = next(p for p in mail.walk() if p.get_content_type() == "text/plain")
    assert "... and 20 more" in text.get_payload(decode=True).decode()
    assert HOOK_TOKEN not in result.stderr


def test_success_and_per_rule_and_per_source_targets_get_only_their_events(
    workspace: dict[str, Path], webhook: Webhook
) -> None:
    ws = workspace
    old_file(ws["inbox"] / "a.txt", b"a")
    old_file(ws["inbox"] / "b.dat", b"b")
    rules = [
        {
            "name": "texts",
            "glob": "*.txt",
            "to": [str(ws["outbox"])],
            "notify": [{"url": webhook.url("texts"), "on": ["success"], "window": "1h"}],
        },
        {"name": "rest", "glob": "*", "to": [str(ws["outbox"])]},
    ]
    source = {"notify": [{"url": webhook.url("inbox"), "on": ["success", "failed"]}]}
    cfg = config(
        ws,
        rules,
        source=source,
        notify=[{"url": webhook.url("top"), "on": ["failed"]}],
    )
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    (texts,) = webhook.messages("texts")
    assert texts["title"] == "filedispatch: 1 delivered"
    assert texts["message"] == f"a.txt -> {ws['outbox'] / 'a.txt'}"
    (inbox,) = webhook.messages("inbox")
    assert inbox["title"] == "filedispatch: 2 delivered"
    assert webhook.messages("top") == []  # nothing failed


def test_a_digest_counts_what_happened(
    workspace: dict[str, Path], webhook: Webhook, service_factory
) -> None:
    ws = workspace
    cfg = to_outbox(ws, {"url": webhook.url("digest"), "on": ["digest"], "every": "0.2s"})
    svc = service_factory(cfg).start()
    for i in range(3):
        old_file(ws["inbox"] / f"f{i}.txt", b"x")
    wait_until(lambda: any("delivered: 3" in m["message"] for m in webhook.messages("digest")), 30)
    assert svc.stop() == 0
    digest = next(m for m in webhook.messages("digest") if "delivered: 3" in m["message"])
    assert digest["title"].startswith("filedispatch: digest of the last 0.2 s")
    assert "failed for good: 0" in digest["message"]


def test_a_source_folder_gone_is_told(
    workspace: dict[str, Path], webhook: Webhook, service_factory
) -> None:
    ws = workspace
    cfg = to_outbox(ws, {"url": webhook.url("src"), "on": ["source_error"], "window": "0.1s"})
    svc = service_factory(cfg).start()
    shutil.rmtree(ws["inbox"])
    (message,) = wait_until(lambda: webhook.messages("src"), 30)
    assert message["title"] == "filedispatch: 1 source trouble"
    assert f"the folder {ws['inbox']} is gone" in message["message"]
    svc.stop()


def test_a_watch_that_fails_is_told(workspace: dict[str, Path], webhook: Webhook) -> None:
    """The kernel refuses the watch (no inotify instance left, as on a host at
    fs.inotify.max_user_instances): the service runs in a user namespace of its own whose
    limit is 0, so the refusal is real and touches nothing outside. The target is told the
    watch failed, once, and files are still found by the rescans that stand in for it."""
    ws = workspace
    cfg = to_outbox(ws, {"url": webhook.url("src"), "on": ["source_error"], "window": "0.1s"})
    svc = ServiceProcess(cfg, wrap=inotify_limited("max_inotify_instances", 0))
    svc.start(wait_ready=False)
    try:
        (message,) = wait_until(lambda: webhook.messages("src"), 30)
        assert message["title"] == "filedispatch: 1 source trouble"
        assert "source inbox: " in message["message"]
        assert "Too many open files" in message["message"], message
        old_file(ws["inbox"] / "a.txt", b"found without a watch")
        wait_until(lambda: (ws["outbox"] / "a.txt").exists(), 30)
        assert f"watching {ws['inbox']} failed (" in svc.log()
    finally:
        assert svc.stop() == 0, svc.log()
    assert len(webhook.messages("src")) == 1, webhook.messages("src")


async def test_a_folder_back_is_not_told_again_by_the_error_its_absence_left(
    workspace: dict[str, Path], webhook: Webhook
) -> None:
    """The watcher keeps the error of a removed folder (its watch ended, and could not begin
    again while the folder was missing) after the folder is back: the notifier's looks, on
    the real folder, tell the removal once and not that stale error as news."""
    from filedispatch.config import load_config
    from filedispatch.notify import Notifier

    ws = workspace
    cfg = to_outbox(ws, {"url": webhook.url("src"), "on": ["source_error"], "window": "0.1s"})
    notifier = Notifier(load_config(cfg))
    watch_error = f"FileNotFoundError: the folder {ws['inbox']} was removed"

    async def look(error: str | None) -> None:
        status = {"sources": [{"name": "inbox", "path": str(ws["inbox"]), "last_error": error}]}
        await notifier._look_at_sources(status)

    await look(None)
    shutil.rmtree(ws["inbox"])
    await look(watch_error)
    ws["inbox"].mkdir()
    await look(watch_error)
    await notifier.aclose()
    (message,) = wait_until(lambda: webhook.messages("src"), 30)
    assert message["title"] == "filedispatch: 1 source trouble", message
    assert f"the folder {ws['inbox']} is gone" in message["message"]


def test_a_dead_notification_server_never_holds_deliveries_back(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    for i in range(5):
        old_file(ws["inbox"] / f"f{i}.txt", b"x")
    dead = f"json://127.0.0.1:{free_port()}/hook?token={HOOK_TOKEN}"
    cfg = to_outbox(ws, {"url": dead, "on": ["success"], "window": "0.1s", "retry": NO_WAIT})
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert {r["status"] for r in journal_rows(ws["db"])} == {"SUCCEEDED"}
    assert len(list(ws["outbox"].iterdir())) == 5
    assert "not sent after 2 attempt(s)" in result.stderr
    assert HOOK_TOKEN not in result.stderr


def test_a_token_without_digits_stays_out_of_apprise_debug_log(
    workspace: dict[str, Path],
) -> None:
    """Apprise logs a Mattermost webhook's URL, token included, at DEBUG: the token is a
    secret whatever characters it is made of (Apprise's own privacy mode says which parts)."""
    ws = workspace
    old_file(ws["inbox"] / "a.txt", b"x")
    token = "webhookkeymadeofletters"
    dead = f"mmost://127.0.0.1:{free_port()}/{token}"
    cfg = to_outbox(ws, {"url": dead, "on": ["success"], "window": "0.1s", "retry": NO_WAIT})
    result = run_cli("-c", cfg, "--once", "--log-level", "DEBUG")
    assert result.returncode == 0, result.stderr
    assert "Mattermost" in result.stderr and "not sent after 2 attempt(s)" in result.stderr
    assert token not in result.stderr


def test_check_shows_the_targets_without_their_secrets_and_the_s3_kind(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    bot = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
    s3 = {
        "url": "s3://archive-bucket/in/",
        "access_key_id": "AKIDCHECK",
        "secret_access_key": "check-secret-key-value",
    }
    cfg = config(
        ws,
        [{"name": "all", "glob": "*", "to": [s3]}],
        notify=[
            {"url": f"json://127.0.0.1:9/hook?token={HOOK_TOKEN}", "on": ["failed", "digest"]},
            {"url": f"tgram://{bot}/987654321"},
        ],
    )
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "s3: s3://archive-bucket/in/" in out
    assert "notify" in out and "json://127.0.0.1:9/hook" in out and "failed, digest" in out
    assert "tgram://" in out
    for secret in (HOOK_TOKEN, bot, "AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw", "check-secret-key"):
        assert secret not in out + result.stderr


def test_a_bad_notification_url_names_the_field(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = to_outbox(ws, {"url": "nosuchscheme://secret-value-123"})
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert "notify[0].url" in result.stderr and "Traceback" not in result.stderr
    assert "secret-value-123" not in result.stderr


def test_a_journal_removed_under_the_service_is_told(
    workspace: dict[str, Path], webhook: Webhook, service_factory
) -> None:
    ws = workspace
    cfg = to_outbox(ws, {"url": webhook.url("journal"), "on": ["journal"], "window": "0.1s"})
    svc = service_factory(cfg).start()
    old_file(ws["inbox"] / "before.txt", b"x")
    wait_until(lambda: (ws["outbox"] / "before.txt").exists(), 30)
    ws["db"].unlink()
    old_file(ws["inbox"] / "after.txt", b"y")
    (message,) = wait_until(lambda: webhook.messages("journal"), 60)
    assert message["title"] == "filedispatch: 1 journal trouble"
    assert str(ws["db"]) in message["message"]
    svc.stop()


def test_a_reload_applies_new_targets_and_refuses_a_bad_one_keeping_the_old(
    workspace: dict[str, Path], webhook: Webhook, service_factory
) -> None:
    ws = workspace
    rules = [{"name": "all", "glob": "*", "to": [str(ws["outbox"])]}]
    fast = {"on": ["success"], "window": "0.1s", "retry": NO_WAIT}
    cfg = config(ws, rules)  # no notify at start: a reload adds the first target
    svc = service_factory(cfg).start()
    old_file(ws["inbox"] / "before.txt", b"x")
    wait_until(lambda: (ws["outbox"] / "before.txt").exists(), 30)

    def reload_to(notify: list[dict[str, Any]], said: str, count: int) -> None:
        config(ws, rules, notify=notify)
        svc.signal(signal.SIGHUP)
        wait_until(lambda: svc.log().count(said) == count, 30)

    reload_to([{"url": webhook.url("one"), **fast}], "reloaded ", 1)
    old_file(ws["inbox"] / "first.txt", b"x")
    (one,) = wait_until(lambda: webhook.messages("one"), 30)
    assert one["message"].startswith("first.txt -> ")
    reload_to([{"url": webhook.url("two"), **fast}], "reloaded ", 2)
    old_file(ws["inbox"] / "second.txt", b"x")
    (two,) = wait_until(lambda: webhook.messages("two"), 30)
    assert two["message"].startswith("second.txt -> ")
    reload_to([{"url": "nosuchscheme://x", **fast}], "reload refused", 1)  # "two" stays
    assert "notify[0].url" in svc.log() or "notify.0.url" in svc.log()
    old_file(ws["inbox"] / "third.txt", b"x")
    wait_until(lambda: len(webhook.messages("two")) == 2, 30)
    assert webhook.messages("two")[1]["message"].startswith("third.txt -> ")
    assert len(webhook.messages("one")) == 1  # the first target was dropped
    assert svc.stop() == 0
    assert HOOK_TOKEN not in svc.log()


def test_the_docs_example_runs_against_a_real_webhook_and_mail_server(
    tmp_path: Path, webhook: Webhook, mailbox: Mailbox
) -> None:
    """notifications.md's example as written, with its paths under tmp_path and its webhook
    and mail targets pointed at the receivers on loopback (Slack and ntfy are left out: no
    such servers here). A file that fails for good is told to the webhook, with the counts."""
    import re

    import yaml

    text = (Path(__file__).resolve().parent.parent / "docs" / "notifications.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None
    example = block.group(1).replace("/srv", str(tmp_path / "srv"))
    example = example.replace("json://127.0.0.1:8080/hook", webhook.url("hook"))
    data = yaml.safe_load(example)
    assert data["notify"][0]["url"] == webhook.url("hook")  # the example still has this target
    data["notify"][1]["url"] = mailbox.url()
    data["sources"][0].pop("notify")  # slack://
    data["rules"][0].pop("notify")  # ntfys://
    data.update(database=str(tmp_path / "j.db"), api={"enabled": False})
    data["monitor"] = {"enabled": False}
    for source in data["sources"]:
        source["settle"] = 0.05
    # /srv/archive/other cannot be made: a file is in the way, so "rest" fails for good
    (tmp_path / "srv" / "archive").mkdir(parents=True)
    (tmp_path / "srv" / "archive" / "other").write_text("in the way")
    data["rules"][1]["to"] = [
        {"url": str(tmp_path / "srv/archive/other/x"), "retry": {"attempts": 1}}
    ]
    old_file(tmp_path / "srv" / "outgoing" / "notes.txt", b"n")
    cfg = write_config(tmp_path / "config.yml", data)
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1, result.stderr  # the file failed for good
    wait_until(lambda: webhook.messages("hook"), 30)
    (message,) = webhook.messages("hook")
    assert "1 failed for good" in message["title"], message
    assert "notes.txt" in message["message"], message
    assert HOOK_TOKEN not in result.stderr
