"""GET /metrics: the Prometheus text format, written by hand.

Counters cover dispatches *finished since the web app started*, read incrementally from the
journal by their ``finished`` time (an index makes each scrape cost only the new rows); gauges
come from the journal and the service's snapshot. Never writes anything.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from ..journal import JournalReader
from .queries import redact_text

#: histogram buckets of delivery durations, in milliseconds
BUCKETS_MS = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10_000, 30_000, 60_000, 300_000)
#: a finish is counted once it is this old, so a commit still in flight is never skipped
LAG_S = 2.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass
class _Tally:
    count: int = 0
    bytes: int = 0


@dataclass
class _Histogram:
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS_MS))
    count: int = 0
    total_ms: float = 0.0


class Outcomes:
    """Running totals of finished dispatches, caught up from the journal at each scrape."""

    def __init__(self, since: float | None = None) -> None:
        self.mark = time.time() if since is None else since
        self.tallies: dict[tuple[str, str], _Tally] = defaultdict(_Tally)
        self.durations: dict[str, _Histogram] = defaultdict(_Histogram)
        self._lock = asyncio.Lock()

    async def catch_up(self, reader: JournalReader, now: float) -> None:
        async with self._lock:
            upto = now - LAG_S
            if upto <= self.mark:
                return
            for row in await reader.outcomes(self.mark, upto, BUCKETS_MS):
                dest = redact_text(row.destination)
                tally = self.tallies[(dest, row.status)]
                tally.count += row.count
                tally.bytes += row.bytes
                hist = self.durations[dest]
                hist.count += row.timed
                hist.total_ms += row.total_ms
                hist.buckets = [a + b for a, b in zip(hist.buckets, row.within, strict=True)]
            self.mark = upto


outcomes_key = web.AppKey("outcomes", Outcomes)


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(**labels: str) -> str:
    return "{" + ",".join(f'{k}="{_label(v)}"' for k, v in labels.items()) + "}"


class _Doc:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_: str) -> None:
        self.lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        text = repr(float(value)) if isinstance(value, float) else str(value)
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {text}")

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render(status: Mapping[str, Any], counts: Iterable[tuple[str, int]], outcomes: Outcomes) -> str:
    """The exposition text from a service snapshot, journal counts and the running totals."""
    doc = _Doc()
    node = dict(status.get("node") or {})
    name = str(node.get("name", ""))
    doc.family("filedispatch_info", "gauge", "The running filedispatch, by version and node.")
    doc.sample("filedispatch_info", 1, version=str(status.get("version", "")), node=name)
    doc.family(
        "filedispatch_node_lease_held",
        "gauge",
        "1 while this node holds its lease (always with SQLite); 0: it delivers nothing.",
    )
    doc.sample("filedispatch_node_lease_held", int(bool(node.get("alive", True))), node=name)
    doc.family("filedispatch_uptime_seconds", "gauge", "Seconds since the service started.")
    doc.sample("filedispatch_uptime_seconds", float(status.get("uptime_s", 0.0)))
    journal = dict(status.get("journal") or {})
    doc.family(
        "filedispatch_journal_writable",
        "gauge",
        "1 while the journal takes writes; 0 while it fails (intake and delivery paused).",
    )
    doc.sample("filedispatch_journal_writable", int(journal.get("state", "ok") == "ok"))
    by_status = dict(counts)
    doc.family("filedispatch_queue_depth", "gauge", "Dispatches waiting (PENDING journal rows).")
    doc.sample("filedispatch_queue_depth", by_status.get("PENDING", 0))
    doc.family("filedispatch_in_flight", "gauge", "Deliveries running now.")
    doc.sample("filedispatch_in_flight", int(status.get("in_flight", 0)))
    doc.family("filedispatch_journal_dispatches", "gauge", "Journal rows by status.")
    for name in ("PENDING", "IN_PROGRESS", "SUCCEEDED", "FAILED"):
        doc.sample("filedispatch_journal_dispatches", by_status.get(name, 0), status=name)
    tallies = sorted(outcomes.tallies.items())
    for name, attr, help_ in (
        (
            "filedispatch_dispatches_total",
            "count",
            "Dispatches finished since the web app started, by destination and final status.",
        ),
        (
            "filedispatch_bytes_total",
            "bytes",
            "Bytes of the files in those dispatches, by destination and final status.",
        ),
    ):
        doc.family(name, "counter", help_)
        for (dest, st), tally in tallies:
            doc.sample(name, getattr(tally, attr), destination=dest, status=st)
    doc.family(
        "filedispatch_retries_total",
        "counter",
        "Attempts that failed and were scheduled again since the service started.",
    )
    for dest, stats in sorted(dict(status.get("destinations", {})).items()):
        doc.sample(
            "filedispatch_retries_total",
            int(stats.get("retried", 0)),
            destination=redact_text(dest),
        )
    name = "filedispatch_dispatch_duration_seconds"
    doc.family(name, "histogram", "How long one delivery attempt took (journal duration_ms).")
    for dest, hist in sorted(outcomes.durations.items()):
        for bound, n in zip(BUCKETS_MS, hist.buckets, strict=True):
            doc.sample(f"{name}_bucket", n, destination=dest, le=f"{bound / 1000:g}")
        doc.sample(f"{name}_bucket", hist.count, destination=dest, le="+Inf")
        doc.sample(f"{name}_sum", hist.total_ms / 1000, destination=dest)
        doc.sample(f"{name}_count", hist.count, destination=dest)
    return doc.text()
