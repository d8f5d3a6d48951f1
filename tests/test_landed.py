"""History says where each file landed: the final name after ``on_conflict: rename``, for a
local folder, FTP and SFTP (real servers on 127.0.0.1), in the journal and in the API, with
the file's mtime beside the journal's times."""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from pathlib import Path
from typing import Any

from .apiutil import get_json
from .conftest import free_port, journal_rows, old, run_cli, wait_until
from .ops import ops_config
from .servers import FtpServer, SftpServer, old_file, remote_config

TOKEN = "landed-t0ken-for-the-test"


def test_location_is_the_final_name_after_a_rename(
    workspace: dict[str, Path], tmp_path: Path, service_factory: Any
) -> None:
    ftp = FtpServer(tmp_path / "ftproot")
    sftp = SftpServer(tmp_path / "sftproot", tmp_path / "keys")
    try:
        out = workspace["outbox"]
        out.mkdir()
        (out / "a.txt").write_bytes(b"taken")
        (ftp.root / "in").mkdir()
        (ftp.root / "in" / "a.txt").write_bytes(b"taken")
        (sftp.root / "in").mkdir(parents=True, exist_ok=True)
        (sftp.root / "in" / "a.txt").write_bytes(b"taken")
        src = old_file(workspace["inbox"] / "a.txt", b"new")
        port = free_port()
        cfg = remote_config(
            workspace,
            {"url": str(out), "on_conflict": "rename"},
            {"url": ftp.url("/in/"), "on_conflict": "rename"},
            {
                "url": sftp.url("/in/"),
                "key_file": str(sftp.key_file),
                "known_hosts": str(sftp.known_hosts),
                "on_conflict": "rename",
            },
        )
        result = run_cli("-c", cfg, "--once", timeout=60)
        assert result.returncode == 0, result.stderr
        rows = {r["protocol"]: r for r in journal_rows(workspace["db"])}
        assert rows["file"]["location"] == str(out / "a-1.txt")
        assert rows["ftp"]["location"] == ftp.url("/in/a-1.txt").replace(ftp.password, "***")
        assert rows["sftp"]["location"] == sftp.url("/in/a-1.txt")
        assert (out / "a-1.txt").read_bytes() == b"new"
        listed = run_cli("history", "list", "--db", workspace["db"])
        assert listed.returncode == 0, listed.stderr
        assert f"inbox/a.txt -> {out / 'a-1.txt'}" in listed.stdout
        assert f"inbox/a.txt -> {sftp.url('/in/a-1.txt')}" in listed.stdout
        assert ftp.password not in listed.stdout
        assert (ftp.root / "in" / "a-1.txt").read_bytes() == b"new"
        assert (sftp.root / "in" / "a-1.txt").read_bytes() == b"new"

        # the API: the same location, ISO 8601 times beside the Unix ones, the file's mtime
        api_cfg = remote_config(
            workspace,
            {"url": str(out)},
            file="api.yml",
            api={"port": port, "token": TOKEN},
        )
        svc = service_factory(api_cfg).start()
        url = f"http://127.0.0.1:{port}/api/v1/logs"
        wait_until(lambda: asyncio.run(get_json(url, TOKEN))["count"] == 3)
        page = asyncio.run(get_json(url, TOKEN))
        mtime_ns = os.stat(src).st_mtime_ns
        for entry in page["results"]:
            detail = asyncio.run(get_json(f"{url}/{entry['id']}", TOKEN))
            row = journal_rows(workspace["db"], "id=?", (entry["id"],))[0]
            assert detail["location"] == row["location"]
            assert entry["created_ts"] == row["created"]
            assert entry["finished_ts"] == row["finished"]
            created = dt.datetime.fromisoformat(entry["created"].replace("Z", "+00:00"))
            assert abs(created.timestamp() - entry["created_ts"]) < 0.001
            assert entry["mtime_ns"] == mtime_ns == row["mtime_ns"]
            mtime = dt.datetime.fromisoformat(entry["mtime"].replace("Z", "+00:00"))
            assert abs(mtime.timestamp() - mtime_ns / 1e9) < 0.001
            assert detail["started_ts"] == row["started"]
        assert svc.stop() == 0
    finally:
        ftp.stop()
        sftp.close()


def test_marked_rows_are_told_from_deliveries(tmp_path: Path, service_factory: Any) -> None:
    """A file ``mark-existing`` recorded is ``marked`` in the API and says so in the CLI; a file
    delivered is not."""
    port = free_port()
    cfg = ops_config(tmp_path, api={"port": port, "token": TOKEN})
    old(tmp_path / "inbox" / "there.txt", b"was there")
    marked = run_cli("mark-existing", "-c", cfg)
    assert marked.returncode == 0, marked.stderr
    svc = service_factory(cfg).start()
    old(tmp_path / "inbox" / "new.txt", b"new")
    url = f"http://127.0.0.1:{port}/api/v1/logs"
    wait_until(lambda: (tmp_path / "outbox" / "new.txt").exists(), 30)
    wait_until(lambda: asyncio.run(get_json(url, TOKEN))["count"] == 2)
    entries = {e["filename"]: e for e in asyncio.run(get_json(url, TOKEN))["results"]}
    assert entries["there.txt"]["marked"] is True and entries["there.txt"]["status"] == "SUCCEEDED"
    assert entries["new.txt"]["marked"] is False and entries["new.txt"]["status"] == "SUCCEEDED"
    detail = asyncio.run(get_json(f"{url}/{entries['there.txt']['id']}", TOKEN))
    assert detail["marked"] is True and "mark-existing" in detail["detail"]
    assert not (tmp_path / "outbox" / "there.txt").exists()
    assert svc.stop() == 0
    listed = run_cli("history", "list", "-c", cfg)
    assert listed.returncode == 0, listed.stderr
    (there,) = [line for line in listed.stdout.splitlines() if "there.txt" in line]
    (new,) = [line for line in listed.stdout.splitlines() if "new.txt" in line]
    assert "marked by mark-existing: not sent" in there and "mark-existing" not in new
