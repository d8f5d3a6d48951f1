"""Rule and delivery controls (issue 14): ages, naming, and a faithful simulation.

Through the real CLI on real folders and a real journal, as an operator would use them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web

from .apiutil import TOKEN, get_json
from .conftest import (
    cli_env,
    delivered,
    free_port,
    journal_rows,
    old,
    run_cli,
    wait_until,
    write_config,
)
from .servers import HttpReceiver, remote_config
from .test_e2e import config


def aged(path: Path, age_s: float, data: bytes = b"x") -> Path:
    """A file last modified ``age_s`` seconds ago."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    then = time.time() - age_s
    os.utime(path, (then, then))
    return path


# ---------------------------------------------------------------------------- 6. simulation


def test_explain_says_why_files_are_not_taken(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws, settle=600)
    hidden = old(ws["inbox"] / ".hidden.txt")
    part = old(ws["inbox"] / "big.iso.part")
    deep = old(ws["inbox"] / "sub" / "deep.txt")
    fresh = ws["inbox"] / "fresh.txt"
    fresh.write_bytes(b"just written")
    good = old(ws["inbox"] / "good.txt")
    result = run_cli("explain", "-c", cfg, hidden, part, deep, "/etc/hostname", fresh, good)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert (
        f"{hidden}: not taken: ignored by the source: its name matches ignore (the defaults" in out
    )
    assert f"{part}: not taken: ignored by the source" in out
    assert f"{deep}: not taken: in a sub-folder, and the source is not recursive" in out
    assert "/etc/hostname: not taken: not inside any source" in out
    assert "=> not taken: not complete yet: modified" in out and "settle is 600s" in out
    assert out.rstrip().endswith("=> would be sent")  # good.txt, last
    assert not ws["db"].exists(), "explain writes nothing"


