"""History queries for the API: query-string parameters -> validated journal queries, and
the journal's typed rows -> JSON.

No SQL here: a filter names a journal column (from the whitelists below) and a value, and the
journal builds the statement. A bad parameter raises ``BadParameter`` naming it (the views
answer 400).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from multidict import MultiMapping

from ..config import STEP_KINDS
from ..journal import Column, Condition, Detail, Entry, PageQuery, SortKey, StatsGroup
from ..models import Status
from ..reporting import PERIODS, Period, human_size, period_label, period_start

UTC = dt.UTC
DAY = 86400.0
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
MAX_OFFSET = 1_000_000_000
MAX_INT = 2**63 - 1
PROTOCOLS = STEP_KINDS

#: the default window of /stats when no ``created`` bound is given: the current period and
#: this many days before it (then aligned to the start of its week or month)
DEFAULT_WINDOW = {"day": 30, "week": 7 * 11, "month": 365}

Kind = Literal["enum", "text", "like", "int", "time", "ordering", "limit", "offset", "cursor"]


class BadParameter(Exception):
    """A query parameter the API cannot use; answered with a 400 naming it."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"{name}: {detail}")
        self.name = name
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Param:
    """One accepted query parameter; the OpenAPI document is generated from these too."""

    name: str
    kind: Kind
    description: str
    column: Column = "id"  #: the journal column a filter applies to
    op: str = "="  #: for int and time filters: "=", ">=" or "<="
    choices: tuple[str, ...] = ()


def _filters() -> tuple[Param, ...]:
    params = [
        Param(
            "status",
            "enum",
            "Only dispatches in this state.",
            "status",
            choices=tuple(s.value for s in Status),
        ),
        Param(
            "destination",
            "text",
            "Exact destination (as shown, credentials redacted).",
            "destination",
        ),
        Param("protocol", "enum", "Only this kind of destination.", "protocol", choices=PROTOCOLS),
        Param(
            "extension", "text", "File extension without the dot (case-insensitive).", "extension"
        ),
        Param(
            "filename", "like", "Part of the file name (case-insensitive for ASCII).", "filename"
        ),
        Param("source", "text", "Exact source name.", "source"),
        Param("rule", "text", "Exact rule name.", "rule"),
    ]
    for suffix, op, what in (
        ("", "=", "exactly"),
        ("__gte", ">=", "at least"),
        ("__lte", "<=", "at most"),
    ):
        params.append(
            Param(f"byte_size{suffix}", "int", f"File size in bytes, {what}.", "size", op)
        )
    params += [
        Param(
            "created",
            "time",
            "Created on this day (YYYY-MM-DD) or in this second "
            "(ISO 8601 date-time; without an offset it is UTC).",
            "created",
            "=",
        ),
        Param(
            "created__gte", "time", "Created at or after this date or date-time.", "created", ">="
        ),
        Param(
            "created__lte",
            "time",
            "Created at or before this date-time, or on or before this day.",
            "created",
            "<=",
        ),
    ]
    return tuple(params)


FILTERS: tuple[Param, ...] = _filters()

#: ordering field -> the journal column it sorts by (NULLs sort as -1 so cursors stay exact)
SORT_FIELDS: dict[str, Column] = {
    "created": "created",
    "finished": "finished",
    "byte_size": "size",
    "filename": "filename",
    "id": "id",
    "status": "status",
    "duration_ms": "duration_ms",
    "attempts": "attempts",
    "destination": "destination",
    "source": "source",
    "extension": "extension",
    "protocol": "protocol",
    "rule": "rule",
}
_TEXT_SORT = {"filename", "status", "destination", "source", "extension", "protocol", "rule"}

LIST_PARAMS: tuple[Param, ...] = (
    *FILTERS,
    Param(
        "ordering",
        "ordering",
        "Sort fields separated by commas, '-' for descending "
        f"(default -created). Fields: {', '.join(SORT_FIELDS)}.",
    ),
    Param("limit", "limit", f"Page size, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT})."),
    Param("offset", "offset", "Rows to skip (not with cursor)."),
    Param("cursor", "cursor", "Continue after the last row of a page: the value of `next`."),
)
STATS_PARAMS: tuple[Param, ...] = (
    Param("period", "enum", "Bucket size (default day).", choices=PERIODS),
    *FILTERS,
)

