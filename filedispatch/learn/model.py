"""The learned model of one examples folder: find the examples, train, cache, predict, explain.

Runs in threads (never on the event loop): training and cross-validation take seconds. The
model is a TF-IDF vectoriser and a logistic regression (see docs/learned-routing.md for the
measurements behind that choice). Models are cached as ``learn-<hash>.npz`` beside the
journal (plain arrays, never a pickle: loading a cache runs no code), the hash taken over the
examples' names, sizes and times and the model's settings.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .extract import MAX_BYTES, Document, Extractor

if TYPE_CHECKING:
    from ..models import FileVersion

log = logging.getLogger(__name__)

#: the fewest examples a label needs (and at least two labels are needed)
MIN_EXAMPLES = 5
#: bump when the features or the classifier change: cached models of another format retrain
MODEL_FORMAT = 1
#: the most example files read per folder (a mistaken folder must not take hours)
MAX_EXAMPLES = 20_000
#: the most folders walked per examples folder (a tree of empty folders costs its walk too)
MAX_FOLDERS = 20_000
#: the most labels per folder: the classifier keeps a weight per label and word (up to 50,000
#: words) and training holds about 20 copies of them, so 4,000 labels (20,000 examples) would
#: need tens of GB in the service's own process; 100 need about 1 GB at the very most
MAX_LABELS = 100
#: PDF or DOCX examples whose parser is stopped (``PARSE_TIMEOUT_S`` or its memory) before the
#: rest of one training's are known by their names: 20,000 hostile examples would otherwise hold
#: the service's start for a day
MAX_STOPPED = 3
#: words per label ``explain`` shows
TOP_WORDS = 6


class Examples(dict[str, list[Path]]):
    """label -> example files, labels and files sorted; ``folder`` is the examples folder they
    were found in (their files are read beneath it, never through a link; None: as named)."""

    def __init__(self, folder: Path | None = None) -> None:
        super().__init__()
        self.folder = folder


def find_examples(folder: Path) -> Examples:
    """One label per sub-folder of ``folder`` (hidden ones skipped), with the regular files in
    it and below it. Symbolic links are not followed. Raises OSError if ``folder`` cannot be
    listed."""
    examples = Examples(folder)
    count = 0
    with os.scandir(folder) as entries:
        labels = sorted(
            e.name for e in entries if e.is_dir(follow_symlinks=False) and e.name[0] != "."
        )
    for label in labels:
        files: list[Path] = []
        for path in _files_beneath(folder / label):
            files.append(path)
            count += 1
            if count > MAX_EXAMPLES:
                raise OSError(f"more than {MAX_EXAMPLES} example files")
        examples[label] = files
    return examples


def _files_beneath(top: Path) -> Iterator[Path]:
    """The regular files in ``top`` and the folders below it (hidden ones skipped, no link
    followed, a folder that cannot be listed left out), each folder's files by name before its
    sub-folders. Walked with a list, not by recursion (``os.walk`` in Python 3.11 recurses: a
    folder nested a thousand deep raised RecursionError); OSError past ``MAX_FOLDERS``."""
    pending, seen = [top], 0
    while pending:
        current = pending.pop()
        seen += 1
        if seen > MAX_FOLDERS:
            raise OSError(f"more than {MAX_FOLDERS} folders of examples")
        try:
            with os.scandir(current) as listing:
                entries = sorted((e for e in listing if e.name[0] != "."), key=lambda e: e.name)
        except OSError:
            continue
        folders = []
        for entry in entries:
            try:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(Path(entry.path))
                elif entry.is_file(follow_symlinks=False):
                    yield Path(entry.path)
            except OSError:
                continue
        pending += reversed(folders)


def example_problems(examples: Examples) -> list[str]:
    """Why these examples cannot train a model (empty when they can)."""
    if len(examples) < 2:
        found = f"only {next(iter(examples))!r}" if examples else "none"
        return [f"needs at least two labels (one sub-folder of examples per label); found {found}"]
    if len(examples) > MAX_LABELS:
        return [f"has {len(examples)} labels (sub-folders); at most {MAX_LABELS} are learned"]
    few = [
        f"{label!r} has {len(files)}"
        for label, files in examples.items()
        if len(files) < MIN_EXAMPLES
    ]
    if few:
        return [f"each label needs at least {MIN_EXAMPLES} example files: " + ", ".join(few)]
    return []


def fingerprint(examples: Examples) -> str:
    """A hash of the examples (label, name, size, mtime, inode) and the model's format."""
    digest = hashlib.sha256(f"filedispatch-learn {MODEL_FORMAT}\0".encode())
    for label, files in sorted(examples.items()):
        for path in files:
            try:
                st = path.stat()
            except OSError:
                continue
            line = f"{label}\0{path.name}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n"
            digest.update(line.encode("utf-8", "surrogateescape"))
    return digest.hexdigest()[:32]


