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
