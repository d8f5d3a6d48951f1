"""Hostile configurations (issue 11.4, 11.6, 11.7): how many are refused cleanly, how many leak.

Runs the real CLI on every bad configuration of tests/hostile_cases.py (a clean refusal: exit
2, one line naming the file and the field, no traceback, no password, within the timeout), and
on one canary configuration per place a secret is put (a real ``--once`` run against HTTP, FTP
and SFTP servers on loopback, then ``check``), searching the output, the log file and every
journal column for the canary. Prints the two figures; asserts nothing.

    python bench/hostile_config.py [--timeout 60]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from tests.conftest import free_port, old  # noqa: E402
from tests.hostile_cases import (  # noqa: E402
    CANARIES,
    CASES,
    canary_env,
    canary_places,
    leaked,
    refused_cleanly,
    run,
)
from tests.servers import FtpServer, HttpReceiver, SftpServer  # noqa: E402


def bad_configs(base: Path, timeout: float) -> tuple[int, int]:
    clean = 0
    for case in CASES:
        folder = base / "bad" / case.name
        try:
            why = refused_cleanly(case, folder, run(case, folder, timeout))
        except subprocess.TimeoutExpired:
            why = f"still running after {timeout:g} s"
        clean += not why
        print(f"  {'ok ' if not why else 'BAD'} {case.name}{': ' + why if why else ''}")
    return len(CASES), clean


def journal_text(db: Path) -> str:
    if not db.exists():
        return ""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return "\n".join(
            json.dumps(r, default=str) for r in conn.execute("SELECT * FROM dispatches")
        )
    except sqlite3.Error:
        return ""
    finally:
        conn.close()


def canary_configs(base: Path, timeout: float) -> tuple[int, int]:
    receiver = HttpReceiver()
    ftp = FtpServer(base / "ftproot", password=CANARIES["ftp_pw"])
    sftp = SftpServer(base / "sftproot", base / "keys", password=CANARIES["sftp_pw"])
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **canary_env()}
    leaks = 0
    try:
        places = canary_places(receiver.url, free_port(), ftp, sftp)
        for name, rule in places:
            folder = base / "canary" / name
            old(folder / "in" / f"{name}.txt", b"payload")
            config = folder / "c.yml"
            data = {
                "database": str(folder / "j.db"),
                "sources": [{"path": str(folder / "in"), "settle": 0}],
                "rules": [rule],
            }
            config.write_text(yaml.safe_dump(data), encoding="utf-8")
            log = folder / "run.log"
            texts = []
            for args in (
                ["-c", str(config), "--once", "--log-level", "DEBUG", "--log-file", str(log)],
                ["check", "-c", str(config)],
            ):
                result = subprocess.run(
                    [sys.executable, "-m", "filedispatch", *args],
                    capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT,
                )  # fmt: skip
                texts += [result.stdout, result.stderr]
            texts += [log.read_text() if log.exists() else "", journal_text(folder / "j.db")]
            found = name in leaked("\n".join(texts))
            leaks += found
            print(f"  {'LEAK' if found else 'ok  '} {name}")
    finally:
        receiver.close()
        ftp.stop()
        sftp.close()
    return len(places), leaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per CLI run")
    args = parser.parse_args()
    logging.getLogger("pyftpdlib").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        tried, clean = bad_configs(base, args.timeout)
        secrets, leaks = canary_configs(base, args.timeout)
    print(f"bad configs tried / refused cleanly: {tried} / {clean}")
    print(f"canary secrets / leaks: {secrets} / {leaks}")


if __name__ == "__main__":
    main()
