"""What learned routing reads of each kind of file, one kind at a time, through the real CLI
and the real service: a document whose only evidence of its label is inside its content (its
name says nothing, PDF and DOCX content compressed, markup whose tags carry another label's
words) goes where that content says; a file of another type goes where its name says, and
``explain`` says that only its name was read.
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import learn_corpus as corpus
from .conftest import delivered, journal_rows, run_cli, write_config
from .test_learn import learn_config

WORDS = corpus.VOCABULARY


def _png(body: str) -> bytes:
    """A PNG whose comment chunk holds ``body`` as plain ASCII: words in the bytes, but an
    image, which the model knows by its name only."""
    chunk = b"tEXtComment\x00" + body.encode("ascii")
    return b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + bytes(17) + chunk + bytes(64)


def _xml(body: str) -> bytes:
    lines = corpus.markup_text(body, "line", WORDS["invoices"])
    return f'<?xml version="1.0"?>\n<record>\n{lines}\n</record>\n'.encode()


def _html(body: str) -> bytes:
    lines = corpus.markup_text(body, "p", WORDS["contracts"])
    return f"<!doctype html>\n<html><body>\n{lines}\n</body></html>\n".encode()


@dataclass(frozen=True)
class Case:
    name: str  #: the file's name: no word of any label, but for the name-only case
    label: str  #: where it must go
    make: Callable[[str], bytes]  #: the file's bytes from the label's generated text
    read: str  #: what explain says of how it was read


CASES = {
    "text": Case("sample-a.txt", "invoices", str.encode, "read: its text"),
    "csv": Case("sample-b.csv", "medical", lambda b: corpus.csv_text(b).encode(), "read: its text"),
    "csv-utf16": Case(  # Excel's "Unicode text": UTF-16 with a byte order mark
        "sample-c.csv", "resumes", lambda b: corpus.csv_text(b).encode("utf-16"), "read: its text"
    ),
    "json": Case(
        "sample-d.json", "contracts", lambda b: corpus.json_text(b).encode(), "read: its text"
    ),
    # the tags and attributes hold invoice words: read with them, it would be an invoice
    "xml": Case("sample-e.xml", "resumes", _xml, "read: its text"),
    # the tags and attributes hold contract words
    "html": Case("sample-f.html", "medical", _html, "read: its text"),
    "docx": Case("sample-g.docx", "invoices", corpus.docx_bytes, "read: its DOCX text"),
    # the text only in a table's cells, as an invoice's lines often are
    "docx-table": Case(
        "sample-h.docx", "contracts", corpus.docx_table_bytes, "read: its DOCX text"
    ),
    # compressed: not one word of it in the file's bytes
    "pdf": Case(
        "sample-i.pdf",
        "medical",
        lambda b: corpus.pdf_bytes(b, flate=True),
        "read: its PDF text",
    ),
    # an image holding contract words: known by its name, which says invoice
    "other": Case(
        "invoice-payment-due.png",
        "invoices",
        lambda _: _png(corpus.text(random.Random(99), "contracts")),
        "read: the file name only (not a text, PDF or DOCX file)",
    ),
}


@dataclass(frozen=True)
class Run:
    root: Path
    check: str  #: what ``check`` printed
    explained: dict[str, str]  #: file name -> its part of ``explain``'s output
    out: dict[str, bytes]  #: what the service delivered, by path under ./out
    labels: dict[str, tuple[str, str | None]]  #: file name -> (rule, label) in the journal


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One inbox with a file per case, explained and then routed by the service once."""
    root = tmp_path_factory.mktemp("formats")
    examples = corpus.examples(root / "examples", per_label=8, kinds=("txt",))
    inbox = root / "inbox"
    inbox.mkdir()
    past = time.time() - 3600
    for i, case in enumerate(CASES.values()):
        path = inbox / case.name
        path.write_bytes(case.make(corpus.text(random.Random(500 + i), case.label)))
        os.utime(path, (past, past))
    cfg = write_config(root / "c.yml", learn_config(root, examples, api={"enabled": False}))
    check = run_cli("check", "-c", cfg)
    assert check.returncode == 0, check.stderr
    files = [str(inbox / case.name) for case in CASES.values()]
    explain = run_cli("explain", "-c", cfg, *files, timeout=120)
    assert explain.returncode == 0, explain.stderr
    explained: dict[str, str] = {}
    for line in explain.stdout.splitlines():
        if not line.startswith(" "):
            current = Path(line.split(":", 1)[0]).name
            explained[current] = ""
        explained[current] += line + "\n"
    once = run_cli("-c", cfg, "--once", timeout=120)
    assert once.returncode == 0, once.stderr
    labels = {r["filename"]: (r["rule"], r["label"]) for r in journal_rows(root / "journal.db")}
    return Run(root, check.stdout, explained, delivered(root / "out"), labels)


@pytest.mark.parametrize("kind", list(CASES))
def test_each_kind_of_file_is_read_for_its_label(run: Run, kind: str) -> None:
    case = CASES[kind]
    part = run.explained[case.name]
    assert case.read in part, part
    assert "+ learned: matched" in part, part
    assert f"-> {run.root / 'out' / case.label / case.name}" in part, part
    sent = run.out.get(f"{case.label}/{case.name}")
    assert sent == (run.root / "inbox" / case.name).read_bytes(), sorted(run.out)
    assert run.labels[case.name] == ("learned", case.label)


def test_check_lists_the_learned_rule(run: Run) -> None:
    examples = run.root / "examples"
    assert f"1. learned: learned from {examples} (min_confidence 0.6)" in run.check, run.check
