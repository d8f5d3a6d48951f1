"""The narrow status interface a running service lends its observers: the web app, the
console and the progress report. They read a snapshot and ask for a few actions through it;
none of them holds the ``Service`` (so none imports ``service.py``: the data flows one way).
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import __version__
from .controls import window_state
from .recovery import RetryAnswer

if TYPE_CHECKING:
    from .cluster import Membership, SharedWatcher
    from .config import Step
    from .dispatcher import Dispatcher
    from .journal import Journal, PostgresTarget
    from .watcher import SourceWatcher


def _never_scanned() -> bool:
    return False


def _no_secrets() -> Collection[str]:
    return ()


def _cannot() -> int:
    raise RuntimeError("this link cannot pause or resume the service")


@dataclass(frozen=True, slots=True)
class ServiceLink:
    """What the running service lends the web app, the console and the progress report."""

    #: a snapshot: version, uptime_s, paused, journal, sources (with ``skipped``), in_flight,
    #: stopped_sources, destinations (``Service.status``; times in seconds, sizes in bytes)
    status: Callable[[], Mapping[str, Any]]
    #: tell the dispatcher to look for due work now (after a retry)
    wake: Callable[[], None]
    #: send a FAILED dispatch again or say why not (None: only re-queue it in the journal)
    retry: Callable[[int], Awaitable[RetryAnswer]] | None = None
    #: stop taking new work; returns how many deliveries are still in flight (they finish)
    pause: Callable[[], int] = _cannot
    #: take new work again; returns how many deliveries are in flight
    resume: Callable[[], int] = _cannot
    #: whether every source's start-up scan is done (the backlog is then all planned)
    scanned: Callable[[], bool] = _never_scanned
    #: the secrets of the config in force, to mask in what is shown
    secrets: Callable[[], Collection[str]] = _no_secrets


def status_snapshot(
    *,
    started_at: float,
    db_path: Path | PostgresTarget,
    journal: Journal,
    membership: Membership,
    watchers: Sequence[SourceWatcher | SharedWatcher],
    dispatcher: Dispatcher,
    steps: Iterable[Step],
) -> dict[str, object]:
    """What ``ServiceLink.status`` returns, from the running service's parts: ``uptime_s`` in
    seconds since ``started_at`` (Unix time, seconds), the journal's health, this node, each
    source's watcher, the deliveries in flight, each destination's counts (``bytes`` sent)
    and each destination with a ``window`` (open now or, in Unix seconds, when it opens)."""
    d = dispatcher
    health = journal.health
    return {
        "version": __version__,
        "uptime_s": round(time.time() - started_at, 1),
        "paused": d.paused or not health.ok,
        "pause_reason": "journal" if not health.ok else "operator" if d.paused else None,
        "journal": {"path": str(db_path), **health.as_dict()},
        "node": {
            "name": membership.name,
            "alive": membership.alive.held.is_set(),
            "lease_s": membership.lease_s,
            "leases_lost": membership.lost,
        },
        "sources": [
            {
                "name": w.config.key,
                "path": str(w.root),
                "polling": w.polling,
                "shared": w.config.shared,
                "listing": getattr(w, "listing", True),
                "ready": w.ready.is_set(),
                "last_error": w.last_error,
                "skipped": dict(w.skipped),
            }
            for w in watchers
        ],
        "in_flight": d.running,
        "stopped_sources": sorted(d.stopped_sources),
        "windows": [asdict(w) for w in window_state(steps)],
        "destinations": {
            name: {
                "succeeded": s.succeeded,
                "failed": s.failed,
                "retried": s.retried,
                "bytes": s.bytes,
                "last_error": s.last_error,
            }
            for name, s in sorted(d.stats.items())
        },
    }
