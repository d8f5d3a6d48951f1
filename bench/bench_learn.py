"""Learned-routing benchmark (issue 18.6): accuracy on held-out generated documents, time to
classify a one-page PDF, time to train on 1,000 examples, the two candidate classifiers side
by side, and what a hostile PDF costs. Prints figures; asserts nothing.

    python bench/bench_learn.py [--per-label 250] [--quick]

Targets from the issue: held-out accuracy >= 0.95; <= 20 ms per one-page PDF (text
extraction in the worker process, vectorising and predicting); training on 1,000 examples
< 10 s. The documents are tests/learn_corpus.py's, made harder than the tests' (4 lines, 6%
of the words from the label's vocabulary) so the classifiers can be told apart.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from filedispatch.learn.extract import Extractor
from filedispatch.learn.model import find_examples, load_or_train, read_document
from tests import learn_corpus as corpus

LINES, SHARE = 4, 0.06  #: a hard set: few label words per document


def hard_text(rng: random.Random, label: str | None) -> str:
    return "\n".join(corpus.sentence(rng, label, share=SHARE) for _ in range(LINES)) + "\n"


def compare(per_label: int) -> None:
    """Logistic regression and a small MLP, 5-fold cross-validated on the same documents;
    and how much filler-only noise each lets through at min_confidence 0.6."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_score
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline

    rng = random.Random(7)
    labels = list(corpus.VOCABULARY)
    texts = [hard_text(rng, label) for label in labels for _ in range(per_label)]
    targets = [label for label in labels for _ in range(per_label)]
    held_out = [hard_text(rng, label) for label in labels for _ in range(100)]
    noise = [hard_text(rng, None) for _ in range(200)]
    candidates: dict[str, Any] = {
        "logistic regression (chosen)": lambda: make_pipeline(
            TfidfVectorizer(sublinear_tf=True), LogisticRegression(C=10.0, max_iter=2000)
        ),
        "MLP, one hidden layer of 64": lambda: make_pipeline(
            TfidfVectorizer(sublinear_tf=True),
            MLPClassifier(hidden_layer_sizes=(64,), max_iter=200, random_state=0),
        ),
    }
    print(f"classifiers on {len(texts)} hard documents ({len(labels)} labels):")
    for name, make in candidates.items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            split = StratifiedKFold(5, shuffle=True, random_state=0)
            scores = cross_val_score(make(), texts, targets, cv=split)
            started = time.perf_counter()
            model = make().fit(texts, targets)
            took = time.perf_counter() - started
        confident = model.predict_proba(held_out).max(axis=1) >= 0.6
        noisy = model.predict_proba(noise).max(axis=1) >= 0.6
        print(
            f"  {name}: cross-validated accuracy {scores.mean():.3f} "
            f"(worst fold {scores.min():.3f}); fit {took:.2f} s; held-out documents taken at "
            f"0.6: {confident.mean():.1%}; noise taken at 0.6: {noisy.mean():.1%}"
        )


def service_model(per_label: int) -> None:
    """The model as the service builds it: examples written as files (half text, half PDF),
    read through the extractor, trained; then held-out PDFs classified one by one."""
    rng = random.Random(11)
    labels = list(corpus.VOCABULARY)
    with tempfile.TemporaryDirectory() as tmp, Extractor() as extractor:
        root = Path(tmp)
        for label in labels:
            for i in range(per_label):
                kind = "pdf" if i % 2 else "txt"
                corpus.write(root / "ex" / label / f"{i}.{kind}", corpus.text(rng, label))
        examples = find_examples(root / "ex")
        total = sum(len(f) for f in examples.values())
        started = time.perf_counter()
        model = load_or_train(extractor, examples, None)
        print(
            f"training on {total} examples (files, half PDF): {time.perf_counter() - started:.2f} s"
        )
        held: list[tuple[str, Path]] = []
        for label in labels:
            for i in range(50):
                held.append(
                    (
                        label,
                        corpus.write(root / "held" / label / f"{i}.pdf", corpus.text(rng, label)),
                    )
                )
        read_document(extractor, held[0][1])  # the worker process is started once
        times, right = [], 0
        for label, path in held:
            started = time.perf_counter()
            answer = model.predict(read_document(extractor, path))
            times.append(time.perf_counter() - started)
            right += answer.label == label
        times.sort()
        print(
            f"held-out one-page PDFs: accuracy {right / len(held):.3f} ({len(held)} files); "
            f"classify time median {statistics.median(times) * 1000:.1f} ms, "
            f"p95 {times[int(len(times) * 0.95)] * 1000:.1f} ms"
        )


def hostile(pages: int, timeout_s: float) -> None:
    """A 10 KB PDF of ``pages`` pages of 250,000 text operators each: pypdf alone spends
    16-20 s per page here (measured under load), so minutes on the file."""
    pdf = corpus.slow_pdf(pages=pages)
    with Extractor(timeout_s=timeout_s) as extractor:
        extractor.document("warm.pdf", corpus.pdf_bytes("warm up"))
        started = time.perf_counter()
        document = extractor.document("hostile.pdf", pdf)
        took = time.perf_counter() - started
    print(
        f"hostile PDF ({len(pdf)} bytes, {pages} pages): back in {took:.2f} s "
        f"with the {timeout_s:g} s limit ({document.note})"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-label", type=int, default=250, help="examples per label (4 labels)")
    parser.add_argument("--quick", action="store_true", help="smaller sets, for a smoke run")
    args = parser.parse_args()
    per_label = 25 if args.quick else args.per_label
    compare(per_label)
    service_model(per_label)
    hostile(20, 5.0)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
