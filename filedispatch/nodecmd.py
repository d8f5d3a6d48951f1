"""The command line's view of the nodes sharing a journal: ``nodes`` (list them), ``nodes
hand-over`` (give a dead node's unshared work to another) and ``check --connect``.

No SQL here (the journal's ``probe`` and ``hand_over`` hold it); nothing here sends a file.
The password is never printed: messages name the journal by its URL, which holds none.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TextIO

from .cluster import describe_node, node_name
from .config import Config
from .errors import ConfigError, JournalError
from .journal import PostgresTarget, Probe, journal_path, open_journal, probe
from .textsafe import escape


def _say(line: str, file: TextIO | None = None) -> None:
    print(escape(line), file=file or sys.stdout)


def list_nodes(config: Config) -> int:
    """Print each node on record: alive or since when dead, its work in flight and the work only
    it may run (exit 0). Raises JournalError when the journal cannot be reached."""
    database = journal_path(config)
    if not isinstance(database, PostgresTarget):
        _say(
            f"journal: {database} (SQLite): one implicit node, this service "
            f"({node_name(config)}); nodes are several only on a PostgreSQL journal"
        )
        return 0
    found = probe(database)
    _say(f"journal: {found.where}")
    _nodes(found, node_name(config))
    return 0


def _nodes(found: Probe, mine: str, indent: str = "") -> None:
    if not found.nodes:
        _say(f"{indent}nodes: none on record")
        return
    _say(f"{indent}nodes:")
    for n in found.nodes:
        _say(f"{indent}  {describe_node(n)}")
        if not n.alive and n.waiting and n.name != mine:
            _say(
                f"{indent}    its {n.waiting} waiting row(s) run only on node {n.name}: start "
                f"it again, or give them to another node (filedispatch nodes hand-over "
                f"{n.name} --to NEW)"
            )


def hand_over(config: Config, where: str, old: str, new: str | None) -> int:
    """Give node ``old``'s unshared work (PENDING and IN_PROGRESS rows) to ``new`` (default:
    this config's node name) and forget ``old``; exit 0. Raises ConfigError (exit 2) when the
    two names are one, NodeConflictError (exit 1) while ``old`` is alive, NotFound (exit 1)
    when the journal knows neither the node nor work of its name, JournalError (exit 1) when
    the journal cannot be reached or is an SQLite file."""
    new = new or node_name(config)
    database = journal_path(config)
    if not isinstance(database, PostgresTarget):
        raise JournalError(
            f"the journal {database} is an SQLite file, used by one service only: its work is "
            "that service's whatever its node name, and there is nothing to hand over"
        )
    if new == old:
        raise ConfigError(
            where, [f"nodes hand-over: {old!r} would be handed over to itself: give --to NEW"]
        )

    async def run() -> int:
        async with open_journal(database, hold=False) as journal:
            return await journal.hand_over(old, new)

    moved = asyncio.run(run())
    _say(
        f"node {old}: {moved} row(s) handed over to node {new}, which runs them (once it "
        f"runs); node {old} is forgotten"
    )
    return 0


def connect_report(config: Config) -> int:
    """``check --connect``: open the journal as the service would and say what it found; 0
    when a service could start on it, 1 with the reasons (on stderr) otherwise. Raises
    JournalError (one line, exit 1) when it cannot be reached."""
    database = journal_path(config)
    found = probe(database)
    mine = node_name(config)
    if found.server is not None:
        _say(f"journal: connected to {found.where} (PostgreSQL {found.server})")
    else:
        can = "writable" if found.writable else "cannot be written by this user"
        _say(f"journal: {found.where} (SQLite, {can})")
    if found.schema is None:
        _say("  schema: none yet; the first service to start creates it")
    else:
        state = "current" if found.schema == found.newest else f"this filedispatch: {found.newest}"
        _say(f"  schema: version {found.schema} ({state})")
    if found.server is not None:
        if found.resolves_lost_commits:
            _say("  lost commit answers: resolved (PostgreSQL 13 or later: pg_xact_status)")
        else:
            _say(
                "  lost commit answers: not resolved (PostgreSQL before 13 has no "
                "pg_xact_status): a batch whose COMMIT answer is lost is run again"
            )
        _nodes(found, mine, "  ")
        held = any(n.alive and n.name == mine for n in found.nodes)
        _say(
            f"  node name {mine!r}: "
            + ("held by a live node now" if held else "free (no live node holds it)")
        )
    problems = found.problems()
    for problem in problems:
        _say(f"filedispatch: {problem}", sys.stderr)
    return 1 if problems else 0