def read_document(
    extractor: Extractor, path: Path, folder: Path | None = None, parse: bool = True
) -> Document:
    """An example file's document (at most ``MAX_BYTES + 1`` bytes read). With ``folder`` (the
    examples folder, which ``path`` is in) it is opened beneath it without following any link,
    so a folder swapped for a link after the listing leads nowhere; only a regular file is
    read. ``parse`` as for ``Extractor.document``."""
    from ..sourcefile import READ_FLAGS, open_beneath

    try:
        if folder is None:
            fd = os.open(path, READ_FLAGS | os.O_NOFOLLOW)
        else:
            fd = open_beneath(folder, path.relative_to(folder).as_posix(), READ_FLAGS)
    except (OSError, ValueError):
        return extractor.document(path.name, None)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return extractor.document(path.name, None)
        data = os.pread(fd, MAX_BYTES + 1, 0)
    except OSError:
        return extractor.document(path.name, None)
    finally:
        os.close(fd)
    return extractor.document(path.name, data, st.st_size, parse)


def version_document(extractor: Extractor, version: FileVersion) -> Document:
    """A source file's document, read through ``sourcefile`` (no link out of the source)."""
    from ..sourcefile import read_head

    data = read_head(version, min(version.size, MAX_BYTES) + 1)
    return extractor.document(version.name, data, version.size)


@dataclass(frozen=True, slots=True)
class Prediction:
    """The model's answer for one document."""

    label: str  #: the most likely label
    probability: float  #: its probability, 0..1
    #: every label with its probability, most likely first
    probabilities: tuple[tuple[str, float], ...]
    document: Document


#: the vectoriser's and the classifier's settings (the cache keeps only what they learned)
VECTORIZER = {"sublinear_tf": True, "strip_accents": "unicode", "max_features": 50_000}
CLASSIFIER = {"C": 10.0, "max_iter": 2000}


def _pipeline() -> Any:
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline

    return make_pipeline(TfidfVectorizer(**VECTORIZER), LogisticRegression(**CLASSIFIER))


@dataclass
class Model:
    """A trained model; ``predict`` and ``top_words`` are safe from several threads."""

    fingerprint: str
    pipeline: Any
    counts: dict[str, int] = field(default_factory=dict)  #: examples per label

    @property
    def labels(self) -> list[str]:
        return [str(c) for c in self.pipeline.classes_]

    def predict(self, document: Document) -> Prediction:
        probs = self.pipeline.predict_proba([document.text])[0]
        ranked = sorted(zip(self.labels, map(float, probs), strict=True), key=lambda p: -p[1])
        return Prediction(ranked[0][0], ranked[0][1], tuple(ranked), document)

    def top_words(self, document: Document, label: str, n: int = TOP_WORDS) -> list[str]:
        """The document's words that weigh most for ``label`` (tf-idf x the label's weight)."""
        vectorizer, classifier = self.pipeline[0], self.pipeline[-1]
        row = vectorizer.transform([document.text]).tocoo()
        coef = classifier.coef_
        if coef.shape[0] == 1:  # two labels: one weight row, for the second label
            sign = 1.0 if label == self.labels[1] else -1.0
            weights = coef[0] * sign
        else:
            weights = coef[self.labels.index(label)]
        names = vectorizer.get_feature_names_out()
        pairs = zip(row.col, row.data, strict=True)
        scored = sorted(((float(v * weights[j]), str(names[j])) for j, v in pairs), reverse=True)
        return [word for score, word in scored[:n] if score > 0]


