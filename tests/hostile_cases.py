"""Hostile configurations: each must be refused at load with exit 2 and one line naming its field.

Shared by tests/test_hostile_config.py and bench/hostile_config.py. A case is a YAML text
(``{d}`` is the case's folder) and the command line to run on it; ``prepare`` lays out what
every case may refer to: ``in/`` (a source), ``afile`` (a regular file), ``link -> in``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: a password no message may show (it holds the characters URLs make awkward)
CANARY = "Kx9/Canary#Zq7?w2"


@dataclass(frozen=True)
class Case:
    name: str
    field: str  #: text the one line must contain (the field, or the option)
    yaml: str
    args: tuple[str, ...] = ("check",)  #: the command; ``-c CONFIG`` is added


SRC = "sources: [{path: ./in}]\n"
RSRC = "sources: [{path: ./in, recursive: true}]\n"
OUT = "rules: [{to: ./out}]\n"

BOMB = "".join(
    f"{x}: &{x} [{', '.join([f'*{p}'] * 9) if p else ', '.join(['lol'] * 9)}]\n"
    for p, x in zip(["", *"abcdefgh"], "abcdefghi", strict=True)
)

CASES: list[Case] = [
    # 11.4: paths compared resolved
    Case("dest-dotdot-recursive", "rules[0].to[0].url", RSRC + "rules: [{to: ./in/../in/sub}]"),
    Case("dest-dotdot-same", "rules[0].to[0].url", SRC + "rules: [{to: ./in/../in}]"),
    Case("dest-through-link", "rules[0].to[0].url", RSRC + "rules: [{to: ./link/sub}]"),
    Case("dest-new-under-link", "rules[0].to[0].url", RSRC + "rules: [{to: ./link/new/deep}]"),
    Case(
        "source-is-link",
        "rules[0].to[0].url",
        "sources: [{path: ./link, recursive: true}]\nrules: [{to: ./in/x}]",
    ),
    Case("database-dotdot", "database", "database: ./in/../in/j.db\n" + SRC + OUT),
    Case("database-through-link", "database", "database: ./link/j.db\n" + SRC + OUT),
    Case("workdir-dotdot", "workdir", "workdir: ./in/../in\n" + SRC + OUT),
    Case(
        "done-dir-dotdot",
        "sources[0].done_dir",
        "sources: [{path: ./in, after: move, done_dir: ./in/../in}]\n" + OUT,
    ),
    Case(
        "failed-dir-link",
        "sources[0].failed_dir",
        "sources: [{path: ./in, failed_dir: ./link}]\n" + OUT,
    ),
    Case("db-option-dotdot", "--db", SRC + OUT, ("--once", "--db", "in/../in/j.db")),
    Case(
        "log-file-in-source",
        "--log-file",
        SRC + OUT,
        ("--once", "--db", "state/j.db", "--log-file", "link/x.log"),
    ),
    # 11.6: numbers that make no sense
    Case(
        "retry-delay-inf", "retry.delay", SRC + "rules: [{to: {url: ./out, retry: {delay: .inf}}}]"
    ),
    Case(
        "retry-delay-1e300",
        "retry.delay",
        SRC + "rules: [{to: {url: ./out, retry: {delay: 1e300}}}]",
    ),
    Case(
        "retry-max-delay-inf",
        "retry.max_delay",
        SRC + "rules: [{to: {url: ./out, retry: {max_delay: .inf}}}]",
    ),
    Case(
        "retry-backoff-huge",
        "retry.backoff",
        SRC + "rules: [{to: {url: ./out, retry: {backoff: 1e9}}}]",
    ),
    Case("settle-inf", "sources[0].settle", "sources: [{path: ./in, settle: .inf}]\n" + OUT),
    Case("rescan-1e300", "sources[0].rescan", "sources: [{path: ./in, rescan: 1e300}]\n" + OUT),
    Case("shutdown-grace-inf", "shutdown_grace", "shutdown_grace: .inf\n" + SRC + OUT),
    Case("timeout-nan", "timeout", SRC + "rules: [{to: {url: ./out, timeout: .nan}}]"),
    Case("nan-in-python-args", "args[0]", SRC + "rules: [{to: {python: 'm:f', args: [.nan]}}]"),
    Case(
        "http-read-timeout-huge",
        "http_timeout.read",
        SRC + "rules: [{to: {url: 'http://h/x', http_timeout: {read: 1e12}}}]",
    ),
    Case(
        "ftp-timeout-negative-inf",
        "connect_timeout",
        SRC + "rules: [{to: {url: 'ftp://h/x', connect_timeout: -.inf}}]",
    ),
    Case(
        "size-beyond-float",
        "rules[0].min_size",
        SRC + "rules: [{min_size: '" + "9" * 400 + "T', to: ./out}]",
    ),
    # 11.6: paths that make no sense
    Case("to-empty", "rules[0].to[0].url", SRC + "rules: [{to: ''}]"),
    Case(
        "done-dir-empty",
        "sources[0].done_dir",
        "sources: [{path: ./in, after: move, done_dir: ''}]\n" + OUT,
    ),
    Case("nul-in-source", "sources[0].path", 'sources: [{path: "./in\\0x"}]\n' + OUT),
    Case("nul-in-database", "database", 'database: "./j\\0.db"\n' + SRC + OUT),
    Case("nul-in-cwd", "cwd", SRC + 'rules: [{to: {command: "true", cwd: "/tmp/\\0"}}]'),
    Case("source-is-a-file", "sources[0].path", "sources: [{path: ./afile}]\n" + OUT),
    Case("source-under-a-file", "sources[0].path", "sources: [{path: ./afile/in}]\n" + OUT),
    Case("database-under-a-file", "database", "database: ./afile/j.db\n" + SRC + OUT),
    Case("workdir-is-a-file", "workdir", "workdir: ./afile\n" + SRC + OUT),
    Case("db-option-under-a-file", "--db", SRC + OUT, ("--once", "--db", "afile/j.db")),
    Case(
        "log-file-is-a-folder",
        "--log-file",
        SRC + OUT,
        ("--once", "--db", "state/j.db", "--log-file", "in"),
    ),
    # 11.6: YAML that makes no sense
    Case("duplicate-top-key", "'rules'", SRC + OUT + OUT),
    Case(
        "duplicate-step-key",
        "'url'",
        SRC + "rules:\n  - to:\n      url: ./out\n      url: ./other\n",
    ),
    Case("alias-bomb", "expands to more than", BOMB + SRC + OUT),
    Case("alias-cycle", "contains it", "x: &x [*x]\n" + SRC + OUT),
    Case(
        "unset-variable-in-command",
        "rules[0].to.command",
        SRC + "rules: [{to: {command: 'echo ${FD_SURELY_UNSET}'}}]",
    ),
    # 11.7: a URL never echoed, whatever its password holds
    Case(
        "password-and-bad-port",
        "rules[0].to[0].url",
        SRC + f"rules: [{{to: 'ftp://u:{CANARY}@h:99999/x'}}]",
    ),
    Case(
        "password-and-no-host",
        "rules[0].to[0].url",
        SRC + f"rules: [{{to: 'https://u:{CANARY}@:80/x'}}]",
    ),
]


#: a secret in each place people put one (issue 11.7)
CANARIES = {
    "query": "Qy7canaryQUERY",
    "query_fail": "Qf3canaryFAILQ",
    "env": "En5canaryENV",
    "shell_var": "Sv2canaryVAR",
    "python_arg": "Pa8canaryARG",
    "sftp_pw": "s1/Sl4shPartA/Sl4shPartB",
    "ftp_pw": "f2#canary?HASH",
    "header": "Hd4canaryHEADER",
}


def canary_env() -> dict[str, str]:
    """The environment of a canary run: a variable a command names, the tests importable."""
    root = str(Path(__file__).resolve().parent.parent)
    return {
        "FD_CANARY_VAR": CANARIES["shell_var"],
        "FD_CANARY_ARG": CANARIES["python_arg"],
        "PYTHONPATH": root,
    }


def canary_places(
    http_url: str, closed_port: int, ftp: Any, sftp: Any
) -> list[tuple[str, dict[str, Any]]]:
    """``(canary name, rule)`` for each place: ``http_url`` answers 201 on ``/up``;
    nothing listens on ``closed_port``; ``ftp`` and ``sftp`` (tests/servers.py) take the
    passwords ``CANARIES["ftp_pw"]`` and ``CANARIES["sftp_pw"]``."""
    c, once = CANARIES, {"attempts": 1}
    closed = f"http://127.0.0.1:{closed_port}"
    return [
        ("query", {"to": {"url": f"{http_url}/up?api_key={c['query']}&a=1"}}),
        (
            "query_fail",
            {"to": {"url": f"{closed}/up?access_token={c['query_fail']}", "retry": once}},
        ),
        (
            "env",
            {
                "to": {
                    "command": 'echo "token is $TOKEN"; echo "$TOKEN" >&2',
                    "env": {"TOKEN": c["env"]},
                }
            },
        ),
        (
            "shell_var",
            {"to": {"command": 'echo "var is ${FD_CANARY_VAR}" >&2; exit 3', "retry": once}},
        ),
        (
            "python_arg",
            {
                "to": {
                    "python": "tests.helpers_programmable:fail",
                    "args": ["${FD_CANARY_ARG}"],
                    "retry": once,
                }
            },
        ),
        (
            "sftp_pw",
            {
                "to": {
                    "url": f"sftp://{sftp.user}:{c['sftp_pw']}@127.0.0.1:{sftp.port}/up/",
                    "known_hosts": str(sftp.known_hosts),
                }
            },
        ),
        ("ftp_pw", {"to": {"url": f"ftp://{ftp.user}:{c['ftp_pw']}@127.0.0.1:{ftp.port}/in/"}}),
        (
            "header",
            {"to": {"url": f"{closed}/up", "headers": {"X-Api-Key": c["header"]}, "retry": once}},
        ),
    ]


def leaked(text: str) -> list[str]:
    """The canaries found in ``text``, whole or as a part between slashes."""
    return [
        name
        for name, secret in CANARIES.items()
        if any(len(part) > 4 and part in text for part in [secret, *secret.split("/")])
    ]


def prepare(folder: Path) -> None:
    """The places every case may name: a source folder, a regular file, a link to the source."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "in").mkdir(exist_ok=True)
    (folder / "afile").write_bytes(b"not a folder")
    if not (folder / "link").is_symlink():
        (folder / "link").symlink_to("in")


def run(case: Case, folder: Path, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Write the case's config in ``folder`` and run the CLI on it, from ``folder``."""
    prepare(folder)
    config = folder / "c.yml"
    config.write_text(case.yaml, encoding="utf-8")
    cmd = (
        ["check", "-c", str(config)] if case.args == ("check",) else ["-c", str(config), *case.args]
    )
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "filedispatch", *cmd],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=folder,
        env=env,
    )


def refused_cleanly(case: Case, folder: Path, result: subprocess.CompletedProcess[str]) -> str:
    """Why ``result`` is not a clean refusal of ``case`` ('' if it is)."""
    lines = result.stderr.splitlines()
    prefix = f"filedispatch: invalid configuration {folder / 'c.yml'}: "
    if result.returncode != 2:
        return f"exit {result.returncode}, not 2"
    if "Traceback" in result.stderr:
        return "a traceback"
    if len(lines) != 1:
        return f"{len(lines)} lines, not one"
    if not lines[0].startswith(prefix):
        return "the line does not name the file"
    if case.field not in lines[0]:
        return f"the line does not name {case.field}"
    if any(part in result.stderr + result.stdout for part in CANARY.split("/")):
        return "the password is echoed"
    return ""
