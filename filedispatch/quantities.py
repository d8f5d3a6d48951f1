"""The quantities the config writes as text, parsed: sizes (``10KB``), rates (``10/s``),
bandwidths (``5MB/s``) and time windows (``Mon-Fri 22:00-06:00`` or a cron expression), with
when a window opens next.

A leaf: it imports nothing of filedispatch, so the config (which checks these at load) and
the delivery controls (which apply them) both build on it. Each parser raises ValueError
saying why the text is not what it should be.
"""

from __future__ import annotations

import dataclasses
import re
from datetime import datetime, timedelta, tzinfo

#: the largest size a rule can compare with (1 PiB)
MAX_SIZE = 1024**5
#: the longest a window may stay shut before its next opening is found (two weeks)
_HORIZON_DAYS = 15

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


def parse_size(value: int | str) -> int:
    """``10KB`` -> 10240: sizes take K, M, G, T (powers of 1024), with or without ``B``/``iB``."""
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string such as 10KB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    match = _SIZE_RE.match(str(value))
    if not match:
        raise ValueError(f"{value!r} is not a size (examples: 512, 10KB, 2GB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    size = number * 1024 ** "_KMGT".index(unit or "_")
    if not size <= MAX_SIZE:  # also refuses what the float could not hold (inf)
        raise ValueError("a size can be at most 1 PiB")
    return int(size)


_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_WINDOW_RE = re.compile(
    r"^\s*(?:(?P<days>[A-Za-z]{3}(?:\s*-\s*[A-Za-z]{3})?(?:\s*,\s*[A-Za-z]{3}"
    r"(?:\s*-\s*[A-Za-z]{3})?)*)\s+)?(?P<start>\d{1,2}:\d{2})\s*-\s*(?P<end>\d{1,2}:\d{2})\s*$"
)
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$", re.I)
_PERIODS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "h": 3600,
    "hour": 3600,
}


def parse_rate(text: str) -> tuple[float, float]:
    """``10/s``, ``600/min``, ``5000/h`` -> (files, per seconds). ValueError if not."""
    match = _RATE_RE.match(text)
    if not match or float(match.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a rate (examples: 10/s, 600/min, 5000/h)")
    return float(match.group(1)), float(_PERIODS[match.group(2).lower()])


def parse_bandwidth(text: str) -> int:
    """``5MB/s``, ``512KB/s`` -> bytes per second (units are powers of 1024)."""
    size, slash, per = text.rpartition("/")
    if not slash or per.strip().lower() not in ("s", "sec", "second"):
        raise ValueError(f"{text!r} is not a bandwidth (examples: 5MB/s, 512KB/s)")
    value = parse_size(size)
    if value < 1024:
        raise ValueError("a bandwidth is at least 1KB/s")
    return value


@dataclasses.dataclass(frozen=True, slots=True)
class Window:
    """When a destination may be sent to: a day-and-time range, or a cron expression whose
    matching minutes are open. Times are in ``tz`` (None: local time)."""

    text: str
    days: frozenset[int] = frozenset(range(7))  #: 0 is Monday
    start: int = 0  #: minutes after midnight
    length: int = 0  #: minutes; a range past midnight belongs to the day it starts on
    cron: str | None = None

    @classmethod
    def parse(cls, text: str) -> Window:
        """``"Mon-Fri 22:00-06:00"``, ``"Sat,Sun 00:00-24:00"``, ``"08:00-18:00"``, or a cron
        expression (five fields: ``"* 22-23,0-5 * * 1-5"``). ValueError saying why not."""
        match = _WINDOW_RE.match(text)
        if match is None:
            if len(text.split()) == 5:
                from croniter import CroniterBadDateError, croniter

                if croniter.is_valid(text):
                    try:  # "0 0 31 2 *" is well formed, but February has no 31st
                        croniter(text).get_next(float)
                    except CroniterBadDateError:
                        raise ValueError(f"{text!r} never opens (no date matches it)") from None
                    return cls(text, cron=text)
            raise ValueError(
                f"{text!r} is not a window (examples: 'Mon-Fri 22:00-06:00', '08:00-18:00', "
                "or a cron expression such as '* 22-23,0-5 * * 1-5')"
            )
        start, end = _minutes(match.group("start")), _minutes(match.group("end"))
        length = (end - start) % (24 * 60) or 24 * 60
        days = _days(match.group("days")) if match.group("days") else frozenset(range(7))
        return cls(text, days, start, length)

    def opens(self, now: float, tz: tzinfo | None) -> float | None:
        """None when the window is open at ``now`` (seconds since 1970), else when it opens
        next."""
        t = datetime.fromtimestamp(now, tz)
        if self.cron is not None:
            return self._cron_opens(t)
        day0 = t.replace(hour=0, minute=0, second=0, microsecond=0)
        for back in (1, 0):  # a range that started yesterday may still run
            begin = _at(day0 - timedelta(days=back), self.start, tz)
            if begin.weekday() in self.days and begin <= t < begin + timedelta(minutes=self.length):
                return None
        for ahead in range(_HORIZON_DAYS):
            begin = _at(day0 + timedelta(days=ahead), self.start, tz)
            if begin > t and begin.weekday() in self.days:
                return begin.timestamp()
        return None  # no day named: refused at load, so not reached

    def _cron_opens(self, t: datetime) -> float | None:
        from croniter import croniter

        assert self.cron is not None
        minute = t.replace(second=0, microsecond=0)
        if croniter.match(self.cron, minute):
            return None
        return float(croniter(self.cron, minute).get_next(float))


def _minutes(hhmm: str) -> int:
    hours, minutes = (int(x) for x in hhmm.split(":"))
    if hours > 24 or minutes > 59 or (hours == 24 and minutes):
        raise ValueError(f"{hhmm} is not a time of day (00:00 to 24:00)")
    return hours * 60 + minutes


def _days(text: str) -> frozenset[int]:
    days: set[int] = set()
    for part in text.lower().replace(" ", "").split(","):
        first, _, last = part.partition("-")
        if first not in _DAYS or (last and last not in _DAYS):
            raise ValueError(f"{part!r} is not a day or a range of days (Mon, Tue ... Sun)")
        a, b = _DAYS.index(first), _DAYS.index(last or first)
        days.update(_DAYS.index(d) % 7 for d in (_DAYS * 2)[a : (b if b >= a else b + 7) + 1])
    return frozenset(days)


def _at(day: datetime, minutes: int, tz: tzinfo | None) -> datetime:
    """``day`` (a midnight) plus ``minutes`` of wall-clock time."""
    naive = day.replace(tzinfo=None) + timedelta(minutes=minutes)
    return naive.replace(tzinfo=tz) if tz is not None else naive