def documents(extractor: Extractor, examples: Examples) -> tuple[list[str], list[str]]:
    """(texts, labels) of every example; once ``MAX_STOPPED`` PDF or DOCX examples were stopped,
    the rest are known by their names (and the log says so)."""
    texts, labels = [], []
    stopped = 0
    for label, files in examples.items():
        for path in files:
            document = read_document(extractor, path, examples.folder, stopped < MAX_STOPPED)
            stopped += document.stopped
            texts.append(document.text)
            labels.append(label)
    if stopped >= MAX_STOPPED:
        log.warning(
            "examples in %s: %d PDF or DOCX files took too long or too much memory to read; "
            "the others are known by their names until the examples change",
            examples.folder,
            stopped,
        )
    return texts, labels


def train(extractor: Extractor, examples: Examples, digest: str | None = None) -> Model:
    """A model trained on every example (seconds for thousands; run it in a thread)."""
    texts, labels = documents(extractor, examples)
    pipeline = _pipeline()
    pipeline.fit(texts, labels)
    counts = {label: len(files) for label, files in examples.items()}
    return Model(digest or fingerprint(examples), pipeline, counts)


@dataclass(frozen=True, slots=True)
class CrossCheck:
    """Cross-validated results on the examples (``learn-check``)."""

    labels: list[str]
    folds: int
    #: label -> the share of its examples predicted right when held out
    accuracy: dict[str, float]
    #: confusion[i][j]: examples of labels[i] predicted as labels[j]
    confusion: list[list[int]]

    @property
    def overall(self) -> float:
        total = sum(map(sum, self.confusion))
        right = sum(self.confusion[i][i] for i in range(len(self.labels)))
        return right / total if total else 0.0


def cross_check(extractor: Extractor, examples: Examples, folds: int = 5) -> CrossCheck:
    """Stratified k-fold cross-validation (``folds`` at most the smallest label's count)."""
    from sklearn.metrics import confusion_matrix
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    texts, labels = documents(extractor, examples)
    folds = max(2, min(folds, min(len(f) for f in examples.values())))
    split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=0)
    predicted = cross_val_predict(_pipeline(), texts, labels, cv=split)
    names = sorted(examples)
    matrix = confusion_matrix(labels, predicted, labels=names)
    accuracy = {
        name: float(matrix[i][i]) / max(1, int(matrix[i].sum())) for i, name in enumerate(names)
    }
    return CrossCheck(names, folds, accuracy, [[int(v) for v in row] for row in matrix])


def cache_path(cache_dir: Path, digest: str, tag: str = "") -> Path:
    """``learn-[TAG-]DIGEST.npz``: ``tag`` names the journal whose service keeps the file."""
    return cache_dir / f"learn-{tag}-{digest}.npz" if tag else cache_dir / f"learn-{digest}.npz"


def load_or_train(
    extractor: Extractor,
    examples: Examples,
    cache_dir: Path | None,
    store: bool = True,
    tag: str = "",
) -> Model:
    """The cached model for these examples, or a new one (then cached, with ``store``; a cache
    that cannot be written is only logged); ``tag`` as for ``cache_path``. Raises ValueError
    if the examples cannot train a model."""
    problems = example_problems(examples)
    if problems:
        raise ValueError(problems[0])
    digest = fingerprint(examples)
    total = sum(len(files) for files in examples.values())
    if cache_dir is not None:
        cached = _load(cache_path(cache_dir, digest, tag), digest)
        if cached is not None:
            log.info("learned model of %d examples loaded from the cache %s", total, cache_dir)
            return cached
    started = time.perf_counter()
    model = train(extractor, examples, digest)
    took = time.perf_counter() - started
    log.info("learned model trained on %d examples in %.1f s", total, took)
    if cache_dir is not None and store:
        _store(cache_path(cache_dir, digest, tag), model)
    return model


