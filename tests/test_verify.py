"""``verify`` on a local folder: the size checked by default, the SHA-256 on request and
recorded in the journal, shown by ``history show``."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import journal_rows, run_cli
from .servers import old_file, remote_config, sha256_of


@pytest.mark.parametrize("verify", ["none", "size", "sha256"])
def test_a_local_copy_is_verified_as_asked(workspace: dict[str, Path], verify: str) -> None:
    src = old_file(workspace["inbox"] / "a.bin", 3 * 1024 * 1024 + 7)
    dest = {"url": str(workspace["outbox"]), "verify": verify}
    # a second destination keeps the source, so the first one copies instead of renaming
    cfg = remote_config(workspace, dest, {"url": str(workspace["root"] / "other")})
    result = run_cli("-c", cfg, "--once", timeout=60)
    assert result.returncode == 0, result.stderr
    assert sha256_of(workspace["outbox"] / "a.bin") == sha256_of(src)
    row = journal_rows(workspace["db"], "step=0")[0]
    assert row["status"] == "SUCCEEDED"
    assert row["sha256"] == (sha256_of(src) if verify == "sha256" else None)
    shown = run_cli("history", "show", str(row["id"]), "--db", workspace["db"]).stdout
    assert (f"sha256:       {sha256_of(src)}" in shown) == (verify == "sha256")
