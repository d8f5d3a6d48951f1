"""The command line as typed: ``-c CONFIG`` before or after any sub-command, and help that
names what to type (the real CLI, as a subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import cli_env, old, run_cli, write_config
from .ops import ops_config

SUBCOMMANDS = [
    ["check"],
    ["explain"],
    ["history", "list"],
    ["history", "show"],
    ["history", "forget"],
    ["history", "stats"],
    ["mark-existing"],
    ["nodes"],
    ["nodes", "hand-over"],
]


@pytest.mark.parametrize("command", SUBCOMMANDS, ids=" ".join)
def test_sub_command_help_names_config_not_an_internal_name(command: list[str]) -> None:
    result = run_cli(*command, "-h")
    assert result.returncode == 0, result.stderr
    assert "-c CONFIG, --config CONFIG" in result.stdout, result.stdout
    assert "SUB_" not in result.stdout, result.stdout


def test_config_before_or_after_every_sub_command(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path)
    (tmp_path / "inbox" / "a.txt").write_bytes(b"a")
    # recorded, not sent: the journal has a row for history to show
    assert run_cli("mark-existing", "-c", cfg).returncode == 0
    runs = {
        "check": (["check"], [], "valid"),
        "explain": (["explain"], [str(tmp_path / "inbox" / "a.txt")], "a.txt"),
        "mark-existing": (["mark-existing"], ["--dry-run"], "would mark 1 file(s)"),
        "history stats": (["history", "stats"], [], "period"),
        "history list": (["history", "list"], [], "a.txt"),
        "nodes": (["nodes"], [], "one implicit node"),
        "check --connect": (["check"], ["--connect"], "schema: version"),
    }
    for name, (command, rest, expected) in runs.items():
        before = run_cli("-c", cfg, *command, *rest)
        after = run_cli(*command, "-c", cfg, *rest)
        for result in (before, after):
            assert result.returncode == 0, (name, result.stderr)
            assert expected in result.stdout, (name, result.stdout)
        assert before.stdout == after.stdout, name


def test_a_sub_command_without_a_config_says_so(tmp_path: Path) -> None:
    for command in (["check"], ["explain", "x.txt"], ["nodes"]):
        result = run_cli(*command, cwd=tmp_path)
        assert result.returncode == 2
        assert f"{command[0]} needs -c CONFIG" in result.stderr
        assert "Traceback" not in result.stderr


def test_once_says_what_it_does_before_the_work(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path)
    for i in range(200):
        (tmp_path / "inbox" / f"f{i:03d}.txt").write_bytes(b"x")
    result = run_cli("-c", cfg, "--once", "--log-level", "INFO")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    # a delivery's line: one file's, or a batch's ("N files -> FOLDER: ...")
    first_delivery = next(
        i for i, line in enumerate(lines) if "filedispatch.dispatcher: " in line and " -> " in line
    )
    announce = next(i for i, line in enumerate(lines) if "source(s)" in line)
    assert announce < first_delivery, "\n".join(lines[: first_delivery + 3])
    assert "dispatching what is in 1 source(s) now, then exiting (--once)" in lines[announce]
    assert not any("watching 1 source(s)" in line for line in lines)


def test_forget_says_when_the_file_is_sent_again(tmp_path: Path) -> None:
    cfg = ops_config(tmp_path)
    (tmp_path / "inbox" / "a.txt").write_bytes(b"a")
    assert run_cli("mark-existing", "-c", cfg).returncode == 0
    forgot = run_cli("history", "forget", "1", "-c", cfg)
    assert forgot.returncode == 0, forgot.stderr
    assert "sent again at the next rescan, within `rescan` seconds (default 60)" in forgot.stdout


def test_check_names_missing_tls_and_ssh_files_and_a_source_to_create(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    cfg = ops_config(
        tmp_path,
        rules=[
            {
                "name": "remote",
                "glob": "*",
                "to": [
                    {
                        "url": "sftp://u@127.0.0.1:2222/in",
                        "key_file": str(tmp_path / "absent_key"),
                        "known_hosts": str(tmp_path / "keys"),
                    },
                    {"url": "https://127.0.0.1:8443/up", "ca_file": str(tmp_path / "no_ca.pem")},
                ],
            }
        ],
        sources=[{"path": str(tmp_path / "not-yet"), "name": "later"}],
    )
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == f"{cfg}: 3 problem(s), listed below"
    assert f"rules[0].to[0].key_file: {tmp_path / 'absent_key'} does not exist" in result.stderr
    assert f"rules[0].to[0].known_hosts: {tmp_path / 'keys'} is not a file" in result.stderr
    assert f"rules[0].to[1].ca_file: {tmp_path / 'no_ca.pem'} does not exist" in result.stderr
    assert "Traceback" not in result.stderr
    assert f"{tmp_path / 'not-yet'} does not exist yet; the service creates it" in result.stdout


#: modules a ``--once`` run of a config that uses none of them must not import: each costs
#: start-up time before the first file moves (issue 16), and most are optional extras
NOT_FOR_A_LOCAL_ONCE = [
    "aiohttp",  # the API (off under --once)
    "aiomonitor",  # the console (off under --once)
    "filedispatch.api",
    "filedispatch.monitor",
    "apprise",  # notifications: no notify targets
    "psycopg",  # an SQLite journal
    "aiobotocore",  # no S3 destination
    "asyncssh",  # no SFTP destination
    "aioftp",  # no FTP destination
    "sklearn",  # no learned rule
    "pypdf",
    "filedispatch.learn.model",
    "filedispatch.learn.extract",  # the learned rules' text reader
    "puremagic",  # no mime: condition
    "logging.config",  # no --log-config
    "logging.handlers",  # no --log-file
]

#: the real CLI, started as ``python -m filedispatch`` starts it, writing the names of the
#: modules loaded at its exit to the file named by its first argument, and ``built:NAME`` for
#: each step kind's model whose validator was built
_REPORT_MODULES = """
import atexit, runpy, sys
report, sys.argv = sys.argv[1], ["filedispatch", *sys.argv[2:]]
def built():
    from filedispatch.config import STEP_MODELS
    return [f"built:{m.__name__}" for m in STEP_MODELS if m.__pydantic_complete__]
atexit.register(lambda: open(report, "w").write("\\n".join(sorted(sys.modules) + built())))
runpy.run_module("filedispatch", run_name="__main__", alter_sys=True)
"""


def test_once_imports_only_what_its_config_uses(tmp_path: Path) -> None:
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    old(inbox / "a.txt", b"a")
    # the default config otherwise: the API and the console are on by default
    cfg = write_config(
        tmp_path / "config.yml",
        {
            "database": str(tmp_path / "journal.db"),
            "sources": [{"path": str(inbox)}],
            "rules": [{"name": "all", "glob": "*", "to": {"url": str(outbox), "mode": "move"}}],
        },
    )
    report = tmp_path / "modules.txt"
    result = subprocess.run(
        [sys.executable, "-c", _REPORT_MODULES, str(report), "-c", str(cfg), "--once"],
        capture_output=True,
        text=True,
        timeout=60,
        env=cli_env(),
    )
    assert result.returncode == 0, result.stderr
    assert (outbox / "a.txt").read_bytes() == b"a"
    loaded = set(report.read_text().split())
    assert "filedispatch.service" in loaded  # the report is the service's own
    found = [m for m in NOT_FOR_A_LOCAL_ONCE if m in loaded]
    assert not found, f"--once of a local config imported {found}"
    # nor did it build the validators of the step kinds it does not use (issue 16)
    assert sorted(m for m in loaded if m.startswith("built:")) == ["built:LocalDestination"]
