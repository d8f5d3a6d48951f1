"""History from the command line (dirsend's list/forget/store-only): list, show, retry, forget,
stats, mark-existing.

Reads go through the journal's reader (read-only, safe while a service writes the journal),
writes through ``Journal``; no SQL here. Nothing here sends a file; only ``retry`` moves one,
back from ``failed_dir`` into its source (see recovery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import datetime as dt
import json
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO, TypeVar

from . import recovery
from .birth import born
from .config import Config, SourceConfig, Step
from .config import scrub as scrub_secrets
from .content import facts_for
from .errors import JournalError, NotFound
from .fate import Fate, fate
from .journal import (
    Database,
    JournalReader,
    PlannedStep,
    journal_lock,
    journal_path,
    open_journal,
    open_reader,
    planned_steps,
    read_states,
)
from .learn import Learned, learned_models
from .models import Dispatch, FileVersion, Status
from .progress import Progress
from .recovery import RetryAnswer
from .reporting import Period, human_size, period_label, period_start
from .router import Chain, Router
from .textsafe import escape

BATCH = 500
T = TypeVar("T")


def _read(path: Database, ask: Callable[[JournalReader], Awaitable[T]]) -> T:
    """One question to the journal at ``path`` (which must exist), answered now."""

    async def run() -> T:
        async with open_reader(path) as reader:
            return await ask(reader)

    return asyncio.run(run())


def as_dict(row: Dispatch) -> dict[str, Any]:
    """A row as the command line shows it: every column, and whether mark-existing made it."""
    out = {f.name: getattr(row, f.name) for f in dataclasses.fields(row) if f.name != "step_key"}
    out["marked"] = row.marked
    return out


def list_rows(path: Database, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` rows (optionally of one status), newest first."""
    wanted = Status(status) if status else None
    return [as_dict(r) for r in _read(path, lambda j: j.recent(limit, wanted))]


def get_row(path: Database, dispatch_id: int) -> dict[str, Any]:
    row = _read(path, lambda j: j.get(dispatch_id))
    if row is None:
        raise NotFound(f"no dispatch with id {dispatch_id} in {path}")
    return as_dict(row)


def stats(path: Database, period: Period = "day") -> list[dict[str, Any]]:
    """Per day, ISO 8601 week (``2026-W49``) or month, by the local date a dispatch finished
    (or was recorded, while it waits): ``period``, ``succeeded``, ``failed``, ``waiting``
    and ``bytes`` (sent, an int), oldest period first."""
    periods: dict[str, dict[str, Any]] = {}
    for row in _read(path, lambda j: j.day_tallies()):
        key = period_label(period_start(row.day, period), period)
        into = periods.setdefault(
            key, {"period": key, "succeeded": 0, "failed": 0, "waiting": 0, "bytes": 0}
        )
        into["succeeded"] += row.succeeded
        into["failed"] += row.failed
        into["waiting"] += row.waiting
        into["bytes"] += row.bytes
    return list(periods.values())


# ---------------------------------------------------------------------------- formatting


def scrub(text: str | None, secrets: Iterable[str] = ()) -> str:
    return scrub_secrets(text or "", secrets)


def shown(value: object, secrets: Iterable[str] = ()) -> str:
    """A value as a table shows it: secrets hidden, on one line (control and bidi characters
    escaped, see ``textsafe``)."""
    return escape(scrub(value if isinstance(value, str) else str(value), secrets))


def _when(row: dict[str, Any]) -> str:
    stamp = row.get("finished") or row.get("started") or row.get("created")
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def format_rows(rows: Iterable[dict[str, Any]], secrets: Iterable[str] = ()) -> list[str]:
    """One line per row: id, time, status, source/file -> where it landed (the final name,
    for a delivered row that recorded one) or its destination, and why if not sent."""
    secrets = list(secrets)
    lines = []
    for r in rows:
        landed = r.get("location") if r["status"] == Status.SUCCEEDED else None
        line = (
            f"{r['id']:>7}  {_when(r)}  {r['status']:<11}  "
            f"{shown(r['source'])}/{shown(r['relpath'])} -> "
            f"{shown(landed or r['destination'], secrets)}"
        )
        if r["status"] != Status.SUCCEEDED and r.get("reason"):
            line += f"  ({shown(r['reason'], secrets)})"
        elif r.get("marked"):
            line += "  (marked by mark-existing: not sent)"
        lines.append(line)
    return lines


