"""What ``make test`` says on a machine without the browser the dashboard tests need: a skip
naming the missing Debian package, and in CI (``CI=true``) a failure with the same words."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _dashboard_tests(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-rsf",
            "-p",
            "no:cacheprovider",
            "tests/test_dashboard.py",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "CI": "", **env},
    )


def test_a_missing_driver_is_named_not_an_error(tmp_path: Path) -> None:
    nowhere = str(tmp_path / "chromedriver")
    result = _dashboard_tests(tmp_path, FILEDISPATCH_CHROMEDRIVER=nowhere)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "skipped" in result.stdout and "error" not in result.stdout.lower()
    assert f"need {nowhere}: install the Debian package(s) chromium-driver" in result.stdout


def test_a_missing_browser_fails_in_ci(tmp_path: Path) -> None:
    result = _dashboard_tests(
        tmp_path,
        CI="true",
        FILEDISPATCH_CHROMIUM=str(tmp_path / "chromium"),
        FILEDISPATCH_CHROMEDRIVER=str(tmp_path / "chromedriver"),
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "install the Debian package(s) chromium chromium-driver" in result.stdout
    assert "passed" not in result.stdout and "skipped" not in result.stdout
