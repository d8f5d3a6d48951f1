"""Installing for real: ``pip install`` of a copy of the project into a fresh virtual
environment in a temporary folder, then the installed ``filedispatch`` run from elsewhere
(``--version``, ``check``, a ``--once`` delivery, the dashboard's files in the package).

It needs the package index pip is configured with (as ``make install`` does)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import filedispatch

from .conftest import write_config
from .servers import old_file

ROOT = Path(__file__).resolve().parent.parent
#: what a copy of the project leaves out: environments, caches, build output
SKIP = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "bench"
)

pytestmark = pytest.mark.slow


def test_pip_install_outside_the_checkout(tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=SKIP)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "--quiet", str(source)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    shutil.rmtree(source)  # the installed copy must not need the source

    exe = venv / "bin" / "filedispatch"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}

    def run(*args: str | Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(exe), *map(str, args)],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=elsewhere,
            env=env,
        )

    version = run("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"filedispatch {filedispatch.__version__}"

    where = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import filedispatch, pathlib; p = pathlib.Path(filedispatch.__file__).parent; "
            "print(p); print(sorted(x.name for x in (p / 'api' / 'static').iterdir()))",
        ],
        capture_output=True,
        text=True,
        cwd=elsewhere,
        env=env,
        timeout=60,
    )
    package, static = where.stdout.splitlines()
    assert Path(package).is_relative_to(venv), package  # not the checkout
    assert static == "['app.js', 'index.html', 'style.css']"

    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    cfg = write_config(
        tmp_path / "config.yml",
        {
            "database": str(tmp_path / "journal.db"),
            "sources": [{"path": str(inbox), "name": "inbox", "settle": 0.1}],
            "rules": [{"name": "all", "glob": "*", "to": str(outbox)}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    check = run("-c", cfg, "check")
    assert check.returncode == 0, check.stderr
    assert check.stdout.splitlines()[0] == f"{cfg}: valid"
    old_file(inbox / "a.txt", b"installed")
    once = run("-c", cfg, "--once")
    assert once.returncode == 0, once.stderr
    assert (outbox / "a.txt").read_bytes() == b"installed"


def test_the_systemd_unit_runs_what_the_documented_install_puts_in_place() -> None:
    unit = (ROOT / "docs" / "filedispatch.service").read_text(encoding="utf-8")
    ops = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    starts = [line.lstrip("#") for line in unit.splitlines() if "ExecStart=" in line]
    assert starts and all(s.startswith("ExecStart=%h/.local/bin/filedispatch ") for s in starts)
    # both documented installs put the command there
    assert "pipx install ." in ops
    assert "ln -s ~/.local/share/filedispatch/venv/bin/filedispatch ~/.local/bin/" in ops
