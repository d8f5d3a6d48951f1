"""History from the command line (dirsend's list/forget/store-only): list, show, retry, forget,
stats, mark-existing.

Reads go through a read-only SQLite connection, safe while a service writes the journal (WAL);
writes go through ``Journal``. Nothing here sends a file; only ``retry`` moves one, back from
``failed_dir`` into its source (see recovery.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from . import recovery
from .config import Config, SourceConfig
from .config import scrub as scrub_secrets
from .content import facts_for
from .errors import JournalError
from .journal import COLUMNS, Journal, PlannedStep, number, planned_steps
from .learn import Learned, learned_models
from .models import FileVersion, Status
from .progress import Progress
from .recovery import RetryAnswer
from .reporting import Period, day_sql, human_size, period_label, period_start
from .router import Chain, Router
from .textsafe import escape

BATCH = 500


class NotFound(JournalError):
    """The id or path names nothing in the journal."""


def connect_ro(path: Path) -> sqlite3.Connection:
    """A read-only connection (it never blocks or changes a running service's journal)."""
    if not path.exists():
        raise JournalError(f"no journal at {path}")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        conn.execute("SELECT 1 FROM dispatches LIMIT 1")
    except sqlite3.Error as exc:
        raise JournalError(f"cannot read the journal {path}: {exc}") from exc
    return conn


def _query(path: Path, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
    conn = connect_ro(path)
    try:
        rows = [dict(r) for r in conn.execute(sql, params)]
    except sqlite3.Error as exc:
        raise JournalError(f"journal read failed: {exc}") from exc
    finally:
        conn.close()
    for row in rows:  # a stat number too large for SQLite is kept in a BLOB (journal._int64)
        for key in _STAT_NUMBERS.intersection(row):
            row[key] = number(row[key])
    return rows


_STAT_NUMBERS = frozenset({"mtime_ns", "dev", "ino", "ctime_ns"})


# ---------------------------------------------------------------------------- reading


#: a SUCCEEDED row no attempt made: recorded by mark-existing, never sent (see Dispatch.marked)
MARKED_SQL = "(status='SUCCEEDED' AND attempts=0) AS marked"


def _with_marked(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for r in rows:
        r["marked"] = bool(r["marked"])
    return rows


def list_rows(path: Path, status: str | None = None, limit: int = 20) -> list[dict[str, Any]]:
    """The newest ``limit`` rows (optionally of one status), newest first."""
    where, params = ("WHERE status=?", [status]) if status else ("", [])
    return _with_marked(
        _query(
            path,
            f"SELECT {COLUMNS}, {MARKED_SQL} FROM dispatches {where} ORDER BY id DESC LIMIT ?",
            [*params, limit],
        )
    )


def get_row(path: Path, dispatch_id: int) -> dict[str, Any]:
    rows = _query(path, f"SELECT {COLUMNS}, {MARKED_SQL} FROM dispatches WHERE id=?", [dispatch_id])
    if not rows:
        raise NotFound(f"no dispatch with id {dispatch_id} in {path}")
    return _with_marked(rows)[0]


def stats(path: Path, period: Period = "day") -> list[dict[str, Any]]:
    """Per day, ISO 8601 week (``2026-W49``) or month, by the local date a dispatch finished
    (or was recorded, while it waits): ``period``, ``succeeded``, ``failed``, ``waiting``
    and ``bytes`` (sent, an int), oldest period first."""
    days = _query(
        path,
        f"SELECT {day_sql('COALESCE(finished, created)', local=True)} AS day, "
        "SUM(status='SUCCEEDED') AS succeeded, SUM(status='FAILED') AS failed, "
        "SUM(status IN ('PENDING', 'IN_PROGRESS')) AS waiting, "
        "SUM(CASE WHEN status='SUCCEEDED' THEN size ELSE 0 END) AS bytes "
        "FROM dispatches GROUP BY day ORDER BY day",
        [],
    )
    periods: dict[str, dict[str, Any]] = {}
    for row in days:
        key = period_label(period_start(int(row.pop("day")), period), period)
        into = periods.setdefault(
            key, {"period": key, "succeeded": 0, "failed": 0, "waiting": 0, "bytes": 0}
        )
        for name, value in row.items():
            into[name] += value or 0
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
        else:
            value = shown(value, secrets)
        out.append(f"{key + ':':<13} {value}")
    return "\n".join(out)


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


def forget(path: Path, dispatch_id: int | None = None, file: str | None = None) -> int:
    """Delete history so the file is sent again (at the next rescan or start); rows removed.

    ``file`` is a path relative to its source, or an absolute path inside one.
    """
    if not path.exists():
        raise JournalError(f"no journal at {path}")
    if dispatch_id is not None:
        row = get_row(path, dispatch_id)
        if row["status"] == Status.IN_PROGRESS:
            raise JournalError(f"dispatch {dispatch_id} is being sent now; try once it finishes")
        return asyncio.run(_forget(path, [(None, None, dispatch_id)]))
    assert file is not None
    absolute = str(Path(file).expanduser().absolute())
    found = _query(
        path,
        "SELECT DISTINCT source, relpath FROM dispatches WHERE relpath=? "
        "OR root || '/' || relpath = ?",
        [file, absolute],
    )
    if not found:
        raise NotFound(f"nothing is recorded for {file} in {path}")
    return asyncio.run(_forget(path, [(r["source"], r["relpath"], None) for r in found]))


async def _forget(path: Path, targets: list[tuple[str | None, str | None, int | None]]) -> int:
    removed = 0
    async with Journal.open(path, hold=False) as journal:
        for source, relpath, dispatch_id in targets:
            if dispatch_id is not None:
                removed += await journal.forget(dispatch_id)
            else:
                removed += await journal.forget(source=source, relpath=relpath)
    return removed


# ---------------------------------------------------------------------------- retry


def retry_targets(path: Path, dispatch_id: int | None, file: str | None) -> list[int]:
    """The FAILED rows to retry: one id; a file's (relative or absolute path); or every one.
    Per version and rule, its first FAILED step (retrying it re-queues the later ones)."""
    if dispatch_id is not None:
        get_row(path, dispatch_id)  # NotFound names the id
        return [dispatch_id]
    where, params = "status='FAILED'", []
    if file is not None:
        absolute = str(Path(file).expanduser().absolute())
        where += " AND (relpath=? OR root || '/' || relpath = ?)"
        params = [file, absolute]
    rows = _query(
        path,
        f"SELECT MIN(id) AS id FROM dispatches WHERE {where} AND step = (SELECT MIN(step) "
        "FROM dispatches d WHERE d.vkey=dispatches.vkey AND d.rule=dispatches.rule "
        "AND d.status='FAILED') GROUP BY vkey, rule ORDER BY MIN(id)",
        params,
    )
    if file is not None and not rows:
        raise NotFound(f"no FAILED dispatch of {file} in {path}")
    return [r["id"] for r in rows]


async def _retry(
    path: Path, ids: list[int], sources: dict[str, SourceConfig] | None
) -> list[RetryAnswer]:
    answers: list[RetryAnswer] = []
    restored: set[Path] = set()
    async with Journal.open(path) as journal:
        for dispatch_id in ids:
            answer = await recovery.retry(journal, sources, dispatch_id)
            if answer.restored is not None and answer.restored in restored:
                continue
            if answer.restored is not None:
                restored.add(answer.restored)
            answers.append(answer)
    return answers


def _retry_command(args: argparse.Namespace, db: Path, config: Config | None) -> int:
    if not db.exists():
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
        for rel, st in sorted(watcher.walk(), key=lambda item: item[0]):
            yield source, FileVersion.from_stat(source.key, source.path, rel, st)


def _route(router: Router, version: FileVersion, learned: Learned | None) -> list[Chain]:
    return router.route(version, facts_for(router, version, learned=learned))


def mark_existing(
    config: Config, db: Path, *, dry_run: bool = False, out: TextIO | None = None
) -> MarkSummary:
    """Record the files present now as dispatched to every destination their rules name,
    without sending them (dirsend's ``--store-only``). ``dry_run`` prints and writes nothing.
    """
    with learned_models(config, store=not dry_run) as learned:
        return _mark_existing(config, db, dry_run, out or sys.stdout, learned)


def _mark_existing(
    config: Config, db: Path, dry_run: bool, out: TextIO, learned: Learned | None
) -> MarkSummary:
    files = list(existing(config))
    router = Router(config)
    summary = MarkSummary()
    if dry_run:
        for _, version in files:
            chains = _route(router, version, learned)
            if not chains:
                summary.unmatched += 1
                continue
            summary.files += 1
            for step in planned_steps(version, chains):
                summary.steps += 1
                line = f"{version.source}/{version.relpath} -> {step.destination}"
                print(escape(line), file=out)
        return summary
    from .service import journal_lock

    with journal_lock(db):  # a running service would send them meanwhile: refuse
        asyncio.run(_mark(router, db, files, summary, learned))
    return summary


async def _mark(
    router: Router,
    db: Path,
    files: list[tuple[SourceConfig, FileVersion]],
    summary: MarkSummary,
    learned: Learned | None,
) -> None:
    async with Journal.open(db, hold=False) as journal:
        with Progress("mark-existing", total=len(files)) as progress:
            for start in range(0, len(files), BATCH):
                steps: list[PlannedStep] = []
                for _, version in files[start : start + BATCH]:
                    chains = _route(router, version, learned)
                    if not chains:
                        summary.unmatched += 1
                        continue
                    summary.files += 1
                    steps += planned_steps(version, chains)
                summary.steps += len(steps)
                summary.new += await journal.mark_done(steps) if steps else 0
                progress.update(min(start + BATCH, len(files)))
            progress.close()


# ---------------------------------------------------------------------------- the CLI's entry


def run_command(args: argparse.Namespace, config: Config | None) -> int:
    """``filedispatch history ...`` and ``mark-existing``; the exit status (1: not found)."""
    from .config import secrets_of
    from .journal import default_path
    from .service import Options, journal_path

    db = args.sub_db or args.db
    options = Options(db=db)
    if config is not None:
        db = journal_path(config, options)
    db = (db or default_path()).expanduser().absolute()
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


def _history_command(args: argparse.Namespace, db: Path, secrets: list[str]) -> int:
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


def _mark_command(config: Config, db: Path, dry_run: bool) -> int:
    summary = mark_existing(config, db, dry_run=dry_run)
    if dry_run:
        print(
            f"would mark {summary.files} file(s) ({summary.steps} destination step(s)) as "
            f"already dispatched; {summary.unmatched} file(s) match no rule"
        )
        return 0
    print(
        f"marked {summary.files} file(s) as already dispatched: {summary.new} destination "
        f"step(s) recorded, {summary.steps - summary.new} were recorded before; "
        f"{summary.unmatched} file(s) match no rule"
    )
    consuming = [s.key for s in config.sources if s.after != "keep"]
    if consuming and summary.files:
        print(
            f"note: source(s) {', '.join(consuming)} have after: delete/move; marked files "
            "were never sent, so they are kept unless a run is given --consume-marked"
        )
    return 0
