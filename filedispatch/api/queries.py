"""History queries for the API: query-string parameters -> validated values -> SQL and JSON.

Every SQL text here is assembled only from the whitelists below; every value is a bound
parameter. A bad parameter raises ``BadParameter`` naming it (the views answer 400).
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

from ..models import Status
from ..reporting import PERIODS, Period, day_sql, human_size, period_label, period_start

UTC = dt.UTC
DAY = 86400.0
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
MAX_OFFSET = 1_000_000_000
MAX_INT = 2**63 - 1
PROTOCOLS = ("file", "http", "ftp", "sftp", "command", "python", "compress")

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
    column: str = ""  #: the journal column a filter applies to
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

#: ordering field -> the SQL expression it sorts by (NULLs sort as -1 so cursors stay exact)
SORT_FIELDS: dict[str, str] = {
    "created": "created",
    "finished": "IFNULL(finished, -1)",
    "byte_size": "size",
    "filename": "filename",
    "id": "id",
    "status": "status",
    "duration_ms": "IFNULL(duration_ms, -1)",
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

ENTRY_SQL = (
    "id, created, finished, filename, source, destination, extension, protocol, rule, status, "
    "attempts, size, duration_ms, reason, sha256, mtime_ns, label"
)
DETAIL_SQL = ENTRY_SQL + ", relpath, step, location, detail, error_type, started, next_attempt"


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


Condition = tuple[str, Any]  # "column op ?" and the value bound to it


def choice(name: str, text: str, choices: Sequence[str]) -> str:
    """The one of ``choices`` that ``text`` names, in any case (``failed`` is ``FAILED``)."""
    for c in choices:
        if c.casefold() == text.casefold():
            return c
    raise BadParameter(name, f"{text[:40]!r} is not one of {', '.join(choices)}")


def _filter_conditions(p: Param, text: str) -> list[Condition]:
    if p.kind == "enum":
        return [(f"{p.column} = ?", choice(p.name, text, p.choices))]
    if p.kind == "text":
        value = text.lower().lstrip(".") if p.name == "extension" else text
        return [(f"{p.column} = ?", value)]
    if p.kind == "like":
        escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        return [(f"{p.column} LIKE ? ESCAPE '\\'", f"%{escaped}%")]
    if p.kind == "int":
        return [(f"{p.column} {p.op} ?", parse_int(p.name, text))]
    if p.kind == "time":
        start, is_date = parse_time(p.name, text)
        width = DAY if is_date else 1.0
        if p.op == "=":
            start = start if is_date else math.floor(start)
            return [(f"{p.column} >= ?", start), (f"{p.column} < ?", start + width)]
        if p.op == ">=":
            return [(f"{p.column} >= ?", start)]
        if is_date:  # on or before that day: the whole day counts
            return [(f"{p.column} < ?", start + DAY)]
        return [(f"{p.column} <= ?", start)]
    raise AssertionError(p.kind)  # pragma: no cover


def _where(conditions: Sequence[Condition]) -> tuple[str, list[Any]]:
    if not conditions:
        return "", []
    return " WHERE " + " AND ".join(c for c, _ in conditions), [v for _, v in conditions]


# --------------------------------------------------------------------------- /logs


@dataclass(frozen=True, slots=True)
class SortKey:
    name: str
    desc: bool

    @property
    def expr(self) -> str:
        return SORT_FIELDS[self.name]


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

    def count_sql(self) -> tuple[str, list[Any]]:
        where, params = _where(self.conditions)
        return f"SELECT COUNT(*) FROM dispatches{where}", params

    def page_sql(self) -> tuple[str, list[Any]]:
        """Rows of the page (one more than ``limit`` tells whether a next page exists)."""
        where, values = _where(self.conditions)
        if self.after is not None:
            seek, seek_values = self._seek()
            where = f"{where} AND {seek}" if where else f" WHERE {seek}"
            values += seek_values
        order = ", ".join(f"{k.expr} {'DESC' if k.desc else 'ASC'}" for k in self.keys)
        extra = ", ".join(k.expr for k in self.keys)
        sql = (
            f"SELECT {ENTRY_SQL}, {extra} FROM dispatches{where} ORDER BY {order} LIMIT ? OFFSET ?"
        )
        return sql, [*values, self.limit + 1, self.offset]

    def _seek(self) -> tuple[str, list[Any]]:
        """Rows strictly after ``after`` in the sort order (keyset pagination)."""
        assert self.after is not None
        keys, after = self.keys, self.after
        if all(k.desc == keys[0].desc for k in keys):
            cols = ", ".join(k.expr for k in keys)
            marks = ", ".join("?" * len(keys))
            return f"({cols}) {'<' if keys[0].desc else '>'} ({marks})", list(after)
        parts, params = [], []
        for i, k in enumerate(keys):
            eq = [f"{p.expr} = ?" for p in keys[:i]]
            parts.append("(" + " AND ".join([*eq, f"{k.expr} {'<' if k.desc else '>'} ?"]) + ")")
            params += [*after[:i], after[i]]
        return "(" + " OR ".join(parts) + ")", params

    def cursor_after(self, row: Sequence[Any]) -> str:
        """The cursor for the page after the one ending with ``row`` (a page_sql row)."""
        values = list(row[-len(self.keys) :])
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
        if any(k.name == name for k in keys):
            continue
        keys.append(SortKey(name, desc))
        if name == "id":
            break
    if len(keys) > 4:
        raise BadParameter("ordering", "at most 4 fields")
    if keys[-1].name != "id":  # a unique last key makes the order total, so pages never overlap
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
        if k.name in _TEXT_SORT:
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


_DAY_SQL = day_sql("created")
#: the period a row falls in, as a day number (UTC): the day itself, its Monday (1970-01-01
#: was a Thursday); months are grouped by day here and folded by ``period_start``, which costs
#: less than SQLite's strftime() on every row
_BUCKET_SQL: dict[str, str] = {
    "day": _DAY_SQL,
    "week": f"{_DAY_SQL} - ({_DAY_SQL} + 3) % 7",
    "month": _DAY_SQL,
}


@dataclass(slots=True)
class StatsQuery:
    """A validated ``GET /api/v1/stats``."""

    period: Period
    conditions: list[Condition]
    since: float | None  #: the window start when no ``created`` filter was given

    def sql(self) -> tuple[str, list[Any]]:
        conditions = list(self.conditions)
        if self.since is not None:
            conditions.append(("created >= ?", self.since))
        where, params = _where(conditions)
        return (
            f"SELECT {_BUCKET_SQL[self.period]} AS bucket, status, destination, extension, "
            f"COUNT(*), TOTAL(size) FROM dispatches{where} "
            "GROUP BY bucket, status, destination, extension",
            params,
        )


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
        first = dt.datetime.fromtimestamp(now - DEFAULT_WINDOW[period] * DAY, UTC).date()
        if period == "week":
            first -= dt.timedelta(days=first.weekday())
        elif period == "month":
            first = first.replace(day=1)
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


def rollup(rows: Iterable[Sequence[Any]], period: Period) -> dict[str, Any]:
    """Groups from ``StatsQuery.sql`` -> per-period buckets and totals."""
    buckets: dict[dt.date, dict[str, Any]] = {}
    totals = _group()
    for day, status, dest, ext, n, size in rows:
        start = period_start(int(day), period)
        group = buckets.get(start)
        if group is None:
            group = buckets[start] = {
                "start": start.isoformat(),
                "label": period_label(start, period),
                **_group(),
            }
        dest = redact_text(dest)
        _add(group, status, dest, ext, int(n), int(size))
        _add(totals, status, dest, ext, int(n), int(size))
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


def entry(row: Sequence[Any]) -> dict[str, Any]:
    """One ``ENTRY_SQL`` row as the API shows it."""
    (
        id_,
        created,
        finished,
        filename,
        source,
        destination,
        extension,
        protocol,
        rule,
        status,
        attempts,
        size,
        duration_ms,
        reason,
        sha256,
        mtime_ns,
        label,
    ) = row[:17]
    return {
        "id": id_,
        "created": iso(created),
        "finished": iso(finished),
        "created_ts": created,
        "finished_ts": finished,
        "filename": filename,
        "source": source,
        "destination": redact_text(destination),
        "extension": extension,
        "protocol": protocol,
        "rule": rule,
        "status": status,
        "attempts": attempts,
        "byte_size": size,
        "size": human_size(size),
        "duration_ms": duration_ms,
        "reason": _redacted(reason),
        "sha256": sha256,
        "mtime": iso(mtime_ns / 1e9),
        "mtime_ns": mtime_ns,
        "label": label,
    }


def detail(row: Sequence[Any]) -> dict[str, Any]:
    """One ``DETAIL_SQL`` row: the entry and what the detail view adds."""
    relpath, step, location, note, error_type, started, next_attempt = row[17:24]
    return {
        **entry(row),
        "relpath": relpath,
        "step": step,
        "location": _redacted(location),
        "detail": _redacted(note),
        "error_type": error_type,
        "started": iso(started),
        "started_ts": started,
        "next_attempt": iso(next_attempt) if next_attempt and row[9] == "PENDING" else None,
    }
