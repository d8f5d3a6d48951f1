"""The documentation's configuration examples and the shipped example config are valid."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from filedispatch.config import load_config, parse_config

from .conftest import ROOT

BLOCK = re.compile(r"```yaml\n(.*?)```", re.DOTALL)


def yaml_blocks() -> list[tuple[str, str]]:
    found = []
    for doc in sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")]):
        for i, block in enumerate(BLOCK.findall(doc.read_text(encoding="utf-8"))):
            found.append((f"{doc.name}#{i + 1}", block))
    return found


@pytest.mark.parametrize("where,block", yaml_blocks(), ids=[w for w, _ in yaml_blocks()])
def test_every_full_config_example_is_valid(where: str, block: str, tmp_path: Path) -> None:
    data = yaml.safe_load(block)
    if not isinstance(data, dict) or not ({"sources", "source"} & data.keys()):
        pytest.skip("a fragment, not a whole configuration")
    parse_config(data, where, tmp_path)


def test_example_config_is_valid() -> None:
    config = load_config(ROOT / "config.example.yml")
    assert config.sources[0].path == ROOT / "inbox"