# --------------------------------------------------------------------------- values


def _single(query: MultiMapping[str], allowed: Mapping[str, Param]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name in query:
        if name not in allowed:
            raise BadParameter(name, f"unknown parameter; known: {', '.join(allowed)}")
        values = query.getall(name)
        if len(values) > 1:
            raise BadParameter(name, "given more than once")
        value = values[0]
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadParameter(name, "is not valid UTF-8") from None
        if value == "":
            raise BadParameter(name, "is empty")
        out[name] = value
    return out


_INT_RE = re.compile(r"[0-9]{1,19}")


def parse_int(name: str, text: str, low: int = 0, high: int = MAX_INT) -> int:
    """A whole number in ``[low, high]`` written with digits only."""
    if not _INT_RE.fullmatch(text):
        raise BadParameter(name, f"{text[:40]!r} is not a whole number of at most 19 digits")
    value = int(text)
    if not low <= value <= high:
        raise BadParameter(name, f"must be between {low} and {high}")
    return value


#: what ``created`` filters accept: a date, or an ISO 8601 date-time (offset optional)
TIME_PATTERN = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
    r"([Tt ][0-9]{2}:[0-9]{2}(:[0-9]{2}(\.[0-9]{1,9})?)?([Zz]|[+-][0-9]{2}:[0-9]{2})?)?"
)
_TIME_RE = re.compile(TIME_PATTERN)


def parse_time(name: str, text: str) -> tuple[float, bool]:
    """An ISO 8601 date or date-time -> (UTC timestamp, whether it was a bare date)."""
    if not _TIME_RE.fullmatch(text):
        raise BadParameter(
            name, f"{text[:40]!r} is not a date (2026-11-23) or an ISO 8601 date-time"
        )
    is_date = len(text) == 10
    norm = re.sub(r"(\.[0-9]{6})[0-9]+", r"\1", text.upper().replace(" ", "T"))
    try:
        when = dt.date.fromisoformat(norm) if is_date else dt.datetime.fromisoformat(norm)
    except ValueError as exc:
        raise BadParameter(name, f"{text[:40]!r} is not a valid date: {exc}") from None
    if isinstance(when, dt.datetime):
        moment = when if when.tzinfo else when.replace(tzinfo=UTC)
    else:
        moment = dt.datetime(when.year, when.month, when.day, tzinfo=UTC)
    try:
        return moment.timestamp(), is_date
    except (OverflowError, OSError, ValueError):
        raise BadParameter(name, f"{text[:40]!r} is out of range") from None


def choice(name: str, text: str, choices: Sequence[str]) -> str:
    """The one of ``choices`` that ``text`` names, in any case (``failed`` is ``FAILED``)."""
    for c in choices:
        if c.casefold() == text.casefold():
            return c
    raise BadParameter(name, f"{text[:40]!r} is not one of {', '.join(choices)}")


def _filter_conditions(p: Param, text: str) -> list[Condition]:
    col = p.column
    if p.kind == "enum":
        return [Condition(col, "=", choice(p.name, text, p.choices))]
    if p.kind == "text":
        value = text.lower().lstrip(".") if p.name == "extension" else text
        return [Condition(col, "=", value)]
    if p.kind == "like":
        return [Condition(col, "contains", text)]
    if p.kind == "int":
        return [
            Condition(
                col,
                ">=" if p.op == ">=" else "<=" if p.op == "<=" else "=",
                parse_int(p.name, text),
            )
        ]
    if p.kind == "time":
        start, is_date = parse_time(p.name, text)
        width = DAY if is_date else 1.0
        if p.op == "=":
            start = start if is_date else math.floor(start)
            return [Condition(col, ">=", start), Condition(col, "<", start + width)]
        if p.op == ">=":
            return [Condition(col, ">=", start)]
        if is_date:  # on or before that day: the whole day counts
            return [Condition(col, "<", start + DAY)]
        return [Condition(col, "<=", start)]
    raise AssertionError(p.kind)  # pragma: no cover


# --------------------------------------------------------------------------- /logs