def format_detail(row: dict[str, Any], secrets: Iterable[str] = ()) -> str:
    secrets = list(secrets)
    out = []
    for key, value in row.items():
        if value is None or (key == "marked" and not value):
            continue
        if key == "marked":
            value = "yes: recorded by mark-existing, never sent"
        if key in ("created", "started", "finished") and value:
            value = f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(value))} ({value:.3f})"
        elif key in ("mtime_ns", "btime_ns"):  # the file's own times: modified, born
            value = f"{_local_ns(value)} ({value})"
        else:
            value = shown(value, secrets)
        out.append(f"{key + ':':<13} {value}")
    return "\n".join(out)


def _local_ns(ns: int) -> str:
    """Nanoseconds since the epoch as a local date and time (to the microsecond)."""
    try:
        moment = dt.datetime.fromtimestamp(ns / 1e9).astimezone()
    except (OverflowError, OSError, ValueError):  # past what the C library can give a date
        return "?"
    return moment.isoformat(sep=" ", timespec="microseconds")


def format_stats(rows: Iterable[dict[str, Any]]) -> list[str]:
    lines = [f"{'period':<10} {'succeeded':>9} {'failed':>7} {'waiting':>7} {'sent':>10}"]
    for r in rows:
        lines.append(
            f"{shown(r['period'] or '-'):<10} {r['succeeded'] or 0:>9} {r['failed'] or 0:>7} "
            f"{r['waiting'] or 0:>7} {human_size(r['bytes'] or 0):>10}"
        )
    return lines


def to_json(rows: list[dict[str, Any]], secrets: Iterable[str] = ()) -> str:
    secrets = list(secrets)
    clean = [
        {k: scrub(v, secrets) if isinstance(v, str) else v for k, v in r.items()} for r in rows
    ]
    return json.dumps(clean, indent=2)


# ---------------------------------------------------------------------------- forget


def forget(path: Database, dispatch_id: int | None = None, file: str | None = None) -> int:
    """Delete history so the file is sent again (at the next rescan or start); rows removed.

    ``file`` is a path relative to its source, or an absolute path inside one.
    """
    if dispatch_id is not None:
        row = get_row(path, dispatch_id)
        if row["status"] == Status.IN_PROGRESS:
            raise JournalError(f"dispatch {dispatch_id} is being sent now; try once it finishes")
        return asyncio.run(_forget(path, [(None, None, dispatch_id)]))
    assert file is not None
    absolute = str(Path(file).expanduser().absolute())
    found = _read(path, lambda j: j.recorded_paths(file, absolute))
    if not found:
        raise NotFound(f"nothing is recorded for {file} in {path}")
    return asyncio.run(_forget(path, [(r.source, r.relpath, None) for r in found]))


async def _forget(path: Database, targets: list[tuple[str | None, str | None, int | None]]) -> int:
    removed = 0
    async with open_journal(path, hold=False) as journal:
        for source, relpath, dispatch_id in targets:
            if dispatch_id is not None:
                removed += await journal.forget(dispatch_id)
            else:
                removed += await journal.forget(source=source, relpath=relpath)
    return removed


# ---------------------------------------------------------------------------- retry


def retry_targets(path: Database, dispatch_id: int | None, file: str | None) -> list[int]:
    """The FAILED rows to retry: one id; a file's (relative or absolute path); or every one.
    Per version and rule, its first FAILED step (retrying it re-queues the later ones)."""
    if dispatch_id is not None:
        get_row(path, dispatch_id)  # NotFound names the id
        return [dispatch_id]
    absolute = str(Path(file).expanduser().absolute()) if file is not None else None
    ids = _read(path, lambda j: j.first_failures(file, absolute))
    if file is not None and not ids:
        raise NotFound(f"no FAILED dispatch of {file} in {path}")
    return ids