def _load(path: Path, digest: str) -> Model | None:
    """A model rebuilt from the arrays ``_store`` wrote (None: no such file, or not usable)."""
    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as saved:
            arrays = {key: saved[key] for key in saved.files}
    except FileNotFoundError:
        return None
    except Exception as exc:  # damaged, or not ours: train again
        log.warning("the cached model %s cannot be read (%s); training again", path, exc)
        return None
    try:
        _check_arrays(arrays)
        pipeline = _pipeline()
        vectorizer, classifier = pipeline[0], pipeline[-1]
        words = [str(w) for w in arrays["words"]]
        vectorizer.vocabulary_ = {word: i for i, word in enumerate(words)}
        vectorizer.fixed_vocabulary_ = False
        vectorizer.idf_ = arrays["idf"]
        classifier.classes_ = arrays["classes"]
        classifier.coef_ = arrays["coef"]
        classifier.intercept_ = arrays["intercept"]
        classifier.n_features_in_ = len(words)
        counts = dict(zip(map(str, arrays["classes"]), map(int, arrays["counts"]), strict=True))
    except Exception as exc:
        log.warning("the cached model %s cannot be used (%s); training again", path, exc)
        return None
    return Model(digest, pipeline, counts)


def _check_arrays(arrays: dict[str, Any]) -> None:
    """ValueError unless the arrays are a model ``_store`` could have written: a file changed
    by someone else must be trained again, not fail (or misbehave) on every file it sees."""
    import numpy as np

    missing = {"words", "idf", "classes", "coef", "intercept", "counts"} - set(arrays)
    if missing:
        raise ValueError(f"no {', '.join(sorted(missing))}")
    words, idf, classes = arrays["words"], arrays["idf"], arrays["classes"]
    coef, intercept, counts = arrays["coef"], arrays["intercept"], arrays["counts"]
    if words.ndim != 1 or classes.ndim != 1 or words.dtype.kind != "U":
        raise ValueError("the words or labels are not a list of strings")
    distinct = len(set(classes.tolist()))
    if classes.dtype.kind != "U" or distinct != len(classes) or distinct < 2:
        raise ValueError("the labels are not two or more distinct strings")
    # a label names a folder at delivery ({label}): only what a sub-folder's name can be
    odd = [c for c in classes.tolist() if not c or c[0] == "." or "/" in c or "\0" in c]
    if odd:
        raise ValueError(f"{odd[0]!r} is not a label (a sub-folder's name)")
    if len(set(words.tolist())) != len(words):
        raise ValueError("a word is there twice")
    rows = 1 if len(classes) == 2 else len(classes)
    shapes = {
        "idf": (idf, (len(words),)),
        "coef": (coef, (rows, len(words))),
        "intercept": (intercept, (rows,)),
        "counts": (counts, (len(classes),)),
    }
    for name, (array, shape) in shapes.items():
        if array.shape != shape or array.dtype.kind not in "fiu":
            raise ValueError(f"{name} is {array.dtype} {array.shape}, not numbers {shape}")
        if not np.all(np.isfinite(array)):
            raise ValueError(f"{name} holds a number that is not finite")


def _store(path: Path, model: Model) -> None:
    import numpy as np

    cache_dir = path.parent
    vectorizer, classifier = model.pipeline[0], model.pipeline[-1]
    words = sorted(vectorizer.vocabulary_, key=vectorizer.vocabulary_.__getitem__)
    arrays = {
        "words": np.array(words, dtype=str),
        "idf": vectorizer.idf_,
        "classes": np.array(classifier.classes_, dtype=str),
        "coef": classifier.coef_,
        "intercept": classifier.intercept_,
        "counts": np.array([model.counts.get(str(c), 0) for c in classifier.classes_]),
    }
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=cache_dir, prefix=".learn-", suffix=".npz")
    except OSError as exc:
        log.warning("cannot cache the model in %s: %s", cache_dir, exc.strerror or exc)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez_compressed(f, **arrays)
        os.replace(temporary, path)
    except OSError as exc:
        Path(temporary).unlink(missing_ok=True)
        log.warning("cannot cache the model in %s: %s", cache_dir, exc.strerror or exc)


def prune(cache_dir: Path, keep: Iterable[str], tag: str) -> None:
    """Remove the cached models of ``tag`` other than ``keep`` (fingerprints); the ones of other
    tags belong to other services."""
    names = {cache_path(cache_dir, d, tag).name for d in keep}
    try:
        for path in cache_dir.glob(f"learn-{tag}-*.npz"):
            if path.name not in names:
                path.unlink(missing_ok=True)
    except OSError:
        pass