def test_explain_and_dry_run_know_what_is_already_done(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws)
    sent = old(ws["inbox"] / "sent.txt")
    assert run_cli("-c", cfg, "--once").returncode == 0
    new = old(ws["inbox"] / "new.txt")
    explain = run_cli("explain", "-c", cfg, sent, new)
    assert explain.returncode == 0, explain.stderr
    assert "=> not taken: already done: dispatch #1" in explain.stdout
    assert explain.stdout.rstrip().endswith("=> would be sent")
    dry = run_cli("-c", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "inbox/sent.txt: not taken: already done: dispatch #1" in dry.stdout
    assert f"inbox/new.txt -> [all] {ws['outbox'] / 'new.txt'}" in dry.stdout
    assert "inbox/sent.txt ->" not in dry.stdout
    assert len(journal_rows(ws["db"])) == 1, "a dry run writes nothing"


def test_dry_run_readiness_and_lock_markers(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws, ready="lock")
    old(ws["inbox"] / "a.csv")
    old(ws["inbox"] / "a.csv.lock")
    old(ws["inbox"] / "b.csv")
    dry = run_cli("-c", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "inbox/a.csv: not taken: not complete yet: a.csv.lock exists" in dry.stdout
    assert f"inbox/b.csv -> [all] {ws['outbox'] / 'b.csv'}" in dry.stdout
    # the marker itself is never a file to send
    assert "a.csv.lock ->" not in dry.stdout


def test_max_items_counts_only_work_not_done_yet(workspace: dict[str, Path]) -> None:
    ws = workspace
    for i in range(5):
        aged(ws["inbox"] / f"f{i}.txt", 3600 - i)  # f0 oldest: offered first
    cfg = config(ws)
    first = run_cli("-c", cfg, "--once", "--max-items", "2")
    assert first.returncode == 0 and "processed: 2" in first.stdout, first.stdout
    dry = run_cli("-c", cfg, "--dry-run", "--max-items", "2")
    assert [line.split(" ->")[0] for line in dry.stdout.splitlines() if " -> " in line] == [
        "inbox/f2.txt",
        "inbox/f3.txt",
    ]
    second = run_cli("-c", cfg, "--once", "--max-items", "2")
    assert "processed: 2" in second.stdout and "already done: 2" in second.stdout, second.stdout
    assert sorted(delivered(ws["outbox"])) == ["f0.txt", "f1.txt", "f2.txt", "f3.txt"]
    third = run_cli("-c", cfg, "--once", "--max-items", "2")
    assert "processed: 1" in third.stdout
    assert len(delivered(ws["outbox"])) == 5


def test_mark_existing_dry_run_agrees_with_the_real_run(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws)
    for i in range(3):
        old(ws["inbox"] / f"m{i}.txt")
    assert run_cli("mark-existing", "-c", cfg).returncode == 0
    old(ws["inbox"] / "later.txt")
    dry = run_cli("mark-existing", "-c", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "inbox/m0.txt -> " in dry.stdout and "(recorded before)" in dry.stdout
    assert "1 destination step(s) would be recorded, 3 were recorded before" in dry.stdout
    real = run_cli("mark-existing", "-c", cfg)
    assert "1 destination step(s) recorded, 3 were recorded before" in real.stdout


def test_an_absolute_exclude_is_a_path_on_this_machine(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [{"name": "all", "exclude": f"{ws['inbox']}/private/*", "to": str(ws["outbox"])}]
    cfg = config(ws, rules, recursive=True)
    old(ws["inbox"] / "private" / "secret.txt")
    old(ws["inbox"] / "public" / "open.txt")
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"public/open.txt": b"x"}


def test_an_absolute_ignore_must_lie_in_its_source(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws, ignore=[f"{ws['inbox']}/drafts/*"], recursive=True)
    old(ws["inbox"] / "drafts" / "d.txt")
    old(ws["inbox"] / "final" / "f.txt")
    check = run_cli("check", "-c", cfg)
    assert check.returncode == 0, check.stderr
    assert "    ignore: the defaults (.*, *.part, ...) and drafts/*" in check.stdout
    explain = run_cli("explain", "-c", cfg, ws["inbox"] / "drafts" / "d.txt")
    assert "not taken: ignored by the source: its name matches ignore" in explain.stdout
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(ws["outbox"]) == {"final/f.txt": b"x"}
    bad = config(ws, ignore=["/etc/*"])
    result = run_cli("check", "-c", bad)
    assert result.returncode == 2 and "ignore[0]: '/etc/*' starts with /" in result.stderr


def test_an_absolute_exclude_outside_every_source_is_refused(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws, [{"exclude": ["*.tmp", "/etc/*"], "to": str(ws["outbox"])}])
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert f"{cfg}: " in result.stderr
    assert "rules[0].exclude[1]: '/etc/*' starts with / " in result.stderr
    assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- 1. ages


def test_min_age_and_max_age_in_a_run(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [{"name": "settled", "min_age": "10m", "max_age": "2d", "to": str(ws["outbox"])}]
    cfg = config(ws, rules)
    aged(ws["inbox"] / "young.txt", 60)
    aged(ws["inbox"] / "ripe.txt", 3600)
    aged(ws["inbox"] / "stale.txt", 3 * 86400)
    check = run_cli("check", "-c", cfg)
    assert check.returncode == 0, check.stderr
    assert "1. settled: age 10m..2d" in check.stdout
    explain = run_cli("explain", "-c", cfg, ws["inbox"] / "young.txt", ws["inbox"] / "stale.txt")
    assert "- settled: too young: modified 1m" in explain.stdout
    assert "min_age 10m; taken at " in explain.stdout
    assert "=> not taken: waits: too young" in explain.stdout
    assert "- settled: too old: modified 3d" in explain.stdout and "max_age 2d" in explain.stdout
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"ripe.txt": b"x"}


def test_a_young_file_is_taken_when_it_comes_of_age(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """No event and no rescan after the start: the watcher's own timer looks again."""
    ws = workspace
    rules = [{"name": "late", "min_age": "1h", "to": str(ws["outbox"])}]
    cfg = config(ws, rules, rescan=0)
    f = aged(ws["inbox"] / "soon.txt", 3600 - 10)  # of age 10 s from now
    due = f.stat().st_mtime + 3600
    svc = service_factory(cfg).start()
    assert time.time() < due, "the start-up scan saw it young: the timer is what takes it"
    wait_until(lambda: delivered(ws["outbox"]) == {"soon.txt": b"x"}, timeout=60)
    rows = journal_rows(ws["db"])
    assert len(rows) == 1 and rows[0]["created"] >= due  # planned only once of age
    assert svc.stop() == 0


def test_an_age_condition_holds_the_file_for_every_later_rule(workspace: dict[str, Path]) -> None:
    """A rule that waits for a file keeps it from the rules after it (nothing goes twice)."""
    ws = workspace
    rules = [
        {"name": "late", "extensions": ["csv"], "min_age": "1h", "to": str(ws["outbox"] / "a")},
        {"name": "rest", "to": str(ws["outbox"] / "b")},
    ]
    cfg = config(ws, rules)
    aged(ws["inbox"] / "young.csv", 60)
    aged(ws["inbox"] / "other.txt", 60)
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"b/other.txt": b"x"}


def test_age_units_and_bad_values(workspace: dict[str, Path]) -> None:
    ws = workspace
    cfg = config(ws, [{"min_age": "5 fortnights", "to": str(ws["outbox"])}])
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert "rules[0].min_age" in result.stderr and "is not a duration" in result.stderr
    cfg = config(ws, [{"min_age": "2d", "max_age": "1h", "to": str(ws["outbox"])}])
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2 and "min_age is larger than max_age" in result.stderr


# ---------------------------------------------------------------------------- 2. naming


def test_naming_groups_times_counter_digest_parent(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [
        {
            "name": "clients",
            "regex": r"(?P<client>[a-z]+)_(?P<date>\d{8})_",
            "to": {
                "url": str(ws["outbox"]),
                "name": "{client}/{date}/{parent}/{mtime:%Y%m%d-%H}-{counter}-{sha256:8}-{name}",
                "timezone": "UTC",
            },
        }
    ]
    cfg = config(ws, rules, recursive=True)
    data = b"invoice body"
    f = aged(ws["inbox"] / "north" / "acme_20261130_inv.pdf", 0, data)
    when = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()  # 00:30 in Berlin
    os.utime(f, (when, when))
    # the machine's local time is Berlin's: the step's own timezone (UTC) is what counts
    result = run_cli("-c", cfg, "--once", env=cli_env(TZ="Europe/Berlin"))
    assert result.returncode == 0, result.stderr
    check = run_cli("check", "-c", cfg)
    assert "regex (?P<client>[a-z]+)_(?P<date>\\d{8})_" in check.stdout
    assert "-{sha256:8}-{name} (times in UTC)" in check.stdout
    digest = hashlib.sha256(data).hexdigest()[:8]
    name = f"acme/20261130/north/20261130-23-1-{digest}-acme_20261130_inv.pdf"
    assert delivered(ws["outbox"]) == {name: data}
    assert journal_rows(ws["db"])[0]["location"].endswith(name)


def test_now_format_and_local_time_default(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [{"to": {"url": str(ws["outbox"]), "name": "{now:%Y}/{mtime:%H}/{name}"}}]
    cfg = config(ws, rules)
    f = old(ws["inbox"] / "a.txt")
    env_tz = "Asia/Tokyo"  # the machine's local time is what TZ says
    result = run_cli("-c", cfg, "--once", env=cli_env(TZ=env_tz))
    assert result.returncode == 0, result.stderr
    hour = datetime.fromtimestamp(f.stat().st_mtime, ZoneInfo(env_tz)).strftime("%H")
    year = datetime.now(ZoneInfo(env_tz)).strftime("%Y")
    assert list(delivered(ws["outbox"])) == [f"{year}/{hour}/a.txt"]


def test_check_refuses_a_group_the_regex_lacks(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [
        {"regex": r"(?P<client>[a-z]+)_", "to": {"url": str(ws["outbox"]), "name": "{clinet}"}}
    ]
    result = run_cli("check", "-c", config(ws, rules))
    assert result.returncode == 2
    assert f"{ws['root'] / 'config.yml'}: rules[0]: to[0].name: unknown placeholder {{clinet}}" in (
        result.stderr
    )
    assert "named groups of the rule's regex (client)" in result.stderr
    assert "Traceback" not in result.stderr


def test_templates_stay_inside_the_destination(workspace: dict[str, Path]) -> None:
    ws = workspace
    rules = [
        {
            "regex": r"x(?P<up>\.\.)y",
            "to": {"url": str(ws["outbox"]), "name": "{up}/{name}"},
        }
    ]
    cfg = config(ws, rules)
    old(ws["inbox"] / "x..y.txt")
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 1
    failed = journal_rows(ws["db"], "status='FAILED'")
    assert len(failed) == 1 and "outside the destination" in failed[0]["reason"]
    assert not (ws["root"] / "x..y.txt").exists() and delivered(ws["outbox"]) == {}
    bad = config(ws, [{"to": {"url": str(ws["outbox"]), "name": "{now.__class__}"}}])
    result = run_cli("check", "-c", bad)
    assert result.returncode == 2 and "is not a placeholder" in result.stderr
    bad = config(ws, [{"to": {"url": str(ws["outbox"]), "timezone": "Mars/Olympus"}}])
    result = run_cli("check", "-c", bad)
    assert result.returncode == 2 and "rules[0].to[0].timezone" in result.stderr


# ---------------------------------------------------------------------------- 3. dedupe


def test_dedupe_content_sends_the_same_bytes_once_per_destination(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    rules = [
        {
            "name": "all",
            "dedupe": "content",
            "to": [str(ws["outbox"]), {"url": str(ws["root"] / "plain"), "dedupe": "none"}],
        }
    ]
    cfg = config(ws, rules)
    aged(ws["inbox"] / "a.txt", 3600, b"same bytes")
    aged(ws["inbox"] / "b.txt", 3500, b"same bytes")
    aged(ws["inbox"] / "c.txt", 3400, b"other bytes")
    check = run_cli("check", "-c", cfg)
    assert f"1) file: {ws['outbox']} name {{relpath}}; dedupe content" in check.stdout
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    sent = delivered(ws["outbox"])
    assert sorted(sent.values()) == [b"other bytes", b"same bytes"]
    assert len(delivered(ws["root"] / "plain")) == 3  # dedupe: none on that destination
    rows = journal_rows(ws["db"], "destination=?", (str(ws["outbox"]),))
    assert {r["status"] for r in rows} == {"SUCCEEDED"}
    dup = [r for r in rows if (r["detail"] or "").startswith("duplicate of dispatch #")]
    assert len(dup) == 1
    first = next(r for r in rows if r["filename"] != dup[0]["filename"] and r["size"] == 10)
    assert dup[0]["detail"].startswith(f"duplicate of dispatch #{first['id']}:")
    assert dup[0]["location"] == first["location"] and dup[0]["sha256"] == first["sha256"]
    # a later run finds the bytes in the journal
    aged(ws["inbox"] / "d.txt", 3300, b"same bytes")
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert len(delivered(ws["outbox"])) == 2
    last = journal_rows(ws["db"], "filename='d.txt' AND destination=?", (str(ws["outbox"]),))
    assert last[0]["detail"].startswith(f"duplicate of dispatch #{first['id']}:")


def test_explain_and_dry_run_say_duplicate_of_the_row_that_has_the_bytes(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    rules = [{"name": "all", "dedupe": "content", "to": str(ws["outbox"])}]
    cfg = config(ws, rules)
    aged(ws["inbox"] / "a.txt", 3600, b"same bytes")
    assert run_cli("-c", cfg, "--once").returncode == 0
    (first,) = journal_rows(ws["db"])
    again = aged(ws["inbox"] / "again.txt", 3500, b"same bytes")
    twin1 = aged(ws["inbox"] / "twin1.txt", 3400, b"new bytes")
    twin2 = aged(ws["inbox"] / "twin2.txt", 3300, b"new bytes")
    explain = run_cli("explain", "-c", cfg, again, twin1, twin2, "/etc/hostname")
    assert explain.returncode == 0, explain.stderr
    out = explain.stdout.split(f"{twin1}:")
    assert f"duplicate of dispatch #{first['id']}: the same bytes (sha256 " in out[0]
    assert f"=> recorded, not sent: duplicate of dispatch #{first['id']}" in out[0]
    assert f"delivered to {ws['outbox']} ({ws['outbox'] / 'a.txt'}); not sent again" in out[0]
    # the first of two new files with the same bytes is sent; the second is its duplicate
    assert out[1].split(f"{twin2}:")[0].rstrip().endswith("=> would be sent")
    assert "=> recorded, not sent: duplicate of inbox/twin1.txt" in out[1]
    assert "/etc/hostname: not taken: not inside any source" in explain.stdout
    # hostile entries in the source are never hashed: a link out of it, a FIFO (whose read
    # would block for ever)
    secret = aged(ws["root"] / "secret.txt", 3600, b"same bytes")
    (ws["inbox"] / "link.txt").symlink_to(secret)
    os.mkfifo(ws["inbox"] / "pipe.txt")
    hostile = run_cli("explain", "-c", cfg, ws["inbox"] / "link.txt", ws["inbox"] / "pipe.txt")
    assert hostile.returncode == 0, hostile.stderr
    assert hostile.stdout.count(": not taken: ") == 2 and "duplicate" not in hostile.stdout
    dry = run_cli("-c", cfg, "--dry-run")
    assert "link.txt ->" not in dry.stdout and "pipe.txt ->" not in dry.stdout
    assert dry.returncode == 0, dry.stderr
    assert f"inbox/again.txt -> [all] {ws['outbox'] / 'again.txt'} (duplicate of dispatch #" in (
        dry.stdout
    )
    assert f"inbox/twin1.txt -> [all] {ws['outbox'] / 'twin1.txt'}\n" in dry.stdout
    assert "inbox/twin2.txt -> [all]" in dry.stdout and "(duplicate of inbox/twin1.txt:" in (
        dry.stdout
    )
    # the real run agrees
    assert run_cli("-c", cfg, "--once").returncode == 0
    rows = {r["filename"]: r for r in journal_rows(ws["db"])}
    assert rows["again.txt"]["detail"].startswith(f"duplicate of dispatch #{first['id']}:")
    assert rows["twin2.txt"]["detail"].startswith(
        f"duplicate of dispatch #{rows['twin1.txt']['id']}:"
    )
    assert sorted(delivered(ws["outbox"])) == ["a.txt", "twin1.txt"]


async def test_dedupe_sends_the_first_planned_of_two_twins_whichever_hash_ends_first() -> None:
    """Two files with the same bytes for one destination: the lower dispatch id (planned
    first, the one ``explain`` calls first) takes the bytes' turn even when its hash ends
    last (a bigger or colder file ahead of it hashes longer); the other then finds it. The
    real run's order once depended on which hashing thread ended first, and under load the
    --once run above disagreed with its own dry run."""
    from filedispatch.controls import Controls

    controls = Controls(journal=None)  # type: ignore[arg-type]  # in_order never reads it
    turns: list[int] = []
    first_hashing, second_hashed = asyncio.Event(), asyncio.Event()

    async def deliver(dispatch_id: int) -> None:
        async with controls.in_order("/srv/out", dispatch_id):
            if dispatch_id == 1:
                await first_hashing.wait()  # the first file's hash is the slow one
            else:
                second_hashed.set()
        async with controls.one_at_a_time(("/srv/out", "same digest")):
            turns.append(dispatch_id)

    tasks = [asyncio.create_task(deliver(i)) for i in (1, 2)]
    await second_hashed.wait()
    first_hashing.set()
    await asyncio.gather(*tasks)
    assert turns == [1, 2]
    assert not controls._hashing and not controls._sending  # nothing left behind


def test_dedupe_never_points_at_a_delivery_that_wrote_nothing(
    workspace: dict[str, Path],
) -> None:
    """on_conflict: skip leaves the name's old bytes in place: a later file with the skipped
    file's bytes must still be sent, not be called a duplicate of the skip."""
    ws = workspace
    rules = [{"to": {"url": str(ws["outbox"]), "on_conflict": "skip", "dedupe": "content"}}]
    cfg = config(ws, rules)
    ws["outbox"].mkdir(parents=True, exist_ok=True)
    (ws["outbox"] / "a.txt").write_bytes(b"already there")
    aged(ws["inbox"] / "a.txt", 3600, b"new bytes")
    assert run_cli("-c", cfg, "--once").returncode == 0
    aged(ws["inbox"] / "b.txt", 3600, b"new bytes")
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert delivered(ws["outbox"]) == {"a.txt": b"already there", "b.txt": b"new bytes"}
    row = journal_rows(ws["db"], "filename='b.txt'")[0]
    assert row["status"] == "SUCCEEDED" and not (row["detail"] or "").startswith("duplicate")


def test_dedupe_refuses_destinations_shown_alike_with_other_credentials(
    workspace: dict[str, Path],
) -> None:
    """Two accounts on one server look the same in the journal (``api_key=***``): dedupe
    there would skip a file the second account never received."""
    ws = workspace
    url = "https://dms.example.org/upload?api_key="
    rules = [
        {"name": "a", "to": {"url": url + "tenant-a-key-0001", "dedupe": "content"}},
        {"name": "b", "to": {"url": url + "tenant-b-key-0002", "dedupe": "content"}},
    ]
    result = run_cli("check", "-c", config(ws, rules))
    assert result.returncode == 2, result.stdout
    assert "rules[0].to[0].dedupe: content cannot tell this destination from rules[1].to[0]" in (
        result.stderr
    )
    assert "tenant-a-key" not in result.stderr and "tenant-b-key" not in result.stderr
    assert "Traceback" not in result.stderr
    one = {"url": url + "tenant-a-key-0001", "dedupe": "content"}
    same = [{"name": n, "to": one} for n in "ab"]
    assert run_cli("check", "-c", config(ws, same)).returncode == 0


# ---------------------------------------------------------------------------- 5. rate


def test_rate_and_bandwidth_hold_deliveries_back(workspace: dict[str, Path]) -> None:
    """Lower bounds only: the limiter may be slower on a busy machine, never faster."""
    ws = workspace
    rules = [
        {"name": "slow", "extensions": ["txt"], "to": {"url": str(ws["outbox"]), "rate": "2/s"}},
        {
            "name": "thin",
            "extensions": ["bin"],
            "to": {"url": str(ws["root"] / "thin"), "bandwidth": "64KB/s"},
        },
    ]
    cfg = config(ws, rules)
    for i in range(6):
        aged(ws["inbox"] / f"f{i}.txt", 3600)
    for i in range(3):
        aged(ws["inbox"] / f"g{i}.bin", 3600, b"z" * 64 * 1024)
    check = run_cli("check", "-c", cfg)
    assert "; rate 2/s" in check.stdout and "; bandwidth 64KB/s" in check.stdout
    result = run_cli("-c", cfg, "--once")
    assert result.returncode == 0, result.stderr
    assert len(delivered(ws["outbox"])) == 6 and len(delivered(ws["root"] / "thin")) == 3
    # 6 files at 2/s (a burst of 2, then one each 0.5 s): the last starts >= 2 s after the first
    txt = sorted(r["finished"] for r in journal_rows(ws["db"], "extension='txt'"))
    assert txt[-1] - txt[0] >= 1.9
    # 3 x 64 KiB at 64 KiB/s (one second's worth at once), sent side by side and sharing the
    # limit: the last ends >= 2 s after the first started
    binary = journal_rows(ws["db"], "extension='bin'")
    assert max(r["finished"] for r in binary) - min(r["started"] for r in binary) >= 1.9


class Growth:
    """From a thread, looks again and again at the files below ``root``: every size one of
    them had while it was still short of ``total`` bytes (a transfer seen in progress)."""

    def __init__(self, root: Path, total: int) -> None:
        self.root, self.total = root, total
        self.partial: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._look, daemon=True)

    def _look(self) -> None:
        while not self._stop.wait(0.005):
            for folder, _, names in os.walk(self.root):
                for name in names:
                    with contextlib.suppress(OSError):
                        size = os.stat(os.path.join(folder, name)).st_size
                        if 0 < size < self.total:
                            self.partial.add(size)

    def __enter__(self) -> Growth:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(30)


@pytest.mark.parametrize("kind", ["local", "ftp", "sftp"])
def test_bandwidth_paces_the_bytes_of_one_big_file(
    workspace: dict[str, Path], kind: str, request: pytest.FixtureRequest
) -> None:
    """One file of four seconds' worth at 32KB/s: the receiver sees it grow, piece by piece,
    rather than the whole file land at once after a wait. No clock is read: the sizes the
    receiving folder shows while the transfer runs are what is counted."""
    ws = workspace
    total = 4 * 32 * 1024
    dest: dict[str, Any]
    if kind == "local":
        receiver = ws["outbox"]
        dest = {"url": str(receiver)}
    elif kind == "ftp":
        ftp = request.getfixturevalue("ftp")
        receiver, dest = ftp.root, {"url": ftp.url("/in/")}
    else:
        sftp = request.getfixturevalue("sftp")
        receiver = sftp.root
        dest = {
            "url": sftp.url("/in/"),
            "key_file": str(sftp.key_file),
            "known_hosts": str(sftp.known_hosts),
        }
    data = os.urandom(total)
    aged(ws["inbox"] / "big.bin", 3600, data)
    cfg = remote_config(ws, {**dest, "bandwidth": "32KB/s"})
    with Growth(receiver, total) as growth:
        result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    arrived = [p for p in receiver.rglob("big.bin")]
    assert len(arrived) == 1 and arrived[0].read_bytes() == data
    # paced in 4 KiB pieces, three seconds after the first second's burst; sent whole, the
    # file would go from nothing to complete in a few milliseconds
    assert len(growth.partial) >= 3, sorted(growth.partial)


def test_a_stop_ends_a_throttled_local_copy_and_leaves_nothing_half_written(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    """A copy waiting for bandwidth in its worker thread lets go when the service stops after
    its grace: the service exits, the half-written copy is removed, and the next start
    delivers the file whole (unthrottled this time)."""
    ws = workspace
    data = os.urandom(1024 * 1024)  # 32 s at 32KB/s: the stop comes long before the end
    aged(ws["inbox"] / "big.bin", 3600, data)
    cfg = remote_config(ws, {"url": str(ws["outbox"]), "bandwidth": "32KB/s"}, shutdown_grace=0.2)
    svc = service_factory(cfg).start()
    with Growth(ws["outbox"], len(data)) as growth:
        wait_until(lambda: len(growth.partial) >= 2, timeout=60)
    assert svc.stop(timeout=60) == 0, svc.log()
    assert "cancelled" in svc.log()
    assert [p.name for p in ws["outbox"].rglob("*") if p.is_file()] == []
    cfg = remote_config(ws, {"url": str(ws["outbox"])})
    assert run_cli("-c", cfg, "--once").returncode == 0
    assert delivered(ws["outbox"]) == {"big.bin": data}


def test_bandwidth_paces_one_http_upload(workspace: dict[str, Path]) -> None:
    """Over HTTP, the receiver's own clock: the bytes of one upload of four seconds' worth
    arrive over more than a second (a lower bound: a busy machine only makes it longer)."""
    ws = workspace
    total = 4 * 32 * 1024
    arrivals: list[float] = []
    receiver = HttpReceiver()

    async def record(req: web.Request, _: int) -> web.StreamResponse:
        async for _chunk in req.content.iter_any():
            arrivals.append(time.monotonic())
        return web.Response(status=201)

    receiver.behave["/in/big.bin"] = record
    try:
        aged(ws["inbox"] / "big.bin", 3600, os.urandom(total))
        dest = {"url": receiver.url + "/in/{name}", "bandwidth": "32KB/s"}
        result = run_cli("-c", remote_config(ws, dest), "--once", timeout=120)
    finally:
        receiver.close()
    assert result.returncode == 0, result.stderr
    assert arrivals and arrivals[-1] - arrivals[0] >= 1.5, len(arrivals)


def test_bad_rate_bandwidth_and_window_are_refused(workspace: dict[str, Path]) -> None:
    ws = workspace
    for key, value, words in (
        ("rate", "fast", "is not a rate"),
        ("bandwidth", "5MB", "is not a bandwidth"),
        ("window", "Mon-Fry 22:00-06:00", "is not a day"),
        ("window", "25:00-26:00", "is not a time of day"),
        ("window", "0 0 31 2 *", "never opens"),  # February 31st: cron finds no next date
        ("dedupe", "bytes", "dedupe"),
    ):
        cfg = config(ws, [{"to": {"url": str(ws["outbox"]), key: value}}])
        result = run_cli("check", "-c", cfg)
        assert result.returncode == 2, (key, result.stdout)
        assert f"rules[0].to[0].{key}" in result.stderr and words in result.stderr
        assert "Traceback" not in result.stderr


# ---------------------------------------------------------------------------- 4. windows


def test_window_times() -> None:
    from filedispatch.quantities import Window

    def at(text: str) -> float:
        return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()

    night = Window.parse("Mon-Fri 22:00-06:00")
    # 2026-11-30 is a Monday
    assert night.opens(at("2026-11-30 23:00"), UTC) is None
    assert night.opens(at("2026-12-01 05:59"), UTC) is None  # Monday's night, on Tuesday
    assert night.opens(at("2026-12-01 12:00"), UTC) == at("2026-12-01 22:00")
    assert night.opens(at("2026-12-05 12:00"), UTC) == at("2026-12-07 22:00")  # Sat -> Mon
    assert night.opens(at("2026-12-05 03:00"), UTC) is None  # Friday's night, on Saturday
    cron = Window.parse("* 22-23 * * 1-5")
    assert cron.opens(at("2026-11-30 22:30"), UTC) is None
    assert cron.opens(at("2026-11-30 21:10"), UTC) == at("2026-11-30 22:00")


def test_outside_its_window_a_file_waits_pending(
    workspace: dict[str, Path], service_factory: Any
) -> None:
    ws = workspace
    now = datetime.now(UTC)
    start = (now.hour + 2) % 24
    window = f"{start:02d}:00-{(start + 1) % 24:02d}:00"
    port = free_port()
    data = {
        "database": str(ws["db"]),
        "sources": [{"path": str(ws["inbox"]), "name": "inbox", "settle": 0.2}],
        "rules": [
            {"to": {"url": str(ws["outbox"]), "window": window, "timezone": "UTC"}},
        ],
        "api": {"port": port, "token": TOKEN},
        "monitor": {"enabled": False},
    }
    cfg = write_config(ws["root"] / "config.yml", data)
    old(ws["inbox"] / "night.txt")
    svc = service_factory(cfg).start()
    rows = wait_until(lambda: [r for r in journal_rows(ws["db"]) if r["reason"]])
    opens = now.replace(hour=start, minute=0, second=0, microsecond=0)
    if opens < now:
        opens += timedelta(days=1)
    assert rows[0]["status"] == "PENDING" and rows[0]["attempts"] == 0
    assert rows[0]["next_attempt"] == opens.timestamp()
    assert "outside the destination's window" in rows[0]["reason"]
    assert delivered(ws["outbox"]) == {}
    status = asyncio.run(get_json(f"http://127.0.0.1:{port}/api/v1/status"))
    assert status["windows"] == [
        {
            "destination": str(ws["outbox"]),
            "window": window,
            "open": False,
            "opens": status["windows"][0]["opens"],
            "waiting": 1,
            "until": status["windows"][0]["until"],
        }
    ]
    assert datetime.fromisoformat(status["windows"][0]["until"]) == opens
    explain = run_cli("explain", "-c", cfg, ws["inbox"] / "night.txt")
    assert f"(its window {window} is shut: waits until " in explain.stdout
    assert "=> not taken: already planned: dispatch #1 waits in the journal" in explain.stdout
    assert svc.stop() == 0
