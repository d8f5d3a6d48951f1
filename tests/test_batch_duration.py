"""Small files copied in one batch share the batch's duration, and each row says so plainly
(the real CLI: ``--once``, then ``history show``)."""

from __future__ import annotations

from pathlib import Path

from .conftest import journal_rows, needs_fastpath, old, run_cli, write_config


@needs_fastpath
def test_a_batch_copy_says_its_duration_is_the_batchs(tmp_path: Path) -> None:
    for i in range(12):
        old(tmp_path / "inbox" / f"f{i:02d}.dat", b"small %d" % i)
    cfg = write_config(
        tmp_path / "config.yml",
        {
            "database": str(tmp_path / "journal.db"),
            "sources": [{"path": str(tmp_path / "inbox"), "settle": 0}],
            "rules": [{"glob": "*", "to": {"url": str(tmp_path / "out"), "mode": "copy"}}],
            "api": {"enabled": False},
            "monitor": {"enabled": False},
        },
    )
    assert run_cli("-c", cfg, "--once").returncode == 0
    rows = journal_rows(tmp_path / "journal.db")
    assert len(rows) == 12 and {r["status"] for r in rows} == {"SUCCEEDED"}
    batched = [r for r in rows if r["detail"] and "copied in a batch of" in r["detail"]]
    assert batched, rows  # the files came in one scan: at least one batch of several
    shown = run_cli("history", "show", str(batched[0]["id"]), "-c", cfg)
    assert shown.returncode == 0, shown.stderr
    assert "the duration is the batch's" in shown.stdout, shown.stdout
