"""The documentation's configuration examples and the shipped example config are valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from filedispatch.config import load_config, parse_config

from .conftest import ROOT

BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def config_examples() -> list[tuple[str, object]]:
    """Every YAML block of the docs that is a whole configuration (fragments are left out)."""
    found = []
    for doc in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        for i, block in enumerate(BLOCK.findall(doc.read_text(encoding="utf-8"))):
            data = yaml.safe_load(block)
            if isinstance(data, dict) and {"sources", "source"} & data.keys():
                found.append((f"{doc.name}#{i + 1}", data))
    return found


EXAMPLES = config_examples()


def test_the_docs_have_config_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("where,data", EXAMPLES, ids=[w for w, _ in EXAMPLES])
def test_every_config_example_is_valid(where: str, data: object, tmp_path: Path) -> None:
    parse_config(data, where, tmp_path)


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.example.yml")
    assert config.sources[0].path == ROOT / "inbox"


def _example(marker: str) -> str:
    """The YAML block of configuration.md that contains ``marker``."""
    text = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    return next(b for b in BLOCK.findall(text) if marker in b)


def test_the_naming_example_runs(tmp_path: Path) -> None:
    """configuration.md's naming example, run as written (--once) on a real file."""
    import hashlib
    import os
    import time

    from .conftest import delivered, run_cli

    (tmp_path / "config.yml").write_text(_example("name: invoices"), encoding="utf-8")
    f = tmp_path / "inbox" / "north" / "acme_20261130_inv.pdf"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"%PDF")
    when = time.time() - 3600
    os.utime(f, (when, when))
    result = run_cli("-c", tmp_path / "config.yml", "--once", "--db", tmp_path / "j.db")
    assert result.returncode == 0, result.stderr
    hhmm = time.strftime("%H%M", time.gmtime(f.stat().st_mtime))
    digest = hashlib.sha256(b"%PDF").hexdigest()[:8]
    assert list(delivered(tmp_path / "outbox" / "invoices")) == [
        f"acme/20261130/{hhmm}-1-{digest}-acme_20261130_inv.pdf"
    ]


def test_the_ages_example_runs(tmp_path: Path) -> None:
    """configuration.md's min_age/max_age example: only the settled report goes."""
    import os
    import time

    from .conftest import delivered, run_cli

    (tmp_path / "config.yml").write_text(_example("settled-reports"), encoding="utf-8")
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    for name, age in (("young.csv", 60), ("settled.csv", 3600), ("ancient.csv", 40 * 86400)):
        (inbox / name).write_bytes(b"a,b")
        os.utime(inbox / name, (time.time() - age, time.time() - age))
    result = run_cli("-c", tmp_path / "config.yml", "--once", "--db", tmp_path / "j.db")
    assert result.returncode == 0, result.stderr
    assert list(delivered(tmp_path / "outbox" / "reports")) == ["settled.csv"]


def test_the_controls_example_runs(tmp_path: Path) -> None:
    """configuration.md's dedupe/window/rate/bandwidth example: ``check`` shows every control
    in its routing table, and a dry run takes the file (the window decides at delivery)."""
    import os
    import time

    from .conftest import run_cli

    (tmp_path / "config.yml").write_text(_example("nightly-partner"), encoding="utf-8")
    (tmp_path / "inbox").mkdir()
    report = tmp_path / "inbox" / "report.csv"
    report.write_bytes(b"a,b")
    os.utime(report, (time.time() - 3600, time.time() - 3600))
    check = run_cli("check", "-c", tmp_path / "config.yml")
    assert check.returncode == 0, check.stderr
    assert (
        "(times in Europe/Berlin); dedupe content; rate 10/s; bandwidth 5MB/s; "
        "window Mon-Fri 22:00-06:00" in check.stdout
    )
    dry = run_cli("-c", tmp_path / "config.yml", "--dry-run", "--db", tmp_path / "j.db")
    assert dry.returncode == 0, dry.stderr
    assert f"inbox/report.csv -> [nightly-partner] {tmp_path / 'outbox' / 'partner'}" in dry.stdout


def test_the_history_example_runs(tmp_path: Path) -> None:
    """configuration.md's history retention example, run as written (--once): the file is
    delivered and kept in the source, and a second run sends nothing again."""
    import os
    import time

    from .conftest import delivered, run_cli

    (tmp_path / "config.yml").write_text(_example("max_rows: 5000000"), encoding="utf-8")
    f = tmp_path / "inbox" / "report.csv"
    f.parent.mkdir()
    f.write_bytes(b"a,b")
    os.utime(f, (time.time() - 3600, time.time() - 3600))
    for _ in range(2):
        result = run_cli("-c", tmp_path / "config.yml", "--once", "--db", tmp_path / "j.db")
        assert result.returncode == 0, result.stderr
        assert delivered(tmp_path / "outbox" / "archive") == {"report.csv": b"a,b"}
    assert f.exists()
