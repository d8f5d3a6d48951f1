"""Programmable dispatch end to end: python, command and compress steps, chains, content routing.

Each test runs the real service in-process (``Service(...).run()`` with ``once``) on real folders
and reads the real journal; the callables it runs are in tests/helpers_programmable.py.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import sqlite3
import struct
import tarfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
import zstandard

from filedispatch.config import parse_config
from filedispatch.content import import_problems
from filedispatch.service import Options, Service

from . import helpers_programmable as helpers
from .conftest import ROOT, cli_env, delivery_name, journal_rows, run_cli, write_config

H = "tests.helpers_programmable"
FAST_RETRY = {"attempts": 3, "delay": 0.05, "jitter": False}
ONE_TRY = {"attempts": 1}


def run_once(ws: dict[str, Path], rules: list[dict[str, Any]]) -> int:
    """Run the real service over ``ws['inbox']`` until its backlog is done; the exit status."""
    config = parse_config(
        {
            "database": str(ws["db"]),
            "workdir": str(ws["root"] / "work"),
            "sources": [{"path": str(ws["inbox"]), "name": "inbox", "settle": 0}],
            "rules": rules,
        },
        base=ws["root"],
    )
    return asyncio.run(Service(config, Options(once=True, webapp=False, monitor=False)).run())


def rows_by(ws: dict[str, Path]) -> dict[tuple[str, int], dict[str, Any]]:
    return {(r["filename"], r["step"]): r for r in journal_rows(ws["db"])}


def notes(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


# --------------------------------------------------------------------------- python steps


def test_sync_async_and_class_callables_get_path_args_kwargs_and_context(
    workspace: dict[str, Path],
) -> None:
    ws, log = workspace, workspace["root"] / "calls.jsonl"
    for name in ("a.one", "b.two", "c.three", "d.three", "e.four", "f.five"):
        (ws["inbox"] / name).write_text(name)
    helpers.Recorder.instances = 0
    rules: list[dict[str, Any]] = [
        {
            "name": "sync",
            "extensions": "one",
            "to": {
                "python": f"{H}:record",
                "args": [1, "two"],
                "kwargs": {"log": str(log), "extra": "x"},
            },
        },
        {
            "name": "async",
            "extensions": "two",
            "to": {"python": f"{H}:arecord", "args": ["tagged"], "kwargs": {"log": str(log)}},
        },
        {
            "name": "class",
            "extensions": "three",
            "to": {"python": f"{H}:Recorder", "args": ["pre"], "kwargs": {"log": str(log)}},
        },
        {  # Rattail's calling convention: no ``context`` parameter, so none is passed
            "name": "plain",
            "extensions": "four",
            "to": {"python": f"{H}:plain", "args": ["p"], "kwargs": {"log": str(log), "k": "v"}},
        },
        {  # an async class is instantiated on the loop (its __init__ may need one)
            "name": "async-class",
            "extensions": "five",
            "to": {"python": f"{H}:AsyncRecorder", "kwargs": {"log": str(log)}},
        },
    ]
    assert run_once(ws, rules) == 0
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for note in notes(log):
        by_kind.setdefault(note["kind"], []).append(note)
    rows = rows_by(ws)

    [sync] = by_kind["sync"]
    assert sync["path"] == str(ws["inbox"] / "a.one")
    assert sync["args"] == [1, "two"] and sync["kwargs"] == {"extra": "x"}
    assert sync["thread"].startswith("python:")  # not the event loop's thread
    assert sync["ctx"] == {
        "path": str(ws["inbox"] / "a.one"),
        "relpath": "a.one",
        "source": "inbox",
        "rule": "sync",
        "dispatch_id": rows[("a.one", 0)]["id"],
        "delivery_id": delivery_name(ws["db"], rows[("a.one", 0)]),  # unique across journals
        "attempt": 1,
        "step": 0,
    }
    assert rows[("a.one", 0)]["detail"] == "returned {'seen': 'a.one'}"

    [coro] = by_kind["async"]
    assert coro["tag"] == "tagged" and coro["ctx"]["rule"] == "async"
    assert rows[("b.two", 0)]["detail"] == "returned 'async done'"

    calls = by_kind["class"]
    assert len(calls) == 2 and {c["prefix"] for c in calls} == {"pre"}
    assert len({c["instance"] for c in calls}) == 1 and helpers.Recorder.instances == 1
    assert sorted(c["calls"] for c in calls) == [1, 2]

    [acls] = by_kind["async-class"]
    assert acls["path"] == str(ws["inbox"] / "f.five") and acls["ctx"]["rule"] == "async-class"
    assert rows[("f.five", 0)]["detail"] == "returned 1"

    [plain] = by_kind["plain"]
    assert plain["args"] == ["p"] and plain["kwargs"] == {"k": "v"}
    assert all(r["status"] == "SUCCEEDED" and r["protocol"] == "python" for r in rows.values())


def test_exceptions_fail_the_step_with_type_and_message_and_others_are_delivered(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    for name in ("bad.txt", "good.dat", "typo.bug", "mixed.seq", "same.rep", "bye.exit"):
        (ws["inbox"] / name).write_text(name)
    rules: list[dict[str, Any]] = [
        {
            "name": "raises",
            "extensions": "txt",
            "to": {"python": f"{H}:fail", "args": ["broken input"], "retry": ONE_TRY},
        },
        {"name": "copy", "extensions": "dat", "to": str(ws["outbox"])},
        {  # a TypeError (here: a missing argument) is a bug: no retry can fix it
            "name": "bug",
            "extensions": "bug",
            "to": {"python": f"{H}:fail", "retry": FAST_RETRY},
        },
    ]
    # Rattail's option: retry only while the same exception type repeats
    rules += [
        {
            "name": name,
            "extensions": name[-3:],
            "to": {
                "python": f"{H}:Flaky",
                "args": errors,
                "retry": {**FAST_RETRY, "attempts": 5, "same_error": True},
            },
        }
        for name, errors in (
            ("mixed-seq", ["RuntimeError", "KeyError"]),
            ("same-rep", ["OSError"] * 2),
        )
    ]
    rules.append({"name": "exit", "extensions": "exit", "to": {"python": f"{H}:exits"}})
    assert run_once(ws, rules) == 1  # some files failed; the service itself went on
    rows = rows_by(ws)
    bye = rows[("bye.exit", 0)]
    assert (bye["status"], bye["attempts"]) == ("FAILED", 1)
    assert bye["reason"] == "SystemExit: the callable called exit(3)"
    bad = rows[("bad.txt", 0)]
    assert (bad["status"], bad["attempts"]) == ("FAILED", 1)
    assert bad["reason"] == "ValueError: broken input: bad.txt"
    assert bad["error_type"] == "ValueError"
    assert files_in(ws["outbox"]) == {"good.dat": b"good.dat"}

    typo = rows[("typo.bug", 0)]
    assert (typo["status"], typo["attempts"], typo["error_type"]) == ("FAILED", 1, "TypeError")
    assert "missing 1 required positional argument: 'message'" in typo["reason"]

    mixed = rows[("mixed.seq", 0)]
    assert (mixed["status"], mixed["attempts"]) == ("FAILED", 2)
    assert mixed["reason"].startswith("KeyError: 'failure 2'")
    assert "a different error than before, RuntimeError" in mixed["reason"]

    same = rows[("same.rep", 0)]
    assert (same["status"], same["attempts"]) == ("SUCCEEDED", 3)


def test_a_hung_callable_times_out_without_blocking_the_service(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    (ws["inbox"] / "slow.wait").write_text("x")
    (ws["inbox"] / "fine.dat").write_text("fine")
    rules: list[dict[str, Any]] = [
        {
            "name": "hangs",
            "extensions": "wait",
            "to": {"python": f"{H}:hang", "timeout": 0.3, "retry": ONE_TRY},
        },
        {"name": "copy", "extensions": "dat", "to": str(ws["outbox"])},
    ]
    helpers.RELEASE.clear()
    started = time.monotonic()
    try:
        assert run_once(ws, rules) == 1
        elapsed = time.monotonic() - started
    finally:
        helpers.RELEASE.set()
    assert elapsed < 10  # the call is abandoned in its daemon thread, not waited for
    slow = rows_by(ws)[("slow.wait", 0)]
    assert (slow["status"], slow["reason"]) == ("FAILED", "timed out after 0.3s")
    assert files_in(ws["outbox"]) == {"fine.dat": b"fine"}


# --------------------------------------------------------------------------- command steps


def assert_gone(pid: int) -> None:
    """The process has ended (a zombie waiting for its parent counts as ended)."""

    def gone() -> bool:
        try:
            return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
        except psutil.NoSuchProcess:
            return True

    deadline = time.monotonic() + 5
    while not gone() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert gone(), f"process {pid} is still running"


AWKWARD = ["$(touch pwned).txt", "`touch pwned2`.txt", "a b \"c\" 'd'.txt", "-rf.txt", "x;touch p3"]


def test_awkward_file_names_are_only_names_to_a_command(workspace: dict[str, Path]) -> None:
    ws, cwd = workspace, workspace["root"] / "cwd"
    cwd.mkdir()
    ws["outbox"].mkdir()
    listing = ws["root"] / "listing.txt"
    for name in AWKWARD:
        (ws["inbox"] / name).write_text(name)
    rules: list[dict[str, Any]] = [
        {
            "name": "copy",
            "continue": True,
            "to": {
                "command": 'cp -- {path} "$OUT"/{name}',
                "env": {"OUT": str(ws["outbox"])},
                "cwd": str(cwd),
                "retry": ONE_TRY,
            },
        },
        {  # dirsend's own style, the placeholder inside double and single quotes
            "name": "list",
            "to": {
                "command": "printf '%s|%s\\n' \"{}\" '{name}' >> " + str(listing),
                "cwd": str(cwd),
                "retry": ONE_TRY,
            },
        },
    ]
    assert run_once(ws, rules) == 0
    assert files_in(ws["outbox"]) == {n: n.encode() for n in AWKWARD}
    lines = set(listing.read_text().splitlines())
    assert lines == {f"{ws['inbox'] / n}|{n}" for n in AWKWARD}
    leftovers = [p for p in ws["root"].rglob("*") if p.name in ("pwned", "pwned2", "p3")]
    assert leftovers == [] and list(cwd.iterdir()) == []
    assert sorted(os.listdir(ws["inbox"])) == sorted(AWKWARD)


def test_a_command_gets_its_row_id_its_journal_and_a_delivery_id_unique_across_journals(
    workspace: dict[str, Path],
) -> None:
    """``FILEDISPATCH_DISPATCH_ID`` stays the row id (what ``history show`` takes);
    ``FILEDISPATCH_JOURNAL`` is the journal's token and ``FILEDISPATCH_DELIVERY_ID`` both
    with when the row was planned (``<token>-<id>-<microseconds>``), the key a command records
    to recognise a repeat: row ids alone coincide between journals, and within one journal
    restored from a backup."""
    ws, seen = workspace, workspace["root"] / "seen.txt"
    (ws["inbox"] / "a.txt").write_text("a")
    command = (
        'printf "%s %s %s" "$FILEDISPATCH_DISPATCH_ID" "$FILEDISPATCH_JOURNAL" '
        f'"$FILEDISPATCH_DELIVERY_ID" > {seen}'
    )
    assert run_once(ws, [{"to": {"command": command, "retry": ONE_TRY}}]) == 0
    ((row),) = journal_rows(ws["db"])
    with sqlite3.connect(ws["db"]) as db:
        [(token,)] = db.execute("SELECT token FROM journal_identity").fetchall()
    assert seen.read_text().split() == [str(row["id"]), token, delivery_name(ws["db"], row)]


def test_a_failing_command_records_exit_code_and_stderr_tail(workspace: dict[str, Path]) -> None:
    ws, cwd = workspace, workspace["root"] / "cwd"
    cwd.mkdir()
    (ws["inbox"] / "f.txt").write_text("x")
    (ws["inbox"] / "g.none").write_text("x")
    (ws["inbox"] / "h.env").write_text("x")
    (ws["inbox"] / "i.bg").write_text("x")
    bg_pid = ws["root"] / "bg.pid"
    noise = "; ".join(f"echo line{i} >&2" for i in range(200))
    rules: list[dict[str, Any]] = [
        {
            "name": "fails",
            "extensions": "txt",
            "to": {
                "command": f"{noise}; echo 'it broke on' {{name}} >&2; exit 3",
                "retry": ONE_TRY,
            },
        },
        {  # 127: the shell cannot find the program; retrying cannot help
            "name": "missing",
            "extensions": "none",
            "to": {"command": "no-such-program-xyz {path}", "retry": FAST_RETRY},
        },
        {
            "name": "env",
            "extensions": "env",
            "to": {
                "command": "printf '%s %s' \"$GREETING\" {stem} > out.txt",
                "env": {"GREETING": "hello"},
                "cwd": str(cwd),
            },
        },
        {  # a background child keeps stdout open: the step still ends with the shell
            "name": "background",
            "extensions": "bg",
            "to": {"command": f"sleep 20 & echo $! > {bg_pid}; echo started {{name}}"},
        },
    ]
    started = time.monotonic()
    assert run_once(ws, rules) == 1
    assert time.monotonic() - started < 10
    assert_gone(int(bg_pid.read_text()))  # it held the output after the shell exited
    rows = rows_by(ws)
    fails = rows[("f.txt", 0)]
    assert (fails["status"], fails["attempts"]) == ("FAILED", 1)
    assert fails["reason"].startswith("exit 3: ...")
    assert fails["reason"].endswith("line198 | line199 | it broke on f.txt")
    assert len(fails["reason"]) < 600
    missing = rows[("g.none", 0)]
    assert (missing["status"], missing["attempts"]) == ("FAILED", 1)
    assert missing["reason"].startswith("exit 127:") and "not found" in missing["reason"]
    assert rows[("h.env", 0)]["status"] == "SUCCEEDED"
    assert rows[("i.bg", 0)]["detail"] == "exit 0: started i.bg"
    assert (cwd / "out.txt").read_text() == "hello h"


def test_a_command_timeout_kills_its_whole_process_group(workspace: dict[str, Path]) -> None:
    ws, pids = workspace, workspace["root"] / "pids"
    (ws["inbox"] / "t.txt").write_text("x")
    rules: list[dict[str, Any]] = [
        {
            "name": "slow",
            "to": {
                "command": 'sleep 30 & echo $! > "$PIDS"; echo $$ >> "$PIDS"; wait',
                "env": {"PIDS": str(pids)},
                "timeout": 0.5,
                "retry": ONE_TRY,
            },
        }
    ]
    started = time.monotonic()
    assert run_once(ws, rules) == 1
    assert time.monotonic() - started < 10
    row = rows_by(ws)[("t.txt", 0)]
    assert (row["status"], row["reason"]) == ("FAILED", "timed out after 0.5s")
    for pid in map(int, pids.read_text().split()):  # the shell and its background child
        assert_gone(pid)


# --------------------------------------------------------------------------- chains and transforms


def test_chain_retries_a_failed_step_and_resumes_without_repeating_earlier_steps(
    workspace: dict[str, Path],
) -> None:
    ws, root = workspace, workspace["root"]
    counter, log, marker = root / "counter.jsonl", root / "flaky.jsonl", root / "marker"
    copies, shipped = root / "copies", root / "shipped"
    (ws["inbox"] / "report.txt").write_text("quarterly numbers\n" * 100)
    (ws["inbox"] / "data.csv").write_text("a,b\n1,2\n")
    once = root / "command-failed-once"
    rules: list[dict[str, Any]] = [
        {  # compress -> local copy -> a command that fails once
            "name": "archive",
            "extensions": "txt",
            "to": [
                {"compress": "gzip"},
                {"url": str(copies)},
                {
                    "command": (
                        f'if [ -e "{once}" ]; then cp {{path}} "{shipped}"/; '
                        f'else touch "{once}"; echo "remote busy" >&2; exit 75; fi'
                    ),
                    "retry": FAST_RETRY,
                },
            ],
        },
        {  # a python transform -> a python step that fails once -> local copy
            "name": "upper",
            "extensions": "csv",
            "to": [
                {"python": f"{H}:upper_copy", "kwargs": {"counter": str(counter)}},
                {
                    "python": f"{H}:flaky_once",
                    "args": [str(marker)],
                    "kwargs": {"log": str(log)},
                    "retry": FAST_RETRY,
                },
                {"url": str(copies)},
            ],
        },
    ]
    shipped.mkdir()
    assert run_once(ws, rules) == 0
    rows = rows_by(ws)
    assert [(rows[("report.txt", i)]["attempts"]) for i in range(3)] == [1, 1, 2]
    assert [(rows[("data.csv", i)]["attempts"]) for i in range(3)] == [1, 2, 1]
    assert all(r["status"] == "SUCCEEDED" for r in rows.values())
    assert "remote busy" not in (rows[("report.txt", 2)]["reason"] or "")
    # the transform ran once; the flaky step twice (its retry); each file reached its ends
    assert len(notes(counter)) == 1 and len(notes(log)) == 2
    original = (ws["inbox"] / "report.txt").read_bytes()
    assert gzip.decompress((copies / "report.txt.gz").read_bytes()) == original
    assert gzip.decompress((shipped / "report.txt.gz").read_bytes()) == original
    assert (copies / "data.upper.csv").read_bytes() == b"A,B\n1,2\n"
    # intermediate files: gone with their chain, and never in the source folder
    assert list((root / "work").iterdir()) == []
    assert sorted(os.listdir(ws["inbox"])) == ["data.csv", "report.txt"]


def test_compress_formats_deliver_archives_that_unpack_to_the_original(
    workspace: dict[str, Path],
) -> None:
    ws = workspace
    data = os.urandom(2000) + b"text " * 5000
    (ws["inbox"] / "blob.bin").write_bytes(data)
    formats = {"gzip": ".gz", "zip": ".zip", "tar.gz": ".tar.gz", "zstd": ".zst"}
    rules: list[dict[str, Any]] = [
        {
            "name": fmt,
            "continue": True,
            "to": [{"compress": fmt, "level": 9}, {"url": str(ws["outbox"] / fmt)}],
        }
        for fmt in formats
    ]
    assert run_once(ws, rules) == 0
    out = {
        fmt: (ws["outbox"] / fmt / f"blob.bin{suffix}").read_bytes()
        for fmt, suffix in formats.items()
    }
    assert gzip.decompress(out["gzip"]) == data
    with zipfile.ZipFile(io.BytesIO(out["zip"])) as zf:
        assert zf.namelist() == ["blob.bin"] and zf.read("blob.bin") == data
    with tarfile.open(fileobj=io.BytesIO(out["tar.gz"])) as tar:
        member = tar.extractfile("blob.bin")
        assert member is not None and member.read() == data
    assert zstandard.ZstdDecompressor().decompress(out["zstd"]) == data
    assert all(len(blob) < len(data) for blob in out.values())


# --------------------------------------------------------------------------- content routing


def _png() -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\x00\x00\x00"))
        + chunk(b"IEND", b"")
    )


PDF = b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n<< /Root 1 0 R >>\n%%EOF\n"


def test_mime_rules_route_files_by_content_not_by_name(workspace: dict[str, Path]) -> None:
    ws = workspace
    (ws["inbox"] / "scan-0001").write_bytes(PDF)  # no extension
    (ws["inbox"] / "photo").write_bytes(_png())  # no extension
    (ws["inbox"] / "misnamed.pdf").write_bytes(_png())  # the wrong extension
    (ws["inbox"] / "notes").write_text("plain words\n")
    rules: list[dict[str, Any]] = [
        {"name": "pdf", "mime": "application/pdf", "to": str(ws["outbox"] / "pdf")},
        {"name": "images", "mime": ["image/*"], "to": str(ws["outbox"] / "images")},
        {"name": "rest", "to": str(ws["outbox"] / "rest")},
    ]
    assert run_once(ws, rules) == 0
    assert set(files_in(ws["outbox"] / "pdf")) == {"scan-0001"}
    assert set(files_in(ws["outbox"] / "images")) == {"photo", "misnamed.pdf"}
    assert set(files_in(ws["outbox"] / "rest")) == {"notes"}


def test_the_example_keyword_classifier_routes_text_files(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    ws, out = workspace, workspace["outbox"]
    (ws["inbox"] / "march.txt").write_text("INVOICE 2024-03\nAmount due: 120 EUR\n")
    (ws["inbox"] / "scan").write_text("Payment receipt for order 42\n")  # no extension
    (ws["inbox"] / "q1.md").write_text("# Quarterly report\nall good\n")
    (ws["inbox"] / "hello.txt").write_text("nothing to see here\n")
    (ws["inbox"] / "picture").write_bytes(_png())  # not text: never classified
    rules: list[dict[str, Any]] = [
        {
            "name": "by-keyword",
            "mime": "text/*",
            "classify": "keyword_classifier:classify",
            "to": str(out / "unsorted"),
        },
        {"name": "unsorted", "to": str(out / "unsorted")},
        {"name": "invoices", "to": str(out / "invoices")},
        {"name": "reports", "to": str(out / "reports")},
    ]
    assert run_once(ws, rules) == 0
    assert set(files_in(out / "invoices")) == {"march.txt", "scan"}
    assert set(files_in(out / "reports")) == {"q1.md"}
    assert set(files_in(out / "unsorted")) == {"hello.txt", "picture"}
    assert {r["filename"]: r["rule"] for r in journal_rows(ws["db"])}["scan"] == "invoices"


# --------------------------------------------------------------------------- configuration


def test_check_reports_hooks_that_cannot_be_imported(workspace: dict[str, Path]) -> None:
    ws = workspace
    base: dict[str, Any] = {"database": str(ws["db"]), "sources": [str(ws["inbox"])]}
    base["sources"] = [{"path": str(ws["inbox"])}]
    cfg = write_config(
        ws["root"] / "bad.yml",
        {
            **base,
            "rules": [
                {"to": [{"python": "no_such_module_xyz:handle"}]},
                {"classify": f"{H}:no_such_function", "to": str(ws["outbox"])},
            ],
        },
    )
    env = cli_env(PYTHONPATH=str(ROOT))
    result = run_cli("check", "-c", cfg, env=env, cwd=ROOT)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "rules[0].to[0].python: cannot import 'no_such_module_xyz:handle'" in result.stderr
    assert "ModuleNotFoundError" in result.stderr
    assert f"rules[1].classify: cannot import '{H}:no_such_function'" in result.stderr
    assert run_cli("-c", cfg, "--once", env=env, cwd=ROOT).returncode == 2  # nor does it start

    good = write_config(
        ws["root"] / "good.yml",
        {**base, "rules": [{"to": [{"python": f"{H}:record"}, {"compress": "zstd"}]}]},
    )
    result = run_cli("check", "-c", good, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("step", "message"),
    [
        ({"command": "cp {pth} /tmp"}, "rules[0].to[0].command: unknown placeholder {pth}"),
        ({"command": 'echo "{path}'}, 'rules[0].to[0].command: the command has an unterminated "'),
        ({"compress": "gzip", "level": 15}, "rules[0].to[0]: level: gzip takes 0 to 9"),
        ({"compress": "rar"}, "rules[0].to[0].compress: Input should be"),
        (
            {"python": "mod:f", "kwargs": {"context": 1}},
            "rules[0].to[0].kwargs: 'context' is reserved",
        ),
    ],
)
def test_step_mistakes_are_config_errors(
    workspace: dict[str, Path], step: dict[str, Any], message: str
) -> None:
    from filedispatch.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        parse_config({"sources": [{"path": str(workspace["inbox"])}], "rules": [{"to": [step]}]})
    assert any(p.startswith(message) for p in err.value.problems), err.value.problems


# --------------------------------------------------------------------------- the documentation

DOC = ROOT / "docs" / "programmable.md"


def doc_configs() -> list[str]:
    blocks = DOC.read_text(encoding="utf-8").split("```yaml\n")[1:]
    return [block.split("```", 1)[0] for block in blocks]


def test_every_config_in_the_docs_loads_and_its_hooks_import(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    configs = doc_configs()
    assert len(configs) >= 5
    for text in configs:
        config = parse_config(yaml.safe_load(text), "docs/programmable.md", base=ROOT)
        assert import_problems(config) == [], text


def test_the_documented_python_steps_run(
    workspace: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "docs" / "examples"))
    ws, arrivals = workspace, workspace["root"] / "arrivals.log"
    [text] = [c for c in doc_configs() if "hooks:Stamp" in c]
    text = text.replace("/srv/inbox", str(ws["inbox"])).replace("/srv/out", str(ws["outbox"]))
    raw = yaml.safe_load(text.replace("/tmp/arrivals.log", str(arrivals)))
    raw.update(database=str(ws["db"]), workdir=str(ws["root"] / "work"))
    raw["sources"][0]["settle"] = 0
    raw["rules"].reverse()  # the .txt rule first, so both rules get a file
    (ws["inbox"] / "note.txt").write_text("hello\n")
    (ws["inbox"] / "data.bin").write_bytes(b"\x00\x01")
    config = parse_config(raw, base=ws["root"])
    assert asyncio.run(Service(config, Options(once=True, webapp=False, monitor=False)).run()) == 0
    assert files_in(ws["outbox"]) == {
        "note.stamped.txt": b"-- received by filedispatch --\nhello\n"
    }
    assert "log-and-hash " + str(ws["inbox"] / "data.bin") in arrivals.read_text()
    digest = rows_by(ws)[("data.bin", 1)]["detail"]
    assert digest == "returned " + repr(hashlib.sha256(b"\x00\x01").hexdigest())