async def _retry(
    path: Database, ids: list[int], sources: dict[str, SourceConfig] | None
) -> list[RetryAnswer]:
    answers: list[RetryAnswer] = []
    restored: set[Path] = set()
    async with open_journal(path) as journal:
        for dispatch_id in ids:
            answer = await recovery.retry(journal, sources, dispatch_id)
            if answer.restored is not None and answer.restored in restored:
                continue
            if answer.restored is not None:
                restored.add(answer.restored)
            answers.append(answer)
    return answers


def _retry_command(args: argparse.Namespace, db: Database, config: Config | None) -> int:
    if isinstance(db, Path) and not db.exists():
        raise NotFound(f"no journal at {db}")
    ids = retry_targets(db, args.id, args.path)
    if not ids:
        print("no FAILED dispatch to retry")
        return 0
    sources = None if config is None else {s.key: s for s in config.sources}
    answers = asyncio.run(_retry(db, ids, sources))
    for answer in answers:  # a path in the answer is a writer's name: shown escaped
        print(escape(answer.message), file=sys.stdout if answer.ok else sys.stderr)
    if any(a.ok for a in answers):
        print("a running service takes them now; otherwise they go at the next start or --once")
    return 0 if all(a.ok for a in answers) else 1


# ---------------------------------------------------------------------------- mark-existing


@dataclass
class MarkSummary:
    files: int = 0  #: files that some rule routes
    steps: int = 0  #: destination steps of those files
    new: int = 0  #: steps recorded now (the others were in the journal already)
    unmatched: int = 0  #: files no rule takes


def existing(config: Config) -> Iterator[tuple[SourceConfig, FileVersion]]:
    """Every regular file in the sources now (what the start-up scan would consider)."""
    from .watcher import SourceWatcher

    async def never(*_: object) -> None:
        return None

    for source in config.sources:
        watcher = SourceWatcher(source, never, never)
        for rel, st in sorted(watcher.entries.walk(), key=lambda item: item[0]):
            yield source, FileVersion.from_stat(source.key, source.path, rel, st)


def _route(router: Router, version: FileVersion, learned: Learned | None) -> list[Chain]:
    return router.route(version, facts_for(router, version, learned=learned))


def mark_existing(
    config: Config, db: Database, *, dry_run: bool = False, out: TextIO | None = None
) -> MarkSummary:
    """Record the files present now as dispatched to every destination their rules name,
    without sending them (dirsend's ``--store-only``). ``dry_run`` prints and writes nothing.
    """
    with learned_models(config, store=not dry_run, database=db) as learned:
        return _mark_existing(config, db, dry_run, out or sys.stdout, learned)


def _mark_existing(
    config: Config, db: Database, dry_run: bool, out: TextIO, learned: Learned | None
) -> MarkSummary:
    files = list(existing(config))
    router = Router(config)
    summary = MarkSummary()
    if dry_run:  # the same files, routes and journal rows as the real run, only read
        for start in range(0, len(files), BATCH):
            batch = [(v, _route(router, v, learned)) for _, v in files[start : start + BATCH]]
            states = read_states(db, [v.key for v, chains in batch if chains])
            for version, chains in batch:
                if not chains:
                    summary.unmatched += 1
                    continue
                summary.files += 1
                recorded = {s.step_key for s in states.get(version.key, [])}
                for step in planned_steps(version, chains):
                    summary.steps += 1
                    before = step.step_key in recorded
                    summary.new += not before
                    line = f"{version.source}/{version.relpath} -> {step.destination}"
                    print(escape(line + ("  (recorded before)" if before else "")), file=out)
        return summary
    with journal_lock(db):  # a running service would send them meanwhile: refuse
        asyncio.run(_mark(config, router, db, files, summary, learned))
    return summary