@dataclass(slots=True)
class LogQuery:
    """A validated ``GET /api/v1/logs``."""

    conditions: list[Condition] = field(default_factory=list)
    ordering: str = "-created"
    keys: list[SortKey] = field(default_factory=list)
    limit: int = DEFAULT_LIMIT
    offset: int = 0
    after: list[Any] | None = None  #: the sort values of the last row of the previous page
    given: dict[str, str] = field(default_factory=dict)  #: the parameters as given

    def page(self) -> PageQuery:
        """The page to read (one row more than ``limit`` tells whether a next page exists)."""
        return PageQuery(self.conditions, self.keys, self.limit + 1, self.offset, self.after)

    def cursor_after(self, row: Entry) -> str:
        """The cursor for the page after the one ending with ``row``."""
        values = row.sort_values(self.keys)
        raw = json.dumps([self.ordering, values], separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def parse_ordering(text: str) -> list[SortKey]:
    keys: list[SortKey] = []
    for part in text.split(","):
        name = part
        desc = name.startswith("-")
        name = name.removeprefix("-")
        if name not in SORT_FIELDS:
            raise BadParameter(
                "ordering", f"{part[:40]!r} is not a sort field; use {', '.join(SORT_FIELDS)}"
            )
        column = SORT_FIELDS[name]
        if any(k.column == column for k in keys):
            continue
        keys.append(SortKey(column, desc))
        if column == "id":
            break
    if len(keys) > 4:
        raise BadParameter("ordering", "at most 4 fields")
    if keys[-1].column != "id":  # a unique last key makes the order total, so pages never overlap
        keys.append(SortKey("id", keys[-1].desc))
    return keys


def _decode_cursor(text: str, ordering: str, keys: list[SortKey]) -> list[Any]:
    bad = BadParameter("cursor", "not a cursor this API issued (take it from `next`)")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        given, values = json.loads(raw)
    except (binascii.Error, ValueError, TypeError):
        raise bad from None
    if given != ordering:
        raise BadParameter("cursor", f"made for ordering={given!r}, not {ordering!r}")
    if not isinstance(values, list) or len(values) != len(keys):
        raise bad
    for k, v in zip(keys, values, strict=True):
        if k.column in _TEXT_SORT:
            ok = isinstance(v, str)
        else:
            ok = isinstance(v, int | float) and not isinstance(v, bool) and abs(v) < 2**62
        if not ok:
            raise bad
    return values


def parse_log_query(query: MultiMapping[str]) -> LogQuery:
    """Validate the query string of ``GET /api/v1/logs``."""
    allowed = {p.name: p for p in LIST_PARAMS}
    given = _single(query, allowed)
    q = LogQuery(given=given)
    for name, text in given.items():
        p = allowed[name]
        if p.kind in ("enum", "text", "like", "int", "time"):
            q.conditions += _filter_conditions(p, text)
    q.ordering = given.get("ordering", "-created")
    q.keys = parse_ordering(q.ordering)
    if "limit" in given:
        q.limit = parse_int("limit", given["limit"], 1, MAX_LIMIT)
    if "offset" in given:
        q.offset = parse_int("offset", given["offset"], 0, MAX_OFFSET)
    if "cursor" in given:
        if "offset" in given:
            raise BadParameter("offset", "cannot be combined with cursor")
        q.after = _decode_cursor(given["cursor"], q.ordering, q.keys)
    return q


# --------------------------------------------------------------------------- /stats


@dataclass(slots=True)
class StatsQuery:
    """A validated ``GET /api/v1/stats``."""

    period: Period
    conditions: list[Condition]
    since: float | None  #: the window start when no ``created`` filter was given

    def filters(self) -> list[Condition]:
        """The conditions the journal applies, the default window included."""
        window = [Condition("created", ">=", self.since)] if self.since is not None else []
        return [*self.conditions, *window]


def parse_stats_query(query: MultiMapping[str], now: float) -> StatsQuery:
    """Validate the query string of ``GET /api/v1/stats``."""
    allowed = {p.name: p for p in STATS_PARAMS}
    given = _single(query, allowed)
    period = choice("period", given.pop("period", "day"), PERIODS)
    conditions: list[Condition] = []
    for name, text in given.items():
        conditions += _filter_conditions(allowed[name], text)
    since = None
    if not any(n.startswith("created") for n in given):
        # the period (reporting's one rule) holding the UTC day DEFAULT_WINDOW days back
        first = period_start(int((now - DEFAULT_WINDOW[period] * DAY) // DAY), cast(Period, period))
        since = dt.datetime(first.year, first.month, first.day, tzinfo=UTC).timestamp()
    return StatsQuery(cast(Period, period), conditions, since)


def _tally() -> dict[str, int]:
    return {"count": 0, "bytes": 0}


def _group() -> dict[str, Any]:
    return {**_tally(), "by_status": {}, "by_destination": {}, "by_extension": {}}


def _add(group: dict[str, Any], status: str, dest: str, ext: str, n: int, size: int) -> None:
    group["count"] += n
    group["bytes"] += size
    for key, value in (("by_status", status), ("by_destination", dest), ("by_extension", ext)):
        t = group[key].setdefault(value, _tally())
        t["count"] += n
        t["bytes"] += size


def rollup(rows: Iterable[StatsGroup], period: Period) -> dict[str, Any]:
    """The journal's stats groups -> per-period buckets and totals."""
    buckets: dict[dt.date, dict[str, Any]] = {}
    totals = _group()
    for row in rows:
        status, ext, n, size = row.status, row.extension, row.count, row.bytes
        start = period_start(row.day, period)
        group = buckets.get(start)
        if group is None:
            group = buckets[start] = {
                "start": start.isoformat(),
                "label": period_label(start, period),
                **_group(),
            }
        dest = redact_text(row.destination)
        _add(group, status, dest, ext, n, size)
        _add(totals, status, dest, ext, n, size)
    return {"results": [buckets[k] for k in sorted(buckets)], "totals": totals}


# --------------------------------------------------------------------------- JSON


_USERINFO_RE = re.compile(r"(?i)\b([a-z][a-z0-9+.\-]*://[^\s:/@]*):[^\s@/]+@")


def redact_text(text: str) -> str:
    """Hide a password in any URL in ``text`` (``ftp://bob:***@host``); the rest is kept."""
    return _USERINFO_RE.sub(r"\1:***@", text) if "@" in text else text


def _redacted(value: str | None) -> str | None:
    return None if value is None else redact_text(value)


def iso(ts: float | None) -> str | None:
    """A journal timestamp as ISO 8601 UTC with milliseconds (``2026-11-23T07:41:43.120Z``)."""
    if ts is None:
        return None
    moment = dt.datetime.fromtimestamp(ts, UTC)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def entry(row: Entry) -> dict[str, Any]:
    """One history row as the API shows it."""
    return {
        "id": row.id,
        "created": iso(row.created),
        "finished": iso(row.finished),
        "created_ts": row.created,
        "finished_ts": row.finished,
        "filename": row.filename,
        "source": row.source,
        "destination": redact_text(row.destination),
        "extension": row.extension,
        "protocol": row.protocol,
        "rule": row.rule,
        "status": row.status,
        "attempts": row.attempts,
        "byte_size": row.size,
        "size": human_size(row.size),
        "duration_ms": row.duration_ms,
        "reason": _redacted(row.reason),
        "sha256": row.sha256,
        "mtime": iso(row.mtime_ns / 1e9),
        "mtime_ns": row.mtime_ns,
        "btime": None if row.btime_ns is None else iso(row.btime_ns / 1e9),
        "btime_ns": row.btime_ns,
        "label": row.label,
        # recorded by mark-existing as already there: SUCCEEDED, but never sent
        "marked": row.status == Status.SUCCEEDED and row.attempts == 0,
    }


def detail(row: Detail) -> dict[str, Any]:
    """One row as the detail view shows it: the entry and what the detail view adds."""
    waiting = row.next_attempt and row.status == Status.PENDING
    return {
        **entry(row),
        "relpath": row.relpath,
        "step": row.step,
        "location": _redacted(row.location),
        "detail": _redacted(row.detail),
        "error_type": row.error_type,
        "started": iso(row.started),
        "started_ts": row.started,
        "next_attempt": iso(row.next_attempt) if waiting else None,
        "node": row.node,
    }
