"""SIGHUP: reload a valid config, keep the old one on a broken config, reopen log files."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import yaml

from .conftest import wait_until
from .ops import delivered, old_file, ops_config


def test_sighup_reloads_a_valid_config_and_keeps_the_old_on_a_broken_one(
    tmp_path: Path, service_factory: Any
) -> None:
    texts, tables = tmp_path / "texts", tmp_path / "tables"
    cfg = ops_config(tmp_path, rules=[{"name": "txt", "extensions": ["txt"], "to": str(texts)}])
    svc = service_factory(cfg).start()
    old_file(tmp_path / "inbox" / "a.txt")
    old_file(tmp_path / "inbox" / "a.csv")
    wait_until(lambda: "a.txt" in delivered(texts))

    data = yaml.safe_load(cfg.read_text())
    data["rules"].append({"name": "csv", "extensions": ["csv"], "to": str(tables)})
    cfg.write_text(yaml.safe_dump(data))
    svc.signal(signal.SIGHUP)
    wait_until(lambda: f"reloaded {cfg}" in svc.log())
    # the new rule takes effect, also for the file that was already waiting (rescan)
    wait_until(lambda: "a.csv" in delivered(tables))
    old_file(tmp_path / "inbox" / "b.csv")
    wait_until(lambda: "b.csv" in delivered(tables))

    cfg.write_text("rules: [this is: not valid\n")
    svc.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in svc.log())
    old_file(tmp_path / "inbox" / "c.txt")
    old_file(tmp_path / "inbox" / "c.csv")
    wait_until(lambda: "c.txt" in delivered(texts) and "c.csv" in delivered(tables))
    assert svc.proc is not None and svc.proc.poll() is None
    assert svc.stop() == 0


def test_sighup_reopens_log_files_and_log_config_with_log_level(
    tmp_path: Path, service_factory: Any
) -> None:
    log = tmp_path / "svc.log"
    log_config = tmp_path / "logging.yml"
    log_config.write_text(
        yaml.safe_dump(
            {
                "version": 1,
                "formatters": {"plain": {"format": "%(levelname)s %(name)s %(message)s"}},
                # a plain FileHandler: only the reopen on SIGHUP moves it to the new file
                "handlers": {
                    "file": {
                        "class": "logging.FileHandler",
                        "filename": str(log),
                        "formatter": "plain",
                    }
                },
                "root": {"level": "WARNING", "handlers": ["file"]},
            }
        )
    )
    cfg = ops_config(tmp_path)
    # --log-level INFO overrides the file's WARNING
    svc = service_factory(cfg, "--log-config", str(log_config), "--log-level", "INFO")
    svc.start(wait_ready=False)
    wait_until(lambda: log.exists() and "watching" in log.read_text())
    assert "INFO filedispatch.service" in log.read_text()

    rotated = tmp_path / "svc.log.1"
    log.rename(rotated)
    old_file(tmp_path / "inbox" / "before-hup.txt")
    wait_until(lambda: "before-hup.txt" in rotated.read_text())  # still writing the old file
    svc.signal(signal.SIGHUP)
    wait_until(lambda: log.exists())
    old_file(tmp_path / "inbox" / "after-hup.txt")
    wait_until(lambda: "after-hup.txt" in log.read_text())
    assert "after-hup.txt" not in rotated.read_text()
    assert svc.stop() == 0


def test_a_reload_that_restarts_the_watchers_keeps_files_still_being_written(
    tmp_path: Path, service_factory: Any
) -> None:
    """process_existing: false leaves alone what was there at the first start, and only that:
    a file still being written when a reload restarts the watchers is sent once complete
    (the restarted watcher used to take it for an existing file, and it was never sent)."""
    old_file(tmp_path / "inbox" / "before.txt")  # there at the start: left alone
    cfg = ops_config(tmp_path)
    data = yaml.safe_load(cfg.read_text())
    data["sources"][0]["process_existing"] = False
    cfg.write_text(yaml.safe_dump(data))
    svc = service_factory(cfg).start()
    wait_until(lambda: "1 existing file(s) left alone" in svc.log())
    with open(tmp_path / "inbox" / "late.txt", "wb") as writer:  # open for writing: not ready
        writer.write(b"written across the reload")
        writer.flush()
        (tmp_path / "other").mkdir()
        data["sources"].append({"path": str(tmp_path / "other"), "name": "other"})
        cfg.write_text(yaml.safe_dump(data))
        svc.signal(signal.SIGHUP)
        wait_until(lambda: "sources changed; watchers restart" in svc.log())
        wait_until(lambda: svc.log().count("left alone") >= 2)  # the restarted watch scanned
    wait_until(lambda: "late.txt" in delivered(tmp_path / "outbox"))
    assert delivered(tmp_path / "outbox") == {"late.txt": b"written across the reload"}
    assert (tmp_path / "inbox" / "before.txt").exists()
    assert svc.stop() == 0