async def _mark(
    config: Config,
    router: Router,
    db: Database,
    files: list[tuple[SourceConfig, FileVersion]],
    summary: MarkSummary,
    learned: Learned | None,
) -> None:
    async with open_journal(db, hold=False) as journal:
        await recovery.upgrade_step_keys(journal, config)  # an older journal's rows count as marked
        with Progress("mark-existing", total=len(files)) as progress:
            for start in range(0, len(files), BATCH):
                steps: list[PlannedStep] = []
                for _, version in files[start : start + BATCH]:
                    chains = _route(router, version, learned)
                    if not chains:
                        summary.unmatched += 1
                        continue
                    summary.files += 1
                    steps += planned_steps(born(version), chains)
                summary.steps += len(steps)
                summary.new += await journal.mark_done(steps) if steps else 0
                progress.update(min(start + BATCH, len(files)))
            progress.close()


# ---------------------------------------------------------------------------- the CLI's entry


def run_command(args: argparse.Namespace, config: Config | None) -> int:
    """``filedispatch history ...`` and ``mark-existing``; the exit status (1: not found)."""
    from .config import secrets_of

    db = journal_path(config, args.sub_db or args.db)
    secrets = secrets_of(config) if config is not None else []
    if args.command == "mark-existing":
        if config is None:
            print("filedispatch: mark-existing needs -c CONFIG", file=sys.stderr)
            return 2
        return _mark_command(config, db, args.sub_dry_run or args.dry_run)
    try:
        if args.history_command == "retry":
            return _retry_command(args, db, config)
        return _history_command(args, db, secrets)
    except NotFound as exc:
        print(f"filedispatch: {exc}", file=sys.stderr)
        return 1


def _history_command(args: argparse.Namespace, db: Database, secrets: list[str]) -> int:
    action = args.history_command
    if action == "list":
        rows = list_rows(db, args.status, args.limit)
        if args.json:
            print(to_json(rows, secrets))
        else:
            print("\n".join(format_rows(rows, secrets)) if rows else "no dispatches recorded")
    elif action == "show":
        print(format_detail(get_row(db, args.id), secrets))
    elif action == "forget":
        removed = forget(db, args.id, args.path)
        what = f"dispatch {args.id}" if args.id is not None else shown(args.path)
        print(
            f"forgot {what} ({removed} row(s)); it is sent again at the next rescan, within "
            "`rescan` seconds (default 60), or at the next start"
        )
    elif action == "stats":
        rows = stats(db, args.period)
        print(json.dumps(rows, indent=2) if args.json else "\n".join(format_stats(rows)))
    return 0


#: the fates in which a source file goes once its version is done
GOES = (Fate.DELETE, Fate.DONE_DIR)


def _steps_of(config: Config, source: SourceConfig) -> list[Step]:
    """Every step of the rules that may take files of ``source`` (named by key or path)."""
    names = {source.key, str(source.path)}
    return [s for r in config.rules if not r.sources or names & set(r.sources) for s in r.to]


def _mark_command(config: Config, db: Database, dry_run: bool) -> int:
    summary = mark_existing(config, db, dry_run=dry_run)
    if dry_run:
        print(
            f"would mark {summary.files} file(s) ({summary.steps} destination step(s)) as "
            f"already dispatched: {summary.new} destination step(s) would be recorded, "
            f"{summary.steps - summary.new} were recorded before; "
            f"{summary.unmatched} file(s) match no rule"
        )
        return 0
    print(
        f"marked {summary.files} file(s) as already dispatched: {summary.new} destination "
        f"step(s) recorded, {summary.steps - summary.new} were recorded before; "
        f"{summary.unmatched} file(s) match no rule"
    )
    consuming = [s.key for s in config.sources if fate(s, _steps_of(config, s)) in GOES]
    if consuming and summary.files:
        print(
            f"note: source(s) {', '.join(consuming)} consume their files once sent (after: "
            "delete/move, or a mode: move destination); marked files were never sent, so they "
            "are kept unless a run is given --consume-marked"
        )
    return 0
