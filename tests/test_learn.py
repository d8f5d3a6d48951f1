"""Learned routing end to end: generated example folders (text, PDF, DOCX), the real CLI, the
real service (in-process and as a subprocess), the real journal and API.

The documents come from tests/learn_corpus.py: each label has its own words over filler words
all labels share; noise is filler only and must fall through to the next rule.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from filedispatch.config import parse_config
from filedispatch.learn.extract import Extractor
from filedispatch.learn.model import find_examples, load_or_train, read_document
from filedispatch.service import Options, Service

from . import learn_corpus as corpus
from .conftest import (
    ROOT,
    ServiceProcess,
    cli_env,
    delivered,
    free_port,
    journal_rows,
    run_cli,
    wait_until,
    write_config,
)

THREE = ["contracts", "invoices", "resumes"]
TOKEN = "t0ken-for-the-learn-tests"


def doc(path: Path, label: str | None, seed: int) -> Path:
    """A generated document of ``label`` (None: filler only) at ``path``, complete (old)."""
    corpus.write(path, corpus.text(random.Random(seed), label))  # makes its folder
    past = time.time() - 3600
    os.utime(path, (past, past))
    return path


def learn_config(root: Path, examples: Path, **extra: Any) -> dict[str, Any]:
    return {
        "database": str(root / "journal.db"),
        "workdir": str(root / "work"),
        "sources": [{"path": str(root / "inbox"), "name": "inbox", "settle": 0, "rescan": 1}],
        "rules": [
            {
                "name": "learned",
                "classify": {"learn": str(examples), "min_confidence": 0.6},
                "to": {"url": str(root / "out"), "name": "{label}/{name}"},
            },
            {"name": "rest", "to": str(root / "out" / "unsorted")},
        ],
        "monitor": {"enabled": False},
        **extra,
    }


@pytest.fixture
def root(tmp_path: Path) -> Path:
    (tmp_path / "inbox").mkdir()
    return tmp_path


def test_files_go_where_their_content_says_and_the_journal_keeps_the_label(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=6, kinds=("txt", "pdf", "docx"))
    inbox = root / "inbox"
    doc(inbox / "scan-1.pdf", "medical", 101)
    doc(inbox / "letter.docx", "contracts", 102)
    doc(inbox / "note.txt", "invoices", 103)
    doc(inbox / "page.html", "resumes", 104)
    doc(inbox / "filler.txt", None, 105)  # noise: no label is likely enough
    (inbox / "broken.pdf").write_bytes(b"%PDF-1.4\n1 0 obj <</Type /Catalog")  # corrupt
    config = parse_config(learn_config(root, examples, api={"enabled": False}), base=root)
    code = asyncio.run(Service(config, Options(once=True, webapp=False, monitor=False)).run())
    assert code == 0
    out = delivered(root / "out")
    assert set(out) == {
        "medical/scan-1.pdf",
        "contracts/letter.docx",
        "invoices/note.txt",
        "resumes/page.html",
        "unsorted/filler.txt",
        "unsorted/broken.pdf",
    }
    assert out["medical/scan-1.pdf"] == (inbox / "scan-1.pdf").read_bytes()
    labels = {r["filename"]: (r["rule"], r["label"]) for r in journal_rows(root / "journal.db")}
    assert labels["scan-1.pdf"] == ("learned", "medical")
    assert labels["filler.txt"] == ("rest", None)
    assert labels["broken.pdf"] == ("rest", None)
    # the model is cached beside the journal under a hash of the examples
    assert len(list(root.glob("learn-*.npz"))) == 1

    cfg = write_config(root / "c.yml", learn_config(root, examples))
    row = next(r for r in journal_rows(root / "journal.db") if r["filename"] == "scan-1.pdf")
    shown = run_cli("history", "show", "-c", cfg, str(row["id"]))
    assert shown.returncode == 0, shown.stderr
    assert "label:        medical" in shown.stdout


def test_explain_prints_each_labels_probability_and_its_words(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=6)
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    pdf = doc(root / "inbox" / "a.pdf", "invoices", 7)
    noise = doc(root / "inbox" / "b.txt", None, 8)
    photo = root / "inbox" / "invoice-photo.png"
    photo.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    dry = run_cli("-c", cfg, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert f"inbox/a.pdf -> [learned] {root / 'out' / 'invoices' / 'a.pdf'}" in dry.stdout
    assert f"inbox/b.txt -> [rest] {root / 'out' / 'unsorted' / 'b.txt'}" in dry.stdout
    assert not list(root.glob("learn-*.npz"))  # a dry run writes nothing, the cache included
    result = run_cli("explain", "-c", cfg, pdf, noise, photo)
    assert result.returncode == 0, result.stderr
    text = result.stdout
    pdf_part, noise_part, photo_part = text.split(str(pdf) + ":")[1], "", ""
    pdf_part, _, rest = pdf_part.partition(str(noise) + ":")
    noise_part, _, photo_part = rest.partition(str(photo) + ":")
    assert "+ learned: matched" in pdf_part
    assert "read: its PDF text" in pdf_part
    lines = [line.strip() for line in pdf_part.splitlines() if "%  " in line]
    assert lines[0].split()[1] == "invoices:"
    assert len(lines) == len(corpus.VOCABULARY)  # every label with its probability
    top_words = lines[0].partition(":")[2]
    assert set(top_words.replace(",", " ").split()) & set(corpus.VOCABULARY["invoices"].split())
    assert f"-> {root / 'out' / 'invoices' / 'a.pdf'}" in pdf_part
    assert "- learned: learned label" in noise_part and "below min_confidence 0.6" in noise_part
    assert "+ rest: matched" in noise_part
    assert "read: the file name only (not a text, PDF or DOCX file)" in photo_part
    assert len(list(root.glob("learn-*.npz"))) == 1  # explain keeps the model it trained

    marked = run_cli("mark-existing", "-c", cfg)  # routes with the model too
    assert marked.returncode == 0, marked.stderr
    rows = {r["filename"]: r for r in journal_rows(root / "journal.db")}
    assert (rows["a.pdf"]["rule"], rows["a.pdf"]["label"]) == ("learned", "invoices")
    assert (rows["b.txt"]["rule"], rows["b.txt"]["label"]) == ("rest", None)

    elsewhere = doc(root / "elsewhere" / "c.pdf", "resumes", 9)  # outside the source
    result = run_cli("explain", "-c", cfg, elsewhere)
    assert "read: its PDF text" in result.stdout
    assert f"-> {root / 'out' / 'resumes' / 'c.pdf'}" in result.stdout


def test_learn_check_reports_accuracy_per_label_and_the_confusion(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=10, labels=THREE)
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    result = run_cli("learn-check", "-c", cfg)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "30 examples, 5-fold cross-validation" in out
    for label in THREE:
        assert any(line.split()[:2] == [label, "100.0%"] for line in out.splitlines()), out
    assert "confusion (rows: the examples' label; columns: the label predicted):" in out
    assert any(line.split() == ["invoices", "0", "10", "0"] for line in out.splitlines()), out


@pytest.mark.parametrize(
    ("counts", "message"),
    [
        ({"invoices": 5, "contracts": 4}, "each label needs at least 5 example files: "),
        ({"invoices": 8}, "needs at least two labels"),
    ],
)
def test_check_refuses_too_few_examples(root: Path, counts: dict[str, int], message: str) -> None:
    examples = root / "examples"
    for label, n in counts.items():
        corpus.examples(examples, per_label=n, labels=[label], kinds=("txt",))
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    for args in (["check", "-c", cfg], ["-c", cfg, "--once"]):
        result = run_cli(*args)
        assert result.returncode == 2, result.stdout + result.stderr
        assert f"{cfg}: rules[0].classify.learn: {examples} {message}" in result.stderr
        assert "Traceback" not in result.stderr
    assert "'contracts' has 4" in result.stderr or "only 'invoices'" in result.stderr


def test_without_the_learn_extra_a_learned_rule_is_a_config_error(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    # a module that refuses to import stands in front of scikit-learn, as if not installed
    shadow = root / "shadow"
    shadow.mkdir()
    (shadow / "sklearn.py").write_text("raise ImportError('not installed')\n")
    result = run_cli("check", "-c", cfg, env=cli_env(PYTHONPATH=str(shadow)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"{cfg}: rules[0].classify.learn: learned routing needs the 'learn' extra "
        "(missing: scikit-learn); install it with: pip install 'filedispatch[learn]'"
    ) in result.stderr
    for module in ("pypdf", "docx"):  # each package of the extra is asked for
        (shadow / f"{module}.py").write_text("raise ImportError('not installed')\n")
    result = run_cli("-c", cfg, "--once", env=cli_env(PYTHONPATH=str(shadow)))
    assert result.returncode == 2, result.stdout + result.stderr
    assert "(missing: scikit-learn, pypdf, python-docx); install it with" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_learn_extra_holds_what_learned_routing_imports_and_the_tests_install_it() -> None:
    import tomllib

    from filedispatch.learn import EXTRA_MODULES

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    names = {re.split(r"[<>=\[ ]", spec, maxsplit=1)[0] for spec in extras["learn"]}
    assert names == set(EXTRA_MODULES.values()) == {"scikit-learn", "pypdf", "python-docx"}
    assert any("learn" in spec for spec in extras["test"]), extras["test"]


def test_the_label_placeholder_needs_a_learned_rule(root: Path) -> None:
    data = learn_config(root, root / "examples")
    data["rules"][1]["to"] = {"url": str(root / "out"), "name": "{label}/{name}"}
    cfg = write_config(root / "c.yml", data)
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert "rules[1]: the {label} placeholder needs classify: {learn: FOLDER}" in result.stderr


def test_a_hostile_pdf_costs_the_timeout_and_the_next_file_is_read() -> None:
    hostile = corpus.slow_pdf()  # about 8 KB; pypdf alone takes minutes on it
    good = corpus.pdf_bytes(corpus.text(random.Random(3), "medical"))
    with Extractor(timeout_s=2.0) as extractor:
        started = time.monotonic()
        document = extractor.document("hostile.pdf", hostile)
        took = time.monotonic() - started
        assert document.method == "name"
        assert document.note == "PDF not readable: took longer than 2 s or too much memory"
        assert took < 60, took  # bounded: unbounded, this file holds the parser for minutes
        after = extractor.document("fine.pdf", good)  # a new worker reads the next file
        assert after.method == "pdf"
        assert "patient" in after.text or "clinic" in after.text or "therapy" in after.text


def test_a_docx_that_unpacks_past_the_memory_limit_ends_in_the_worker_not_here() -> None:
    with Extractor() as extractor:
        document = extractor.document("bomb.docx", corpus.docx_bomb())
        assert document.method == "name" and document.note is not None
        assert document.note.startswith("DOCX not readable: ")
        assert "memory" in document.note
        after = extractor.document("fine.docx", corpus.docx_bytes("the agreement is signed"))
        assert after.method == "docx" and "agreement" in after.text


def test_a_corrupt_or_oversized_document_is_known_by_its_name(tmp_path: Path) -> None:
    with Extractor() as extractor:
        corrupt = extractor.document("x.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 4)
        assert corrupt.method == "name" and corrupt.note is not None
        assert corrupt.note.startswith("PDF not readable: ")
        bad_docx = extractor.document("y.docx", b"PK\x03\x04" + bytes(100))
        assert bad_docx.method == "name" and bad_docx.note is not None
        big = extractor.document("z.pdf", b"%PDF-1.4\n", size=10**9)
        assert big.note == "PDF larger than 16777216 bytes" and big.text == "z pdf"


def test_a_changed_examples_folder_is_a_new_model_and_the_same_one_is_cached(
    tmp_path: Path,
) -> None:
    examples = corpus.examples(tmp_path / "ex", per_label=5, labels=THREE, kinds=("txt",))
    cache = tmp_path / "cache"
    with Extractor() as extractor:
        first = load_or_train(extractor, find_examples(examples), cache)
        again = load_or_train(extractor, find_examples(examples), cache)
        assert again.fingerprint == first.fingerprint
        assert again is not first  # read back from the cache file
        for label in THREE:  # and it answers as the model it was made from
            sample = read_document(extractor, corpus.write(tmp_path / "s.txt", label + " x"))
            assert again.predict(sample).probabilities == first.predict(sample).probabilities
            assert again.top_words(sample, label) == first.top_words(sample, label)
        corpus.examples(examples, per_label=5, labels=["medical"], kinds=("txt",), seed=9)
        grown = load_or_train(extractor, find_examples(examples), cache)
    assert grown.fingerprint != first.fingerprint
    # a damaged cache file is trained again, not trusted and not fatal
    damaged = cache / f"learn-{grown.fingerprint}.npz"
    damaged.write_bytes(b"PK\x03\x04 not an archive")
    with Extractor() as extractor:
        rebuilt = load_or_train(extractor, find_examples(examples), cache)
    assert rebuilt.fingerprint == grown.fingerprint and rebuilt.labels == grown.labels
    assert grown.labels == sorted([*THREE, "medical"])


def test_the_service_retrains_when_examples_change_and_a_restart_reuses_the_model(
    root: Path,
) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    port = free_port()
    data = learn_config(root, examples, api={"port": port, "token": TOKEN})
    cfg = write_config(root / "c.yml", data)
    db = root / "journal.db"
    service = ServiceProcess(cfg, env=cli_env())
    try:
        service.start()
        assert "learned model trained on 15 examples" in service.log()
        doc(root / "inbox" / "before.txt", "medical", 201)  # no label for it yet
        wait_until(lambda: (root / "out" / "unsorted" / "before.txt").exists())
        corpus.examples(examples, per_label=5, labels=["medical"], kinds=("txt",), seed=5)
        wait_until(lambda: "examples in" in service.log() and "retrained" in service.log(), 60)
        doc(root / "inbox" / "after.txt", "medical", 202)
        wait_until(lambda: (root / "out" / "medical" / "after.txt").exists())
        row = next(r for r in journal_rows(db) if r["filename"] == "after.txt")
        assert row["label"] == "medical"
        entry = asyncio.run(_api_entry(port, row["id"]))
        assert entry["label"] == "medical" and entry["rule"] == "learned"
    finally:
        assert service.stop() == 0
    again = ServiceProcess(cfg, env=cli_env())
    again.log_path = root / "second.log"
    try:
        again.start()
        assert "loaded from the cache" in again.log()
        assert "trained on" not in again.log()
        # examples that can no longer train a model: the rule keeps the one it has
        for path in sorted((examples / "medical").iterdir())[:2]:
            path.unlink()
        wait_until(lambda: "the rule keeps its model" in again.log(), 60)
        assert "'medical' has 3" in again.log()
        doc(root / "inbox" / "third.txt", "medical", 203)
        wait_until(lambda: (root / "out" / "medical" / "third.txt").exists())
    finally:
        assert again.stop() == 0


async def _api_entry(port: int, dispatch_id: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{port}/api/v1/logs/{dispatch_id}"
        async with session.get(url, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            body: dict[str, Any] = await resp.json()
            return body


def test_a_reload_that_adds_a_learned_rule_trains_it_before_it_takes_files(
    root: Path, service_factory: Any
) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    data = learn_config(root, examples, api={"enabled": False})
    learned_rule = data["rules"].pop(0)
    cfg = write_config(root / "c.yml", data)
    service = service_factory(cfg).start()
    doc(root / "inbox" / "first.txt", "invoices", 301)
    wait_until(lambda: (root / "out" / "unsorted" / "first.txt").exists())

    few = root / "few"  # a reload with too few examples is refused, naming the folder
    corpus.examples(few, per_label=2, labels=THREE, kinds=("txt",))
    write_config(cfg, {**data, "rules": [{**learned_rule, "classify": {"learn": str(few)}}]})
    service.signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in service.log())
    assert f"{few} each label needs at least 5 example files" in service.log()

    write_config(cfg, {**data, "rules": [learned_rule, *data["rules"]]})
    service.signal(signal.SIGHUP)
    wait_until(lambda: f"reloaded {cfg}" in service.log())
    doc(root / "inbox" / "second.txt", "invoices", 302)
    wait_until(lambda: (root / "out" / "invoices" / "second.txt").exists())
    assert service.stop() == 0


def test_the_docs_walkthrough_runs(tmp_path: Path) -> None:
    """docs/learned-routing.md: its first config and its "Try it" steps, as written."""
    text = (ROOT / "docs" / "learned-routing.md").read_text(encoding="utf-8")
    config = re.findall(r"```yaml\n(.*?)```", text, re.DOTALL)[0]
    steps = text.split("## Try it", 1)[1]
    script = steps.split("python - <<'EOF'\n", 1)[1].split("\nEOF\n", 1)[0]
    commands = [
        line.split("#", 1)[0].split()
        for line in steps.split("\nEOF\n", 1)[1].split("```", 1)[0].splitlines()
        if line.startswith("filedispatch ")
    ]
    (tmp_path / "inbox").mkdir()
    (tmp_path / "config.yml").write_text(config, encoding="utf-8")
    made = subprocess.run(
        [sys.executable, "-c", script.replace("/path/to/filedispatch", str(ROOT))],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert [c[1] for c in commands] == ["check", "learn-check", "explain", "-c"]
    for command in commands:
        args = [a if a != "inbox/*" else "inbox/scan.pdf" for a in command[1:]]
        result = run_cli(*args, cwd=tmp_path)
        assert result.returncode == 0, (command, result.stdout, result.stderr)
    assert set(delivered(tmp_path / "sorted")) == {
        "medical/scan.pdf",
        "contracts/letter.txt",
        "unsorted/misc.txt",
    }


def test_a_bad_learn_setting_names_its_field(root: Path) -> None:
    data = learn_config(root, root / "examples")
    data["rules"][0]["classify"] = {"learn": "./examples", "min_confidence": 2, "lern": 1}
    cfg = write_config(root / "c.yml", data)
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"filedispatch: invalid configuration {cfg}: rules[0].classify.min_confidence: "
        "Input should be less than or equal to 1",
        f"filedispatch: invalid configuration {cfg}: rules[0].classify.lern: "
        "unknown field (check its spelling)",
    ]


def _trained(tmp_path: Path) -> tuple[Path, Path, str]:
    """(examples folder, cache folder, the cached model's fingerprint) of three labels."""
    examples = corpus.examples(tmp_path / "ex", per_label=5, labels=THREE, kinds=("txt",))
    cache = tmp_path / "cache"
    with Extractor() as extractor:
        digest = load_or_train(extractor, find_examples(examples), cache).fingerprint
    return examples, cache, digest


def test_a_cache_file_someone_changed_is_trained_again_not_used(tmp_path: Path) -> None:
    import numpy as np

    examples, cache, digest = _trained(tmp_path)
    path = cache / f"learn-{digest}.npz"
    with np.load(path) as saved:
        arrays = {key: saved[key] for key in saved.files}
    sample = corpus.write(tmp_path / "s.txt", corpus.text(random.Random(4), "invoices"))
    # arrays of the right names but the wrong shapes: every file would fail to be classified
    broken = {**arrays, "coef": arrays["coef"][:, :3]}
    # labels no sub-folder can have: "{label}/{name}" would climb out of the destination
    climbing = {**arrays, "classes": np.array(["../x", "invoices", "resumes"])}
    for changed in (broken, {**arrays, "classes": np.array(["a", "b", "c", "d"])}, climbing):
        with path.open("wb") as f:
            np.savez(f, **changed)
        with Extractor() as extractor:
            model = load_or_train(extractor, find_examples(examples), cache)
            answer = model.predict(read_document(extractor, sample))
        assert answer.label == "invoices" and model.labels == sorted(THREE)
    # a pickle in its place is never unpickled (that would run the code it names)
    marker = tmp_path / "ran"
    path.write_bytes(
        b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."  # pickle protocol 0
    )
    with Extractor() as extractor:
        model = load_or_train(extractor, find_examples(examples), cache)
    assert not marker.exists() and model.labels == sorted(THREE)
    assert os.stat(path).st_mode & 0o777 == 0o600  # trained again, written for us only


def test_an_example_folder_swapped_for_a_link_after_the_listing_is_not_read(
    tmp_path: Path,
) -> None:
    examples = corpus.examples(tmp_path / "ex", per_label=5, labels=THREE, kinds=("txt",))
    deep = examples / "invoices" / "2024"
    corpus.write(deep / "march.txt", corpus.text(random.Random(5), "invoices"))
    secret = tmp_path / "private"
    secret.mkdir()
    (secret / "march.txt").write_text("secretword " * 50)
    found = find_examples(examples)
    assert deep / "march.txt" in found["invoices"]
    # between the listing and the reading, a writer of the examples puts a link in its place
    deep.rename(examples / "invoices" / "moved")
    deep.symlink_to(secret)
    with Extractor() as extractor:
        model = load_or_train(extractor, found, None)
    assert "secretword" not in model.pipeline[0].vocabulary_


def test_markup_is_stripped_in_one_pass_however_its_brackets_are_laid_out() -> None:
    # many "<" and no ">": a pattern that looks ahead from each "<" takes seconds on this
    # (on the routing thread); and a tag longer than such a look-ahead was kept as words
    data = '<p title="' + "hiddenattr " * 300 + '">invoice due</p>' + "<" * 300_000
    with Extractor() as extractor:
        document = extractor.document("page.html", data.encode())
    assert document.method == "text"
    assert "invoice due" in document.text and "hiddenattr" not in document.text


def test_a_label_whose_folder_name_is_not_utf8_is_delivered_and_kept(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    odd = os.fsdecode(b"factures-\xe9")  # a Latin-1 folder name
    (examples / "invoices").rename(examples / odd)
    doc(root / "inbox" / "note.txt", "invoices", 103)
    cfg = write_config(root / "c.yml", learn_config(root, examples, api={"enabled": False}))
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    # the label as the journal keeps names: its odd byte escaped (the delivery uses the same)
    row = next(r for r in journal_rows(root / "journal.db") if r["filename"] == "note.txt")
    assert (row["rule"], row["label"]) == ("learned", "factures-\\xe9")
    sent = root / "out" / "factures-\\xe9" / "note.txt"
    assert sent.read_bytes() == (root / "inbox" / "note.txt").read_bytes()


def test_check_refuses_more_labels_than_a_model_can_hold(root: Path) -> None:
    # a writer of the examples folder makes thousands of labels: training them would take
    # the service's memory (a weight per label and word), so the folder is refused instead
    examples = root / "examples"
    for i in range(101):
        for j in range(5):
            corpus.write(examples / f"label-{i}" / f"{j}.txt", f"word{i}x{j} other{i}")
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    result = run_cli("check", "-c", cfg)
    assert result.returncode == 2, result.stdout + result.stderr
    assert (
        f"{cfg}: rules[0].classify.learn: {examples} has 101 labels (sub-folders); "
        "at most 100 are learned"
    ) in result.stderr


def test_a_text_file_in_latin_1_keeps_its_accented_words() -> None:
    data = "Facture: montant dû, échéance réglée.\\n".encode("latin-1") * 5
    with Extractor() as extractor:
        document = extractor.document("facture.txt", data)
    assert document.method == "text"
    assert "échéance réglée" in document.text and "\\ufffd" not in document.text


def test_two_services_sharing_a_state_folder_keep_each_others_cached_models(root: Path) -> None:
    # two journals in one folder (as every PostgreSQL journal's services share the per-user
    # state folder): each service removes only its own stale models, so neither retrains
    first = corpus.examples(root / "ex1", per_label=5, labels=THREE, kinds=("txt",))
    second = corpus.examples(root / "ex2", per_label=5, labels=["medical", "invoices"], seed=3)
    configs = []
    for name, examples in (("a", first), ("b", second)):
        data = learn_config(root, examples, database=str(root / f"{name}.db"))
        configs.append(write_config(root / f"{name}.yml", data))
    logs = [run_cli("-c", cfg, "--once", timeout=120) for cfg in (*configs, configs[0])]
    for result in logs:
        assert result.returncode == 0, result.stderr
    assert "trained on 15 examples" in logs[0].stderr
    assert "trained on 10 examples" in logs[1].stderr
    assert "loaded from the cache" in logs[2].stderr and "trained on" not in logs[2].stderr
    assert len(list(root.glob("learn-*.npz"))) == 2


def test_after_three_examples_stop_the_parser_the_rest_are_known_by_name(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a writer of the examples folder fills it with PDFs that each hold the parser until it
    # is stopped: 20,000 of them would hold the service's start for a day
    from filedispatch.learn.model import documents

    examples = corpus.examples(tmp_path / "ex", per_label=5, labels=THREE, kinds=("txt",))
    hostile = corpus.slow_pdf()
    for i in range(4):
        (examples / "contracts" / f"slow-{i}.pdf").write_bytes(hostile)
    corpus.write(examples / "resumes" / "cv.pdf", corpus.text(random.Random(6), "resumes"))
    with Extractor(timeout_s=1.0) as extractor:
        texts, labels = documents(extractor, find_examples(examples))
    assert "3 PDF or DOCX files took too long or too much memory to read" in caplog.text
    assert texts[labels.index("resumes")] == "cv pdf"  # after them: by its name only
    assert len(texts) == 20


def test_a_hostile_pdf_in_the_inbox_costs_its_time_and_the_next_file_goes_by_its_content(
    root: Path,
) -> None:
    # the service's own path: the parser is stopped, the PDF is routed by its name (which
    # says nothing: the next rule takes it), and the file after it is read and routed
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    inbox = root / "inbox"
    (inbox / "hostile.pdf").write_bytes(corpus.slow_pdf())
    past = time.time() - 3600
    os.utime(inbox / "hostile.pdf", (past, past))
    doc(inbox / "letter.txt", "contracts", 401)
    cfg = write_config(root / "c.yml", learn_config(root, examples, api={"enabled": False}))
    explained = run_cli("explain", "-c", cfg, inbox / "hostile.pdf", timeout=120)
    assert explained.returncode == 0, explained.stderr
    assert (
        "read: the file name only (PDF not readable: took longer than 5 s or too much memory)"
    ) in explained.stdout
    result = run_cli("-c", cfg, "--once", timeout=120)  # unbounded: minutes on this PDF
    assert result.returncode == 0, result.stderr
    assert set(delivered(root / "out")) == {"unsorted/hostile.pdf", "contracts/letter.txt"}
    rows = {r["filename"]: (r["rule"], r["label"]) for r in journal_rows(root / "journal.db")}
    assert rows == {"hostile.pdf": ("rest", None), "letter.txt": ("learned", "contracts")}


def test_links_in_the_examples_are_not_followed_and_odd_label_names_are_kept_as_written(
    root: Path,
) -> None:
    examples = corpus.examples(root / "examples", per_label=4, labels=["invoices"], kinds=("txt",))
    secret = root / "private"
    corpus.write(secret / "words.txt", "topsecretword " * 50)
    # a file, a folder and a whole label that are links out of the examples folder
    (examples / "invoices" / "link.txt").symlink_to(secret / "words.txt")
    (examples / "invoices" / "folder").symlink_to(secret)
    (examples / "linked-label").symlink_to(secret)
    # labels named as naming templates or format strings: folder names, never expanded
    odd = {"{name}": "contracts", "{}": "resumes", "%s{label}": "medical"}
    for label, words in odd.items():
        corpus.examples(examples / label, per_label=5, labels=[words], kinds=("txt",))
        (examples / label / words).rename(examples / label / "x")
    cfg = write_config(root / "c.yml", learn_config(root, examples, api={"enabled": False}))
    refused = run_cli("check", "-c", cfg)  # the links do not count as examples
    assert refused.returncode == 2, refused.stdout
    assert "each label needs at least 5 example files: 'invoices' has 4" in refused.stderr
    corpus.write(examples / "invoices" / "fifth.txt", corpus.text(random.Random(9), "invoices"))
    found = find_examples(examples)
    assert sorted(found) == sorted(["invoices", *odd])
    assert all(not p.is_symlink() and secret not in p.parents for f in found.values() for p in f)
    for i, words in enumerate(odd.values()):
        doc(root / "inbox" / f"file-{i}.txt", words, 410 + i)
    doc(root / "inbox" / "secret.txt", None, 420).write_text("topsecretword " * 50)
    result = run_cli("-c", cfg, "--once", timeout=120)
    assert result.returncode == 0, result.stderr
    out = delivered(root / "out")
    assert {f"{label}/file-{i}.txt" for i, label in enumerate(odd)} <= set(out), sorted(out)
    assert "unsorted/secret.txt" in out  # the secret's words were never learned
    explained = run_cli("explain", "-c", cfg, root / "inbox" / "secret.txt")
    assert "topsecretword" not in explained.stdout


def test_a_learned_rule_and_a_classify_hook_work_side_by_side(root: Path) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    data = learn_config(root, examples, api={"enabled": False})
    learned, rest = data["rules"]
    hook = {
        "name": "by-keyword",
        "glob": "*.md",
        "classify": "keyword_classifier:classify",
        "to": str(root / "out" / "unsorted"),
    }
    reports = {"name": "reports", "to": str(root / "out" / "reports")}
    data["rules"] = [hook, learned, rest, reports]
    cfg = write_config(root / "c.yml", data)
    (root / "inbox" / "q1.md").write_text("# Quarterly report\nall good\n")
    doc(root / "inbox" / "cv.txt", "resumes", 430)
    env = cli_env(PYTHONPATH=str(ROOT / "docs" / "examples"))
    result = run_cli("-c", cfg, "--once", env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert set(delivered(root / "out")) == {"reports/q1.md", "resumes/cv.txt"}
    rows = {r["filename"]: (r["rule"], r["label"]) for r in journal_rows(root / "journal.db")}
    assert rows == {"q1.md": ("reports", None), "cv.txt": ("learned", "resumes")}


def test_hostile_markup_and_json_are_read_as_plain_text_in_bounded_time() -> None:
    # an entity bomb: a parser that expands entities makes gigabytes of it; here the
    # declarations are tags, dropped, and the references stay what they are
    lol = '<!ENTITY lol0 "invoice">' + "".join(
        f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)
    )
    bomb = f'<?xml version="1.0"?><!DOCTYPE r [{lol}]><r>&lol9; payment due</r>'
    nested = "[" * 2_000_000 + '"patient"' + "]" * 2_000_000  # 4 MB of nesting
    with Extractor() as extractor:
        xml = extractor.document("bomb.xml", bomb.encode())
        assert xml.method == "text" and "payment due" in xml.text and len(xml.text) < 1000
        deep = extractor.document("deep.json", nested.encode())
        assert deep.method == "text" and len(deep.text) <= 100_000 + len("deep json\n")


def test_an_example_nested_a_thousand_folders_deep_is_found_without_a_traceback(
    root: Path,
) -> None:
    # os.walk recursed once per folder level: 1,100 levels ended check (and the service's
    # start) in a RecursionError. The tree is made outside pytest's temporary folders and
    # removed by rm: pytest's clean-up of old ones (shutil.rmtree) recurses the same way, and
    # would fail every later session
    import tempfile

    top = Path(tempfile.mkdtemp(prefix="fd-deep-examples-"))
    try:
        examples = corpus.examples(top / "ex", per_label=5, labels=THREE, kinds=("txt",))
        deep = examples / "invoices"
        for _ in range(1100):  # one by one: Path.mkdir(parents=True) recurses too
            deep /= "d"
            deep.mkdir()
        corpus.write(deep / "deep.txt", corpus.text(random.Random(10), "invoices"))
        cfg = write_config(root / "c.yml", learn_config(root, examples))
        result = run_cli("check", "-c", cfg)
        assert result.returncode == 0, result.stderr
        assert (deep / "deep.txt") in find_examples(examples)["invoices"]
        checked = run_cli("learn-check", "-c", cfg)
        assert checked.returncode == 0, checked.stderr
        rows = [line.split() for line in checked.stdout.splitlines()]
        assert ["invoices", "100.0%", "(6", "examples)"] in rows, checked.stdout
    finally:
        subprocess.run(["rm", "-rf", "--", str(top)], check=True)


def test_learn_check_shows_a_label_with_a_control_character_escaped_and_lined_up(
    root: Path,
) -> None:
    examples = corpus.examples(root / "examples", per_label=5, labels=THREE, kinds=("txt",))
    (examples / "resumes").rename(examples / "cv\nfiles")  # a newline in a folder's name
    cfg = write_config(root / "c.yml", learn_config(root, examples))
    result = run_cli("learn-check", "-c", cfg)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    matrix = lines[lines.index(next(x for x in lines if x.startswith("  confusion"))) + 1 :]
    assert len(matrix) == 4 and matrix[2].startswith("  cv\\nfiles  "), matrix
    assert len({len(line) for line in matrix}) == 1, matrix  # every row as wide
    per_label = [line for line in lines if "examples)" in line]
    assert len({line.index("%") for line in per_label}) == 1, per_label


def test_a_docx_naming_a_local_file_as_an_entity_does_not_read_it(tmp_path: Path) -> None:
    import io
    import zipfile

    secret = tmp_path / "secret.txt"
    secret.write_text("topsecretword")
    source = zipfile.ZipFile(io.BytesIO(corpus.docx_bytes("placeholder")))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as hostile:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "word/document.xml":
                head, _, rest = data.partition(b"?>")
                doctype = f'<!DOCTYPE w:document [<!ENTITY xxe SYSTEM "file://{secret}">]>'
                data = head + b"?>" + doctype.encode() + rest.replace(b"placeholder", b"&xxe; due")
            hostile.writestr(info, data)
    with Extractor() as extractor:
        document = extractor.document("letter.docx", out.getvalue())
    assert document.method == "docx" and "topsecretword" not in document.text
