"""The narrow status interface a running service lends its observers: the web app, the
console and the progress report. They read a snapshot and ask for a few actions through it;
none of them holds the ``Service`` (so none imports ``service.py``: the data flows one way).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from .recovery import RetryAnswer


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
