"""Learned routing: rules whose ``classify: {learn: FOLDER}`` model picks a label per file.

Owns the models of a config's learned rules (``Learned``: trained at start, retrained when an
examples folder changes, always off the event loop) and the checks ``check`` runs. Imports
scikit-learn, pypdf and python-docx (the ``learn`` extra) only when a rule asks for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Config
    from ..journal import Database
    from ..models import FileVersion
    from .extract import Document, Extractor
    from .model import Model, Prediction

log = logging.getLogger(__name__)

EXTRA_MODULES = {"sklearn": "scikit-learn", "pypdf": "pypdf", "docx": "python-docx"}
#: seconds between looks at the examples folders for a change (a look is a listing and stats)
REFRESH_S = 5.0


def missing_extra() -> list[str]:
    """The packages of ``filedispatch[learn]`` that cannot be imported (not installed, or
    broken: both are told the same way)."""
    missing = []
    for module, package in EXTRA_MODULES.items():
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    return missing


def learn_folders(config: Config) -> dict[str, Path]:
    """``rules[i].classify`` -> its examples folder, for each learned rule."""
    from ..config import LearnClassify

    return {
        f"rules[{i}].classify.learn": rule.classify.learn
        for i, rule in enumerate(config.rules)
        if isinstance(rule.classify, LearnClassify)
    }


def learn_problems(config: Config) -> list[str]:
    """Config errors of the learned rules: the extra not installed, examples missing or too
    few (one line each, naming the field)."""
    folders = learn_folders(config)
    if not folders:
        return []
    missing = missing_extra()
    if missing:
        where = next(iter(folders))
        return [
            f"{where}: learned routing needs the 'learn' extra (missing: {', '.join(missing)}); "
            "install it with: pip install 'filedispatch[learn]'"
        ]
    from .model import example_problems, find_examples

    problems = []
    for where, folder in folders.items():
        try:
            examples = find_examples(folder)
        except OSError as exc:
            problems.append(f"{where}: cannot read {folder}: {exc.strerror or exc}")
            continue
        problems += [f"{where}: {folder} {p}" for p in example_problems(examples)]
    return problems


class Learned:
    """The trained models of a config's learned rules, by examples folder.

    ``refresh`` (in a thread) trains what changed and swaps each model in whole; ``predict``
    (in a thread) reads the current one. A retraining that fails keeps the old model, and a
    model is kept until the end (a reload may bring its folder back).
    """

    def __init__(self, cache_dir: Path | None = None, store: bool = True, tag: str = "") -> None:
        self.cache_dir = cache_dir
        self.tag = tag  #: the journal's name in the cache files' names (``model.cache_path``)
        self.store = store  #: write newly trained models into ``cache_dir``
        #: remove cached models no rule uses now (the service's; a command leaves them)
        self.prune = False
        self._extractor: Extractor | None = None  #: made on first need: most configs learn nothing
        self._extractor_lock = threading.Lock()
        self._models: dict[Path, Model] = {}
        self._refresh_lock = threading.Lock()
        self._said: dict[Path, str] = {}  #: the last problem logged per folder (said once)
        #: the last version read and its document: several learned rules read a file once
        self._last: tuple[str, Document] | None = None

    @property
    def extractor(self) -> Extractor:
        with self._extractor_lock:
            if self._extractor is None:
                from .extract import Extractor

                self._extractor = Extractor()
            return self._extractor

    def model(self, folder: Path) -> Model | None:
        return self._models.get(folder)

    def predict(self, folder: Path, version: FileVersion) -> Prediction | None:
        """The model's answer for a source file; None when the folder has no model yet."""
        from .model import version_document

        model = self._models.get(folder)
        if model is None:
            return None
        last = self._last
        if last is not None and last[0] == version.key:
            document = last[1]
        else:
            document = version_document(self.extractor, version)
            self._last = (version.key, document)
        return model.predict(document)

    def refresh(self, folders: list[Path], strict: bool = False) -> list[Path]:
        """Train (or load from the cache) each folder whose examples changed; returns those
        retrained. ``strict``: raise ValueError instead of logging a folder that cannot train."""
        if not folders:  # no rule learns: nothing to load (not even the model module)
            return []
        from .model import find_examples, fingerprint, load_or_train, prune

        changed = []
        with self._refresh_lock:
            for folder in dict.fromkeys(folders):
                try:
                    examples = find_examples(folder)
                    current = self._models.get(folder)
                    if current is not None and current.fingerprint == fingerprint(examples):
                        continue
                    model = load_or_train(
                        self.extractor, examples, self.cache_dir, self.store, self.tag
                    )
                except (OSError, ValueError) as exc:
                    if strict:
                        raise ValueError(f"{folder}: {exc}") from None
                    if self._said.get(folder) != str(exc):
                        self._said[folder] = str(exc)
                        log.error("examples in %s: %s; the rule keeps its model", folder, exc)
                    continue
                self._said.pop(folder, None)
                if current is not None:
                    log.info("examples in %s changed: retrained (%s)", folder, _counts(model))
                self._models[folder] = model
                changed.append(folder)
            if changed and self.cache_dir is not None and self.prune:
                prune(self.cache_dir, (m.fingerprint for m in self._models.values()), self.tag)
        return changed

    def close(self) -> None:
        with self._extractor_lock:
            if self._extractor is not None:
                self._extractor.close()


@contextlib.contextmanager
def learned_models(
    config: Config,
    store: bool = True,
    where: str = "<config>",
    database: Database | None = None,
) -> Iterator[Learned | None]:
    """The learned rules' models for a command (loaded from beside the journal, ``database``
    or the config's, or trained now and, with ``store``, kept there); None when no rule
    learns. ConfigError (naming ``where``, the config file) if the examples cannot train one."""
    folders = list(learn_folders(config).values())
    if not folders:
        yield None
        return
    from ..errors import ConfigError
    from ..journal import journal_path, state_folder, state_tag

    chosen = journal_path(config) if database is None else database
    learned = Learned(state_folder(chosen), store=store, tag=state_tag(chosen))
    try:
        try:
            learned.refresh(folders, strict=True)
        except ValueError as exc:
            raise ConfigError(where, [f"classify.learn: {exc}"]) from None
        yield learned
    finally:
        learned.close()


def _counts(model: Model) -> str:
    return ", ".join(f"{label}: {n}" for label, n in sorted(model.counts.items()))


@contextlib.asynccontextmanager
async def learning(
    folders: Callable[[], list[Path]],
    cache_dir: Path,
    tag: str,
    every_s: float = REFRESH_S,
) -> AsyncIterator[Learned]:
    """The models of ``folders()`` trained now (ValueError if one cannot be), then kept current
    by a task that looks for changed examples every ``every_s`` seconds until the block ends.
    ``folders`` is called each time, so a reloaded config's folders are followed. The models
    are cached in ``cache_dir`` under ``tag`` (the journal's), and the ones of ``tag`` no rule
    uses are removed."""
    learned = Learned(cache_dir, tag=tag)
    learned.prune = True
    try:
        await asyncio.to_thread(learned.refresh, folders(), True)
        task = asyncio.create_task(_keep_current(learned, folders, every_s), name="learning")
        try:
            yield learned
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        await asyncio.to_thread(learned.close)


async def _keep_current(
    learned: Learned, folders: Callable[[], list[Path]], every_s: float
) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            await asyncio.to_thread(learned.refresh, folders())
        except Exception:  # never let a bad examples folder end the service
            log.exception("retraining failed; the rules keep their models")
